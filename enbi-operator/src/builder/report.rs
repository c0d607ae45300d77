//! Writing the report: JSON in the termination message (the operator reads it from the Pod
//! status), bounded by `BuildReport::encode`, and a copy in the log.

use std::path::Path;

use enbi_core::report::BuildReport;

use super::log::LogTail;

/// Writes `report` to `path` and the log. A report that cannot be written is logged: the
/// kubelet then falls back to the log's end (`FallbackToLogsOnError`).
pub fn write(report: &BuildReport, path: &Path, log: &LogTail) {
    let json = report.encode();
    log.line("enbi", &format!("report: {json}"));
    if let Err(e) = std::fs::write(path, &json) {
        log.line(
            "enbi",
            &format!(
                "error: cannot write the report to {} ({e}); set --termination-log to a writable path",
                path.display()
            ),
        );
    }
}
