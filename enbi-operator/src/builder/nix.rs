//! Evaluation (`nix eval` of the output's derivation) and `nix build` of it, their log streamed
//! and a failure classified.
//!
//! Nix logs to stderr; every line is forwarded to stdout (so `kubectl logs` shows the build)
//! and the end is kept for the report. Nix 2.8 has no `--print-out-paths`, so the output path
//! comes from `--json`. A failure is an evaluation error (bad flake URL, missing attribute,
//! fetch error: retrying the same spec cannot help) or a build error (a builder failed), told
//! apart by what nix printed.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use enbi_core::job::StoreMode;
use enbi_core::reason::FailureReason;

use super::log::LogTail;
use super::process::wait_until;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `nix` ({0}): the builder image must have nix on its PATH")]
    Spawn(std::io::Error),
    #[error("nix could not evaluate {installable}: {first_error}")]
    Eval {
        installable: String,
        first_error: String,
    },
    #[error("nix could not build {installable}: {first_error}")]
    Build {
        installable: String,
        first_error: String,
    },
    #[error(
        "nix ran past the build timeout; raise --build-timeout (ENBI_BUILD_TIMEOUT) or make the build faster"
    )]
    Timeout,
    #[error("nix succeeded but printed no derivation or output path: {0}")]
    NoOutput(String),
}

impl NixError {
    /// Nix's unexpected output, shortened for the report.
    fn no_output(printed: &str) -> Self {
        NixError::NoOutput(printed.chars().take(500).collect())
    }

    pub fn reason(&self) -> FailureReason {
        match self {
            NixError::Eval { .. } => FailureReason::EvalFailed,
            NixError::Timeout => FailureReason::DeadlineExceeded,
            NixError::Spawn(_) | NixError::Build { .. } | NixError::NoOutput(_) => {
                FailureReason::BuildFailed
            }
        }
    }
}

/// What the log said, as far as telling evaluation from build failures goes.
#[derive(Debug, Default)]
struct Verdict {
    first_error: Option<String>,
    building: bool,
    build_failed: bool,
    eval_failed: bool,
}

/// Nix's words for a failed derivation build.
const BUILD_FAILURES: &[&str] = &[
    "builder for '",
    "dependencies of derivation",
    "failed to build",
    "build of '",
    "hash mismatch in fixed-output derivation",
];
/// Nix's words for a failed evaluation or fetch.
const EVAL_FAILURES: &[&str] = &[
    "does not provide attribute",
    "error: getting status of",
    "cannot find flake",
    "unsupported flake",
    "is not a valid URL",
    "error: attribute '",
    "undefined variable",
    "syntax error",
    "while evaluating",
    "while fetching",
    "unable to download",
    "does not exist",
    "error: cannot ",
];

impl Verdict {
    fn see(&mut self, line: &str) {
        let line = line.trim();
        if line.starts_with("building '") {
            self.building = true;
        }
        if let Some(error) = line.strip_prefix("error:")
            && self.first_error.is_none()
        {
            self.first_error = Some(error.trim().to_owned());
        }
        if BUILD_FAILURES.iter().any(|p| line.contains(p)) {
            self.build_failed = true;
        } else if EVAL_FAILURES.iter().any(|p| line.contains(p)) {
            self.eval_failed = true;
        }
    }

    /// A failed derivation means a build failure even if evaluation warnings came first; an
    /// error before anything was built is an evaluation failure.
    fn is_build_failure(&self) -> bool {
        self.build_failed || (self.building && !self.eval_failed)
    }
}

/// How nix runs: with which store, and with what more in its environment (the fetch
/// credentials' settings).
#[derive(Debug, Clone)]
pub struct Nix {
    pub store: StoreMode,
    pub env: Vec<(String, String)>,
}

/// The flake as Nix locks it (`nix flake metadata --json`): the locked URL, which pins a
/// revision or a NAR hash, to evaluate and to report as the image's provenance.
pub fn lock(
    flake_url: &str,
    nix: &Nix,
    deadline: Instant,
    log: &LogTail,
) -> Result<Locked, NixError> {
    let json = run(
        &["flake", "metadata", "--json", flake_url],
        flake_url,
        nix,
        deadline,
        log,
    )?;
    parse_metadata(&json).ok_or_else(|| NixError::no_output(&json))
}

/// A locked flake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub url: String,
    pub revision: Option<String>,
    pub nar_hash: Option<String>,
}

fn parse_metadata(json: &str) -> Option<Locked> {
    let meta: serde_json::Value = serde_json::from_str(json).ok()?;
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    Some(Locked {
        url: text(meta.get("url"))?,
        revision: text(meta.get("revision")),
        nar_hash: text(meta.get("locked").and_then(|l| l.get("narHash"))),
    })
}

/// Evaluates `installable` to its derivation (`nix eval --raw <installable>.drvPath`): a
/// step of its own, so the trace shows evaluation apart from building.
pub fn evaluate(
    installable: &str,
    nix: &Nix,
    deadline: Instant,
    log: &LogTail,
) -> Result<String, NixError> {
    let attribute = format!("{installable}.drvPath");
    let drv = run(
        &["eval", "--raw", &attribute],
        installable,
        nix,
        deadline,
        log,
    )?;
    let drv = drv.trim();
    if drv.starts_with('/') && drv.ends_with(".drv") {
        Ok(drv.to_owned())
    } else {
        Err(NixError::no_output(drv))
    }
}

/// Builds the derivation `drv` of `installable` and returns its output path.
pub fn build(
    drv: &str,
    installable: &str,
    nix: &Nix,
    deadline: Instant,
    log: &LogTail,
) -> Result<PathBuf, NixError> {
    let outputs = drv_outputs(drv, nix_version().as_deref());
    let json = run(
        &[
            "build",
            "--json",
            "--no-link",
            "--print-build-logs",
            &outputs,
        ],
        installable,
        nix,
        deadline,
        log,
    )?;
    output_path(&json).ok_or_else(|| NixError::no_output(&json))
}

/// Copies `store_path` and its closure to the store `to` (`nix copy --to`).
pub fn copy(
    store_path: &str,
    to: &str,
    nix: &Nix,
    deadline: Instant,
    log: &LogTail,
) -> Result<(), NixError> {
    run(
        &["copy", "--to", to, store_path],
        store_path,
        nix,
        deadline,
        log,
    )
    .map(drop)
}

/// The installable naming the outputs of the derivation `drv`: `<drv>^*` since Nix 2.13 (a
/// bare `.drv` path now names the derivation file itself, which `nix build` merely prints),
/// the bare path before, when `^` did not exist; also when the version is unknown.
fn drv_outputs(drv: &str, version: Option<&str>) -> String {
    let at_least_2_13 = version
        .and_then(|v| {
            let mut parts = v.split(['.', 'p', 'r', '-', '+']);
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            Some((major, minor) >= (2, 13))
        })
        .unwrap_or(false);
    if at_least_2_13 {
        format!("{drv}^*")
    } else {
        drv.to_owned()
    }
}

/// Nix's version (`nix --version`: `nix (Nix) 2.26.3`), e.g. `2.26.3`.
fn nix_version() -> Option<String> {
    let out = Command::new("nix")
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last().map(str::to_owned)
}

/// Runs nix with `args` until `deadline`, its log forwarded, and returns its stdout; a failure
/// is classified by what nix printed.
fn run(
    args: &[&str],
    installable: &str,
    nix: &Nix,
    deadline: Instant,
    log: &LogTail,
) -> Result<String, NixError> {
    let mut command = Command::new("nix");
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match nix.store {
        StoreMode::NodeDaemon => command.env("NIX_REMOTE", "daemon"),
        StoreMode::Pod => command.env_remove("NIX_REMOTE"),
    };
    command.envs(nix.env.iter().map(|(k, v)| (k, v)));
    log.line("enbi", &format!("nix {}", args.join(" ")));
    let mut child = command.spawn().map_err(NixError::Spawn)?;
    let verdict = Arc::new(Mutex::new(Verdict::default()));
    let stderr = child.stderr.take().map(|stderr| {
        let verdict = verdict.clone();
        log.forward("", stderr, move |line| {
            verdict
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .see(line)
        })
    });
    let stdout = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        })
    });
    let status = wait_until(&mut child, deadline).map_err(NixError::Spawn)?;
    if let Some(t) = stderr {
        let _ = t.join();
    }
    let out = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let Some(status) = status else {
        return Err(NixError::Timeout);
    };
    if !status.success() {
        let verdict = verdict.lock().unwrap_or_else(PoisonError::into_inner);
        let first_error = verdict
            .first_error
            .clone()
            .unwrap_or_else(|| format!("nix {} exited with {status}", args[0]));
        let installable = installable.to_owned();
        return Err(if verdict.is_build_failure() {
            NixError::Build {
                installable,
                first_error,
            }
        } else {
            NixError::Eval {
                installable,
                first_error,
            }
        });
    }
    Ok(out)
}

/// The `out` output (or the only one) from `nix build --json`.
fn output_path(json: &str) -> Option<PathBuf> {
    let built: serde_json::Value = serde_json::from_str(json).ok()?;
    let outputs = built.as_array()?.first()?.get("outputs")?.as_object()?;
    let path = outputs.get("out").or_else(|| {
        (outputs.len() == 1)
            .then(|| outputs.values().next())
            .flatten()
    })?;
    path.as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(log: &str) -> Verdict {
        let mut v = Verdict::default();
        log.lines().for_each(|l| v.see(l));
        v
    }

    #[test]
    fn tells_evaluation_from_build_failures() {
        let missing = "error: flake 'path:/tmp/x' does not provide attribute 'packages.x86_64-linux.nope', 'legacyPackages.x86_64-linux.nope' or 'nope'";
        assert!(!verdict(missing).is_build_failure());
        assert_eq!(
            verdict(missing).first_error.as_deref(),
            missing.strip_prefix("error: ")
        );
        assert!(
            !verdict("error: getting status of '/nope': No such file or directory")
                .is_build_failure()
        );
        let failed = "building '/nix/store/abc-broken.drv'...\nerror: builder for '/nix/store/abc-broken.drv' failed with exit code 3;\n       last 1 log lines:";
        assert!(verdict(failed).is_build_failure());
        assert!(
            verdict(
                "building '/nix/store/a.drv'...\nerror: writing to file: No space left on device"
            )
            .is_build_failure()
        );
    }

    #[test]
    fn reads_the_locked_flake() {
        let json = r#"{"locked":{"narHash":"sha256-bZs=","rev":"8005","type":"git"},"revision":"8005","url":"git+file:///f?ref=master&rev=8005"}"#;
        assert_eq!(
            parse_metadata(json),
            Some(Locked {
                url: "git+file:///f?ref=master&rev=8005".into(),
                revision: Some("8005".into()),
                nar_hash: Some("sha256-bZs=".into()),
            })
        );
        assert_eq!(parse_metadata(r#"{"locked":{}}"#), None);
    }

    #[test]
    fn names_a_derivations_outputs_as_its_nix_version_reads_them() {
        let drv = "/nix/store/a-x.drv";
        assert_eq!(drv_outputs(drv, Some("2.26.3")), "/nix/store/a-x.drv^*");
        assert_eq!(drv_outputs(drv, Some("2.13.0")), "/nix/store/a-x.drv^*");
        assert_eq!(
            drv_outputs(drv, Some("2.31.0pre20250101_abc")),
            "/nix/store/a-x.drv^*"
        );
        assert_eq!(drv_outputs(drv, Some("3.0")), "/nix/store/a-x.drv^*");
        assert_eq!(drv_outputs(drv, Some("2.8.0")), drv);
        assert_eq!(drv_outputs(drv, None), drv);
        assert_eq!(drv_outputs(drv, Some("unknown")), drv);
    }

    #[test]
    fn reads_the_output_path() {
        let json = r#"[{"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/b-image"}}]"#;
        assert_eq!(output_path(json), Some(PathBuf::from("/nix/store/b-image")));
        let single = r#"[{"drvPath":"/nix/store/a.drv","outputs":{"bin":"/nix/store/c"}}]"#;
        assert_eq!(output_path(single), Some(PathBuf::from("/nix/store/c")));
        assert_eq!(output_path("[]"), None);
        assert_eq!(output_path("nope"), None);
    }
}
