//! What the Nix output is, and how to read the image out of it.
//!
//! - an executable file: a `streamLayeredImage` script, run with its stdout read as the image;
//! - a regular file starting with a tar header or the gzip magic bytes: a Docker or OCI archive
//!   (`buildImage`, `buildLayeredImage`, `.tar` or `.tar.gz`), read directly;
//! - anything else (a directory, another file): not an image.
//!
//! The build container writes the bytes as they are into the image pipe ([`stream`]); the load
//! container recognises gzip by its magic bytes, not by a name, in archives and script output
//! alike, and decompresses it in the stream ([`decompressed`]).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use flate2::read::MultiGzDecoder;

use super::log::LogTail;
use super::process::wait_until;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Reading in large blocks keeps the pipe to containerd full.
const READ_BUFFER: usize = 1 << 20;

/// The kinds of image output enbi accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A script that writes the image archive to stdout.
    Stream(PathBuf),
    /// An image archive file, gzipped or not.
    Archive(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{path} is a directory, not an image: build a streamLayeredImage script or an image archive (buildLayeredImage, buildImage)"
    )]
    Directory { path: String },
    #[error(
        "{path} is neither an executable streamLayeredImage script nor a Docker/OCI image archive (.tar or .tar.gz)"
    )]
    OtherFile { path: String },
    #[error("cannot read the Nix output {path}: {error}")]
    Unreadable { path: String, error: io::Error },
    #[error("cannot run the image script {path}: {error}")]
    Spawn { path: String, error: io::Error },
    #[error("cannot write the image to the load container: {error}")]
    Write { error: io::Error },
}

/// Looks at the output at `path` (following the store's symlinks).
pub fn detect(path: &Path) -> Result<Output, OutputError> {
    let shown = path.display().to_string();
    let unreadable = |error| OutputError::Unreadable {
        path: shown.clone(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.is_dir() {
        return Err(OutputError::Directory { path: shown });
    }
    if !meta.is_file() {
        return Err(OutputError::OtherFile { path: shown });
    }
    if meta.permissions().mode() & 0o111 != 0 {
        return Ok(Output::Stream(path.to_owned()));
    }
    let mut head = Vec::with_capacity(512);
    File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(unreadable)?;
    if head.starts_with(&GZIP_MAGIC) || is_tar_header(&head) {
        Ok(Output::Archive(path.to_owned()))
    } else {
        Err(OutputError::OtherFile { path: shown })
    }
}

/// A ustar/GNU header ("ustar" at 257), or an old-style header with a valid checksum.
fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    block[..512]
        .try_into()
        .is_ok_and(super::archive::checksum_ok)
}

/// Pipe buffer for the image stream: 1 MiB (Linux's default maximum for unprivileged
/// processes) instead of 64 KiB makes 16 times fewer wake-ups between the processes.
const PIPE_BYTES: usize = 1 << 20;

/// Enlarges a pipe's buffer, if the kernel allows (a small pipe is only slower).
pub fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    let _ = rustix::pipe::fcntl_setpipe_size(pipe, PIPE_BYTES);
}

/// Writes the image of `output` into `pipe` until `deadline`: the script's stdout is the pipe
/// itself (no copy in between), an archive is copied (the kernel splices it). The script's
/// stderr goes to the log. Returns the script's exit status (`None` past the deadline).
pub fn stream(
    output: &Output,
    pipe: &File,
    deadline: Instant,
    log: &LogTail,
) -> Result<Option<ExitStatus>, OutputError> {
    match output {
        Output::Archive(path) => {
            let unreadable = |error| OutputError::Unreadable {
                path: path.display().to_string(),
                error,
            };
            let mut file = File::open(path).map_err(unreadable)?;
            io::copy(&mut file, &mut &*pipe).map_err(|error| OutputError::Write { error })?;
            Ok(Some(ExitStatus::from_raw(0)))
        }
        Output::Stream(path) => {
            let spawn = |error| OutputError::Spawn {
                path: path.display().to_string(),
                error,
            };
            let stdout = pipe.try_clone().map_err(spawn)?;
            let mut child = Command::new(path)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(spawn)?;
            let forward = child
                .stderr
                .take()
                .map(|stderr| log.forward("image script", stderr, |_| {}));
            let status = wait_until(&mut child, deadline).map_err(spawn)?;
            if let Some(f) = forward {
                let _ = f.join();
            }
            Ok(status)
        }
    }
}

/// The image stream as the loader reads it: gunzipped when it starts with gzip's magic bytes.
pub fn decompressed(raw: impl Read + Send + 'static) -> Box<dyn Read + Send> {
    let mut buffered = BufReader::with_capacity(READ_BUFFER, raw);
    let gzipped = buffered
        .fill_buf()
        .map(|head| head.starts_with(&GZIP_MAGIC))
        .unwrap_or(false);
    if gzipped {
        Box::new(BufReader::with_capacity(
            READ_BUFFER,
            MultiGzDecoder::new(buffered),
        ))
    } else {
        Box::new(buffered)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn tar_bytes() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(2);
        builder
            .append_data(&mut header, "manifest.json", &b"[]"[..])
            .expect("append");
        builder.into_inner().expect("tar")
    }

    #[test]
    fn detects_scripts_archives_and_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let script = file(d, "stream", b"#!/bin/sh\n", 0o555);
        assert_eq!(detect(&script).expect("script"), Output::Stream(script));
        let tar = file(d, "image.tar", &tar_bytes(), 0o444);
        assert_eq!(detect(&tar).expect("tar"), Output::Archive(tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes()).expect("gzip");
        // The name does not matter: the magic bytes do.
        let gz = file(d, "image", &gz.finish().expect("gzip"), 0o444);
        assert_eq!(detect(&gz).expect("gz"), Output::Archive(gz));
        let text = file(d, "readme.txt", &[b'x'; 600], 0o444);
        assert!(matches!(detect(&text), Err(OutputError::OtherFile { .. })));
        assert!(matches!(detect(d), Err(OutputError::Directory { .. })));
    }

    #[test]
    fn decompresses_gzip_in_the_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes()).expect("gzip");
        let path = file(
            dir.path(),
            "image.tar.gz",
            &gz.finish().expect("gzip"),
            0o444,
        );
        let mut bytes = Vec::new();
        decompressed(File::open(path).expect("opens"))
            .read_to_end(&mut bytes)
            .expect("reads");
        assert_eq!(bytes, tar_bytes());
    }
}
