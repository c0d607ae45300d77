//! What the builder Pod's two containers say: the build container's [`Handoff`] to the load
//! container, and the load container's [`BuildReport`] to the operator.
//!
//! The report is JSON in the load container's termination message, which the kubelet caps at
//! 4 KiB and the operator reads from the Pod status: no endpoint, no volume. Encoding keeps the
//! report under the cap by trimming the log tail from its start (the end says why it failed);
//! parsing refuses anything larger or malformed with an error, never a panic.
//!
//! The handoff comes from the container that runs the flake's code, so its parser trusts none of
//! it: bounded size, store paths that look like store paths, no control characters, and only the
//! failure reasons a build can have (a build cannot claim, say, a tag conflict).

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

/// Where an image came from, as the build container reported it: the flake as Nix locked it,
/// the derivation and its output. Shown in the NixBuild's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    /// The locked flake reference (with `rev` or `narHash`), as `nix flake metadata` gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_flake: Option<String>,
    /// The commit of a git or Mercurial flake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The NAR hash of the flake's source tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_hash: Option<String>,
    /// The derivation that was built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derivation: Option<String>,
    /// Its output: the image script or archive the image was read from.
    pub store_path: String,
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
    #[serde(flatten)]
    pub provenance: Provenance,
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

    /// The field to cut: the log tail or message of a failure, the locked flake URL (the only
    /// long field) of a success.
    fn longest_text_mut(&mut self) -> &mut String {
        fn longer<'a>(a: &'a mut String, b: &'a mut String) -> &'a mut String {
            if a.len() >= b.len() { a } else { b }
        }
        match self {
            BuildReport::Failed(f) => longer(&mut f.log_tail, &mut f.message),
            BuildReport::Succeeded(i) => match i.provenance.locked_flake.as_mut() {
                Some(flake) => longer(flake, &mut i.image_tag),
                None => &mut i.image_tag,
            },
        }
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

/// The build container's message to the load container: the first line of the image pipe,
/// followed by the image stream when the build succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result")]
pub enum Handoff {
    Built(Built),
    Failed(FailureReport),
}

/// A built image output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Built {
    #[serde(flatten)]
    pub provenance: Provenance,
    /// Milliseconds from the build container's start to its output.
    pub build_ms: u64,
}

/// Why a handoff was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("the build container's message is over {MAX_HANDOFF_BYTES} bytes")]
    Oversized,
    #[error("the build container's message is not valid: {0}")]
    Malformed(String),
}

impl Handoff {
    /// One line of JSON (serde_json escapes every newline inside strings).
    pub fn encode(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses the first line of the image pipe, which the flake's code could have written.
    pub fn parse(line: &[u8]) -> Result<Self, HandoffError> {
        if line.len() > MAX_HANDOFF_BYTES {
            return Err(HandoffError::Oversized);
        }
        let handoff: Handoff = serde_json::from_slice(line.trim_ascii())
            .map_err(|e| HandoffError::Malformed(e.to_string()))?;
        match handoff {
            Handoff::Built(built) => {
                let p = &built.provenance;
                let store_path = |what: &str, path: &str| {
                    is_store_path(path)
                        .then_some(())
                        .ok_or_else(|| HandoffError::Malformed(format!("{what} {path:?}")))
                };
                store_path("output", &p.store_path)?;
                if let Some(drv) = &p.derivation {
                    store_path("derivation", drv)?;
                }
                let texts = [&p.locked_flake, &p.revision, &p.nar_hash];
                if texts.into_iter().flatten().any(|t| !is_plain(t, 2048)) {
                    return Err(HandoffError::Malformed(
                        "a provenance field with control characters or over 2048 bytes".into(),
                    ));
                }
                Ok(Handoff::Built(built))
            }
            Handoff::Failed(mut failure) => {
                // Only what a build can fail with; anything else is the build's own failure.
                if !matches!(
                    failure.reason,
                    FailureReason::EvalFailed
                        | FailureReason::BuildFailed
                        | FailureReason::NotAnImage
                        | FailureReason::DeadlineExceeded
                ) {
                    failure.reason = FailureReason::BuildFailed;
                }
                Ok(Handoff::Failed(failure))
            }
        }
    }
}

/// The handoff's size limit: a failure's log tail fits, an image never travels in it.
pub const MAX_HANDOFF_BYTES: usize = 16 * 1024;

/// `/nix/store/<32 base-32 characters>-<name>`, as Nix names store paths.
pub fn is_store_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    let (hash, name) = rest.split_at_checked(32).unwrap_or(("", ""));
    hash.bytes()
        .all(|b| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eotu".contains(&b)))
        && hash.len() == 32
        && name.len() > 1
        && name.len() <= 212
        && name.starts_with('-')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

/// Printable text of at most `max` bytes.
fn is_plain(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
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

    const STORE_PATH: &str = "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkd-app-stream";

    fn image() -> BuildReport {
        BuildReport::Succeeded(ImageReport {
            image_tag: "registry.example/app:v1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 112_199_680,
            provenance: Provenance {
                store_path: STORE_PATH.into(),
                ..Default::default()
            },
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

    #[test]
    fn handoffs_round_trip_on_one_line() {
        let built = Handoff::Built(Built {
            provenance: Provenance {
                locked_flake: Some("git+https://example.org/app?rev=abc\nx".into()),
                revision: None,
                nar_hash: Some("sha256-bZsJIso1URwbhSoVqrjnrnTw30qQQx3ZriTo15rlkyw=".into()),
                derivation: Some(format!("{}.drv", &STORE_PATH)),
                store_path: STORE_PATH.into(),
            },
            build_ms: 7,
        });
        let line = built.encode();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        // A newline inside a field would be a control character: refused.
        assert!(Handoff::parse(line.as_bytes()).is_err());
        let Handoff::Built(mut b) = built else {
            unreachable!()
        };
        b.provenance.locked_flake = Some("git+https://example.org/app?rev=abc".into());
        let built = Handoff::Built(b);
        assert_eq!(Handoff::parse(built.encode().as_bytes()), Ok(built));
    }

    #[test]
    fn handoffs_from_the_flake_are_not_trusted() {
        let with_path = |path: &str| {
            format!(r#"{{"result":"Built","storePath":{path:?},"buildMs":1}}"#).into_bytes()
        };
        assert!(Handoff::parse(&with_path(STORE_PATH)).is_ok());
        for bad in [
            "/etc/passwd",
            "/nix/store/../../etc/passwd",
            "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkd",
            "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkd-a/../x",
            "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkE-app",
            "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkd-a b",
        ] {
            assert!(Handoff::parse(&with_path(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            Handoff::parse(&vec![b' '; MAX_HANDOFF_BYTES + 1]),
            Err(HandoffError::Oversized)
        );
        let claimed = br#"{"result":"Failed","reason":"TagConflict","message":"m"}"#;
        let Ok(Handoff::Failed(f)) = Handoff::parse(claimed) else {
            panic!("a failure")
        };
        assert_eq!(f.reason, FailureReason::BuildFailed);
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
            let _ = Handoff::parse(text.as_bytes());
        }
    }
}
