//! The build log: every line goes to stdout at once (so `kubectl logs` follows the build) and
//! the last lines are kept, bounded, for the failure report.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Bytes of log kept for the report; the report itself is cut to fit its 4 KiB.
const TAIL_BYTES: usize = 8 * 1024;
/// Longest line kept whole; longer ones keep their start.
const LINE_BYTES: usize = 1024;

/// The last lines of the log, shared by the threads that forward output.
#[derive(Debug, Clone, Default)]
pub struct LogTail {
    inner: Arc<Mutex<Tail>>,
    /// Print lines to stdout too (off in unit tests, which the harness cannot capture here).
    echo: bool,
}

#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl LogTail {
    /// A log that is printed to stdout as it goes.
    pub fn stdout() -> Self {
        Self {
            echo: true,
            ..Self::default()
        }
    }

    /// Prints `line` to stdout (prefixed with `source`, if any) and keeps it.
    pub fn line(&self, source: &str, line: &str) {
        let line = line.trim_end_matches(['\r', '\n']);
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = if source.is_empty() {
                writeln!(out, "{line}")
            } else {
                writeln!(out, "{source}: {line}")
            };
        }
        let mut kept = line.to_owned();
        if kept.len() > LINE_BYTES {
            let mut end = LINE_BYTES;
            while !kept.is_char_boundary(end) {
                end -= 1;
            }
            kept.truncate(end);
            kept.push('…');
        }
        let mut tail = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        tail.bytes += kept.len() + 1;
        tail.lines.push_back(kept);
        while tail.bytes > TAIL_BYTES {
            match tail.lines.pop_front() {
                Some(old) => tail.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    /// The kept lines, oldest first, each ending in a newline.
    pub fn text(&self) -> String {
        let tail = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        tail.lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Forwards `reader` line by line on a thread, calling `inspect` on each line first.
    pub fn forward(
        &self,
        source: &'static str,
        reader: impl Read + Send + 'static,
        mut inspect: impl FnMut(&str) + Send + 'static,
    ) -> JoinHandle<()> {
        let tail = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            // Lines, not strings: a build may print invalid UTF-8.
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                inspect(&line);
                tail.line(source, &line);
                buf.clear();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_tail() {
        let tail = LogTail::default();
        for i in 0..5000 {
            tail.line("", &format!("line {i}"));
        }
        let text = tail.text();
        assert!(text.len() <= TAIL_BYTES, "{}", text.len());
        assert!(text.ends_with("line 4999\n"));
        tail.line("", &"x".repeat(5000));
        assert!(tail.text().ends_with("…\n"));
    }
}
