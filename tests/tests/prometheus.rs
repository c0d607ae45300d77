//! A real Prometheus (`tests/tools/install` builds it) scrapes `enbi-operator run` on the local
//! cluster with the Timoni module's alerting rules loaded: the rules come from `timoni build`
//! of `timoni/` (the one copy of them), pass `promtool check rules`, load and evaluate, and the
//! alerts for a target that does not answer, a failing build and a Pod gated too long go
//! pending or firing, while those whose condition does not hold stay inactive. Every query of
//! the rules and of the Grafana dashboard (`docs/grafana-dashboard.json`) is valid PromQL and
//! names only metrics the operator exposes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, Webhook, build_annotations, build_namespace,
    eventually, finish_builder, http_get, is_gated, kwok_pod, nixbuild_spec, require_cluster,
    wait_phase,
};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// The repository's root (the tests crate is `tests/` in it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The directory `tests/tools/install` puts the pinned CLIs in (timoni, prometheus, promtool),
/// installing what is missing.
fn tools() -> PathBuf {
    let out = Command::new(root().join("tests/tools/install"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/tools/install");
    assert!(out.status.success(), "tests/tools/install failed");
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

/// What the module renders for monitoring: the rules file (the PrometheusRule's spec) and the
/// scrape job the rules select (the metrics Service's name and namespace).
struct Rendered {
    rules: PathBuf,
    job: String,
    namespace: String,
}

/// `timoni build` of the module with the PrometheusRule on and thresholds a test reaches in
/// seconds; the PrometheusRule's spec is written to `dir/rules.yaml`.
fn render(tools: &Path, dir: &Path) -> Rendered {
    let values = dir.join("values.cue");
    std::fs::write(
        &values,
        "values: monitoring: prometheusRule: {enabled: true, buildFailures: 1, gatedPodSeconds: 1}\n",
    )
    .expect("values");
    let out = Command::new(tools.join("timoni"))
        .args(["build", "enbi"])
        .arg(root().join("timoni"))
        .args(["-n", "enbi-system", "-f"])
        .arg(&values)
        .output()
        .expect("run timoni build");
    assert!(
        out.status.success(),
        "timoni build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect();
    let kind = |k: &'static str| objects.iter().filter(move |o| o["kind"] == k);
    let rule = kind("PrometheusRule").next().expect("a PrometheusRule");
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&rule["spec"]).expect("rules YAML"),
    )
    .expect("write rules");
    let service = kind("Service")
        .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
        .expect("the metrics Service");
    let field = |f: &str| service["metadata"][f].as_str().expect(f).to_owned();
    Rendered {
        rules,
        job: field("name"),
        namespace: field("namespace"),
    }
}

/// A port nothing listens on (bound, then closed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A Prometheus process, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on `dir`, scraping `targets` every second as the job `job` with the
    /// label `namespace` (as a ServiceMonitor of the module would), and evaluating `rules`
    /// every second.
    fn start(binary: &Path, dir: &Path, rendered: &Rendered, targets: &[String]) -> Self {
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [rendered.rules],
            "scrape_configs": [{
                "job_name": rendered.job,
                "static_configs": [{
                    "targets": targets,
                    "labels": {"namespace": rendered.namespace},
                }],
            }],
        });
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, serde_yaml::to_string(&config).expect("yaml")).expect("config");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start prometheus");
        Self { child, port, log }
    }

    /// `GET /api/v1/<path>`'s `data`, once Prometheus answers with success.
    fn api(&self, path: &str) -> Option<Value> {
        let (code, body) = http_get(self.port, &format!("/api/v1/{path}"))?;
        let json: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && json["status"] == "success").then(|| json["data"].clone())
    }

    /// The value of each series `query` returns, with its labels.
    fn query(&self, query: &str) -> Option<Vec<(Value, f64)>> {
        let data = self.api(&format!("query?query={}", encode(query)))?;
        data["result"]
            .as_array()?
            .iter()
            .map(|s| Some((s["metric"].clone(), s["value"][1].as_str()?.parse().ok()?)))
            .collect()
    }

    /// The single value of `query`, `None` until there is exactly one series.
    fn value(&self, query: &str) -> Option<f64> {
        match self.query(query)?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Active alerts as (alertname, instance label, state).
fn alerts(prometheus: &Prometheus) -> Option<Vec<(String, String, String)>> {
    let data = prometheus.api("alerts")?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    Some(
        data["alerts"]
            .as_array()?
            .iter()
            .map(|a| {
                (
                    text(&a["labels"]["alertname"]),
                    text(&a["labels"]["instance"]),
                    text(&a["state"]),
                )
            })
            .collect(),
    )
}

/// The metric names (`enbi_*`, without the `_total`, `_bucket`, `_sum` or `_count` of a sample)
/// that `query` names.
fn enbi_metrics(query: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = query;
    while let Some(at) = rest.find("enbi_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        names.push(base.to_owned());
    }
    names
}

/// The metrics README's Observability section lists (base names, as [`enbi_metrics`]).
fn readme_metrics() -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let names: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `enbi_"))
        .flat_map(|row| enbi_metrics(&format!("enbi_{}", row.split(" | ").next().unwrap_or(""))))
        .collect();
    assert!(names.len() >= 15, "README's metrics: {names:?}");
    names
}

/// The queries of the Grafana dashboard, with its variables set for this Prometheus.
fn dashboard_queries(rendered: &Rendered) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docs/grafana-dashboard.json"))
        .expect("docs/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(queries.len() >= 15, "the dashboard's queries: {queries:?}");
    queries
        .iter()
        .map(|q| {
            q.replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$namespace", &rendered.namespace)
                .replace("$job", &rendered.job)
        })
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_operator_and_evaluates_the_modules_alerts() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let tools = tools();
    let dir = tempfile::tempdir().expect("temporary directory");
    let rendered = render(&tools, dir.path());

    let check = Command::new(tools.join("promtool"))
        .args(["check", "rules"])
        .arg(&rendered.rules)
        .output()
        .expect("run promtool");
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let builds = build_namespace(&client, "prom-b").await;
    let app = TestNamespace::opted_in(&client, "prom-app").await;
    let webhook = Webhook::install(&client, &app.name, free_port()).await;
    let operator_port = free_port();
    let mut args: Vec<String> = [
        "--builder-image",
        "localhost/enbi:test",
        "--max-builds-per-node",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(webhook.operator_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = Operator::for_builds("prometheus", &builds.name, operator_port, &args, &[]);
    webhook.wait_ready(&client).await;
    let up = format!("127.0.0.1:{operator_port}");
    let down = format!("127.0.0.1:{}", free_port());
    let prometheus = Prometheus::start(
        &tools.join("prometheus"),
        dir.path(),
        &rendered,
        &[up.clone(), down.clone()],
    );
    let job = format!("job=\"{}\"", rendered.job);

    // The operator's series, scraped: every enbi_* metric of the README's list that exists
    // before anything happened, with the counters' series there from 0.
    let names = eventually("enbi_ready 1 in Prometheus", WAIT, || async {
        let ready = prometheus.value(&format!("enbi_ready{{{job}}}"));
        if ready != Some(1.0) {
            return None;
        }
        prometheus.query(&format!(
            "count by (__name__) ({{__name__=~\"enbi_.+\", {job}}})"
        ))
    })
    .await;
    let names: Vec<&str> = names
        .iter()
        .filter_map(|(m, _)| m["__name__"].as_str())
        .collect();
    for name in [
        "enbi_reconciliations_total",
        "enbi_builds_started_total",
        "enbi_jobs_finished_total",
        "enbi_gated_pods",
        "enbi_gated_pod_oldest_seconds",
        "enbi_waiting_pods",
        "enbi_image_node_pairs",
        "enbi_releases_pending",
        "enbi_watch_list_mode",
    ] {
        assert!(names.contains(&name), "{name} scraped: {names:?}");
    }
    let failed_builds =
        format!("enbi_jobs_finished_total{{{job}, purpose=\"build\", result=\"failed\"}}");
    assert_eq!(prometheus.value(&failed_builds), Some(0.0));
    assert_eq!(
        prometheus.value(&format!(
            "enbi_waiting_pods{{{job}, reason=\"SchedulingGated\"}}"
        )),
        Some(0.0)
    );

    // The rules: loaded from the module's PrometheusRule, all evaluated, all healthy.
    let rules = eventually("every rule evaluated", WAIT, || async {
        let data = prometheus.api("rules")?;
        let group = data["groups"]
            .as_array()?
            .iter()
            .find(|g| g["name"] == "enbi")?
            .clone();
        let rules = group["rules"].as_array()?.clone();
        rules
            .iter()
            .all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            })
            .then_some(rules)
    })
    .await;
    let mut alert_names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    alert_names.sort_unstable();
    assert_eq!(
        alert_names,
        [
            "EnbiBuildsFailing",
            "EnbiOperatorAbsent",
            "EnbiOperatorDown",
            "EnbiOperatorNotReady",
            "EnbiPodGatedTooLong",
            "EnbiReleaseIncomplete",
            "EnbiWebhookCertificateExpiring",
        ]
    );
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    // Provoked: a build whose builder fails, and a Pod the webhook gates.
    Api::<NixBuild>::namespaced(client.clone(), &app.name)
        .create(
            &PostParams::default(),
            &NixBuild::new("broken", nixbuild_spec("example.test/broken:1")),
        )
        .await
        .expect("create the NixBuild");
    let report = BuildReport::Failed(FailureReport {
        reason: FailureReason::EvalFailed,
        message: "flake github:example/app does not provide attribute packages.x86_64-linux.app"
            .into(),
        log_tail: String::new(),
    });
    finish_builder(&client, &builds.name, "broken", 1, &report.encode()).await;
    wait_phase(&client, &app.name, "broken", Phase::Failed).await;
    let tag = "example.test/gated:1";
    let pod = kwok_pod(
        "gated",
        tag,
        build_annotations("github:example/app", tag, "app"),
        Some("amd64"),
    );
    let created = Api::<Pod>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the Pod");
    assert!(is_gated(&created), "the webhook gates the Pod");

    eventually(
        "the failed build Job counted in Prometheus",
        WAIT,
        || async { (prometheus.value(&failed_builds)? == 1.0).then_some(()) },
    )
    .await;
    eventually("the gated Pod counted in Prometheus", WAIT, || async {
        let gated = prometheus.value(&format!("enbi_gated_pods{{{job}}}"))?;
        let waiting = prometheus.value(&format!(
            "enbi_waiting_pods{{{job}, reason=\"SchedulingGated\"}}"
        ))?;
        (gated == 1.0 && waiting == 1.0).then_some(())
    })
    .await;

    let active = eventually("the provoked alerts", WAIT, || async {
        let active = alerts(&prometheus)?;
        let state = |name: &str| {
            active
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, instance, state)| (instance.clone(), state.clone()))
        };
        // `for: 5m`: pending for the whole test.
        (state("EnbiOperatorDown") == Some((down.clone(), "pending".into()))
            && state("EnbiBuildsFailing").is_some_and(|(_, s)| s == "firing")
            && state("EnbiPodGatedTooLong").is_some_and(|(_, s)| s == "firing"))
        .then_some(active)
    })
    .await;
    for (name, instance, _) in &active {
        if name == "EnbiOperatorDown" {
            assert_eq!(instance, &down, "the operator that answers is not down");
        }
        assert!(
            ![
                "EnbiOperatorNotReady",
                "EnbiOperatorAbsent",
                "EnbiReleaseIncomplete",
                "EnbiWebhookCertificateExpiring",
            ]
            .contains(&name.as_str()),
            "{name} is active without its condition: {active:?}\n{}",
            prometheus.logs()
        );
    }

    // The webhook's certificate, made by the operator a moment ago for a year.
    let expiry = prometheus
        .value(&format!(
            "enbi_webhook_certificate_expiry_timestamp_seconds{{{job}}} - time()"
        ))
        .expect("the certificate's expiry scraped");
    assert!(
        (360.0 * 86400.0..=366.0 * 86400.0).contains(&expiry),
        "expires in {expiry} s"
    );

    // README's list of metrics has every metric the operator exposes; every query of the
    // rules and the dashboard is one Prometheus accepts and names only metrics of that list.
    let documented = readme_metrics();
    let (_, text) = http_get(operator_port, "/metrics").expect("/metrics");
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .filter(|n| n.starts_with("enbi_"))
    {
        assert!(
            documented.contains(name),
            "{name} is not in README's metrics"
        );
    }
    let rule_queries: Vec<String> = rules
        .iter()
        .filter_map(|r| r["query"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(rule_queries.len(), rules.len());
    for query in rule_queries.iter().chain(&dashboard_queries(&rendered)) {
        for name in enbi_metrics(query) {
            assert!(
                documented.contains(&name),
                "{name} in {query} is not in README's metrics"
            );
        }
        assert!(
            prometheus.query(query).is_some(),
            "Prometheus refuses the query {query}"
        );
    }

    // Leave no NixBuild behind with a finalizer that only a running operator removes.
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    nixbuilds
        .delete_collection(&Default::default(), &Default::default())
        .await
        .expect("delete the NixBuilds");
    eventually("the NixBuilds gone", WAIT, || async {
        let list = nixbuilds.list(&Default::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    drop(operator);
}
