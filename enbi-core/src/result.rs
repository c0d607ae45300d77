//! The builder's report: what it built, or why it failed.
//!
//! The builder writes it as JSON to its container's termination message, which the kubelet caps
//! at 4 KiB and the operator reads from the Pod status: no endpoint, no volume. Encoding keeps
//! the report under the cap by trimming the log tail from its start (the end says why it failed);
//! parsing refuses anything larger or malformed with an error, never a panic.

use serde::{Deserialize, Serialize};

use crate::reason::FailureReason;

/// The kubelet's limit for a termination message.
pub const MAX_REPORT_BYTES: usize = 4096;

/// What the builder reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result")]
pub enum BuildReport {
    Succeeded(ImageReport),
    Failed(FailureReport),
}

/// A loaded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    /// The reference the image is stored under: `spec.imageTag` normalised
    /// (`reference::normalise`), as the kubelet's CRI looks it up.
    pub image_tag: String,
    /// Manifest digest, `sha256:<64 hex>`.
    pub digest: String,
    /// Image size in bytes, as containerd counts it.
    pub size: u64,
    pub store_path: String,
    /// Bytes piped from the Nix output into containerd (0 when the image was already present).
    pub bytes_streamed: u64,
    /// False when the same image was already present under the tag and nothing was imported.
    pub imported: bool,
    pub timings: Timings,
}

/// Milliseconds spent per step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timings {
    pub build_ms: u64,
    pub import_ms: u64,
    pub total_ms: u64,
}

/// A failed build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureReport {
    pub reason: FailureReason,
    pub message: String,
    /// Last lines of the build log.
    #[serde(default)]
    pub log_tail: String,
}

/// Why a report could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the builder's report is {0} bytes, over the {MAX_REPORT_BYTES}-byte limit")]
    Oversized(usize),
    #[error("the builder's report is not valid JSON ({error}); it began: {start}")]
    Malformed { error: String, start: String },
}

impl BuildReport {
    /// JSON of at most [`MAX_REPORT_BYTES`], cutting the start of the longest text field (the
    /// log tail, usually: its end says why the build failed) until it fits.
    pub fn encode(&self) -> String {
        let mut report = self.clone();
        loop {
            let json = serde_json::to_string(&report).unwrap_or_default();
            let excess = json.len().saturating_sub(MAX_REPORT_BYTES);
            if excess == 0 {
                return json;
            }
            let field = report.longest_text_mut();
            // Escaping makes JSON at least as long as the text, so cutting `excess` text bytes
            // (plus the marker's 3) removes at least `excess` JSON bytes.
            let cut = keep_end(field, field.len().saturating_sub(excess + 3));
            *field = if cut == *field { String::new() } else { cut };
        }
    }

    fn longest_text_mut(&mut self) -> &mut String {
        let fields: [&mut String; 2] = match self {
            BuildReport::Failed(f) => [&mut f.log_tail, &mut f.message],
            BuildReport::Succeeded(i) => [&mut i.store_path, &mut i.image_tag],
        };
        let [a, b] = fields;
        if a.len() >= b.len() { a } else { b }
    }

    /// Parses a termination message, refusing anything over the cap.
    pub fn parse(text: &str) -> Result<Self, ReportError> {
        if text.len() > MAX_REPORT_BYTES {
            return Err(ReportError::Oversized(text.len()));
        }
        serde_json::from_str(text.trim()).map_err(|e| ReportError::Malformed {
            error: e.to_string(),
            start: text.chars().take(200).collect(),
        })
    }
}

/// The last at most `max` bytes of `s`, on a character boundary, marked with `…` if cut.
fn keep_end(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn image() -> BuildReport {
        BuildReport::Succeeded(ImageReport {
            image_tag: "registry.example/app:v1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 112_199_680,
            store_path: "/nix/store/abc-app-stream".into(),
            bytes_streamed: 112_199_680,
            imported: true,
            timings: Timings {
                build_ms: 1,
                import_ms: 2,
                total_ms: 3,
            },
        })
    }

    fn failure(log_tail: String) -> BuildReport {
        BuildReport::Failed(FailureReport {
            reason: FailureReason::BuildFailed,
            message: "nix build exited with status 1".into(),
            log_tail,
        })
    }

    #[test]
    fn round_trips() {
        for r in [image(), failure("error: builder failed\n".into())] {
            assert_eq!(BuildReport::parse(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn wire_format_is_stable() {
        let json: serde_json::Value =
            serde_json::from_str(&failure("x".into()).encode()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"result": "Failed", "reason": "BuildFailed", "message": "nix build exited with status 1", "logTail": "x"})
        );
        let json: serde_json::Value = serde_json::from_str(&image().encode()).expect("json");
        assert_eq!(json["result"], "Succeeded");
        assert_eq!(json["timings"]["totalMs"], 3);
    }

    #[test]
    fn long_logs_keep_their_end() {
        let log = (0..2000).map(|i| format!("line {i}\n")).collect::<String>();
        let encoded = failure(log).encode();
        assert!(encoded.len() <= MAX_REPORT_BYTES);
        let BuildReport::Failed(f) = BuildReport::parse(&encoded).expect("parses") else {
            panic!("failure")
        };
        assert!(f.log_tail.starts_with('…') && f.log_tail.ends_with("line 1999\n"));
    }

    #[test]
    fn oversized_and_malformed_are_errors() {
        assert_eq!(
            BuildReport::parse(&"x".repeat(5000)),
            Err(ReportError::Oversized(5000))
        );
        let err = BuildReport::parse("Killed\n").expect_err("not json");
        assert!(err.to_string().contains("it began: Killed"), "{err}");
        assert!(BuildReport::parse(r#"{"result":"Succeeded"}"#).is_err());
        assert!(BuildReport::parse(r#"{"result":"Failed","reason":"Nope","message":""}"#).is_err());
    }

    proptest! {
        #[test]
        fn encoding_always_fits_and_parses(message in "\\PC{0,3000}", tail in "(\\PC|\n|\"|\\\\){0,6000}") {
            let r = BuildReport::Failed(FailureReport { reason: FailureReason::EvalFailed, message, log_tail: tail });
            let encoded = r.encode();
            prop_assert!(encoded.len() <= MAX_REPORT_BYTES);
            prop_assert!(BuildReport::parse(&encoded).is_ok());
        }

        #[test]
        fn parsing_never_panics(text in "\\PC{0,5000}") {
            let _ = BuildReport::parse(&text);
        }
    }
}
