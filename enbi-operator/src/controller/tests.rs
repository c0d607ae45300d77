//! The NixBuild controller's reconcile against a scripted API server (`crate::mock`).

use enbi_core::optin::PodBuildNamespaces;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
            policy: policy::Policy::default(),
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
        release_timeout: Some(Duration::from_secs(120)),
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

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// `new_build`, Succeeded on n1 and loaded on n2, then deleted.
fn deleted_build() -> NixBuild {
    let mut build = new_build();
    build.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    build.status = Some(serde_json::from_value(json!({
        "phase": "Succeeded", "imageDigest": DIGEST, "buildNode": "n1",
        "imageNodes": [{"node": "n2", "state": "Loaded", "since": "2026-12-01T00:00:00Z", "loads": 1}],
    })).expect("status"));
    build
}

#[tokio::test]
async fn a_deleted_build_releases_its_image_on_each_node_before_its_finalizer_goes() {
    let build = deleted_build();
    let builds_ns = BuilderSettings::default().namespace;
    let (client, server) = mock::client();
    let apply = "&force=true&fieldManager=enbi-operator";
    let release_job = |node: &str| {
        let name = job::release_name(&build, node);
        Exchange::patch(&format!(
            "/apis/batch/v1/namespaces/{builds_ns}/jobs/{name}?{apply}"
        ))
        .apply(json!({
            "metadata": {"name": name, "labels": {keys::RELEASE: "true", keys::BUILD_UID: "0b5e6a1c-build"}},
            "spec": {"template": {"spec": {"nodeName": node, "containers": [{"name": "release",
                "args": ["release", "--image-tag", "example.test/app:v1", "--image-digest", DIGEST,
                    "--containerd-address", "/run/containerd/containerd.sock",
                    "--containerd-namespace", "k8s.io"]}]}}},
        }))
        .echo()
    };
    let scenario = server.expect(vec![
        Exchange::get(&format!(
            "/apis/enbi.hrzn.ee/v1alpha1/namespaces/{NS}/nixbuilds/app"
        ))
        .ok(&build),
        release_job("n1"),
        release_job("n2"),
        Exchange::post(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"))
            .includes(json!({
                "type": "Normal", "reason": "Releasing",
                "note": "releasing image example.test/app:v1 on n1, n2",
            }))
            .created(),
    ]);
    let nodes = vec![ready_amd64_node("n1"), ready_amd64_node("n2")];
    let ctx = Arc::new(context(client, nodes));
    let action = reconcile(Arc::new(build), ctx.clone())
        .await
        .expect("reconciled");
    drop(ctx);
    scenario.verify().await;
    assert_ne!(
        action,
        Action::await_change(),
        "back at the timeout at the latest"
    );
}

#[tokio::test]
async fn a_stale_copy_of_a_released_build_starts_nothing() {
    let build = deleted_build();
    let (client, server) = mock::client();
    // The finalizer went (and the Jobs with it) since the cache read the NixBuild.
    let scenario = server.expect(vec![
        Exchange::get(&format!(
            "/apis/enbi.hrzn.ee/v1alpha1/namespaces/{NS}/nixbuilds/app"
        ))
        .fails(404, "NotFound"),
    ]);
    let nodes = vec![ready_amd64_node("n1"), ready_amd64_node("n2")];
    let ctx = Arc::new(context(client, nodes));
    let action = reconcile(Arc::new(build), ctx.clone())
        .await
        .expect("reconciled");
    drop(ctx);
    scenario.verify().await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn once_every_node_has_an_outcome_the_jobs_go_then_the_finalizer() {
    let build = deleted_build();
    let builds_ns = BuilderSettings::default().namespace;
    let settings = BuilderSettings::default();
    let plan = release::plan(&build, []).expect("a plan");
    let job = job::render_release(&build, &plan.target("n1").expect("n1"), 120, &settings);
    let name = job.name_any();
    let mut job: Job = serde_json::from_value(json!({
        "status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1},
    }))
    .map(|status: Job| Job {
        status: status.status,
        ..job
    })
    .expect("a job");
    job.metadata.namespace = Some(builds_ns.clone());
    let report = release::ReleaseReport {
        removed: vec!["example.test/app:v1".into()],
        ..Default::default()
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-x"), "namespace": builds_ns, "labels": {"job-name": name}},
        "spec": {"nodeName": "n1", "containers": []},
        "status": {"phase": "Succeeded", "containerStatuses": [{"name": "release", "ready": false,
            "restartCount": 0, "image": "", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "message": report.encode()}}}]},
    }))
    .expect("a pod");
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        Exchange::post(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"))
            .includes(json!({
                "type": "Normal", "reason": "Released",
                "note": "image example.test/app:v1 released: n1: removed (1 references); n2: node gone",
            }))
            .created(),
        Exchange::delete(&format!("/apis/batch/v1/namespaces/{builds_ns}/jobs/{name}"))
            .ok(json!({})),
        Exchange::patch(&format!(
            "/apis/enbi.hrzn.ee/v1alpha1/namespaces/{NS}/nixbuilds/app"
        ))
        .ok(&build),
    ]);
    // n2 has left the cluster.
    let mut ctx = context(client, vec![ready_amd64_node("n1")]);
    ctx.jobs = store([job]);
    ctx.builder_pods = store([pod]);
    let ctx = Arc::new(ctx);
    let action = reconcile(Arc::new(build), ctx.clone())
        .await
        .expect("reconciled");
    drop(ctx);
    scenario.verify().await;
    assert_eq!(action, Action::await_change());
}
