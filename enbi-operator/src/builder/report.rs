//! Writing a report: JSON in the termination message (the operator reads it from the Pod
//! status), bounded by its encoder (`BuildReport::encode`), and a copy in the log.

use std::path::Path;

use super::log::LogTail;

/// Writes the report `json` to `path` and the log. A report that cannot be written is logged:
/// the kubelet then falls back to the log's end (`FallbackToLogsOnError`).
pub fn write(json: &str, path: &Path, log: &LogTail) {
    log.line("enbi", &format!("report: {json}"));
    if let Err(e) = std::fs::write(path, json) {
        log.line(
            "enbi",
            &format!(
                "error: cannot write the report to {} ({e}); set --termination-log to a writable path",
                path.display()
            ),
        );
    }
}
