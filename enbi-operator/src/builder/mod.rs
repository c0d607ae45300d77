//! The two containers of a builder Pod, which share a FIFO (`pipe`) and nothing else.
//!
//! - `enbi-operator build` (`build`): locks, evaluates and builds
//!   `<flakeUrl>#packages.<system>.<packageName>` with nix (`nix`; whether Nix's sandbox is in
//!   effect is said first, `sandbox`), and writes what it built,
//!   then the image, into the pipe (`output`). It runs the flake's code, so it has no
//!   containerd socket and no API token; it alone gets the build's fetch credentials
//!   (`credentials`).
//! - `enbi-operator load` (`loader`): reads the pipe, checks the stream (`archive`), imports it
//!   into the node's containerd under the NixBuild's tag through containerd's API (`import`,
//!   `api`) and reports the result as JSON in its termination message (`report`). It runs only
//!   enbi's code.
//!
//! A release Job's one container runs `enbi-operator release` (`release`): it unpins and
//! removes a deleted NixBuild's image on its node, unless a container there uses it.
//!
//! Both are synchronous (child processes, with threads for the pipes), except the import, which
//! runs its containerd calls on a runtime of its own.

mod api;
mod archive;
mod build;
mod containerd;
mod credentials;
mod import;
mod loader;
mod log;
mod nix;
mod output;
mod pipe;
mod process;
mod release;
mod report;
mod sandbox;

use std::time::Duration;

use enbi_core::trace::TraceContext;
use opentelemetry::trace::Status;
use tracing::{Span, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use self::build::{BuildArgs, run as run_build};
pub use self::loader::{LoadArgs, run as run_load};
use self::log::LogTail;
pub use self::release::{ReleaseArgs, run as run_release};
use crate::telemetry;

/// Joins `span` to the build's trace (`TRACEPARENT`, set by the operator) and logs its id.
fn join_trace(span: &Span, log: &LogTail) {
    let parent = std::env::var("TRACEPARENT")
        .ok()
        .and_then(|v| TraceContext::parse(&v));
    telemetry::join(span, parent.as_ref());
    if let Some(trace) = parent {
        log.line("enbi", &format!("trace_id={}", trace.trace_id_hex()));
    }
}

/// Runs one step in a span of its own, marked as an error (with the error's text) if it fails.
fn step<T, E: std::fmt::Display>(
    name: &'static str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let span = info_span!("step", otel.name = name);
    let result = span.in_scope(f);
    if let Err(e) = &result {
        span.set_status(Status::error(e.to_string()));
    }
    result
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
