//! Waiting for child processes with a deadline, without async: poll `try_wait`, kill on expiry.

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits for `child` until `deadline`; past it, kills the child and returns `None`.
pub fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(pause);
        // Quick steps keep short commands quick; 50 ms keeps long waits cheap.
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
