//! Logs and traces for both commands.
//!
//! Logs go to stdout as text or JSON. Spans are exported over OTLP only when the standard
//! `OTEL_EXPORTER_OTLP_*` variables name an endpoint (protocol, service name and resource
//! attributes come from the standard variables too); otherwise nothing is exported and no
//! exporter exists. A build's spans join the trace its NixBuild names ([`TraceContext`]): its
//! root span is emitted once, with the stored ids, when the build finishes.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::SystemTime;

use enbi_core::trace::{self, TraceContext};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Instrumentation scope of enbi's spans.
const SCOPE: &str = "enbi";

/// The exporter, while it runs; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Sets up logging and, when configured, OTLP export. gRPC export needs a tokio runtime: call
/// this inside one and keep it alive until [`Telemetry::shutdown`].
pub fn init(format: LogFormat, service_name: &'static str) -> Telemetry {
    let env: HashMap<String, String> = std::env::vars().collect();
    let (provider, export_error) = if trace::export_enabled(&env) {
        match provider(service_name, &env) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let otel = provider.as_ref().map(|p| {
        global::set_tracer_provider(p.clone());
        // Only enbi's own spans: a build's trace shows enbi's steps, not library internals.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SCOPE))
            .with_filter(Targets::new().with_target("enbi_operator", LevelFilter::INFO))
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = match format {
        LogFormat::Text => fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => fmt::layer().json().with_span_list(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .init();
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "OTLP export is configured but cannot start; spans are not exported");
    }
    Telemetry { provider }
}

fn provider(
    service_name: &'static str,
    env: &HashMap<String, String>,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    // The builder reads endpoint, protocol and timeout from the OTEL_* variables itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder().build()?;
    let mut resource = Resource::builder();
    if !env.contains_key("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service_name);
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .with_id_generator(PresetIds)
        .build())
}

impl Telemetry {
    /// Whether spans are exported (and so builds get a trace context).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is still buffered; spans of a stopping process are not lost.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: flushing spans: {e}");
        }
    }
}

/// A fresh trace context for a new build.
pub fn new_context() -> TraceContext {
    TraceContext {
        trace_id: RandomIdGenerator::default().new_trace_id().to_bytes(),
        span_id: RandomIdGenerator::default().new_span_id().to_bytes(),
    }
}

/// The OpenTelemetry context whose parent is `cx`'s root span.
pub fn parent(cx: &TraceContext) -> Context {
    Context::new().with_remote_span_context(span_context(cx))
}

pub fn span_context(cx: &TraceContext) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(cx.trace_id),
        SpanId::from_bytes(cx.span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// Makes `span` a child of the build's root span and writes its ids into the span's
/// `trace_id`/`span_id` fields, so every log line inside it names the trace.
pub fn join(span: &tracing::Span, cx: Option<&TraceContext>) {
    if let Some(cx) = cx {
        // Fails only without an exporter (no layer): then there is no trace to join.
        let _ = span.set_parent(parent(cx));
    }
    record_ids(span);
}

/// Writes the span's OpenTelemetry ids into its `trace_id`/`span_id` fields (declared empty).
pub fn record_ids(span: &tracing::Span) {
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", ids.trace_id().to_string());
        span.record("span_id", ids.span_id().to_string());
    }
}

/// What the build's root span records when it ends.
#[derive(Debug)]
pub struct RootSpan<'a> {
    pub context: TraceContext,
    pub started: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// `Some(reason: message)` for a failed build.
    pub error: Option<&'a str>,
}

/// Emits the build's root span, `nixbuild`, with the ids stored on the NixBuild, from when the
/// build was created until now. A no-op without an exporter.
pub fn end_root_span(root: RootSpan<'_>) {
    let tracer = global::tracer(SCOPE);
    let mut span = PresetIds::with(&root.context, || {
        tracer
            .span_builder("nixbuild")
            .with_kind(SpanKind::Internal)
            .with_start_time(root.started)
            .with_attributes(root.attributes)
            .start_with_context(&tracer, &Context::new())
    });
    span.set_status(match root.error {
        Some(message) => Status::error(message.to_owned()),
        None => Status::Ok,
    });
    span.end();
}

/// Random ids, except for a root span started inside [`PresetIds::with`], which gets the ids
/// stored on its NixBuild: the SDK takes a span's ids only from its id generator.
#[derive(Debug)]
struct PresetIds;

thread_local! {
    static PRESET: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

impl PresetIds {
    fn with<T>(cx: &TraceContext, start: impl FnOnce() -> T) -> T {
        let ids = (
            TraceId::from_bytes(cx.trace_id),
            SpanId::from_bytes(cx.span_id),
        );
        PRESET.with(|p| p.set(Some(ids)));
        let span = start();
        PRESET.with(|p| p.set(None));
        span
    }
}

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET
            .with(|p| p.get())
            .map_or_else(|| RandomIdGenerator::default().new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        PRESET
            .with(|p| p.get())
            .map_or_else(|| RandomIdGenerator::default().new_span_id(), |(_, s)| s)
    }
}
