//! The operator against an apiserver without the WatchList feature gate (Kubernetes 1.33's
//! default), which refuses streaming lists: every watch falls back to lists in pages, the
//! operator becomes ready and builds; with the gate on again, a new operator streams.

use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, build_namespace, eventually, finish_builder, http_get,
    nixbuild_spec, require_cluster, restart_components, success_report, wait_phase,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{PostParams, WatchParams};
use kube::{Api, Client};

const WAIT: Duration = Duration::from_secs(60);
/// The resources the operator watches (the webhook's NixBuild cache aside).
const RESOURCES: [&str; 5] = ["nixbuilds", "jobs", "pods", "nodes", "namespaces"];
/// What the operator logs once per watch that falls back.
const FALLBACK_LOG: &str = "the apiserver refuses streaming lists";

/// The local cluster's apiserver restarted with `--feature-gates=<gates>`; dropped, restarted
/// as the environment says (without ENBI_APISERVER_FEATURE_GATES: with none), also when the
/// test fails.
struct ApiserverGates;

/// The apiserver and its clients in the control plane, killed together and started again by
/// `up` in order: a client that reconnects while the apiserver starts meets 403s until its RBAC
/// caches are filled, then backs off for up to a minute (client-go), and so would the builder
/// Pods. (An apiserver asked to stop, as `up` does when its flags change, also keeps its watches
/// open for 10 s until `up` kills it.)
const CONTROL_PLANE: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kwok-images",
];

impl ApiserverGates {
    fn set(gates: &str) -> Self {
        restart_components(&CONTROL_PLANE, &[("ENBI_APISERVER_FEATURE_GATES", gates)]);
        Self
    }
}

impl Drop for ApiserverGates {
    fn drop(&mut self) {
        restart_components(&CONTROL_PLANE, &[]);
    }
}

/// Whether the apiserver accepts a streaming list (a watch with `sendInitialEvents`).
async fn serves_streaming_lists(client: &Client, ns: &str) -> bool {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    match pods.watch(&WatchParams::streaming_lists(), "0").await {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.code == 422 => false,
        Err(e) => panic!("a streaming list: {e}"),
    }
}

/// The samples of `enbi_watch_list_mode` for `mode`, per resource, once every resource has one
/// (the operator is ready).
async fn watch_modes(port: u16, mode: &str) -> Vec<(String, f64)> {
    eventually(
        &format!("enbi_watch_list_mode of every watch on {port}"),
        WAIT,
        || async {
            let (_, metrics) = http_get(port, "/metrics")?;
            let value = |resource: &str, mode: &str| {
                let series =
                    format!("enbi_watch_list_mode{{resource=\"{resource}\",mode=\"{mode}\"}}");
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let modes: Vec<(String, f64)> = RESOURCES
                .iter()
                .map(|r| (r.to_string(), value(r, mode)))
                .collect();
            let counted = RESOURCES
                .iter()
                .all(|r| value(r, "streaming") + value(r, "paginated") > 0.0);
            counted.then_some(modes)
        },
    )
    .await
}

async fn ready(port: u16) {
    eventually(&format!("/readyz 200 on {port}"), WAIT, || async {
        http_get(port, "/readyz").filter(|(code, body)| *code == 200 && body == "ok")
    })
    .await;
}

#[tokio::test]
async fn without_watchlist_every_watch_lists_in_pages_and_builds_succeed() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "watchlist-b").await;
    let app = TestNamespace::new(&client, "watchlist-app").await;

    let gates = tokio::task::spawn_blocking(|| ApiserverGates::set("WatchList=false"))
        .await
        .expect("restart the apiserver");
    let client = eventually("the apiserver back", WAIT, enbi_tests::cluster).await;
    assert!(
        !serves_streaming_lists(&client, &app.name).await,
        "WatchList=false: the apiserver refuses streaming lists"
    );

    let operator = Operator::for_builds("watchlist-off", &builds.name, 18094, &[], &[]);
    ready(18094).await;
    for (resource, paginated) in watch_modes(18094, "paginated").await {
        assert!(paginated >= 1.0, "{resource} lists in pages: {paginated}");
    }
    for (resource, streaming) in watch_modes(18094, "streaming").await {
        assert_eq!(streaming, 0.0, "no {resource} watch streams");
    }
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let tag = "example.test/watchlist:1";
    api.create(
        &PostParams::default(),
        &NixBuild::new("paged", nixbuild_spec(tag)),
    )
    .await
    .expect("create");
    let node = finish_builder(&client, &builds.name, "paged", 0, &success_report(tag)).await;
    let done = wait_phase(&client, &app.name, "paged", Phase::Succeeded).await;
    assert_eq!(done.status.and_then(|s| s.build_node), Some(node));
    let paginated: f64 = watch_modes(18094, "paginated")
        .await
        .iter()
        .map(|(_, v)| v)
        .sum();
    let logs = operator.logs();
    let fallbacks = logs.lines().filter(|l| l.contains(FALLBACK_LOG)).count();
    assert_eq!(
        fallbacks as f64, paginated,
        "one log line per watch that fell back:\n{logs}"
    );
    drop(operator);

    tokio::task::spawn_blocking(move || drop(gates))
        .await
        .expect("restore the apiserver");
    let client = eventually("the apiserver back", WAIT, enbi_tests::cluster).await;
    // A suite run against a cluster whose apiserver has WatchList off keeps it off.
    let expected = if std::env::var("ENBI_APISERVER_FEATURE_GATES")
        .is_ok_and(|g| g.contains("WatchList=false"))
    {
        "paginated"
    } else {
        "streaming"
    };
    assert_eq!(
        serves_streaming_lists(&client, &app.name).await,
        expected == "streaming"
    );
    let operator = Operator::for_builds("watchlist-on", &builds.name, 18095, &[], &[]);
    ready(18095).await;
    for (resource, count) in watch_modes(18095, expected).await {
        assert!(count >= 1.0, "{resource} is {expected} again: {count}");
    }
    if expected == "streaming" {
        let logs = operator.logs();
        assert!(!logs.contains(FALLBACK_LOG), "no watch falls back:\n{logs}");
    }
}
