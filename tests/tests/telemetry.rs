//! One trace per build, across the operator and a real builder run, and the Prometheus metrics.
//!
//! Both processes export over OTLP/gRPC to an in-process collector. The builder runs for real
//! (real Nix, a private containerd, the offline fixture flake) with the `TRACEPARENT` the
//! operator put in its Job; its report then ends the kwok builder Pod, so the operator records
//! the real result.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use enbi_core::crd::{NixBuild, NixBuildSpec, Phase};
use enbi_core::keys;
use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport};
use enbi_core::trace::TraceContext;
use enbi_tests::host::{Containerd, Fixture};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, build_namespace, eventually, finish_builder, jobs_for,
    require_cluster, set_node_images, wait_phase,
};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

const WAIT: Duration = Duration::from_secs(60);
const METRICS: &str = "127.0.0.1:18083";

/// Spans received so far by an in-process OTLP collector.
struct Collector {
    server: FakeCollectorServer,
    spans: Vec<ExportedSpan>,
}

impl Collector {
    async fn start() -> Self {
        let server = FakeCollectorServer::start()
            .await
            .expect("collector starts");
        Self {
            server,
            spans: vec![],
        }
    }

    /// OTLP settings for a process exporting here; a short batch delay keeps the tests quick.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.server.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    }

    /// Waits until the spans received satisfy `done`; returns all of them.
    async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&[ExportedSpan]) -> bool,
    ) -> Vec<ExportedSpan> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let new = self
                .server
                .exported_spans(1, Duration::from_millis(200))
                .await;
            self.spans.extend(new);
            if done(&self.spans) {
                return self.spans.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; spans so far: {:#?}",
                self.spans
                    .iter()
                    .map(|s| (&s.name, &s.trace_id))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// An attribute's value as the collector shows it (the protobuf value's debug form).
fn attr<'a>(span: &'a ExportedSpan, key: &str) -> &'a str {
    span.attributes.get(key).map_or("", String::as_str)
}

fn named<'a>(spans: &'a [ExportedSpan], trace: &str, name: &str) -> Vec<&'a ExportedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect()
}

fn one<'a>(spans: &'a [ExportedSpan], trace: &str, name: &str) -> &'a ExportedSpan {
    let found = named(spans, trace, name);
    assert_eq!(found.len(), 1, "one {name:?} span in trace {trace}");
    found[0]
}

fn status_code(span: &ExportedSpan) -> &str {
    span.status.as_ref().map_or("", |s| s.code.as_str())
}

fn system() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64-linux".into(),
        _ => "x86_64-linux".into(),
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// Runs the real builder Pod's containers (`enbi-operator build` and `load`) with `env`;
/// returns the report's text.
fn run_builder(
    containerd: &Containerd,
    fixture: &Fixture,
    package: &str,
    tag: &str,
    env: &[(&str, String)],
) -> String {
    let url = fixture.url();
    let system = system();
    enbi_tests::host::run_builder(
        &Operator::binary(),
        &containerd.socket(),
        &[
            "build",
            "--flake-url",
            &url,
            "--package-name",
            package,
            "--system",
            &system,
        ],
        &["load", "--image-tag", tag],
        env,
    )
    .report
}

/// `GET /metrics` of the operator, as text (`None` while it does not answer).
fn scrape() -> Option<String> {
    let mut stream = TcpStream::connect(METRICS).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.0 200").then_some(body)
}

/// The value of the sample whose line starts with `series` (name and labels), 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An operator exporting to `collector`, its builders in `builds`, logging `format`.
fn start_operator(
    name: &str,
    builds: &TestNamespace,
    collector: &Collector,
    format: &str,
) -> Operator {
    let mut env = collector.env();
    env.push(("ENBI_LOG_FORMAT", format.to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Operator::start_with_env(
        name,
        &[
            "--build-namespace",
            &builds.name,
            "--builder-image",
            "localhost/enbi:test",
            "--listen-address",
            METRICS,
            "--max-builds-per-node",
            "0",
        ],
        &env,
    )
}

async fn job_traceparent(client: &Client, build_ns: &str, build: &str) -> String {
    let job = eventually("the builder Job", WAIT, || async {
        jobs_for(client, build_ns, build).await.into_iter().next()
    })
    .await;
    let env = job
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec")
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    env.into_iter()
        .find(|e| e.name == "TRACEPARENT")
        .and_then(|e| e.value)
        .expect("the Job has TRACEPARENT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_spans_join_the_trace_they_are_given() {
    if !enbi_tests::host::tools() {
        return;
    }
    let mut collector = Collector::start().await;
    let containerd = Containerd::start();
    let fixture = Fixture::new();
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut env = collector.env();
    env.extend([
        ("TRACEPARENT", parent.to_owned()),
        ("ENBI_NODE_NAME", "node-a".to_owned()),
    ]);

    let report = run_builder(
        &containerd,
        &fixture,
        "stream",
        "fixture/stream:built",
        &env,
    );
    let BuildReport::Succeeded(image) = BuildReport::parse(&report).expect("report") else {
        panic!("build failed: {report}");
    };
    // Each container flushes its spans as it exits: its root span comes with its steps.
    let spans = collector
        .until("the builder's and the loader's spans", |s| {
            !named(s, trace, "builder").is_empty() && !named(s, trace, "loader").is_empty()
        })
        .await;
    let builder = one(&spans, trace, "builder");
    let loader = one(&spans, trace, "loader");
    for span in [builder, loader] {
        assert_eq!(
            span.parent_span_id, "b7ad6b7169203331",
            "{} is a child of the given span",
            span.name
        );
        assert_ne!(status_code(span), "STATUS_CODE_ERROR");
        assert!(
            attr(span, "enbi.node").contains("\"node-a\""),
            "{}",
            span.name
        );
    }
    for (span, key, value) in [
        (builder, "enbi.package", "\"stream\"".to_owned()),
        (builder, "enbi.system", format!("{:?}", system())),
        (builder, "enbi.flake_url", format!("{:?}", fixture.url())),
        (
            builder,
            "enbi.store_path",
            format!("{:?}", image.provenance.store_path),
        ),
        (loader, "enbi.image_digest", format!("{:?}", image.digest)),
        (
            loader,
            "enbi.image_size",
            format!("IntValue({})", image.size),
        ),
        (
            loader,
            "enbi.bytes_streamed",
            format!("IntValue({})", image.bytes_streamed),
        ),
    ] {
        assert!(
            attr(span, key).contains(&value),
            "{} {key}: {} should hold {value}",
            span.name,
            attr(span, key)
        );
    }
    let steps = |parent: &str| -> Vec<String> {
        spans
            .iter()
            .filter(|s| s.trace_id == trace && s.parent_span_id == parent)
            .map(|s| s.name.clone())
            .collect()
    };
    let (built, loaded) = (steps(&builder.span_id), steps(&loader.span_id));
    for step in ["evaluate", "build", "stream"] {
        assert!(
            built.iter().any(|s| s == step),
            "{step} under the builder: {built:?}"
        );
    }
    for step in ["import", "report"] {
        assert!(
            loaded.iter().any(|s| s == step),
            "{step} under the loader: {loaded:?}"
        );
    }

    // A failure marks the failing step and both containers' spans as errors, with the reason.
    let parent = "00-1bf7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01";
    let failed_trace = "1bf7651916cd43dd8448eb211c80319c";
    env.retain(|(k, _)| *k != "TRACEPARENT");
    env.push(("TRACEPARENT", parent.to_owned()));
    let report = run_builder(
        &containerd,
        &fixture,
        "not-an-image",
        "fixture/none:built",
        &env,
    );
    assert!(matches!(
        BuildReport::parse(&report),
        Ok(BuildReport::Failed(FailureReport {
            reason: FailureReason::NotAnImage,
            ..
        }))
    ));
    let spans = collector
        .until("the failed builder's and loader's spans", |s| {
            !named(s, failed_trace, "builder").is_empty()
                && !named(s, failed_trace, "loader").is_empty()
        })
        .await;
    for name in ["builder", "loader"] {
        let span = one(&spans, failed_trace, name);
        assert_eq!(status_code(span), "STATUS_CODE_ERROR", "{name}");
        let message = span
            .status
            .as_ref()
            .map(|s| s.message.clone())
            .unwrap_or_default();
        assert!(message.starts_with("NotAnImage"), "{name}: {message}");
    }
    // The build made a directory, not an image: the build step failed, nothing was streamed.
    assert_eq!(
        status_code(one(&spans, failed_trace, "build")),
        "STATUS_CODE_ERROR"
    );
    assert_ne!(
        status_code(one(&spans, failed_trace, "evaluate")),
        "STATUS_CODE_ERROR"
    );
    assert!(named(&spans, failed_trace, "import").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_triggered_build_is_one_trace_through_a_real_builder_and_moves_the_metrics() {
    let client = require_cluster!();
    if !enbi_tests::host::tools() {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let mut collector = Collector::start().await;
    let builds = build_namespace(&client, "otel-b").await;
    let operator = start_operator("otel", &builds, &collector, "text");
    let app = TestNamespace::opted_in(&client, "otel-app").await;
    let containerd = Containerd::start();
    let fixture = Fixture::new();
    let tag = "localhost/fixture/stream:built";
    set_node_images(&client, Some("localhost/enbi:test")).await;
    let before = eventually("the metrics endpoint", WAIT, || async { scrape() }).await;

    let pod = enbi_tests::kwok_pod(
        "app",
        tag,
        enbi_tests::build_annotations(&fixture.url(), tag, "stream"),
        Some(arch()),
    );
    Api::<Pod>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = eventually("the Pod watcher's NixBuild", WAIT, || async {
        nixbuilds
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .next()
    })
    .await;
    let name = build.name_any();
    let context = TraceContext::of(&build).expect("the NixBuild carries its trace context");
    let trace = context.trace_id_hex();
    let root_id: String = context.to_string()[36..52].to_owned();
    assert_eq!(
        job_traceparent(&client, &builds.name, &name).await,
        build.annotations()[keys::TRACEPARENT],
        "the builder joins the build's trace"
    );

    // The real builder, as the Job would run it, on the node the kwok Pod was given.
    let mut env = collector.env();
    env.push(("TRACEPARENT", context.to_string()));
    let report = run_builder(&containerd, &fixture, "stream", tag, &env);
    let BuildReport::Succeeded(image) = BuildReport::parse(&report).expect("report") else {
        panic!("build failed: {report}");
    };
    let node = finish_builder(&client, &builds.name, &name, 0, &report).await;
    let done = wait_phase(&client, &app.name, &name, Phase::Succeeded).await;
    assert_eq!(
        done.status.and_then(|s| s.image_digest),
        Some(image.digest.clone())
    );

    let spans = collector
        .until("the build's root span", |s| {
            !named(s, &trace, "nixbuild").is_empty()
        })
        .await;
    let root = one(&spans, &trace, "nixbuild");
    assert_eq!(root.span_id, root_id, "the root span has the stored ids");
    assert_eq!(root.parent_span_id, "", "a root");
    assert_eq!(status_code(root), "STATUS_CODE_OK");
    for (key, value) in [
        ("enbi.nixbuild", format!("{name:?}")),
        ("enbi.flake_url", format!("{:?}", fixture.url())),
        ("enbi.package", "\"stream\"".to_owned()),
        ("enbi.system", format!("{:?}", system())),
        ("enbi.node", format!("{node:?}")),
        ("enbi.image_digest", format!("{:?}", image.digest)),
        ("enbi.image_size", format!("IntValue({})", image.size)),
    ] {
        assert!(
            attr(root, key).contains(&value),
            "{key}: {}",
            attr(root, key)
        );
    }
    let reconciles = named(&spans, &trace, "reconcile");
    assert!(reconciles.len() >= 2, "reconciles: {}", reconciles.len());
    assert!(reconciles.iter().all(|s| s.parent_span_id == root_id));
    // The reconciles tell the build's history: the Job applied, then the result.
    assert!(
        reconciles
            .iter()
            .any(|s| attr(s, "enbi.job_applied").contains("BoolValue(true)"))
    );
    assert!(
        reconciles
            .iter()
            .any(|s| attr(s, "enbi.next_phase").contains("Succeeded")
                && attr(s, "enbi.reason").contains("ResultSuccess"))
    );
    // The builder Pod's two containers: both children of the build's root span.
    let builder = one(&spans, &trace, "builder");
    let loader = one(&spans, &trace, "loader");
    assert_eq!(builder.parent_span_id, root_id);
    assert_eq!(loader.parent_span_id, root_id);
    let parent_of = |name: &str| -> Vec<&str> {
        named(&spans, &trace, name)
            .iter()
            .map(|s| s.parent_span_id.as_str())
            .collect()
    };
    assert_eq!(parent_of("evaluate"), [builder.span_id.as_str()]);
    assert_eq!(parent_of("import"), [loader.span_id.as_str()]);
    assert!(
        root.start_time_unix_nano <= reconciles[0].start_time_unix_nano
            && root.end_time_unix_nano >= builder.end_time_unix_nano,
        "the root span covers the build"
    );
    assert!(
        operator.logs().contains(&format!("trace_id=\"{trace}\"")),
        "log lines of the build's reconciles name its trace"
    );
    // The Pod's own span links to the build's trace.
    let pod_span = spans
        .iter()
        .find(|s| s.name == "pod needs image" && attr(s, "k8s.pod.name").contains("\"app\""))
        .expect("the Pod watcher's span");
    assert_ne!(pod_span.trace_id, trace);
    assert!(
        pod_span
            .links
            .iter()
            .any(|l| l.trace_id == trace && l.span_id == root_id),
        "{:?}",
        pod_span.links
    );
    // Nothing of this build went to another trace.
    let name_attr = format!("{name:?}");
    assert!(
        spans
            .iter()
            .filter(|s| s.name == "reconcile" && attr(s, "enbi.nixbuild").contains(&name_attr))
            .all(|s| s.trace_id == trace)
    );

    let after = scrape().expect("metrics");
    for (series, moved) in [
        ("enbi_builds_started_total ", 1.0),
        ("enbi_pod_triggered_builds_total ", 1.0),
        (
            "enbi_builds_finished_total{result=\"succeeded\",reason=\"ResultSuccess\"} ",
            1.0,
        ),
        (
            "enbi_build_duration_seconds_count{result=\"succeeded\"} ",
            1.0,
        ),
    ] {
        assert_eq!(
            sample(&after, series) - sample(&before, series),
            moved,
            "{series}in:\n{after}"
        );
    }
    assert!(
        sample(&after, "enbi_reconciliations_total ")
            > sample(&before, "enbi_reconciliations_total ")
    );
    assert!(after.contains("enbi_builds_queued 0"), "{after}");
    assert!(
        !after.contains(tag) && !after.contains(&name),
        "no tags or names as labels"
    );
    set_node_images(&client, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_ends_its_trace_with_the_reason_after_an_operator_restart() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let mut collector = Collector::start().await;
    let builds = build_namespace(&client, "otel-restart-b").await;
    let mut first = start_operator("otel-restart", &builds, &collector, "text");
    let app = TestNamespace::new(&client, "otel-restart-app").await;
    set_node_images(&client, Some("localhost/enbi:test")).await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = NixBuild::new(
        "broken",
        NixBuildSpec {
            flake_url: "github:example/app".into(),
            package_name: "missing".into(),
            image_tag: "example.test/broken:v1".into(),
            system: system(),
            fetch_secret_ref: None,
            resources: None,
        },
    );
    nixbuilds
        .create(&PostParams::default(), &build)
        .await
        .expect("create");

    // A NixBuild made by a user gets its trace context from the operator.
    let traceparent = job_traceparent(&client, &builds.name, "broken").await;
    let stamped = nixbuilds.get("broken").await.expect("get");
    assert_eq!(stamped.annotations()[keys::TRACEPARENT], traceparent);
    let context = TraceContext::parse(&traceparent).expect("valid traceparent");
    let trace = context.trace_id_hex();
    collector
        .until("a reconcile span before the restart", |s| {
            !named(s, &trace, "reconcile").is_empty()
        })
        .await;
    first.kill();
    let restarted = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let second = start_operator("otel-restart-2", &builds, &collector, "json");
    let failure = BuildReport::Failed(FailureReport {
        reason: FailureReason::EvalFailed,
        message: "flake does not provide attribute 'packages.x86_64-linux.missing'".into(),
        log_tail: String::new(),
    })
    .encode();
    finish_builder(&client, &builds.name, "broken", 1, &failure).await;
    let failed = wait_phase(&client, &app.name, "broken", Phase::Failed).await;
    assert_eq!(
        failed.annotations()[keys::TRACEPARENT],
        traceparent,
        "the trace context is kept"
    );

    let spans = collector
        .until("the failed build's root span", |s| {
            !named(s, &trace, "nixbuild").is_empty()
        })
        .await;
    let root = one(&spans, &trace, "nixbuild");
    assert_eq!(status_code(root), "STATUS_CODE_ERROR");
    let message = root
        .status
        .as_ref()
        .map(|s| s.message.clone())
        .unwrap_or_default();
    assert!(message.starts_with("EvalFailed"), "{message}");
    assert!(attr(root, "enbi.failure_reason").contains("EvalFailed"));
    let reconciles = named(&spans, &trace, "reconcile");
    assert!(
        reconciles
            .iter()
            .any(|s| s.start_time_unix_nano < restarted)
    );
    assert!(
        reconciles
            .iter()
            .any(|s| s.start_time_unix_nano > restarted),
        "the restarted operator adds to the same trace"
    );
    let traced_json_line = second.logs().lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["span"]["trace_id"] == trace.as_str())
    });
    assert!(traced_json_line, "JSON log lines carry the trace id");
    let by_parent: BTreeMap<&str, usize> = reconciles.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.parent_span_id.as_str()).or_default() += 1;
        m
    });
    assert_eq!(
        by_parent.keys().copied().collect::<Vec<_>>(),
        [&traceparent[36..52]]
    );
    set_node_images(&client, None).await;
}

/// The same builder spans over OTLP/HTTP with protobuf bodies, received by a minimal
/// `/v1/traces` endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_spans_also_go_over_http_protobuf() {
    use axum::body::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    if !enbi_tests::host::tools() {
        return;
    }
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            for span in request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                let _ = sender.send(span.name.clone());
            }
            ""
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let containerd = Containerd::start();
    let fixture = Fixture::new();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        (
            "TRACEPARENT",
            "00-2bf7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01".into(),
        ),
    ];
    let report = run_builder(&containerd, &fixture, "stream", "fixture/http:built", &env);
    assert!(matches!(
        BuildReport::parse(&report),
        Ok(BuildReport::Succeeded(_))
    ));
    let mut names = vec![];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(names.iter().any(|n| n == "builder") && names.iter().any(|n| n == "loader")) {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(name)) => names.push(name),
            _ => panic!("no builder and loader spans over HTTP; got {names:?}"),
        }
    }
    for step in ["evaluate", "build", "stream", "import", "report"] {
        assert!(names.contains(&step.to_owned()), "{step} in {names:?}");
    }
}
