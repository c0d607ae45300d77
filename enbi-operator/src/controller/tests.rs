//! The NixBuild controller's reconcile against a scripted API server (`crate::mock`).

use enbi_core::optin::PodBuildNamespaces;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

use super::*;
use crate::mock::{self, Exchange, store};
use crate::optin::OptIn;
use crate::pods::{self, PodWatcher};

const NS: &str = "apps";

/// A NixBuild just made, its finalizer already set (as the Pod watcher makes them).
fn new_build() -> NixBuild {
    serde_json::from_value(json!({
        "apiVersion": keys::API_VERSION, "kind": "NixBuild",
        "metadata": {"name": "app", "namespace": NS, "uid": "0b5e6a1c-build", "generation": 1,
            "finalizers": [keys::FINALIZER]},
        "spec": {"flakeUrl": "github:example/app", "packageName": "app.stream",
            "imageTag": "example.test/app:v1", "system": "x86_64-linux"},
    }))
    .expect("build")
}

fn ready_amd64_node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {keys::HOSTNAME_LABEL: name, keys::ARCH_LABEL: "amd64",
            keys::OS_LABEL: "linux"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("node")
}

/// A context over `client` with default settings, `nodes`, and no Jobs or Pods.
fn context(client: Client, nodes: Vec<Node>) -> Context {
    let nodes = store(nodes);
    let reporter = Context::reporter(Some("enbi-0".into()));
    let metrics = Arc::new(Metrics::new());
    let pods = PodWatcher::new(
        client.clone(),
        nodes.clone(),
        store([]),
        mpsc::unbounded().0,
        reporter.clone(),
        metrics.clone(),
        pods::Settings {
            opt_in: OptIn::new(
                client.clone(),
                PodBuildNamespaces::All,
                vec![],
                &Metrics::new(),
            ),
            actions: Default::default(),
            tracing: false,
        },
    );
    Context {
        client: client.clone(),
        builder: BuilderSettings::default(),
        machine: machine::Settings::default(),
        policy: policy::Policy::default(),
        capacity: capacity::Limits::default(),
        node_repel: vec![],
        builds: store([]),
        jobs: store([]),
        builder_pods: store([]),
        nodes,
        pods: Arc::new(pods),
        pod_stores: vec![],
        recorder: Recorder::new(client, reporter),
        metrics,
        health: Arc::default(),
        settings_fault: None,
        tracing: false,
        failures: Mutex::default(),
    }
}

#[tokio::test]
async fn a_new_build_applies_its_builder_job_then_its_status_then_says_so() {
    let build = new_build();
    let job = job::name(&build, 1);
    let builds_ns = BuilderSettings::default().namespace;
    let (client, server) = mock::client();
    // kube writes the query of a patch after `?` with a leading `&`.
    let apply = "&force=true&fieldManager=enbi-operator";
    let scenario = server.expect(vec![
        Exchange::patch(&format!(
            "/apis/batch/v1/namespaces/{builds_ns}/jobs/{job}?{apply}"
        ))
        .apply(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": job, "namespace": builds_ns, "labels": {
                keys::BUILD_NAME: "app", keys::BUILD_NAMESPACE: NS, keys::BUILD_UID: "0b5e6a1c-build",
                keys::ATTEMPT: "1",
            }},
        }))
        .echo(),
        Exchange::patch(&format!(
            "/apis/enbi.hrzn.ee/v1alpha1/namespaces/{NS}/nixbuilds/app/status?{apply}"
        ))
        .apply(json!({
            "apiVersion": keys::API_VERSION, "kind": "NixBuild",
            "status": {"phase": "Building", "attempts": 1, "buildJobName": job},
        }))
        .ok(&build),
        Exchange::post(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"))
            .includes(json!({
                "type": "Normal", "reason": "Scheduled", "action": "Reconcile",
                "note": format!("Attempt 1: builder Job {job} created; eligible nodes: n1"),
                "regarding": {"kind": "NixBuild", "namespace": NS, "name": "app"},
                "reportingController": keys::MANAGER,
            }))
            .created(),
    ]);
    let ctx = Arc::new(context(client, vec![ready_amd64_node("n1")]));
    let action = reconcile(Arc::new(build), ctx.clone())
        .await
        .expect("reconciled");
    assert_eq!(ctx.metrics.builds_started.get(), 1);
    drop(ctx);
    scenario.verify().await;
    assert_eq!(action, Action::await_change());
}
