//! `enbi-operator load`: the load container. It waits for the build container's handoff on the
//! image pipe, imports the image that follows into the node's containerd under the NixBuild's
//! tag, and writes the report. It trusts nothing it reads: the handoff is checked
//! (`Handoff::parse`), the stream must be a well-formed image archive of bounded size, and the
//! tag is the one the operator gave, never one named in the archive.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use enbi_core::defaults;
use enbi_core::reason::FailureReason;
use enbi_core::reference::normalise;
use enbi_core::report::{BuildReport, FailureReport, Handoff, ImageReport, Timings};
use enbi_core::validation::IMAGE_TAG;
use opentelemetry::trace::Status;
use tracing::field::Empty;
use tracing::info_span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::containerd::{ContainerdArgs, SocketError};
use super::import::{self, LoadError, Request};
use super::log::LogTail;
use super::pipe::{self, PipeError};
use super::{join_trace, millis, report, step};

/// Load the image the build container writes into the image pipe into the node's containerd
/// (a builder Pod's `load` container).
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Reference the image gets in containerd; stored normalised (`app:v1` becomes
    /// `docker.io/library/app:v1`), as the kubelet looks it up.
    #[arg(long, env = "ENBI_IMAGE_TAG")]
    pub image_tag: String,
    /// The FIFO the build container writes the image into.
    #[arg(long, env = "ENBI_IMAGE_PIPE", default_value = defaults::IMAGE_PIPE)]
    pub image_pipe: PathBuf,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Pin the image (`io.cri-containerd.pinned=pinned`) so the kubelet's image GC keeps it.
    #[arg(long, env = "ENBI_PIN")]
    pub pin: bool,
    /// Replace the tag if it names another image (otherwise: TagConflict).
    #[arg(long, env = "ENBI_ALLOW_OVERWRITE")]
    pub allow_overwrite: bool,
    /// Seconds to wait for the build container's result.
    #[arg(long, env = "ENBI_BUILD_TIMEOUT", default_value_t = defaults::BUILDER_BUILD_TIMEOUT_SECONDS)]
    pub build_timeout: u64,
    /// Seconds streaming, importing and tagging may take.
    #[arg(long, env = "ENBI_IMPORT_TIMEOUT", default_value_t = defaults::BUILDER_IMPORT_TIMEOUT_SECONDS)]
    pub import_timeout: u64,
    /// The largest image stream accepted, in bytes (uncompressed).
    #[arg(long, env = "ENBI_MAX_IMAGE_BYTES", default_value_t = 64 << 30)]
    pub max_image_bytes: u64,
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

/// Why loading failed.
#[derive(Debug, thiserror::Error)]
enum LoaderError {
    #[error("invalid image tag: {0}")]
    Invalid(String),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Pipe(#[from] PipeError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

impl LoaderError {
    fn reason(&self) -> FailureReason {
        match self {
            LoaderError::Invalid(_) => FailureReason::EvalFailed,
            LoaderError::Socket(_) => FailureReason::ImportFailed,
            LoaderError::Pipe(PipeError::NeverOpened) => FailureReason::DeadlineExceeded,
            // What the build container wrote, or failed to write.
            LoaderError::Pipe(_) => FailureReason::BuildFailed,
            LoaderError::Load(e) => e.reason(),
        }
    }
}

/// Loads the image and writes the report; the exit code says whether it succeeded.
pub fn run(args: LoadArgs) -> ExitCode {
    let log = LogTail::stdout();
    let started = Instant::now();
    let span = info_span!(
        "loader",
        enbi.image_tag = %args.image_tag,
        enbi.node = args.node_name.as_deref().unwrap_or_default(),
        enbi.image_digest = Empty,
        enbi.image_size = Empty,
        enbi.bytes_streamed = Empty,
        enbi.import_ms = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    join_trace(&span, &log);
    let result = span.in_scope(|| load(&args, &log, started));
    pipe::mark_exited(&args.image_pipe);
    let report = span.in_scope(|| match result {
        Ok(Ok(image)) => {
            // As i64: OpenTelemetry has no unsigned integers (a u64 would become a string).
            let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            span.record("enbi.image_digest", image.digest.as_str());
            span.record("enbi.image_size", int(image.size));
            span.record("enbi.bytes_streamed", int(image.bytes_streamed));
            span.record("enbi.import_ms", int(image.timings.import_ms));
            BuildReport::Succeeded(image)
        }
        Ok(Err(failure)) => {
            log.line("enbi", &format!("the build failed: {}", failure.message));
            span.set_status(Status::error(format!(
                "{}: {}",
                failure.reason.as_str(),
                failure.message
            )));
            BuildReport::Failed(failure)
        }
        Err(e) => {
            // The tail is taken first: the message is in the report already.
            let log_tail = log.text();
            log.line("enbi", &format!("error: {e}"));
            span.set_status(Status::error(format!("{}: {e}", e.reason().as_str())));
            BuildReport::Failed(FailureReport {
                reason: e.reason(),
                message: e.to_string(),
                log_tail,
            })
        }
    });
    span.in_scope(|| {
        info_span!("report")
            .in_scope(|| report::write(&report.encode(), &args.termination_log, &log));
    });
    match report {
        BuildReport::Succeeded(_) => ExitCode::SUCCESS,
        BuildReport::Failed(_) => ExitCode::FAILURE,
    }
}

/// The loaded image, the build container's failure, or the loader's own error.
fn load(
    args: &LoadArgs,
    log: &LogTail,
    started: Instant,
) -> Result<Result<ImageReport, FailureReport>, LoaderError> {
    // First, so the build container can connect at once.
    let pipe = pipe::open_reader(&args.image_pipe)?;
    IMAGE_TAG
        .check(&args.image_tag)
        .map_err(LoaderError::Invalid)?;
    let tag = normalise(&args.image_tag);
    let containerd = &args.containerd;
    // Before a long build: without containerd there is nowhere to put the image. Exiting now
    // also stops the build container (it watches the pipe).
    containerd.check_socket()?;
    let build_deadline = started + Duration::from_secs(args.build_timeout);
    let (handoff, stream) = pipe::read_handoff(pipe, build_deadline)?;
    let built = match handoff {
        Handoff::Built(built) => built,
        Handoff::Failed(failure) => return Ok(Err(failure)),
    };
    log.line(
        "enbi",
        &format!("the build container built {}", built.provenance.store_path),
    );
    let import_started = Instant::now();
    let loaded = step("import", || {
        import::load(
            containerd,
            &Request {
                tag: &tag,
                store_path: &built.provenance.store_path,
                source: built.provenance.locked_flake.as_deref(),
                revision: built.provenance.revision.as_deref(),
                pin: args.pin,
                allow_overwrite: args.allow_overwrite,
                timeout: Duration::from_secs(args.import_timeout),
                max_bytes: args.max_image_bytes,
            },
            Box::new(stream),
            log,
        )
    })?;
    Ok(Ok(ImageReport {
        image_tag: tag,
        digest: loaded.digest,
        size: loaded.size,
        provenance: built.provenance,
        bytes_streamed: loaded.bytes_streamed,
        imported: loaded.imported,
        timings: Timings {
            build_ms: built.build_ms,
            import_ms: millis(import_started.elapsed()),
            total_ms: millis(started.elapsed()),
        },
    }))
}
