//! The whole story with real components, on the local cluster's real node (`tests/cluster/up
//! --real-node`: a real kubelet on a real containerd, and a Nix daemon on the host):
//!
//! an annotated Pod whose image is missing gets `ErrImagePull` -> the operator's Pod watcher
//! creates one NixBuild -> a builder Job runs on the real node with the real builder
//! (`enbi-operator build` in an image made of this machine's binaries: this operator, nix, ctr),
//! which builds the offline fixture flake through the node's Nix daemon and streams the image
//! into the node's containerd -> the kubelet's next pull attempt finds it, and the Pod's real
//! container prints the fixture's message.
//!
//! With the admission webhook, the same Pod is gated at creation and runs without a failed
//! pull; without it, a Deployment's Pod in pull back-off is replaced once its image is loaded.
//!
//! On two real nodes, a Deployment with one Pod per node gets one build: through Spegel, the
//! second node pulls the image from the first; without a mirror, enbi loads it on the second
//! node itself, and again after it was removed there. A deleted NixBuild's image is released on
//! both nodes, except where a container still uses it.
//!
//! In the default store mode, `pod`, the Debian-built builder image (`images/builder/build-image`,
//! pushed to the local registry) builds the fixture flake, fetched over HTTP, in the Pod's own
//! store, and says whether Nix's sandbox was on.
//!
//! Without the real node the test fails in CI (`CI=true`; `tests/run` starts it) and elsewhere
//! prints a loud `SKIPPED` line and returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::keys;
use enbi_tests::host::{Fixture, NIX_CONFIG};
use enbi_tests::{OPERATOR_LOCK, Operator, TestNamespace, Webhook, build_namespace, eventually};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Secret};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const REAL_NODE: &str = "enbi-real-0";
const REAL_NODE_TAINT: &str = "enbi.test/real-node";
const BUILDER_IMAGE: &str = "localhost/enbi:e2e";
const MESSAGE: &str = "hello from the stream";

fn cluster_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cluster")
        .join(name)
}

/// Runs `tests/cluster/SCRIPT ARGS` and returns its stdout.
fn cluster_tool(script: &str, args: &[&str]) -> String {
    let out = Command::new(cluster_script(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tests/cluster/{script} runs: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `tests/cluster/real-node ARGS` and returns its stdout.
fn real_node(args: &[&str]) -> String {
    cluster_tool("real-node", args)
}

/// The KEY=VALUE lines a cluster script prints.
fn key_values(printed: &str) -> BTreeMap<String, String> {
    printed
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Whether the real node is Ready; fails in CI and says SKIPPED elsewhere when it is not.
async fn real_node_ready(client: &Client) -> bool {
    let node = Api::<Node>::all(client.clone()).get_opt(REAL_NODE).await;
    let ready = node
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .is_some_and(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
    if ready {
        return true;
    }
    enbi_tests::unavailable(
        "the real node",
        &format!(
            "no Ready node {REAL_NODE} ({node:?}); start it with tests/cluster/up --real-node (root)"
        ),
    )
}

/// The fixture flake (tests/fixtures/images next to a static busybox) added to the host's Nix
/// store through its daemon: the builder Pod sees the node's store, so `path:<store path>`
/// is a flake URL it can read. Salted with `tag`'s own tag, so that its images are new to every
/// node, as a fresh build's are: a kubelet (1.35+) that once pulled the same image ID under
/// another name (e.g. another test's, through Spegel) verifies the pull of any new name, which
/// no registry answers here (troubleshooting: "The kubelet insists on pulling an image it
/// already has").
fn fixture_for(tag: &str) -> String {
    let salt = tag.rsplit(':').next().expect("a tag");
    flake_in_store(&Fixture::salted(salt).url())
}

/// `flake_url` added to the host's Nix store through its daemon, as `path:<store path>`.
fn flake_in_store(flake_url: &str) -> String {
    let out = host_nix("nix", &["flake", "archive", "--json", flake_url])
        .unwrap_or_else(|e| panic!("nix flake archive: {e}"));
    let json: serde_json::Value = serde_json::from_str(&out).expect("nix's json");
    let path = json["path"].as_str().expect("a store path").to_owned();
    format!("path:{path}")
}

/// Image names in the real node's containerd (`k8s.io`, the kubelet's namespace).
fn node_images(socket: &str) -> Vec<String> {
    let out = Command::new("ctr")
        .args(["--address", socket, "-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .expect("ctr runs");
    assert!(out.status.success(), "ctr images ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn waiting_reason(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

#[tokio::test]
async fn a_pod_with_a_missing_image_gets_it_built_on_the_real_node_and_runs() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let socket = socket(REAL_NODE);
    // A tag of this run only, so that the image is missing at first.
    let tag = fresh_tag("e2e-stream");
    let flake_url = fixture_for(&tag);

    // Builds go to a real node (tolerated; the fake ones are repelled), the one the Pod is on.
    let builds = build_namespace(&client, "e2e-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    let operator = start_operator("e2e", &builds.name, &repel);

    let app = TestNamespace::opted_in(&client, "e2e-app").await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app", "annotations": {
            "enbi.hrzn.ee/nixbuild-flakeUrl": flake_url,
            "enbi.hrzn.ee/nixbuild-imageTag": tag,
            "enbi.hrzn.ee/nixbuild-packageName": "stream",
        }},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": REAL_NODE},
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists"}],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": tag}],
        },
    }))
    .expect("pod");
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the Pod");

    // The kubelet cannot pull the image (there is no registry): ErrImagePull comes first.
    let reason = eventually(
        "the Pod's ErrImagePull",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("app").await.ok()?;
            assert_ne!(
                phase(&pod),
                Some("Succeeded"),
                "ran before its image existed"
            );
            waiting_reason(&pod).filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
        },
    )
    .await;
    eprintln!("e2e: the Pod waits with {reason}");

    // One NixBuild, made by the Pod watcher, succeeds on the real node.
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let all = nixbuilds.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 1, "exactly one NixBuild for the Pod");
    assert_eq!(
        build
            .annotations()
            .get("enbi.hrzn.ee/requested-by-pod")
            .map(String::as_str),
        Some("app"),
        "made by the Pod watcher"
    );
    assert_eq!(build.spec.image_tag, tag);
    assert_eq!(build.spec.flake_url, flake_url);
    let status = build.status.clone().expect("status");
    assert_eq!(status.build_node.as_deref(), Some(REAL_NODE));
    let digest = status.image_digest.clone().expect("a digest");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert!(status.image_size.is_some_and(|s| s > 0), "{status:?}");
    // Provenance: the flake as Nix locked it, the derivation and the output it was read from.
    let provenance = locked_as(&status, "path:/nix/store/");
    assert!(
        provenance
            .derivation
            .as_deref()
            .is_some_and(|d| d.ends_with(".drv")),
        "{provenance:?}"
    );
    assert!(
        provenance.store_path.starts_with("/nix/store/"),
        "{provenance:?}"
    );

    // Its one Job ran on the real node.
    let selector = format!("enbi.hrzn.ee/nixbuild-name={}", build.name_any());
    let jobs = Api::<Job>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("jobs");
    assert_eq!(jobs.items.len(), 1, "one builder Job");
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("builder pods");
    let nodes: Vec<Option<String>> = builder_pods
        .items
        .iter()
        .map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    assert_eq!(nodes, [Some(REAL_NODE.to_owned())], "the builder's node");

    // The image is in the node's containerd, where the kubelet looks.
    let images = node_images(&socket);
    assert!(images.contains(&tag), "{tag} not in {images:?}");

    // The kubelet's next attempt finds it; the container prints the fixture's message.
    let log = runs_to_completion(&pods, "app").await;
    assert!(log.contains(MESSAGE), "log: {log:?}");
    eprintln!("e2e: the Pod's log: {}", log.trim());

    // Deleting the NixBuild while the operator runs: its finalizer deletes the Job, so nothing
    // is left when the namespaces go.
    nixbuilds
        .delete(&build.name_any(), &DeleteParams::default())
        .await
        .expect("delete the NixBuild");
    let jobs_api = Api::<Job>::namespaced(client.clone(), &builds.name);
    eventually(
        "the NixBuild and its Job gone",
        Duration::from_secs(60),
        || async {
            let build_gone = nixbuilds.get_opt(&build.name_any()).await.ok()?.is_none();
            let jobs = jobs_api
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            let jobs_gone = jobs
                .items
                .iter()
                .all(|j| j.metadata.deletion_timestamp.is_some());
            (build_gone && jobs_gone).then_some(())
        },
    )
    .await;

    // Leave the node's containerd as it was: remove this run's image names.
    let ours: Vec<String> = node_images(&socket)
        .into_iter()
        .filter(|name| name.starts_with("enbi.test/e2e-stream"))
        .collect();
    let _ = Command::new("ctr")
        .args(["--address", &socket, "-n", "k8s.io", "images", "rm"])
        .args(&ours)
        .output();
}

/// A Deployment of two replicas on two real nodes whose image is missing: enbi builds it once,
/// on one node (A), and the Pod on the other node (B) gets it from A through Spegel (the
/// DaemonSet `tests/cluster/up --real-node` runs; every node's containerd mirrors all registries
/// to its Spegel), with no registry anywhere.
#[tokio::test]
async fn a_deployment_on_two_real_nodes_gets_its_image_through_spegel() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await || !spegel_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let tag = fresh_tag("e2e-spegel");
    let flake_url = fixture_for(&tag);
    let ips = real_node_ips(&client).await;
    let hits_before: BTreeMap<&String, u64> =
        ips.iter().map(|(n, ip)| (n, spegel_hits(ip))).collect();

    let builds = build_namespace(&client, "spegel-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    // Spegel spreads the image: enbi loads it only on its build node.
    let operator = start_operator_with("spegel", &builds.name, &repel, &["--image-mirror"], None);

    let app = TestNamespace::opted_in(&client, "spegel-app").await;
    let deployment = one_pod_per_real_node(&flake_url, &tag);
    Api::<Deployment>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");

    // One NixBuild for both Pods; it succeeds on one of the real nodes: A.
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let status = build.status.clone().expect("status");
    let node_a = status.build_node.clone().expect("a build node");
    let digest = status.image_digest.clone().expect("a digest");
    let nodes = real_nodes();
    assert!(
        nodes.contains(&node_a),
        "built on {node_a}, not a real node"
    );

    // Both Pods run: A's with the image enbi loaded, B's with the image pulled through Spegel.
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let running = running_pods(&pods, 2).await;
    let pod_b = running
        .iter()
        .find(|p| node_of(p) != node_a)
        .expect("a Pod on another node");
    let node_b = node_of(pod_b);
    assert!(nodes.contains(&node_b), "{node_b}");
    let log = pods
        .logs(&pod_b.name_any(), &LogParams::default())
        .await
        .expect("B's log");
    assert!(log.contains(MESSAGE), "B's log: {log:?}");

    // Exactly one NixBuild, whose one builder ran on A.
    let all = nixbuilds.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 1, "exactly one NixBuild for both Pods");
    let selector = format!("enbi.hrzn.ee/nixbuild-name={}", build.name_any());
    let builder_nodes: Vec<String> = Api::<Pod>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("builder pods")
        .items
        .iter()
        .map(node_of)
        .collect();
    assert_eq!(
        builder_nodes,
        std::slice::from_ref(&node_a),
        "one builder, on A"
    );

    // B's containerd holds the same image, and the kubelet pulled it (through B's mirror, the
    // only place a pull can go here: every registry's server is a closed port).
    let images_b = node_image_digests(&socket(&node_b));
    assert_eq!(
        images_b.get(&tag),
        Some(&digest),
        "{tag} on {node_b}: {images_b:?}"
    );
    let pulled = pod_events(&client, &app.name, &pod_b.name_any())
        .await
        .into_iter()
        .find(|m| m.starts_with(&format!("Successfully pulled image \"{tag}\"")))
        .expect("the kubelet's Pulled event on B");
    eprintln!("spegel: on {node_b}: {pulled}");
    // Spegel on B served the pull (its mirror hits went up), from A: at least the manifest;
    // layers B's content store already holds (the fixture's images share them) are not asked.
    let hits_b = spegel_hits(&ips[&node_b]) - hits_before[&node_b];
    assert!(
        hits_b >= 1,
        "{node_b}'s Spegel served {hits_b} mirror requests"
    );
    eprintln!(
        "spegel: {node_b}'s Spegel served {hits_b} mirror requests for {tag} ({digest}), built on {node_a}"
    );

    // Leave the nodes' containerd as they were.
    drop(operator);
    for node in &nodes {
        remove_images(&socket(node), "enbi.test/e2e-spegel");
    }
}

/// Without a mirror (Spegel taken off the nodes), enbi itself puts the image on the node where a
/// Pod waits for it: one load Job there, and another once the image was removed and is needed
/// again.
#[tokio::test]
async fn without_a_mirror_enbi_loads_the_image_on_the_other_node_and_again_after_removal() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let nodes = real_nodes();
    assert!(nodes.len() >= 2, "two real nodes needed, found {nodes:?}");
    builder_image_on_real_nodes();
    let _no_mirror = NoMirror::new(&client).await;
    let tag = fresh_tag("e2e-load");
    let flake_url = fixture_for(&tag);
    let builds = build_namespace(&client, "e2e-load-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    // Reload soon after a load: the test removes the image and waits for it to come back.
    let operator = start_operator_with(
        "e2e-load",
        &builds.name,
        &repel,
        &["--reload-after-seconds", "5"],
        None,
    );
    let app = TestNamespace::opted_in(&client, "e2e-load-app").await;
    Api::<Deployment>::namespaced(client.clone(), &app.name)
        .create(
            &PostParams::default(),
            &one_pod_per_real_node(&flake_url, &tag),
        )
        .await
        .expect("create the Deployment");

    // One build, on A; B's Pod waits until enbi loads the image on B; both run.
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let name = build.name_any();
    let status = build.status.clone().expect("status");
    let node_a = status.build_node.clone().expect("a build node");
    let digest = status.image_digest.clone().expect("a digest");
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let running = running_pods(&pods, 2).await;
    let node_b = running
        .iter()
        .map(node_of)
        .find(|n| *n != node_a)
        .expect("a Pod on another node");
    assert!(nodes.contains(&node_b), "{node_b} is not a real node");
    for pod in &running {
        let log = pods
            .logs(&pod.name_any(), &LogParams::default())
            .await
            .expect("log");
        assert!(log.contains(MESSAGE), "{}: {log:?}", node_of(pod));
    }
    let images_b = node_image_digests(&socket(&node_b));
    assert_eq!(images_b.get(&tag), Some(&digest), "{tag} on {node_b}");

    // Status says where the image is (once the operator read the load Job's report, which may
    // come after the kubelet found the image); one load Job ran, on B, for the same NixBuild.
    let build = node_loaded(&nixbuilds, &name, &node_b, 1).await;
    let held = image_nodes(&build);
    assert_eq!(
        held.get(&node_a),
        Some(&("Loaded".to_owned(), 0)),
        "{held:?}"
    );
    let loads = load_job_nodes(&client, &builds.name, &name).await;
    assert_eq!(loads, [(node_b.clone(), "1".to_owned())], "load Jobs");
    let reasons = event_reasons(&client, &app.name, &name).await;
    for reason in ["Loading", "Loaded"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
    eprintln!("e2e load: built on {node_a}, loaded on {node_b} ({digest})");

    // The image goes from B (as the kubelet's image GC or an operator would remove it) and B's
    // Pod is replaced: the new one waits, and enbi loads the image there again.
    remove_images(&socket(&node_b), "enbi.test/e2e-load");
    assert!(!node_images(&socket(&node_b)).contains(&tag), "removed");
    let pod_b = running
        .iter()
        .find(|p| node_of(p) == node_b)
        .expect("B's Pod");
    pods.delete(&pod_b.name_any(), &DeleteParams::default())
        .await
        .expect("delete B's Pod");
    let reloaded = node_loaded(&nixbuilds, &name, &node_b, 2).await;
    let running = running_pods(&pods, 2).await;
    assert!(
        running.iter().all(|p| p.uid() != pod_b.uid()),
        "B's Pod was replaced"
    );
    let images_b = node_image_digests(&socket(&node_b));
    assert_eq!(images_b.get(&tag), Some(&digest), "{tag} back on {node_b}");
    let loads = load_job_nodes(&client, &builds.name, &name).await;
    assert_eq!(
        loads,
        [
            (node_b.clone(), "1".to_owned()),
            (node_b.clone(), "2".to_owned())
        ],
        "load Jobs"
    );
    let reasons = event_reasons(&client, &app.name, &name).await;
    assert!(reasons.iter().any(|r| r == "Reloading"), "{reasons:?}");
    assert_eq!(
        reloaded.status.map(|s| s.attempts),
        Some(1),
        "loads are not build attempts"
    );

    drop(operator);
    for node in &nodes {
        remove_images(&socket(node), "enbi.test/e2e-load");
    }
}

/// With a mirror, enbi loads only the build node and lets the mirror serve the others; when no
/// node holds the image any more (the build node was scaled away before another pulled it), a Pod
/// that waits for it is not stuck: enbi loads the image on the Pod's node itself.
#[tokio::test]
async fn with_a_mirror_but_no_node_left_holding_the_image_enbi_loads_where_the_pod_waits() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await || !spegel_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let nodes = real_nodes();
    assert!(nodes.len() >= 2, "two real nodes needed, found {nodes:?}");
    builder_image_on_real_nodes();
    let repository = "enbi.test/e2e-noholder";
    let tag = fresh_tag("e2e-noholder");
    let flake_url = fixture_for(&tag);
    let builds = build_namespace(&client, "e2e-noholder-b").await;
    let app = TestNamespace::opted_in(&client, "e2e-noholder-app").await;
    let webhook = Webhook::install(&client, &app.name, 19467).await;
    let repel = kwok_nodes(&client).await.join(",");
    let operator = start_operator_with(
        "e2e-noholder",
        &builds.name,
        &repel,
        &["--image-mirror"],
        Some(&webhook),
    );
    webhook.wait_ready(&client).await;
    // A first Pod on any real node has the image built (on node A) and runs there.
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let mut first = app_pod(&flake_url, &tag, "Never");
    first["metadata"]["name"] = json!("first");
    first["spec"]["nodeSelector"] = json!({"type": "real"});
    first["spec"]["containers"][0]["command"] = json!(["/bin/echo", MESSAGE]);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(first).expect("pod"),
    )
    .await
    .expect("create the first Pod");
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let name = build.name_any();
    eventually("the first Pod done", Duration::from_secs(120), || async {
        let pod = pods.get("first").await.ok()?;
        (phase(&pod) == Some("Succeeded")).then_some(())
    })
    .await;
    let node_a = build
        .status
        .as_ref()
        .and_then(|s| s.build_node.clone())
        .expect("a build node");
    let node_b = nodes
        .iter()
        .find(|n| **n != node_a)
        .expect("another real node")
        .clone();

    // The build node goes, image and all, before any other node pulled the image.
    remove_images(&socket(&node_a), repository);
    let rejoin = Rejoin(node_a.clone());
    Api::<Node>::all(client.clone())
        .delete(&node_a, &DeleteParams::default())
        .await
        .expect("delete the build node");

    // A second Pod, on B, for the same image: no node holds it, and the mirror has nothing to
    // serve.
    let mut pod = app_pod(&flake_url, &tag, "Always");
    pod["metadata"]["name"] = json!("app");
    pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] = json!(node_b);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).expect("pod"),
    )
    .await
    .expect("create the Pod");
    let build = node_loaded(&nixbuilds, &name, &node_b, 1).await;
    let running = eventually("the Pod Ready", Duration::from_secs(120), || async {
        let pod = pods.get("app").await.ok()?;
        ready_since(&pod).map(|_| pod)
    })
    .await;
    assert_eq!(node_of(&running), node_b);
    let log = pods.logs("app", &LogParams::default()).await.expect("log");
    assert!(log.contains(MESSAGE), "log: {log:?}");
    let digest = build.status.and_then(|s| s.image_digest).expect("a digest");
    assert_eq!(
        node_image_digests(&socket(&node_b)).get(&tag),
        Some(&digest),
        "{tag} on {node_b}"
    );
    assert_eq!(
        load_job_nodes(&client, &builds.name, &name).await,
        [(node_b.clone(), "1".to_owned())],
        "one load Job, on the Pod's node"
    );
    let reasons = event_reasons(&client, &app.name, &name).await;
    assert!(reasons.iter().any(|r| r == "Loading"), "{reasons:?}");
    eprintln!("e2e no holder: built on {node_a} (then deleted), loaded on {node_b} ({digest})");

    drop(operator);
    drop(rejoin);
    eventually("Spegel ready again", Duration::from_secs(120), || async {
        spegel_ready(&client).await.then_some(())
    })
    .await;
    for node in &nodes {
        remove_images(&socket(node), repository);
    }
}

/// History limits never collect a Succeeded NixBuild whose image runs on the real nodes: with
/// `--keep-succeeded 0` it stays while its Deployment runs, and a replaced replica starts on
/// the image the node holds, never gated for a rebuild.
#[tokio::test]
async fn history_limits_keep_the_build_of_a_running_deployment_and_replicas_need_no_rebuild() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let _no_mirror = NoMirror::new(&client).await;
    let repository = "enbi.test/e2e-history";
    let tag = fresh_tag("e2e-history");
    let flake_url = fixture_for(&tag);
    let builds = build_namespace(&client, "e2e-history-b").await;
    let app = TestNamespace::opted_in(&client, "e2e-history-app").await;
    let webhook = Webhook::install(&client, &app.name, 19468).await;
    let repel = kwok_nodes(&client).await.join(",");
    let operator = start_operator_with(
        "e2e-history",
        &builds.name,
        &repel,
        &["--keep-succeeded", "0", "--gc-interval-seconds", "1"],
        Some(&webhook),
    );
    webhook.wait_ready(&client).await;
    Api::<Deployment>::namespaced(client.clone(), &app.name)
        .create(
            &PostParams::default(),
            &one_pod_per_real_node(&flake_url, &tag),
        )
        .await
        .expect("create the Deployment");
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let running = running_pods(&pods, 2).await;
    let jobs = load_job_nodes(&client, &builds.name, &build.name_any()).await;

    // Collection runs every second and keeps no Succeeded build, except one whose image runs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = nixbuilds.get_opt(&build.name_any()).await.expect("get");
    assert_eq!(
        kept.as_ref().map(ResourceExt::uid),
        Some(build.uid()),
        "in use, so kept"
    );

    // A replica goes; its replacement starts at once on the image its node holds.
    pods.delete(&running[0].name_any(), &DeleteParams::default())
        .await
        .expect("delete a replica");
    eventually(
        "the replacement running",
        Duration::from_secs(120),
        || async {
            let again = running_pods(&pods, 2).await;
            again
                .iter()
                .all(|p| p.uid() != running[0].uid())
                .then_some(())
        },
    )
    .await;
    let all = nixbuilds.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        all.items.iter().map(ResourceExt::uid).collect::<Vec<_>>(),
        [build.uid()],
        "no new NixBuild"
    );
    let builders = Api::<Job>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default())
        .await
        .expect("jobs");
    assert_eq!(
        builders.items.len(),
        1 + jobs.len(),
        "the build's Job and its loads, nothing more"
    );
    assert_eq!(
        load_job_nodes(&client, &builds.name, &build.name_any()).await,
        jobs,
        "no new load"
    );

    drop(operator);
    for node in &real_nodes() {
        remove_images(&socket(node), repository);
    }
}

/// Registers a real node's Node again when dropped (after the test deleted it), even when the
/// test fails.
struct Rejoin(String);

impl Drop for Rejoin {
    fn drop(&mut self) {
        let rejoined = Command::new(cluster_script("real-node"))
            .args(["rejoin", &self.0])
            .status();
        if !std::thread::panicking() {
            assert!(rejoined.is_ok_and(|s| s.success()), "rejoin {}", self.0);
        }
    }
}

/// A deleted NixBuild's image is released on each node enbi put it on: removed where nothing
/// uses it, only unpinned where a container does (which keeps running and finds it on restart).
#[tokio::test]
async fn a_deleted_nixbuild_releases_its_image_except_where_a_container_uses_it() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let nodes = real_nodes();
    assert!(nodes.len() >= 2, "two real nodes needed, found {nodes:?}");
    builder_image_on_real_nodes();
    // Without a mirror, enbi loads the second node itself: both nodes hold its image.
    let _no_mirror = NoMirror::new(&client).await;
    let repository = "enbi.test/e2e-release";
    for node in &nodes {
        remove_images(&socket(node), repository);
    }
    let tag = fresh_tag("e2e-release");
    let flake_url = fixture_for(&tag);
    let builds = build_namespace(&client, "e2e-release-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    let operator = start_operator("e2e-release", &builds.name, &repel);
    let app = TestNamespace::opted_in(&client, "e2e-release-app").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &app.name);
    deployments
        .create(
            &PostParams::default(),
            &one_pod_per_real_node(&flake_url, &tag),
        )
        .await
        .expect("create the Deployment");
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let name = build.name_any();
    let node_a = build
        .status
        .as_ref()
        .and_then(|s| s.build_node.clone())
        .expect("a build node");
    let node_b = nodes
        .iter()
        .find(|n| **n != node_a)
        .expect("another real node")
        .clone();
    node_loaded(&nixbuilds, &name, &node_b, 1).await;
    let digest_reference = format!(
        "{repository}@{}",
        build
            .status
            .as_ref()
            .and_then(|s| s.image_digest.clone())
            .expect("a digest")
    );
    for node in [&node_a, &node_b] {
        let labels = image_labels(&socket(node), &tag).expect("the image on the node");
        assert!(
            labels.contains("io.cri-containerd.pinned=pinned"),
            "{node}: {labels}"
        );
    }

    // The Deployment goes; one Pod of the image stays, on A only, not asking enbi for anything.
    deployments
        .delete("spread", &DeleteParams::foreground())
        .await
        .expect("delete the Deployment");
    for node in [&node_a, &node_b] {
        let socket = socket(node);
        eventually(
            &format!("no container of the Deployment on {node}"),
            Duration::from_secs(120),
            || async { containers_of(&socket, repository).is_empty().then_some(()) },
        )
        .await;
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let user: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_a},
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": tag, "command":
                ["/bin/sh", "-c", format!("echo {MESSAGE}; exec /bin/busybox sleep 3600")]}],
        },
    }))
    .expect("a pod");
    pods.create(&PostParams::default(), &user)
        .await
        .expect("create the Pod");
    running_pods(&pods, 1).await;

    nixbuilds
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the NixBuild");
    eventually("the NixBuild gone", Duration::from_secs(90), || async {
        nixbuilds.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await;

    // A: a container uses it: still there under both names, unpinned.
    let on_a = socket(&node_a);
    for reference in [&tag, &digest_reference] {
        let labels = image_labels(&on_a, reference)
            .unwrap_or_else(|| panic!("{reference} gone from {node_a}, where a Pod uses it"));
        assert!(
            !labels.contains("io.cri-containerd.pinned"),
            "{node_a}: {labels}"
        );
    }
    // B: nothing uses it: both names gone (containerd then collects the content).
    let on_b = node_images(&socket(&node_b));
    assert!(
        !on_b.iter().any(|n| *n == tag || *n == digest_reference),
        "{node_b} still holds {tag}"
    );
    let notes: Vec<(String, String)> = events_about(&client, &app.name, &name)
        .await
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    let released = notes
        .iter()
        .find(|(reason, _)| reason == "Released")
        .unwrap_or_else(|| panic!("a Released Event in {notes:?}"));
    assert!(
        released
            .1
            .contains(&format!("{node_a}: in use by a container, unpinned only"))
            && released.1.contains(&format!("{node_b}: removed (")),
        "{released:?}"
    );
    assert!(notes.iter().any(|(r, _)| r == "Releasing"), "{notes:?}");
    // Its Jobs (build, load, releases) went with it.
    let jobs = Api::<Job>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default().labels(&format!("{}={}", keys::BUILD_NAME, name)))
        .await
        .expect("jobs");
    assert!(
        jobs.items.is_empty(),
        "{:?}",
        jobs.items.iter().map(|j| j.name_any()).collect::<Vec<_>>()
    );
    // The Pod on A keeps running.
    let log = pods.logs("user", &LogParams::default()).await.expect("log");
    assert!(log.contains(MESSAGE), "{log:?}");

    drop(operator);
    for node in &nodes {
        remove_images(&socket(node), repository);
    }
}

/// The labels of image `name` in a node's containerd (`k8s.io`), as `ctr` prints them.
fn image_labels(socket: &str, name: &str) -> Option<String> {
    let filter = format!("name=={name}");
    let out = Command::new("ctr")
        .args(["--address", socket, "-n", "k8s.io", "images", "ls", &filter])
        .output()
        .expect("ctr runs");
    assert!(out.status.success(), "ctr images ls");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1)?;
    Some(
        line.split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The containers in a node's containerd (`k8s.io`) whose image is named `repository...`.
fn containers_of(socket: &str, repository: &str) -> Vec<String> {
    let out = Command::new("ctr")
        .args(["--address", socket, "-n", "k8s.io", "containers", "ls"])
        .output()
        .expect("ctr runs");
    assert!(out.status.success(), "ctr containers ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|i| i.starts_with(repository))
        })
        .map(str::to_owned)
        .collect()
}

/// Spegel taken off the real nodes while it lives (if it runs), so that pulls nobody serves
/// fail at once, as on a cluster without a mirror.
struct NoMirror(bool);

impl NoMirror {
    async fn new(client: &Client) -> Self {
        let spegel = Api::<DaemonSet>::namespaced(client.clone(), "spegel")
            .get_opt("spegel")
            .await
            .ok()
            .flatten()
            .is_some();
        if spegel {
            real_node(&["spegel", "off"]);
        }
        Self(spegel)
    }
}

impl Drop for NoMirror {
    fn drop(&mut self) {
        if self.0 {
            real_node(&["spegel", "on"]);
        }
    }
}

/// `status.imageNodes` as node -> (state, loads).
fn image_nodes(build: &NixBuild) -> BTreeMap<String, (String, u32)> {
    build
        .status
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.image_nodes)
        .map(|n| (n.node.clone(), (format!("{:?}", n.state), n.loads)))
        .collect()
}

/// Waits until NixBuild `name`'s status says `node` holds the image after `loads` loads.
async fn node_loaded(nixbuilds: &Api<NixBuild>, name: &str, node: &str, loads: u32) -> NixBuild {
    eventually(
        &format!("{node} Loaded after {loads} load(s)"),
        Duration::from_secs(240),
        || async {
            let build = nixbuilds.get(name).await.ok()?;
            let held = image_nodes(&build);
            (held.get(node) == Some(&("Loaded".to_owned(), loads))).then_some(build)
        },
    )
    .await
}

/// The load Jobs of NixBuild `name` in `namespace`, as (node, round), by round.
async fn load_job_nodes(client: &Client, namespace: &str, name: &str) -> Vec<(String, String)> {
    let selector = format!("{},{}={name}", keys::LOAD_ROUND, keys::BUILD_NAME);
    let mut loads: Vec<(String, String)> = Api::<Job>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("Jobs")
        .items
        .iter()
        .map(|j| {
            let node = j.annotations().get(keys::LOAD_NODE).cloned();
            let round = j.labels().get(keys::LOAD_ROUND).cloned();
            (node.unwrap_or_default(), round.unwrap_or_default())
        })
        .collect();
    loads.sort_by(|a, b| a.1.cmp(&b.1));
    loads
}

/// The reasons of the Events about object `name` in `namespace`.
async fn event_reasons(client: &Client, namespace: &str, name: &str) -> Vec<String> {
    events_about(client, namespace, name)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

/// The Events about object `name` in `namespace`.
async fn events_about(client: &Client, namespace: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("events")
        .items
}

/// Whether Spegel runs and is ready on every real node; fails in CI and says SKIPPED elsewhere
/// when it does not.
async fn spegel_ready(client: &Client) -> bool {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), "spegel")
        .get_opt("spegel")
        .await;
    let ready = ds
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|d| d.status.as_ref());
    if ready.is_some_and(|s| {
        s.desired_number_scheduled >= 2 && s.number_ready == s.desired_number_scheduled
    }) {
        return true;
    }
    enbi_tests::unavailable(
        "Spegel on the real nodes",
        &format!(
            "no ready DaemonSet spegel/spegel on >= 2 nodes ({ready:?}); tests/cluster/up --real-node starts it"
        ),
    )
}

/// The real nodes' IPs, by name (each node's Spegel listens on its IP).
async fn real_node_ips(client: &Client) -> BTreeMap<String, String> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("type=real"))
        .await
        .expect("nodes")
        .items
        .iter()
        .filter_map(|n| {
            let ip = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")?
                .address
                .clone();
            Some((n.name_any(), ip))
        })
        .collect()
}

/// Mirror requests Spegel on `ip` served from a peer (`spegel_mirror_requests_total`, cache
/// "hit", summed over registries).
fn spegel_hits(ip: &str) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((ip, 9090)).expect("Spegel's metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("ask for metrics");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("spegel_mirror_requests_total{") && l.contains("cache=\"hit\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Image names and their digests in a node's containerd (`k8s.io`).
fn node_image_digests(socket: &str) -> BTreeMap<String, String> {
    let out = Command::new("ctr")
        .args(["--address", socket, "-n", "k8s.io", "images", "ls"])
        .output()
        .expect("ctr runs");
    assert!(out.status.success(), "ctr images ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let name = cols.next()?.to_owned();
            Some((name, cols.nth(1)?.to_owned()))
        })
        .collect()
}

/// The messages of the Events about a Pod.
async fn pod_events(client: &Client, namespace: &str, pod: &str) -> Vec<String> {
    events_about(client, namespace, pod)
        .await
        .into_iter()
        .filter_map(|e| e.message)
        .collect()
}

/// The hostile fixtures (tests/fixtures/hostile), with `targets` listing what to try on this
/// node, added to the host's store.
fn hostile_in_store(targets: &str) -> String {
    let fixture = Fixture::of("hostile", &["flake.nix", "probe.sh"]);
    std::fs::write(fixture.dir.path().join("targets"), targets).expect("targets");
    flake_in_store(&fixture.url())
}

/// Flakes whose build step and image script try to reach the node's containerd socket, a
/// ServiceAccount token, a file of the host and services on the host's loopback (the script also
/// through a build it asks the node's Nix daemon to run unsandboxed, as only a trusted user
/// could): each runs as a NixBuild on the real node, and reaches none of them.
#[tokio::test]
async fn hostile_flakes_reach_nothing_from_the_builder() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let sockets: Vec<String> = real_nodes().iter().map(|n| socket(n)).collect();
    // A file only the host has, and the apiserver's port on host loopback.
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let kubeconfig = std::fs::read_to_string(std::env::var("KUBECONFIG").expect("KUBECONFIG"))
        .expect("kubeconfig");
    let apiserver_port = kubeconfig
        .split("https://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .expect("the apiserver's port")
        .to_owned();
    // Every node's socket as a path on this machine, and the standard path (each node's own).
    let targets: String = sockets
        .iter()
        .map(|s| format!("socket {s}\n"))
        .chain([format!(
            "socket /run/containerd/containerd.sock\nfile {}\ntcp 127.0.0.1 {apiserver_port}\n",
            marker.path().display()
        )])
        .collect();
    let flake_url = hostile_in_store(&targets);

    let builds = build_namespace(&client, "hostile-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    let operator = start_operator("hostile", &builds.name, &repel);
    let app = TestNamespace::new(&client, "hostile").await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    for (package, stage) in [("probe-script", "script"), ("probe-build", "build")] {
        let (message, log) =
            hostile_build_fails(&nixbuilds, &builder_pods, &operator, &flake_url, package).await;
        // The image script also asks the node's daemon, as a trusted user could, for a build
        // with the sandbox off: stage "trust".
        let stages: &[&str] = match stage {
            "script" => &["script", "trust"],
            _ => &["build"],
        };
        let probes = probe_lines(&log, stages);
        eprintln!("hostile {package}: {probes:#?}\nfailure: {message}");
        // The probes ran to their end (a fixture that does nothing proves nothing)...
        for stage in stages {
            assert!(
                probes.contains(&format!("{stage} done").as_str()),
                "{package}: the {stage} probes did not run:\n{log}"
            );
        }
        for want in ["token", "socket", "file", "tcp"] {
            assert!(
                probes
                    .iter()
                    .any(|p| p.contains(&format!(" blocked {want} "))),
                "{package}: no {want} probe: {probes:?}"
            );
        }
        // ...and reached nothing, nor saw containerd's socket.
        let reached: Vec<&&str> = probes.iter().filter(|p| p.contains(" reached ")).collect();
        assert!(reached.is_empty(), "{package} reached: {reached:?}");
        let seen: Vec<&&str> = probes
            .iter()
            .filter(|p| p.contains(" seen socket ") && p.contains("containerd"))
            .collect();
        assert!(seen.is_empty(), "{package} saw: {seen:?}");
        // The build ends with a clear reason.
        let says = match stage {
            "script" => "the image stream is empty",
            _ => "could not build",
        };
        assert!(message.contains(says), "{package}: {message}");
    }
    // Nothing was loaded, on any node.
    for socket in &sockets {
        let images = node_images(socket);
        assert!(!images.iter().any(|i| i.contains("hostile")), "{images:?}");
    }
}

/// Builds `package` of the hostile fixtures at `flake_url` as a NixBuild, which must fail with
/// `BuildFailed` (the probes always fail): its failure message and its build log.
async fn hostile_build_fails(
    nixbuilds: &Api<NixBuild>,
    builder_pods: &Api<Pod>,
    operator: &Operator,
    flake_url: &str,
    package: &str,
) -> (String, String) {
    let tag = format!("enbi.test/{package}:hostile");
    create_nixbuild(nixbuilds, package, flake_url, package, &tag).await;
    let done = eventually(
        "the hostile build to end",
        Duration::from_secs(180),
        || async {
            let b = nixbuilds.get(package).await.ok()?;
            matches!(b.phase(), Phase::Failed | Phase::Succeeded).then_some(b)
        },
    )
    .await;
    let status = done.status.clone().expect("status");
    assert_eq!(
        (done.phase(), status.failure_reason.as_deref()),
        (Phase::Failed, Some("BuildFailed")),
        "{package}: {status:?}\noperator log:\n{}",
        operator.logs()
    );
    let message = status.failure_message.clone().unwrap_or_default();
    (message, build_log(builder_pods, package).await)
}

/// The probes' lines of `stage` in a build log (after `enbi-probe: `).
fn probe_lines<'a>(log: &'a str, stages: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter_map(|l| l.split_once("enbi-probe: ").map(|(_, p)| p))
        .filter(|p| stages.iter().any(|s| p.starts_with(&format!("{s} "))))
        .collect()
}

/// `pod` mode, as it runs by default (the Debian builder image, user namespaces on): the hostile
/// fixtures try to act as root on the node (write in a directory of the host, read a process of
/// the host, be uid 0 of the node) besides what the test above tries, from the image script
/// (the build container's root) and from the build step (in Nix's sandbox, which is on). They
/// reach nothing: the Pod's uid 0 is an unprivileged uid of the node, nothing of the host is
/// in the container's view, and the host directory stays empty.
#[tokio::test]
async fn pod_mode_hostile_flakes_are_not_root_on_the_node() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let image = debian_builder_image();
    let sockets: Vec<String> = real_nodes().iter().map(|n| socket(n)).collect();
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let host_dir = tempfile::tempdir().expect("a host directory");
    // This test's own process: a process of the host, by its pid there.
    let me = std::process::id();
    let my_name = std::env::args()
        .next()
        .and_then(|a| Some(Path::new(&a).file_name()?.to_string_lossy().into_owned()))
        .expect("this test's name");
    let targets: String = sockets
        .iter()
        .map(|s| format!("socket {s}\n"))
        .chain([format!(
            "socket /run/containerd/containerd.sock\nfile {}\nwrite {}\nproc {me} {my_name}\n",
            marker.path().display(),
            host_dir.path().display(),
        )])
        .collect();
    let fixture = Fixture::of("hostile", &["flake.nix", "probe.sh"]);
    std::fs::write(fixture.dir.path().join("targets"), &targets).expect("targets");
    let flake_url = serve_tarball(&fixture);

    let builds = build_namespace(&client, "hostile-pod-b").await;
    let repel = all_but(&client, REAL_NODE).await.join(",");
    let operator =
        start_operator_with_image("hostile-pod", &builds.name, &repel, &image, "pod", &[]);
    let app = TestNamespace::new(&client, "hostile-pod").await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    for (package, stage) in [("probe-script", "script"), ("probe-build", "build")] {
        let (message, log) =
            hostile_build_fails(&nixbuilds, &builder_pods, &operator, &flake_url, package).await;
        let probes = probe_lines(&log, &[stage]);
        eprintln!("hostile {package} in pod mode: {probes:#?}\nfailure: {message}");
        let pod = builder_pods
            .list(&ListParams::default().labels(&format!("enbi.hrzn.ee/nixbuild-name={package}")))
            .await
            .expect("builder pods")
            .items
            .into_iter()
            .next()
            .expect("a builder Pod");
        let spec = pod.spec.expect("pod spec");
        assert_eq!(
            spec.host_users,
            Some(false),
            "{package}: not user-namespaced"
        );
        assert!(
            log.lines().any(|l| l.starts_with("enbi: sandbox: on")),
            "{package}: the sandbox is not on:\n{log}"
        );
        assert!(
            probes.contains(&format!("{stage} done").as_str()),
            "{package}: the {stage} probes did not run:\n{log}"
        );
        for want in ["noderoot", "token", "socket", "file", "write", "proc"] {
            assert!(
                probes
                    .iter()
                    .any(|p| p.contains(&format!(" blocked {want} "))),
                "{package}: no blocked {want} probe: {probes:?}"
            );
        }
        let reached: Vec<&&str> = probes.iter().filter(|p| p.contains(" reached ")).collect();
        assert!(reached.is_empty(), "{package} reached: {reached:?}");
        let says = match stage {
            "script" => "the image stream is empty",
            _ => "could not build",
        };
        assert!(message.contains(says), "{package}: {message}");
    }
    let written: Vec<_> = std::fs::read_dir(host_dir.path())
        .expect("the host directory")
        .collect();
    assert!(written.is_empty(), "written on the host: {written:?}");
    let images = node_images(&socket(REAL_NODE));
    assert!(!images.iter().any(|i| i.contains("hostile")), "{images:?}");
}

/// The contrast to the test above, so that its probes are known to tell: with the setting off
/// (`--builder-user-namespaces=false`, for nodes without user namespaces) the same image script
/// runs as the node's own root (uid 0, identity uid map), and Nix's sandbox is off.
#[tokio::test]
async fn pod_mode_without_user_namespaces_the_build_is_root_on_the_node() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let image = debian_builder_image();
    let fixture = Fixture::of("hostile", &["flake.nix", "probe.sh"]);
    std::fs::write(fixture.dir.path().join("targets"), "").expect("targets");
    let flake_url = serve_tarball(&fixture);
    let builds = build_namespace(&client, "host-users-b").await;
    let repel = all_but(&client, REAL_NODE).await.join(",");
    let off = ["--builder-user-namespaces", "false"];
    let operator =
        start_operator_with_image("host-users", &builds.name, &repel, &image, "pod", &off);
    let app = TestNamespace::new(&client, "host-users").await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    let package = "probe-script";
    let (_, log) =
        hostile_build_fails(&nixbuilds, &builder_pods, &operator, &flake_url, package).await;
    let probes = probe_lines(&log, &["script"]);
    eprintln!("{package} without user namespaces: {probes:#?}");
    assert!(probes.contains(&"script done"), "{log}");
    assert!(
        probes.contains(&"script reached noderoot uid0"),
        "{probes:?}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("enbi: sandbox: off (")),
        "{log}"
    );
}

/// The default store mode, `pod`, with the image a user runs: the Debian-built builder image
/// (`images/builder/build-image`: trixie's Nix 2.26 and this operator), pushed to the local
/// registry and pulled from there by the real node's kubelet. The build has the Pod's own store:
/// the fixture flake comes over HTTP as a tarball (from this process, on the host's address on
/// the nodes' bridge), nothing from the node's store or daemon. The build log says whether Nix's
/// sandbox was in effect; the image lands in the node's containerd, and a Pod runs it.
#[tokio::test]
async fn pod_store_mode_builds_with_the_debian_builder_image() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let image = debian_builder_image();
    let socket = socket(REAL_NODE);
    let tag = fresh_tag("e2e-pod-store");
    let fixture = Fixture::salted(tag.rsplit(':').next().expect("a tag"));
    let flake_url = serve_tarball(&fixture);
    eprintln!("e2e: builder image {image}, flake {flake_url}");

    let builds = build_namespace(&client, "pod-store-b").await;
    // Built where the Pod below runs (every other node is repelled).
    let repel = all_but(&client, REAL_NODE).await.join(",");
    let operator = start_operator_with_image("pod-store", &builds.name, &repel, &image, "pod", &[]);
    let app = TestNamespace::new(&client, "pod-store").await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    create_nixbuild(&nixbuilds, "pod-store", &flake_url, "stream", &tag).await;
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let status = build.status.clone().expect("status");
    assert_eq!(status.build_node.as_deref(), Some(REAL_NODE));
    locked_as(&status, "http://");
    assert!(
        node_images(&socket).contains(&tag),
        "{tag} not on {REAL_NODE}"
    );

    // The build container's log: the image's Nix built it, and said which sandbox it had.
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    let log = build_log(&builder_pods, &build.name_any()).await;
    let sandbox = log
        .lines()
        .find(|l| l.starts_with("enbi: sandbox: "))
        .unwrap_or_else(|| panic!("no sandbox line in the build log:\n{log}"));
    eprintln!("e2e: the build log:\n{log}");
    // The real nodes run user-namespaced Pods (runc >= 1.2): Nix's sandbox is on there.
    assert!(sandbox.starts_with("enbi: sandbox: on"), "{sandbox}\n{log}");
    assert!(log.contains("built /nix/store/"), "{log}");

    // The image runs.
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let app_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": REAL_NODE},
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists"}],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": tag, "imagePullPolicy": "Never"}],
        },
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &app_pod)
        .await
        .expect("create the Pod");
    let out = runs_to_completion(&pods, "app").await;
    assert!(out.contains(MESSAGE), "log: {out:?}");
    remove_images(&socket, "enbi.test/e2e-pod-store");
}

/// Creates the NixBuild `name` of `package` of `flake_url` for this machine's system.
async fn create_nixbuild(
    nixbuilds: &Api<NixBuild>,
    name: &str,
    flake_url: &str,
    package: &str,
    tag: &str,
) {
    let build: NixBuild = serde_json::from_value(json!({
        "apiVersion": "enbi.hrzn.ee/v1alpha1",
        "kind": "NixBuild",
        "metadata": {"name": name},
        "spec": {
            "flakeUrl": flake_url,
            "packageName": package,
            "imageTag": tag,
            "system": host_system(),
        },
    }))
    .expect("nixbuild");
    nixbuilds
        .create(&PostParams::default(), &build)
        .await
        .expect("create the NixBuild");
}

/// The build's provenance, whose locked flake starts with `prefix` and pins a NAR hash.
fn locked_as(
    status: &enbi_core::crd::NixBuildStatus,
    prefix: &str,
) -> enbi_core::report::Provenance {
    let provenance = status.provenance.clone().expect("provenance");
    assert!(
        provenance
            .locked_flake
            .as_deref()
            .is_some_and(|f| f.starts_with(prefix) && f.contains("narHash=")),
        "{provenance:?}"
    );
    provenance
}

/// Waits for the Pod `name` to succeed (failing at once if it fails) and returns its log.
async fn runs_to_completion(pods: &Api<Pod>, name: &str) -> String {
    eventually(
        "the Pod to run to completion",
        Duration::from_secs(120),
        || async {
            let pod = pods.get(name).await.ok()?;
            assert_ne!(phase(&pod), Some("Failed"), "{:?}", pod.status);
            (phase(&pod) == Some("Succeeded")).then_some(())
        },
    )
    .await;
    pods.logs(name, &LogParams::default())
        .await
        .expect("container log")
}

/// The build container's log of the (first) builder Pod of the NixBuild `name`.
async fn build_log(builder_pods: &Api<Pod>, name: &str) -> String {
    let selector = format!("enbi.hrzn.ee/nixbuild-name={name}");
    let pod = builder_pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("builder pods")
        .items
        .into_iter()
        .next()
        .expect("a builder Pod");
    builder_pods
        .logs(
            &pod.name_any(),
            &LogParams {
                container: Some("build".into()),
                ..LogParams::default()
            },
        )
        .await
        .expect("the build container's log")
}

/// The Debian-built builder image of this operator (`images/builder/build-image`; the archive
/// `tests/run` made, `ENBI_BUILDER_ARCHIVE`, else made here), pushed to the local registry
/// (`tests/tools/push-image`), by digest as the real nodes reach the registry. Once per run.
fn debian_builder_image() -> String {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let dir = tempfile::tempdir().expect("tempdir");
            let run = |cmd: &mut Command| {
                let out = cmd.output().expect("runs");
                assert!(
                    out.status.success(),
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            };
            let tar = match std::env::var_os("ENBI_BUILDER_ARCHIVE") {
                Some(tar) => PathBuf::from(tar),
                None => {
                    let tar = dir.path().join("builder.tar");
                    run(Command::new(root.join("images/builder/build-image"))
                        .arg("--binary")
                        .arg(Operator::binary())
                        .args(["--name", "localhost/enbi-builder:e2e"])
                        // No binary cache is reachable: Nix would wait out its retries.
                        .args(["--nix-option", "substituters ="])
                        .arg(&tar));
                    tar
                }
            };
            let pushed = run(Command::new(root.join("tests/tools/push-image"))
                .arg(&tar)
                .arg("enbi-builder:e2e"));
            let registry =
                |what: &str| run(Command::new(root.join("tests/cluster/registry")).arg(what));
            let (host, node) = (registry("addr"), registry("node-addr"));
            pushed.replacen(&host, &node, 1)
        })
        .clone()
}

/// `fixture` as a flake tarball served over HTTP on the host's address on the nodes' bridge
/// (where the nodes' Pods reach the host), for as long as the test runs: its URL.
fn serve_tarball(fixture: &Fixture) -> String {
    use std::io::{Read, Write};
    let dir = fixture.dir.path();
    let tar = dir.with_extension("tar.gz");
    let out = Command::new("tar")
        .arg("-czf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.parent().expect("a parent"))
        .arg(dir.file_name().expect("a name"))
        .output()
        .expect("tar runs");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = std::fs::read(&tar).expect("the tarball");
    let _ = std::fs::remove_file(&tar);
    let node_addr = real_node_registry_host();
    let listener = std::net::TcpListener::bind((node_addr.as_str(), 0)).expect("a port");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            // One request per connection: read its head, answer with the tarball, close.
            let mut head = [0; 4096];
            let _ = conn.read(&mut head);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    format!("http://{node_addr}:{port}/fixture.tar.gz")
}

/// The host's address on the nodes' bridge (the registry's, as the nodes reach it).
fn real_node_registry_host() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("cluster/registry"))
        .arg("node-addr")
        .output()
        .expect("registry node-addr runs");
    assert!(out.status.success(), "registry node-addr");
    let addr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    addr.rsplit_once(':')
        .map(|(host, _)| host.to_owned())
        .expect("HOST:PORT")
}

/// Imports the builder image made of this operator into every real node.
fn builder_image_on_real_nodes() {
    real_node(&[
        "builder-image",
        &Operator::binary().display().to_string(),
        BUILDER_IMAGE,
    ]);
}

/// The real nodes' names.
fn real_nodes() -> Vec<String> {
    real_node(&["nodes"]).lines().map(str::to_owned).collect()
}

/// `node`'s containerd socket, as a path on this machine.
fn socket(node: &str) -> String {
    real_node(&["socket", node])
}

/// An operator whose builders run on the real nodes through their Nix daemon, into the node's
/// containerd at the default socket path.
fn start_operator(name: &str, builds: &str, repel: &str) -> Operator {
    start_operator_with(name, builds, repel, &[], None)
}

/// [`start_operator`] with `extra` arguments, serving `webhook` too (its Secret in the build
/// namespace).
fn start_operator_with(
    name: &str,
    builds: &str,
    repel: &str,
    extra: &[&str],
    webhook: Option<&Webhook>,
) -> Operator {
    let webhook_args = webhook.map(Webhook::operator_args).unwrap_or_default();
    let mut extra = extra.to_vec();
    extra.extend(webhook_args.iter().map(String::as_str));
    start_operator_with_image(name, builds, repel, BUILDER_IMAGE, "node-daemon", &extra)
}

/// An operator whose builders run `image` in `store_mode` on the real nodes, with `extra`
/// arguments.
fn start_operator_with_image(
    name: &str,
    builds: &str,
    repel: &str,
    image: &str,
    store_mode: &str,
    extra: &[&str],
) -> Operator {
    // A free port: another cluster's tests may run the same tests on this machine.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    // Where the nodes' layout keeps containerd's socket (k3s's own path on a k3s-layout node),
    // as `build.containerdSocket` of examples/values-k3s.cue says.
    let node_socket = real_node(&["node-socket"]);
    let args: Vec<String> = [
        "--containerd-socket",
        &node_socket,
        "--build-namespace",
        builds,
        "--builder-image",
        image,
        "--listen-address",
        &listen,
        "--store-mode",
        store_mode,
        "--builder-tolerations",
        REAL_NODE_TAINT,
        "--node-repel",
        repel,
    ]
    .iter()
    .chain(extra)
    .map(|a| (*a).to_owned())
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Operator::start_with_env(name, &args, &[("POD_NAMESPACE", builds)])
}

/// The simulated (kwok) nodes: builds are repelled from them, as no builder runs there.
async fn kwok_nodes(client: &Client) -> Vec<String> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .expect("nodes")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect()
}

/// Waits for the one NixBuild of `nixbuilds` to succeed, failing at once (with the operator's
/// log) if it fails.
async fn the_nixbuild_succeeds(nixbuilds: &Api<NixBuild>, operator: &Operator) -> NixBuild {
    eventually(
        "the NixBuild to succeed",
        Duration::from_secs(180),
        || async {
            let build = nixbuilds.list(&ListParams::default()).await.ok()?;
            let build = build.items.into_iter().next()?;
            assert_ne!(
                build.phase(),
                Phase::Failed,
                "the build failed: {:?}\noperator log:\n{}",
                build.status,
                operator.logs()
            );
            (build.phase() == Phase::Succeeded).then_some(build)
        },
    )
    .await
}

/// When the build finished: its image was on the build node then.
fn completed_at(build: &NixBuild) -> k8s_openapi::jiff::Timestamp {
    build
        .status
        .as_ref()
        .and_then(|s| s.completion_time.clone())
        .expect("completion time")
        .0
}

/// A Deployment of two replicas of `tag` from the fixture flake, one on each real node (the
/// first two), each printing the image's message and staying up.
fn one_pod_per_real_node(flake_url: &str, tag: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "spread"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "spread"}},
            "template": {
                "metadata": {"labels": {"app": "spread"}, "annotations": {
                    "enbi.hrzn.ee/nixbuild-flakeUrl": flake_url,
                    "enbi.hrzn.ee/nixbuild-imageTag": tag,
                    "enbi.hrzn.ee/nixbuild-packageName": "stream",
                }},
                "spec": {
                    "nodeSelector": {"type": "real"},
                    "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists"}],
                    // One replica per node.
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": {"app": "spread"}},
                        "topologyKey": "kubernetes.io/hostname",
                    }]}},
                    "terminationGracePeriodSeconds": 1,
                    // The image's own message, then stay up (a Deployment restarts what exits).
                    "containers": [{"name": "app", "image": tag, "command":
                        ["/bin/sh", "-c", format!("echo {MESSAGE}; exec /bin/busybox sleep 3600")]}],
                },
            },
        },
    }))
    .expect("deployment")
}

/// Waits until `count` Pods of `pods` have every container running, and returns them.
async fn running_pods(pods: &Api<Pod>, count: usize) -> Vec<Pod> {
    eventually(
        &format!("{count} Pods running"),
        Duration::from_secs(240),
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?.items;
            let running: Vec<Pod> = list
                .into_iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|cs| {
                            cs.iter()
                                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                        })
                })
                .collect();
            (running.len() == count).then_some(running)
        },
    )
    .await
}

/// The node a Pod is bound to ("" before scheduling).
fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn fresh_tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("enbi.test/{name}:{nanos:x}")
}

/// An annotated Pod (template) of `tag` from the fixture flake, on the real node.
fn app_pod(flake_url: &str, tag: &str, restart: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": {"app": "app"}, "annotations": {
            "enbi.hrzn.ee/nixbuild-flakeUrl": flake_url,
            "enbi.hrzn.ee/nixbuild-imageTag": tag,
            "enbi.hrzn.ee/nixbuild-packageName": "stream",
        }},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": REAL_NODE},
            "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists"}],
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": tag, "imagePullPolicy": "IfNotPresent",
                            "command": ["/bin/sh", "-c", "/bin/echo hello from the stream; exec /bin/busybox sleep 600"]}],
        },
    })
}

/// The kubelet's pull failures (`Failed`, `BackOff` with the image in the note) on Pods in `ns`.
async fn pull_failures(client: &Client, ns: &str) -> Vec<String> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| matches!(e.reason.as_deref(), Some("Failed" | "BackOff")))
        .filter_map(|e| e.note)
        .filter(|n| n.contains("ErrImagePull") || n.contains("pull"))
        .collect()
}

/// Removes this run's image names from the node's containerd.
fn remove_images(socket: &str, prefix: &str) {
    let ours: Vec<String> = node_images(socket)
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect();
    if !ours.is_empty() {
        let _ = Command::new("ctr")
            .args(["--address", socket, "-n", "k8s.io", "images", "rm"])
            .args(&ours)
            .output();
    }
}

/// When the Pod's Ready condition last became True.
fn ready_since(pod: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(c.last_transition_time.as_ref()?.0)
}

#[tokio::test]
async fn a_gated_pod_runs_on_the_real_node_once_built_without_a_failed_pull() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let socket = socket(REAL_NODE);
    let tag = fresh_tag("e2e-gated");
    let flake_url = fixture_for(&tag);
    let repel = all_but(&client, REAL_NODE).await.join(",");
    let builds = build_namespace(&client, "e2e-gate-b").await;
    let app = TestNamespace::opted_in(&client, "e2e-gate-app").await;
    let webhook = Webhook::install(&client, &app.name, 19466).await;
    let operator = start_operator_with("e2e-gate", &builds.name, &repel, &[], Some(&webhook));
    webhook.wait_ready(&client).await;
    let mut pod = app_pod(&flake_url, &tag, "Always");
    pod["metadata"]["name"] = json!("app");
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).expect("pod"),
        )
        .await
        .expect("create the Pod");
    assert!(enbi_tests::is_gated(&created), "gated at creation");

    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let loaded = completed_at(&build);
    let running = eventually("the Pod Ready", Duration::from_secs(60), || async {
        let pod = pods.get("app").await.ok()?;
        ready_since(&pod).map(|_| pod)
    })
    .await;
    assert!(!enbi_tests::is_gated(&running));
    let ready = ready_since(&running).expect("ready");
    eprintln!(
        "e2e gated: Ready {:?} after the build's completion",
        ready.duration_since(loaded)
    );
    assert!(
        ready.duration_since(loaded) <= k8s_openapi::jiff::SignedDuration::from_secs(5),
        "Ready at {ready}, image loaded at {loaded}"
    );
    let failures = pull_failures(&client, &app.name).await;
    assert!(failures.is_empty(), "pull failures: {failures:?}");
    let log = pods.logs("app", &LogParams::default()).await.expect("log");
    assert!(log.contains(MESSAGE), "log: {log:?}");
    remove_images(&socket, "enbi.test/e2e-gated");
}

#[tokio::test]
async fn a_pod_in_pull_back_off_is_recreated_once_its_image_is_loaded() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    let socket = socket(REAL_NODE);
    let tag = fresh_tag("e2e-backoff");
    let flake_url = fixture_for(&tag);
    let repel = all_but(&client, REAL_NODE).await.join(",");
    let builds = build_namespace(&client, "e2e-backoff-b").await;
    let app = TestNamespace::opted_in(&client, "e2e-backoff-app").await;
    // No webhook: the Pod fails its pulls first, as when enbi was down at its creation.
    let operator = start_operator("e2e-backoff", &builds.name, &repel);
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": app_pod(&flake_url, &tag, "Always"),
        },
    }))
    .expect("deployment");
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let first = eventually(
        "the Pod's pull to fail",
        Duration::from_secs(60),
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|p| {
                waiting_reason(p).is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
            })
        },
    )
    .await;
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let loaded = completed_at(&build);
    let running = eventually("a Pod Ready", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|p| ready_since(p).is_some())
    })
    .await;
    assert_ne!(running.uid(), first.uid(), "the waiting Pod was replaced");
    let ready = ready_since(&running).expect("ready");
    eprintln!(
        "e2e back-off: Ready {:?} after the build's completion",
        ready.duration_since(loaded)
    );
    assert!(
        ready.duration_since(loaded) <= k8s_openapi::jiff::SignedDuration::from_secs(5),
        "Ready at {ready}, image loaded at {loaded}\n{}",
        operator.logs()
    );
    remove_images(&socket, "enbi.test/e2e-backoff");
}

/// Every node but `node`: the gate tests build where their Pod runs, so that its image is there
/// when the gate goes.
async fn all_but(client: &Client, node: &str) -> Vec<String> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .filter(|n| n != node)
        .collect()
}

fn host_system() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64-linux",
        _ => "x86_64-linux",
    }
}

/// A Secret of `files` (keys named as enbi reads them) from `dir`.
fn fetch_secret(name: &str, dir: &Path, files: &[&str]) -> Secret {
    let data: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            let value = std::fs::read_to_string(dir.join(f)).expect("a credential file");
            ((*f).to_owned(), value)
        })
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).expect("secret")
}

/// Private flakes on real git servers, over HTTP with basic auth and over SSH: each builds with
/// the right Secret, fails with the wrong one or none, naming the Secret and the URL and never
/// a credential; a Secret that is missing fails before any Job.
#[tokio::test]
async fn private_flakes_build_with_their_fetch_secret_only() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    builder_image_on_real_nodes();
    // The private git servers on the real nodes' bridge.
    let servers = key_values(&cluster_tool("git-server", &["up"]));
    let salt = format!(
        "p{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis()
    );
    let fixture = Fixture::salted(&salt);
    let repository = format!("private-{salt}");
    cluster_tool(
        "git-server",
        &[
            "publish",
            &fixture.dir.path().display().to_string(),
            &repository,
        ],
    );
    let http = format!("git+{}/{repository}.git?ref=main", servers["HTTP"]);
    let ssh = format!("git+{}/{repository}.git?ref=main", servers["SSH"]);

    let builds = build_namespace(&client, "private-b").await;
    let repel = kwok_nodes(&client).await.join(",");
    let app = TestNamespace::new(&client, "private").await;
    let operator = start_operator_with(
        "private",
        &builds.name,
        &repel,
        &["--fetch-secret-namespaces", &app.name],
        None,
    );
    let credentials = Path::new(&servers["CREDENTIALS"]);
    let secrets = Api::<Secret>::namespaced(client.clone(), &app.name);
    for (name, dir, files) in [
        ("http", "right", &["netrc"][..]),
        ("http-wrong", "wrong", &["netrc"][..]),
        ("ssh", "right", &["ssh-privatekey", "known_hosts"][..]),
        ("ssh-wrong", "wrong", &["ssh-privatekey", "known_hosts"][..]),
    ] {
        secrets
            .create(
                &PostParams::default(),
                &fetch_secret(name, &credentials.join(dir), files),
            )
            .await
            .expect("create the Secret");
    }
    // What must never show: the passwords and the private keys' lines.
    let secret_values: Vec<String> = ["right", "wrong"]
        .iter()
        .flat_map(|dir| {
            let netrc =
                std::fs::read_to_string(credentials.join(dir).join("netrc")).expect("netrc");
            let password = netrc
                .split_whitespace()
                .last()
                .expect("a password")
                .to_owned();
            let key =
                std::fs::read_to_string(credentials.join(dir).join("ssh-privatekey")).expect("key");
            let lines: Vec<String> = key
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned)
                .collect();
            std::iter::once(password).chain(lines)
        })
        .collect();

    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let cases: [(&str, &str, Option<&str>, Option<&str>); 7] = [
        ("http", &http, Some("http"), None),
        ("http-wrong", &http, Some("http-wrong"), Some("EvalFailed")),
        ("http-none", &http, None, Some("EvalFailed")),
        ("ssh", &ssh, Some("ssh"), None),
        ("ssh-wrong", &ssh, Some("ssh-wrong"), Some("EvalFailed")),
        ("ssh-none", &ssh, None, Some("EvalFailed")),
        ("missing", &http, Some("nope"), Some("FetchSecretUnusable")),
    ];
    for (name, url, secret, _) in &cases {
        let mut spec = json!({
            "flakeUrl": url,
            "packageName": "stream",
            "imageTag": format!("enbi.test/private-{name}:{salt}"),
            "system": host_system(),
        });
        if let Some(secret) = secret {
            spec["fetchSecretRef"] = json!({"name": secret});
        }
        let build: NixBuild = serde_json::from_value(json!({
            "apiVersion": "enbi.hrzn.ee/v1alpha1",
            "kind": "NixBuild",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("nixbuild");
        nixbuilds
            .create(&PostParams::default(), &build)
            .await
            .expect("create the NixBuild");
    }
    for (name, url, secret, failure) in &cases {
        let done = eventually(
            &format!("the {name} build to end"),
            Duration::from_secs(240),
            || async {
                let b = nixbuilds.get(name).await.ok()?;
                matches!(b.phase(), Phase::Failed | Phase::Succeeded).then_some(b)
            },
        )
        .await;
        let status = done.status.clone().expect("status");
        eprintln!("{name}: {:?} {:?}", done.phase(), status.failure_message);
        assert_eq!(
            status.failure_reason.as_deref(),
            *failure,
            "{name}: {status:?}\noperator log:\n{}",
            operator.logs()
        );
        let message = status.failure_message.clone().unwrap_or_default();
        let events: Vec<String> = events_about(&client, &app.name, name)
            .await
            .into_iter()
            .filter_map(|e| e.message)
            .collect();
        for shown in std::iter::once(&message)
            .chain(&events)
            .chain(std::iter::once(&operator.logs()))
        {
            for value in &secret_values {
                assert!(
                    !shown.contains(value.as_str()),
                    "{name} shows a credential: {shown}"
                );
            }
        }
        if failure.is_some() {
            let url = url.split('?').next().expect("a URL");
            assert!(message.contains(url), "{name} names the URL: {message}");
            if let Some(secret) = secret {
                let named = format!("Secret {}/{secret}", app.name);
                assert!(message.contains(&named), "{name} names {named}: {message}");
            }
        }
    }
    // The missing Secret's build never had a Job; the others' copies belong to their Jobs.
    let jobs = Api::<Job>::namespaced(client.clone(), &builds.name);
    let builder_secrets = Api::<Secret>::namespaced(client.clone(), &builds.name);
    let of =
        |name: &str| ListParams::default().labels(&format!("enbi.hrzn.ee/nixbuild-name={name}"));
    assert!(
        jobs.list(&of("missing"))
            .await
            .expect("jobs")
            .items
            .is_empty()
    );
    for name in ["http", "ssh-wrong"] {
        let job = jobs.list(&of(name)).await.expect("jobs").items.remove(0);
        let copy = builder_secrets
            .get(&job.name_any())
            .await
            .expect("the Job's copy");
        let owner = &copy.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Job", job.uid().unwrap_or_default().as_str())
        );
    }
    // The images of the right Secrets are on a node.
    let images: Vec<String> = real_nodes()
        .iter()
        .flat_map(|n| node_images(&socket(n)))
        .collect();
    for name in ["http", "ssh"] {
        let tag = format!("enbi.test/private-{name}:{salt}");
        assert!(images.iter().any(|i| i == &tag), "{tag} in {images:?}");
    }
}

/// nix against the host's daemon (the nodes' store), with `args`; its stdout, or its stderr as
/// the error.
fn host_nix(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("NIX_REMOTE", "daemon")
        .output()
        .expect("nix runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A build pushes its image's closure, signed, to the binary cache; a load on a node whose
/// store lacks the image then substitutes it from the cache instead of building it.
#[tokio::test]
async fn a_load_where_the_store_lacks_the_image_substitutes_it_from_the_binary_cache() {
    let client = enbi_tests::require_cluster!();
    if !real_node_ready(&client).await {
        return;
    }
    let _serial = OPERATOR_LOCK.lock().await;
    let nodes = real_nodes();
    assert!(nodes.len() >= 2, "two real nodes needed, found {nodes:?}");
    builder_image_on_real_nodes();
    // Without Spegel, so that enbi loads the image on the other node itself.
    let _no_mirror = NoMirror::new(&client).await;
    let cache = key_values(&cluster_tool("nix-cache", &["up"]));
    cluster_tool("nix-cache", &["clear"]);
    let url = cache["URL"].clone();
    let repository = "enbi.test/e2e-cache";
    let tag = fresh_tag("e2e-cache");
    let flake_url = fixture_for(&tag);
    let builds = build_namespace(&client, "e2e-cache-b").await;
    let signing_key: Secret = serde_json::from_value(json!({
        "metadata": {"name": "cache-key"},
        "stringData": {"secret-key": std::fs::read_to_string(&cache["SECRET_KEY_FILE"]).expect("key")},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &builds.name)
        .create(&PostParams::default(), &signing_key)
        .await
        .expect("create the signing key's Secret");
    let app = TestNamespace::opted_in(&client, "e2e-cache-app").await;
    let webhook = Webhook::install(&client, &app.name, 19468).await;
    let repel = kwok_nodes(&client).await.join(",");
    // Uncompressed: the fixture's layers are random bytes.
    let push_to = format!("{url}?compression=none");
    let operator = start_operator_with(
        "e2e-cache",
        &builds.name,
        &repel,
        &[
            "--cache-substituters",
            &url,
            "--cache-trusted-public-keys",
            &cache["PUBLIC_KEY"],
            "--cache-push-to",
            &push_to,
            "--cache-signing-secret",
            "cache-key",
        ],
        Some(&webhook),
    );
    webhook.wait_ready(&client).await;

    // A first Pod has the image built on a node (A), which pushes it.
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let mut first = app_pod(&flake_url, &tag, "Never");
    first["metadata"]["name"] = json!("first");
    first["spec"]["nodeSelector"] = json!({"type": "real"});
    first["spec"]["containers"][0]["command"] = json!(["/bin/echo", MESSAGE]);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(first).expect("pod"),
    )
    .await
    .expect("create the first Pod");
    let nixbuilds = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let build = the_nixbuild_succeeds(&nixbuilds, &operator).await;
    let name = build.name_any();
    let status = build.status.clone().expect("status");
    let node_a = status.build_node.clone().expect("a build node");
    let out = status.provenance.expect("provenance").store_path;
    let hash = out
        .trim_start_matches("/nix/store/")
        .split('-')
        .next()
        .expect("a store hash")
        .to_owned();
    let narinfo = eventually("the image pushed", Duration::from_secs(120), || async {
        let got = Command::new("curl")
            .args(["-fsS", &format!("{url}/{hash}.narinfo")])
            .output()
            .ok()?;
        got.status
            .success()
            .then(|| String::from_utf8_lossy(&got.stdout).into_owned())
    })
    .await;
    assert!(
        narinfo.contains(&format!("StorePath: {out}"))
            && narinfo.contains("Sig: enbi-test-cache-1:"),
        "{narinfo}"
    );

    // The nodes' store loses the image: its closure, the image first, but for what is still
    // alive (busybox, which other fixtures' images share).
    let closure = host_nix("nix-store", &["-qR", &out]).expect("the closure");
    let mut deleted = vec![];
    for path in closure.lines().rev() {
        if host_nix("nix", &["store", "delete", path]).is_ok() {
            deleted.push(path.to_owned());
        }
    }
    assert!(
        host_nix("nix", &["path-info", &out]).is_err(),
        "{out} is gone"
    );
    eprintln!("e2e cache: deleted {deleted:?}");

    // A Pod on another node (B): enbi's load there substitutes the image from the cache.
    let node_b = nodes
        .iter()
        .find(|n| **n != node_a)
        .expect("another real node")
        .clone();
    let mut pod = app_pod(&flake_url, &tag, "Always");
    pod["metadata"]["name"] = json!("app");
    pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] = json!(node_b);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).expect("pod"),
    )
    .await
    .expect("create the Pod");
    node_loaded(&nixbuilds, &name, &node_b, 1).await;
    eventually("the Pod Ready", Duration::from_secs(120), || async {
        let pod = pods.get("app").await.ok()?;
        ready_since(&pod).map(|_| ())
    })
    .await;
    let selector = format!("{},{}={name}", keys::LOAD_ROUND, keys::BUILD_NAME);
    let builder_pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    let load_pod = builder_pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("load Pods")
        .items
        .remove(0);
    let log = builder_pods
        .logs(
            &load_pod.name_any(),
            &LogParams {
                container: Some("build".into()),
                ..LogParams::default()
            },
        )
        .await
        .expect("the load's build log");
    assert!(
        log.contains(&format!("copying path '{out}' from '{url}'")),
        "the load substitutes {out}:\n{log}"
    );
    assert!(
        !log.contains("building '"),
        "the load builds nothing:\n{log}"
    );

    drop(operator);
    for node in &nodes {
        remove_images(&socket(node), repository);
    }
}
