//! The image pipe: a FIFO in the `emptyDir` the build and load containers share.
//!
//! Whichever container starts first creates it. The load container opens the read end at its
//! start, without following links, and refuses anything but a FIFO: the build container could
//! have replaced it. The build container opens the write end at its start and holds it, so the
//! loader sees the stream end whenever the build container stops, however it stops; it also
//! watches the pipe, so that a build nobody will load stops as soon as the load container is
//! gone (or, if that happened before it connected, finds the loader's exit marker).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use enbi_core::report::{Handoff, HandoffError, MAX_HANDOFF_BYTES};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{CWD, FileType, Mode, mknodat};

use super::output::widen_pipe;

#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("cannot create or open the image pipe {path}: {error}")]
    Open { path: PathBuf, error: io::Error },
    #[error("{0} is not a FIFO: the build container replaced the image pipe")]
    NotAFifo(PathBuf),
    #[error("the build container said nothing before the build deadline")]
    NeverOpened,
    #[error("the load container exited before the build container connected; see its report")]
    LoaderExited,
    #[error(
        "the build container stopped without saying what it built (killed? out of memory?); see its log"
    )]
    NoHandoff,
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error("reading the image pipe failed: {0}")]
    Read(io::Error),
}

/// Creates the FIFO unless it exists, writable by the build container's user.
fn create(path: &Path) -> Result<(), PipeError> {
    let open_error = |error: io::Error| PipeError::Open {
        path: path.to_owned(),
        error,
    };
    match mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o666), 0) {
        // The umask narrowed the mode; the build container may run as another user.
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(open_error),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(open_error(e.into())),
    }
}

/// The marker the load container leaves when it exits: a build container still waiting for a
/// reader then stops instead of waiting for its deadline.
fn exited_marker(path: &Path) -> PathBuf {
    let mut marker = path.as_os_str().to_owned();
    marker.push(".loader-exited");
    PathBuf::from(marker)
}

/// The build container's end, once the load container has opened its own. Opening without
/// blocking and retrying lets it notice a loader that exited first.
pub fn open_writer(path: &Path, deadline: Instant) -> Result<File, PipeError> {
    create(path)?;
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(nonblocking())
            .open(path)
        {
            Ok(file) => {
                set_blocking(&file)?;
                widen_pipe(&file);
                return Ok(file);
            }
            // ENXIO: no reader yet.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
                if exited_marker(path).exists() {
                    return Err(PipeError::LoaderExited);
                }
                if Instant::now() >= deadline {
                    return Err(PipeError::NeverOpened);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => {
                return Err(PipeError::Open {
                    path: path.to_owned(),
                    error,
                });
            }
        }
    }
}

/// The load container's end, opened at once (so the build container can connect) and checked:
/// a FIFO, not a link or a file the build container put there. Read it with [`read_handoff`].
pub fn open_reader(path: &Path) -> Result<File, PipeError> {
    create(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nonblocking() | rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|error| PipeError::Open {
            path: path.to_owned(),
            error,
        })?;
    let is_fifo = file
        .metadata()
        .map_err(PipeError::Read)?
        .file_type()
        .is_fifo();
    if !is_fifo {
        return Err(PipeError::NotAFifo(path.to_owned()));
    }
    widen_pipe(&file);
    Ok(file)
}

/// Tells a build container that has not connected yet that no one will read (see
/// [`open_writer`]).
pub fn mark_exited(path: &Path) {
    let _ = std::fs::write(exited_marker(path), b"");
}

/// Waits until `deadline` for the build container's first line; the rest of the returned
/// reader is the image.
pub fn read_handoff(
    pipe: File,
    deadline: Instant,
) -> Result<(Handoff, BufReader<File>), PipeError> {
    // A FIFO read end polls readable once a writer wrote, or came and went; before that, a
    // read would see an end of file.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PipeError::NeverOpened);
        }
        let timeout = rustix::event::Timespec::try_from(left.min(Duration::from_secs(60)))
            .map_err(|e| PipeError::Read(io::Error::other(e)))?;
        let mut fds = [PollFd::new(&pipe, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(PipeError::Read(e.into())),
        }
    }
    set_blocking(&pipe)?;
    let mut reader = BufReader::with_capacity(1 << 20, pipe);
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_HANDOFF_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(PipeError::Read)?;
    if line.is_empty() {
        return Err(PipeError::NoHandoff);
    }
    Ok((Handoff::parse(&line)?, reader))
}

fn nonblocking() -> i32 {
    rustix::fs::OFlags::NONBLOCK.bits() as i32
}

fn set_blocking(file: &File) -> Result<(), PipeError> {
    let flags = rustix::fs::fcntl_getfl(file).map_err(|e| PipeError::Read(e.into()))?;
    rustix::fs::fcntl_setfl(file, flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| PipeError::Read(e.into()))
}

/// Calls `gone` if the pipe's reader goes away before [`Watch::stop`]: the load container
/// failed, so the build is for nothing.
#[derive(Debug)]
pub struct Watch {
    stop: rustix::fd::OwnedFd,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    pub fn start(pipe: &File, gone: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let pipe = pipe.try_clone()?;
        let (stop_read, stop) = rustix::pipe::pipe()?;
        let thread = std::thread::spawn(move || {
            let mut fds = [
                PollFd::new(&pipe, PollFlags::empty()),
                PollFd::new(&stop_read, PollFlags::IN),
            ];
            while poll(&mut fds, None).is_err() {}
            let stopped = !fds[1].revents().is_empty();
            if !stopped && fds[0].revents().contains(PollFlags::ERR) {
                gone();
            }
        });
        Ok(Watch { stop, thread })
    }

    /// Stops watching; the duplicate of the pipe the watch held is closed when this returns.
    pub fn stop(self) {
        let _ = rustix::io::write(self.stop.as_fd(), &[1]);
        let _ = self.thread.join();
    }
}
