//! The Pod watcher against a scripted API server (`crate::mock`): for each kind of Pod, the
//! exact requests it makes, in order.

use enbi_core::optin::PodBuildNamespaces;
use enbi_core::pod::findings::{self, Finding};
use futures::channel::mpsc;
use serde_json::{Value, json};

use super::*;
use crate::controller::Context;
use crate::mock::{self, Exchange, store};

const NS: &str = "apps";
const TAG: &str = "example.test/app:v1";
const POD: &str = "/api/v1/namespaces/apps/pods/p";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";
const NIXBUILDS: &str = "/apis/enbi.hrzn.ee/v1alpha1/namespaces/apps/nixbuilds";
const UID: &str = "0b5e6a1c-pod";
/// Another controller's gate, before enbi's: the patch must remove the second.
const OTHER_GATE: &str = "example.test/other";

/// A Pod `p` in `apps` asking for `TAG` (annotated with `annotations`): one container of
/// `TAG`, and the fields of `spec` added to its spec.
fn pod(annotations: Value, spec: Value, status: Value) -> Pod {
    let mut s =
        json!({"containers": [{"name": "app", "image": TAG, "imagePullPolicy": "IfNotPresent"}]});
    for (k, v) in spec.as_object().expect("object") {
        s[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": NS, "uid": UID, "annotations": annotations},
        "spec": s,
        "status": status,
    }))
    .expect("pod")
}

fn annotations() -> Value {
    json!({
        keys::POD_FLAKE_URL: "github:example/app",
        keys::POD_IMAGE_TAG: TAG,
        keys::POD_PACKAGE_NAME: "app.stream",
    })
}

/// The gates of a Pod the webhook gated (after another gate).
fn gates() -> Value {
    json!([{"name": OTHER_GATE}, {"name": keys::GATE}])
}

/// A Pod the webhook gated: not scheduled, so its system is annotated.
fn gated_pod() -> Pod {
    let mut a = annotations();
    a[keys::POD_SYSTEM] = json!("x86_64-linux");
    pod(a, json!({"schedulingGates": gates()}), json!({}))
}

/// A Pod on `n1` whose container waits for its image with `reason`.
fn waiting_pod(reason: &str) -> Pod {
    pod(
        annotations(),
        json!({"nodeName": "n1"}),
        json!({"containerStatuses": [{"name": "app", "ready": false, "restartCount": 0, "image": TAG,
            "imageID": "", "state": {"waiting": {"reason": reason}}}]}),
    )
}

/// The Pod as the watcher's cache holds it, and so as `handle` gets it.
fn cached(mut pod: Pod) -> Pod {
    strip(&mut pod);
    pod
}

/// What the Pod asks to build (as the core finds it).
fn request_of(pod: &Pod, nodes: &Store<Node>) -> BuildRequest {
    let arch = waiting::node_arch(pod, nodes);
    match findings::inspect(pod, arch.as_deref()).as_slice() {
        [Finding::Build(r)] => r.clone(),
        other => panic!("the Pod should ask for a build: {other:?}"),
    }
}

/// The NixBuild of `request` in `phase`, built on `n1` and loaded on `n2`.
fn build(request: &BuildRequest, phase: &str) -> NixBuild {
    serde_json::from_value(json!({
        "apiVersion": keys::API_VERSION, "kind": "NixBuild",
        "metadata": {"name": request.name, "namespace": NS, "uid": "0b5e6a1c-build"},
        "spec": request.spec,
        "status": {"phase": phase, "buildNode": "n1", "imageNodes": [
            {"node": "n2", "state": "Loaded", "since": "2026-01-01T00:00:00Z"},
        ]},
    }))
    .expect("build")
}

/// A Ready node of `arch`.
fn node(name: &str, arch: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {keys::HOSTNAME_LABEL: name, keys::ARCH_LABEL: arch}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("node")
}

/// `n1` and `n3` amd64, `n2` arm64: `n1` and `n2` hold the image (`build`).
fn nodes() -> Store<Node> {
    store([
        node("n1", "amd64"),
        node("n2", "arm64"),
        node("n3", "amd64"),
    ])
}

/// A Pod watcher over `client` with these caches, and what it wakes.
fn pod_watcher(
    client: Client,
    nodes: Store<Node>,
    builds: impl IntoIterator<Item = NixBuild>,
    actions: podactions::Settings,
) -> (PodWatcher, mpsc::UnboundedReceiver<ObjectRef<NixBuild>>) {
    let (trigger, woken) = mpsc::unbounded();
    let settings = Settings {
        opt_in: OptIn::new(
            client.clone(),
            PodBuildNamespaces::All,
            vec![],
            &Metrics::new(),
        ),
        actions,
        policy: enbi_core::policy::Policy::default(),
        tracing: false,
    };
    let watcher = PodWatcher::new(
        client,
        nodes,
        store(builds),
        trigger,
        Context::reporter(Some("enbi-0".into())),
        Arc::new(Metrics::new()),
        settings,
    );
    (watcher, woken)
}

fn narrowing(narrow: bool) -> podactions::Settings {
    podactions::Settings {
        recreate: false,
        narrow,
    }
}

/// The Event of `reason` published on the Pod, about `build`.
fn event(reason: &str, build: &str) -> Exchange {
    Exchange::post(EVENTS)
        .includes(event_body(reason, build))
        .created()
}

fn event_body(reason: &str, build: &str) -> Value {
    json!({
        "reason": reason,
        "type": "Normal",
        "action": "WatchPod",
        "regarding": {"kind": "Pod", "namespace": NS, "name": "p", "uid": UID},
        "related": {"apiVersion": keys::API_VERSION, "kind": "NixBuild", "namespace": NS, "name": build},
        "reportingController": keys::MANAGER,
        "reportingInstance": "enbi-0",
    })
}

/// The patch removing enbi's gate (the second), after a test that it is still there.
fn ungate_ops() -> Vec<Value> {
    vec![
        json!({"op": "test", "path": "/spec/schedulingGates/1/name", "value": keys::GATE}),
        json!({"op": "remove", "path": "/spec/schedulingGates/1"}),
    ]
}

/// The gated Pod as the apiserver has it: the cache strips its node selector.
fn gated_pod_in_full() -> Pod {
    let mut a = annotations();
    a[keys::POD_SYSTEM] = json!("x86_64-linux");
    pod(
        a,
        json!({"schedulingGates": gates(), "nodeSelector": {keys::ARCH_LABEL: "amd64"}}),
        json!({}),
    )
}

/// The operations narrowing the gated Pod to `n1`: of the holders, `n2` is arm64 and the Pod
/// selects amd64; `n3` is amd64 but has no image.
fn narrow_ops() -> Value {
    json!({"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": keys::HOSTNAME_LABEL, "operator": "In", "values": ["n1"]}]},
        ]},
    }}})
}

/// The NixBuilds the watcher woke so far.
fn woken(receiver: &mut mpsc::UnboundedReceiver<ObjectRef<NixBuild>>) -> Vec<ObjectRef<NixBuild>> {
    std::iter::from_fn(|| receiver.try_recv().ok()).collect()
}

#[tokio::test]
async fn a_gated_pod_whose_build_succeeded_is_ungated_and_wakes_the_build() {
    let nodes = nodes();
    let p = cached(gated_pod());
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    // Let go, it waits no more: no WaitingForBuild.
    let scenario = server.expect(vec![
        Exchange::patch(POD).json_patch(json!(ungate_ops())).ok(&p),
    ]);
    let (watcher, mut wake) = pod_watcher(
        client,
        nodes,
        [build(&request, "Succeeded")],
        narrowing(false),
    );
    watcher.handle(&p, None).await;
    drop(watcher);
    scenario.verify().await;
    assert_eq!(woken(&mut wake), [ObjectRef::new(&request.name).within(NS)]);
}

#[tokio::test]
async fn a_reconcile_that_looks_at_its_pods_does_not_wake_itself_again() {
    let nodes = nodes();
    let p = cached(gated_pod());
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        Exchange::patch(POD).json_patch(json!(ungate_ops())).ok(&p),
    ]);
    let (watcher, mut wake) = pod_watcher(
        client,
        nodes,
        [build(&request, "Succeeded")],
        narrowing(false),
    );
    watcher.handle(&p, Some(&request.name)).await;
    drop(watcher);
    scenario.verify().await;
    assert!(woken(&mut wake).is_empty(), "no reconcile loop");
}

#[tokio::test]
async fn narrowing_reads_the_pod_then_narrows_and_ungates_in_one_patch() {
    let nodes = nodes();
    let p = cached(gated_pod());
    let request = request_of(&p, &nodes);
    let mut ops = vec![narrow_ops()];
    ops.extend(ungate_ops());
    // The note names the nodes the Pod was narrowed to (n1), not every holder (n1, n2).
    let mut narrowed = event_body("NodeAffinityNarrowed", &request.name);
    narrowed["note"] = json!(format!(
        "Node affinity narrowed, as the scheduling gate went, to the nodes that hold the image \
         of NixBuild {} and that the Pod can run on (n1; --narrow-gated-pods).",
        request.name
    ));
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        Exchange::get(POD).ok(gated_pod_in_full()),
        Exchange::patch(POD).json_patch(json!(ops)).ok(&p),
        Exchange::post(EVENTS).includes(narrowed).created(),
    ]);
    let (watcher, _wake) = pod_watcher(
        client,
        nodes,
        [build(&request, "Succeeded")],
        narrowing(true),
    );
    watcher.handle(&p, None).await;
    drop(watcher);
    scenario.verify().await;
}

#[tokio::test]
async fn a_narrowing_the_apiserver_refuses_falls_back_to_the_plain_ungate() {
    let nodes = nodes();
    let p = cached(gated_pod());
    let request = request_of(&p, &nodes);
    let mut ops = vec![narrow_ops()];
    ops.extend(ungate_ops());
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        Exchange::get(POD).ok(gated_pod_in_full()),
        Exchange::patch(POD)
            .json_patch(json!(ops))
            .fails(422, "Invalid"),
        Exchange::patch(POD).json_patch(json!(ungate_ops())).ok(&p),
        // No NodeAffinityNarrowed.
    ]);
    let (watcher, _wake) = pod_watcher(
        client,
        nodes,
        [build(&request, "Succeeded")],
        narrowing(true),
    );
    watcher.handle(&p, None).await;
    drop(watcher);
    scenario.verify().await;
}

/// A ReplicaSet's Pod in back-off on `n1`, where the image now is.
fn backed_off_pod() -> Pod {
    let mut p = waiting_pod("ImagePullBackOff");
    p.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "0b5e6a1c-rs",
            "controller": true,
        }))
        .expect("owner"),
    ]);
    p
}

#[tokio::test]
async fn a_controlled_pod_in_back_off_where_the_image_is_is_deleted_for_its_uid() {
    let nodes = nodes();
    let p = cached(backed_off_pod());
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        Exchange::delete(POD)
            .body(json!({"preconditions": {"uid": UID}}))
            .ok(&p),
    ]);
    let settings = podactions::Settings {
        recreate: true,
        narrow: false,
    };
    let (watcher, mut wake) = pod_watcher(client, nodes, [build(&request, "Succeeded")], settings);
    watcher.handle(&p, None).await;
    drop(watcher);
    scenario.verify().await;
    assert_eq!(woken(&mut wake).len(), 1);
}

#[tokio::test]
async fn without_recreation_a_pod_in_back_off_is_left_to_the_kubelet() {
    let nodes = nodes();
    let p = cached(backed_off_pod());
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    let scenario = server.expect(vec![event("WaitingForBuild", &request.name)]);
    let (watcher, mut wake) = pod_watcher(
        client,
        nodes,
        [build(&request, "Succeeded")],
        narrowing(false),
    );
    watcher.handle(&p, None).await;
    drop(watcher);
    scenario.verify().await;
    assert_eq!(woken(&mut wake).len(), 1, "its node may still need a load");
}

/// The watcher reads the Pod's namespace (its fetch Secret) before it creates a NixBuild.
fn namespace_read() -> Exchange {
    Exchange::get(&format!("/api/v1/namespaces/{NS}")).ok(json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": NS},
    }))
}

/// The NixBuild the watcher creates for `request`, asked for by Pod `p` on `n1`.
fn new_build(request: &BuildRequest) -> Exchange {
    Exchange::post(NIXBUILDS).body(json!({
        "apiVersion": keys::API_VERSION,
        "kind": "NixBuild",
        "metadata": {
            "name": request.name,
            "namespace": NS,
            "finalizers": [keys::FINALIZER],
            "labels": {keys::CREATED_BY: "enbi-pod-watcher"},
            "annotations": {keys::REQUESTED_BY_POD: "p", keys::WANTED_ON_NODE: "n1"},
        },
        "spec": request.spec,
    }))
}

#[tokio::test]
async fn a_pod_whose_build_does_not_exist_creates_it_once() {
    let nodes = nodes();
    let p = cached(waiting_pod("ErrImagePull"));
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        namespace_read(),
        new_build(&request).created(),
        event("WaitingForBuild", &request.name),
        // The second look at the Pod, before the cache shows the NixBuild: nothing.
    ]);
    let (watcher, mut wake) = pod_watcher(client, nodes, [], narrowing(false));
    watcher.handle(&p, None).await;
    watcher.handle(&p, None).await;
    assert_eq!(watcher.metrics.pod_triggered_builds.get(), 1);
    drop(watcher);
    scenario.verify().await;
    assert!(woken(&mut wake).is_empty(), "nothing to load yet");
}

#[tokio::test]
async fn a_build_whose_creation_failed_is_asked_for_again() {
    let nodes = nodes();
    let p = cached(waiting_pod("ErrImagePull"));
    let request = request_of(&p, &nodes);
    let (client, server) = mock::client();
    let scenario = server.expect(vec![
        namespace_read(),
        new_build(&request).fails(500, "InternalError"),
        event("WaitingForBuild", &request.name),
        namespace_read(),
        new_build(&request).created(),
    ]);
    let (watcher, _wake) = pod_watcher(client, nodes, [], narrowing(false));
    watcher.handle(&p, None).await;
    watcher.handle(&p, None).await;
    assert_eq!(watcher.metrics.pod_triggered_builds.get(), 1);
    drop(watcher);
    scenario.verify().await;
}
