//! `enbi-operator build`: the builder that runs inside a build Job.
//!
//! It builds `<flakeUrl>#packages.<system>.<packageName>` with nix (`nix`), streams the output
//! into the node's containerd under the normalised image tag (`output`, `archive`, `load`,
//! `containerd`), and reports the result as JSON in the termination message (`report`). The
//! build is synchronous: child processes, with threads for the pipes.

mod archive;
mod containerd;
mod load;
mod log;
mod nix;
mod output;
mod process;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use enbi_core::crd::NixBuildSpec;
use enbi_core::reason::FailureReason;
use enbi_core::reference::normalise;
use enbi_core::result::{BuildReport, FailureReport, ImageReport, Timings};
use enbi_core::trace::TraceContext;
use garde::Validate;
use opentelemetry::trace::Status;
use tracing::field::Empty;
use tracing::info_span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use self::containerd::{Ctr, CtrError};
use self::load::{LoadError, Request};
use self::log::LogTail;
use self::nix::{NixError, Store};
use self::output::OutputError;
use crate::telemetry;

/// Build a flake's image and load it into the node's containerd (runs inside a build Job).
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Flake reference to build from, e.g. `git+https://host/repo?rev=<commit>`.
    #[arg(long, env = "ENBI_FLAKE_URL")]
    pub flake_url: String,
    /// Attribute below `packages.<system>`: a streamLayeredImage script or an image archive.
    #[arg(long, env = "ENBI_PACKAGE_NAME")]
    pub package_name: String,
    /// Nix system to build for, e.g. `x86_64-linux`.
    #[arg(long, env = "ENBI_SYSTEM")]
    pub system: String,
    /// Reference the image gets in containerd; stored normalised (`app:v1` becomes
    /// `docker.io/library/app:v1`), as the kubelet looks it up.
    #[arg(long, env = "ENBI_IMAGE_TAG")]
    pub image_tag: String,
    /// containerd's socket.
    #[arg(
        long,
        env = "ENBI_CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_address: PathBuf,
    /// containerd namespace of the kubelet's CRI.
    #[arg(long, env = "ENBI_CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub containerd_namespace: String,
    /// Snapshotter to unpack into: the one the CRI uses.
    #[arg(long, env = "ENBI_SNAPSHOTTER", default_value = "overlayfs")]
    pub snapshotter: String,
    /// Nix store: the Pod's own, or the node's daemon through its socket.
    #[arg(long, env = "ENBI_STORE", value_enum, default_value = "pod")]
    pub store: Store,
    /// Pin the image (`io.cri-containerd.pinned=pinned`) so the kubelet's image GC keeps it.
    #[arg(long, env = "ENBI_PIN")]
    pub pin: bool,
    /// Replace the tag if it names another image (otherwise: TagConflict).
    #[arg(long, env = "ENBI_ALLOW_OVERWRITE")]
    pub allow_overwrite: bool,
    /// Seconds `nix build` may take.
    #[arg(long, env = "ENBI_BUILD_TIMEOUT", default_value_t = 3000)]
    pub build_timeout: u64,
    /// Seconds streaming, importing and tagging may take.
    #[arg(long, env = "ENBI_IMPORT_TIMEOUT", default_value_t = 900)]
    pub import_timeout: u64,
    /// Node the build runs on, for the trace (the Job sets it from `spec.nodeName`).
    #[arg(long, env = "ENBI_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the JSON report goes (the container's termination message).
    #[arg(
        long,
        env = "ENBI_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid build input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Ctr(#[from] CtrError),
}

impl BuildError {
    pub fn reason(&self) -> FailureReason {
        match self {
            // The apiserver refuses such specs; one that gets here cannot build on retry.
            BuildError::Invalid(_) => FailureReason::EvalFailed,
            BuildError::Nix(e) => e.reason(),
            BuildError::Output(_) => FailureReason::NotAnImage,
            BuildError::Load(e) => e.reason(),
            BuildError::Ctr(_) => FailureReason::ImportFailed,
        }
    }

    /// The span status of a step or build that failed so: `Reason: message`.
    fn status(&self) -> Status {
        Status::error(format!("{}: {self}", self.reason().as_str()))
    }
}

/// Runs a build and writes its report; the exit code says whether it succeeded. With a
/// `TRACEPARENT` (set by the operator), its spans join the build's trace.
pub fn run(args: BuildArgs) -> ExitCode {
    let log = LogTail::stdout();
    let started = Instant::now();
    let span = info_span!(
        "builder",
        enbi.flake_url = %args.flake_url,
        enbi.package = %args.package_name,
        enbi.system = %args.system,
        enbi.image_tag = %args.image_tag,
        enbi.node = args.node_name.as_deref().unwrap_or_default(),
        enbi.image_digest = Empty,
        enbi.image_size = Empty,
        enbi.bytes_streamed = Empty,
        enbi.build_ms = Empty,
        enbi.import_ms = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = std::env::var("TRACEPARENT")
        .ok()
        .and_then(|v| TraceContext::parse(&v));
    telemetry::join(&span, parent.as_ref());
    if let Some(trace) = parent {
        log.line("enbi", &format!("trace_id={}", trace.trace_id_hex()));
    }
    let report = span.in_scope(|| match build(&args, &log, started) {
        Ok(image) => {
            span.record("enbi.image_digest", image.digest.as_str());
            // As i64: OpenTelemetry has no unsigned integers (a u64 would become a string).
            let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            span.record("enbi.image_size", int(image.size));
            span.record("enbi.bytes_streamed", int(image.bytes_streamed));
            span.record("enbi.build_ms", int(image.timings.build_ms));
            span.record("enbi.import_ms", int(image.timings.import_ms));
            BuildReport::Succeeded(image)
        }
        Err(e) => {
            // The tail is taken first: the message is in the report already.
            let log_tail = log.text();
            log.line("enbi", &format!("error: {e}"));
            span.set_status(e.status());
            BuildReport::Failed(FailureReport {
                reason: e.reason(),
                message: e.to_string(),
                log_tail,
            })
        }
    });
    span.in_scope(|| {
        info_span!("report").in_scope(|| report::write(&report, &args.termination_log, &log));
    });
    match report {
        BuildReport::Succeeded(_) => ExitCode::SUCCESS,
        BuildReport::Failed(_) => ExitCode::FAILURE,
    }
}

/// Runs one step of the build in a span of its own, marked as an error if it fails.
fn step<T>(name: &'static str, f: impl FnOnce() -> Result<T, BuildError>) -> Result<T, BuildError> {
    let span = info_span!("step", otel.name = name);
    let result = span.in_scope(f);
    if let Err(e) = &result {
        span.set_status(e.status());
    }
    result
}

fn build(args: &BuildArgs, log: &LogTail, started: Instant) -> Result<ImageReport, BuildError> {
    let spec = NixBuildSpec {
        flake_url: args.flake_url.clone(),
        package_name: args.package_name.clone(),
        image_tag: args.image_tag.clone(),
        system: args.system.clone(),
    };
    spec.validate()
        .map_err(|report| BuildError::Invalid(report.to_string().trim().replace('\n', "; ")))?;
    let tag = normalise(&spec.image_tag);
    let ctr = Ctr {
        address: args.containerd_address.clone(),
        namespace: args.containerd_namespace.clone(),
        snapshotter: args.snapshotter.clone(),
    };
    // Before a long build: without containerd there is nowhere to put the image.
    ctr.check_socket()?;

    let installable = spec.installable();
    let deadline = started + Duration::from_secs(args.build_timeout);
    let drv = step("evaluate", || {
        Ok(nix::evaluate(&installable, args.store, deadline, log)?)
    })?;
    let store_path = step("build", || {
        Ok(nix::build(&drv, &installable, args.store, deadline, log)?)
    })?;
    let build_ms = millis(started.elapsed());
    log.line("enbi", &format!("built {}", store_path.display()));
    let store_path_text = store_path.display().to_string();

    let import_started = Instant::now();
    let loaded = step("import", || {
        let output = output::detect(&store_path)?;
        Ok(load::load(
            &ctr,
            &Request {
                tag: &tag,
                store_path: &store_path_text,
                output: &output,
                pin: args.pin,
                allow_overwrite: args.allow_overwrite,
                timeout: Duration::from_secs(args.import_timeout),
            },
            log,
        )?)
    })?;
    Ok(ImageReport {
        image_tag: tag,
        digest: loaded.digest,
        size: loaded.size,
        store_path: store_path_text,
        bytes_streamed: loaded.bytes_streamed,
        imported: loaded.imported,
        timings: Timings {
            build_ms,
            import_ms: millis(import_started.elapsed()),
            total_ms: millis(started.elapsed()),
        },
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
