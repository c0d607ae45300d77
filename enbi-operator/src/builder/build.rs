//! `enbi-operator build`: the build container. It locks and evaluates the flake, builds the
//! image output, says what it built (or why it failed) on the image pipe's first line, then
//! writes the image into the pipe. It has no containerd socket and no API token: everything
//! here may run code of the flake's author.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use enbi_core::crd::NixBuildSpec;
use enbi_core::report::{Built, FailureReport, Handoff, Provenance};
use enbi_core::validation::{FLAKE_URL, PACKAGE_NAME, check_system};
use tracing::field::Empty;
use tracing::info_span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::log::LogTail;
use enbi_core::defaults;
use enbi_core::job::StoreMode;

use super::credentials;
use super::nix::{self, Nix, NixError};
use super::output::{self, OutputError};
use super::pipe::{self, Watch};
use super::sandbox;
use super::{join_trace, millis, step};

/// Build a flake's image output and write it into the image pipe (a builder Pod's `build`
/// container).
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
    /// Nix store: the Pod's own, or the node's daemon through its socket.
    #[arg(long, env = "ENBI_STORE", value_enum, default_value = "pod")]
    pub store: StoreMode,
    /// Seconds locking, evaluating and building may take.
    #[arg(long, env = "ENBI_BUILD_TIMEOUT", default_value_t = defaults::BUILDER_BUILD_TIMEOUT_SECONDS)]
    pub build_timeout: u64,
    /// The FIFO the load container reads the image from.
    #[arg(long, env = "ENBI_IMAGE_PIPE", default_value = defaults::IMAGE_PIPE)]
    pub image_pipe: PathBuf,
    /// Directory of the build's fetch credentials (the copy of its `spec.fetchSecretRef`).
    #[arg(long, env = "ENBI_FETCH_CREDENTIALS")]
    pub fetch_credentials: Option<PathBuf>,
    /// Binary caches to substitute from (Nix's extra-substituters).
    #[arg(long, env = "ENBI_SUBSTITUTERS", value_delimiter = ',')]
    pub substituters: Vec<String>,
    /// Their public keys (Nix's extra-trusted-public-keys).
    #[arg(long, env = "ENBI_TRUSTED_PUBLIC_KEYS", value_delimiter = ',')]
    pub trusted_public_keys: Vec<String>,
    /// Binary cache to copy the built image's closure to, after the image was handed over.
    #[arg(long, env = "ENBI_PUSH_TO")]
    pub push_to: Option<String>,
    /// Nix secret key file that signs what is pushed.
    #[arg(long, env = "ENBI_PUSH_SIGNING_KEY", requires = "push_to")]
    pub push_signing_key: Option<PathBuf>,
    /// Node the build runs on, for the trace (the Job sets it from `spec.nodeName`).
    #[arg(long, env = "ENBI_NODE_NAME")]
    pub node_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("invalid build input: {0}")]
    Invalid(String),
    #[error("cannot read the fetch credentials: {0}")]
    Credentials(std::io::Error),
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl BuildError {
    fn reason(&self) -> enbi_core::reason::FailureReason {
        use enbi_core::reason::FailureReason;
        match self {
            // The apiserver refuses such specs; one that gets here cannot build on retry.
            BuildError::Invalid(_) => FailureReason::EvalFailed,
            BuildError::Credentials(_) => FailureReason::FetchSecretUnusable,
            BuildError::Nix(e) => e.reason(),
            BuildError::Output(_) => FailureReason::NotAnImage,
        }
    }
}

/// Builds, hands the result to the load container and streams the image. Exits 0 when the
/// image (or the failure) was handed over, whatever the loader then decides: the loader's
/// report is the build's result.
pub fn run(args: BuildArgs) -> ExitCode {
    let log = LogTail::stdout();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.build_timeout);
    let span = info_span!(
        "builder",
        enbi.flake_url = %args.flake_url,
        enbi.package = %args.package_name,
        enbi.system = %args.system,
        enbi.node = args.node_name.as_deref().unwrap_or_default(),
        enbi.store_path = Empty,
        enbi.build_ms = Empty,
        enbi.sandbox = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    join_trace(&span, &log);
    let _entered = span.enter();

    // First, so the loader knows at once if this container dies, however it dies.
    let pipe = match pipe::open_writer(&args.image_pipe, deadline) {
        Ok(pipe) => pipe,
        Err(e) => {
            log.line("enbi", &format!("error: {e}"));
            span.set_status(opentelemetry::trace::Status::error(e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    let watch = Watch::start(&pipe, || {
        println!("enbi: the load container stopped reading the image pipe; stopping the build");
        std::process::exit(1);
    });

    let result = build(&args, deadline, &log);
    if let Ok(watch) = watch {
        watch.stop();
    }
    let (handoff, output) = match result {
        Ok((provenance, output)) => {
            span.record("enbi.store_path", provenance.store_path.as_str());
            let build_ms = millis(started.elapsed());
            span.record("enbi.build_ms", i64::try_from(build_ms).unwrap_or(i64::MAX));
            let built = Built {
                provenance,
                build_ms,
            };
            (Handoff::Built(built), Some(output))
        }
        Err(e) => {
            let log_tail = log.text();
            log.line("enbi", &format!("error: {e}"));
            span.set_status(opentelemetry::trace::Status::error(format!(
                "{}: {e}",
                e.reason().as_str()
            )));
            let failure = FailureReport {
                reason: e.reason(),
                message: e.to_string(),
                log_tail,
            };
            (Handoff::Failed(failure), None)
        }
    };
    match hand_over(&pipe, &handoff, output.as_ref(), deadline, &log) {
        Ok(()) => {
            if let (Some(to), Handoff::Built(built)) = (&args.push_to, &handoff) {
                push(&args, to, &built.provenance.store_path, deadline, &log);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            log.line("enbi", &format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Copies the closure of `store_path` to the binary cache `to`, signed with the key, if any.
/// The image is loaded by then: a failed push is logged, and the build stands.
fn push(args: &BuildArgs, to: &str, store_path: &str, deadline: Instant, log: &LogTail) {
    let to = match &args.push_signing_key {
        Some(key) => {
            let separator = if to.contains('?') { '&' } else { '?' };
            format!("{to}{separator}secret-key={}", key.display())
        }
        None => to.to_owned(),
    };
    let started = Instant::now();
    let pushed = step("push", || {
        nix::copy(store_path, &to, &nix_for(args, None), deadline, log)
    });
    match pushed {
        Ok(()) => log.line(
            "enbi",
            &format!(
                "pushed {store_path} and its closure to the binary cache in {} ms",
                millis(started.elapsed())
            ),
        ),
        Err(e) => log.line(
            "enbi",
            &format!("warning: pushing to the binary cache failed: {e}"),
        ),
    }
}

/// How nix runs: the image's `NIX_CONFIG`, extended with the caches and the fetch credentials.
fn nix_for(args: &BuildArgs, credentials: Option<&credentials::Credentials>) -> Nix {
    let list = |name: &str, values: &[String]| {
        (!values.is_empty()).then(|| format!("{name} = {}", values.join(" ")))
    };
    let settings: Vec<String> = std::env::var("NIX_CONFIG")
        .ok()
        .into_iter()
        .chain(list("extra-substituters", &args.substituters))
        .chain(list("extra-trusted-public-keys", &args.trusted_public_keys))
        // Builds push what they built right after nix found it missing in the cache: never
        // trust such an answer later (a daemon takes this only from its own configuration).
        .chain((!args.substituters.is_empty()).then(|| "narinfo-cache-negative-ttl = 0".to_owned()))
        .chain(credentials.iter().flat_map(|c| c.settings.clone()))
        .collect();
    let mut env: Vec<(String, String)> = credentials.map(|c| c.env.clone()).unwrap_or_default();
    if !settings.is_empty() {
        env.push(("NIX_CONFIG".to_owned(), settings.join("\n")));
    }
    Nix {
        store: args.store,
        env,
    }
}

fn build(
    args: &BuildArgs,
    deadline: Instant,
    log: &LogTail,
) -> Result<(Provenance, output::Output), BuildError> {
    let invalid = |field: &str, e: String| BuildError::Invalid(format!("{field} {e}"));
    FLAKE_URL
        .check(&args.flake_url)
        .map_err(|e| invalid("flakeUrl", e))?;
    PACKAGE_NAME
        .check(&args.package_name)
        .map_err(|e| invalid("packageName", e))?;
    check_system(&args.system).map_err(|e| invalid("system", e))?;

    let sandbox = sandbox::report(args.store, log);
    tracing::Span::current().record("enbi.sandbox", sandbox.as_str());
    // Kept until nix is done: dropping it removes the private copy.
    let credentials = args
        .fetch_credentials
        .as_deref()
        .map(credentials::prepare)
        .transpose()
        .map_err(BuildError::Credentials)?;
    if let Some(c) = &credentials {
        log.line("enbi", &format!("fetch credentials: {}", c.keys.join(", ")));
    }
    let nix = nix_for(args, credentials.as_ref());
    let (locked, drv) = step("evaluate", || {
        let locked = nix::lock(&args.flake_url, &nix, deadline, log)?;
        let spec = NixBuildSpec {
            flake_url: locked.url.clone(),
            package_name: args.package_name.clone(),
            system: args.system.clone(),
            image_tag: String::new(),
            fetch_secret_ref: None,
            resources: None,
        };
        let drv = nix::evaluate(&spec.installable(), &nix, deadline, log)?;
        Ok::<_, BuildError>((locked, drv))
    })?;
    // An output that is not an image fails the build step: nothing will be streamed.
    let (store_path, output) = step("build", || {
        let store_path = nix::build(&drv, &locked.url, &nix, deadline, log)?;
        log.line("enbi", &format!("built {}", store_path.display()));
        let output = output::detect(&store_path)?;
        Ok::<_, BuildError>((store_path, output))
    })?;
    Ok((
        Provenance {
            locked_flake: Some(locked.url),
            revision: locked.revision,
            nar_hash: locked.nar_hash,
            derivation: Some(drv),
            store_path: store_path.display().to_string(),
        },
        output,
    ))
}

#[derive(Debug, thiserror::Error)]
enum HandOverError {
    #[error("cannot write to the image pipe: {0}")]
    Pipe(std::io::Error),
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Writes the handoff line and, after a build, the image. A loader that stops reading (it
/// already holds this image, or it failed) is not an error here: its report says which.
fn hand_over(
    pipe: &std::fs::File,
    handoff: &Handoff,
    output: Option<&output::Output>,
    deadline: Instant,
    log: &LogTail,
) -> Result<(), HandOverError> {
    use std::io::Write;
    let broken = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
    match (&mut &*pipe).write_all(handoff.encode().as_bytes()) {
        Err(e) if broken(&e) => {
            log.line("enbi", "the load container needs no image");
            return Ok(());
        }
        Err(e) => return Err(HandOverError::Pipe(e)),
        Ok(()) => {}
    }
    let Some(output) = output else {
        return Ok(());
    };
    step("stream", || {
        match output::stream(output, pipe, deadline, log) {
            Ok(Some(status)) if !status.success() => log.line(
                "enbi",
                &format!("the image script exited with {status} (the load container checks what it wrote)"),
            ),
            Ok(None) => log.line("enbi", "the image script ran past the build deadline"),
            Ok(Some(_)) => {}
            Err(OutputError::Write { error }) if broken(&error) => {
                log.line("enbi", "the load container stopped reading the image");
            }
            Err(e) => return Err(HandOverError::from(e)),
        }
        Ok(())
    })
}
