//! `enbi-operator run` against the local cluster: the Pod watcher, placement and repel, the
//! result path, failures, restarts and garbage collection. The builder is the fake kubelet's
//! exit protocol here (see tests/cluster/README.md); the real builder has tests of its own.

use std::collections::BTreeSet;
use std::time::Duration;

use enbi_core::crd::{ImageNodeState, NixBuild, NixBuildSpec, Phase};
use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, build_annotations, build_namespace, eventually,
    finish_builder, jobs_for, kwok_pod, kwok_pod_spec, require_cluster, set_node_images,
    success_report, wait_phase,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const BUILDER_IMAGE: &str = "localhost/enbi:test";
const WAIT: Duration = Duration::from_secs(60);

/// A build namespace with the builder ServiceAccount, and an operator using it.
async fn setup(client: &Client, name: &str, extra: &[&str]) -> (TestNamespace, Operator) {
    let builds = build_namespace(client, &format!("{name}-b")).await;
    let mut args = vec![
        "--build-namespace",
        &builds.name,
        "--builder-image",
        BUILDER_IMAGE,
        "--listen-address",
        "127.0.0.1:18081",
        "--max-builds-per-node",
        "0",
    ];
    args.extend_from_slice(extra);
    let operator = Operator::start(name, &args);
    (builds, operator)
}

fn spec(tag: &str, system: &str) -> NixBuildSpec {
    NixBuildSpec {
        flake_url: "github:example/app".into(),
        package_name: "app.stream".into(),
        image_tag: tag.into(),
        system: system.into(),
        fetch_secret_ref: None,
        resources: None,
    }
}

async fn builds_in(client: &Client, ns: &str) -> Vec<NixBuild> {
    Api::<NixBuild>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
}

async fn node_arch(client: &Client, node: &str) -> String {
    let node = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .expect("node");
    node.labels()
        .get("kubernetes.io/arch")
        .cloned()
        .unwrap_or_default()
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    let list = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

#[tokio::test]
async fn annotated_deployment_gets_one_build_and_then_runs() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    // The image is then marked present on every node at once, as a mirror would spread it.
    let (builds, operator) = setup(&client, "pods", &["--image-mirror"]).await;
    let app = TestNamespace::opted_in(&client, "pods-app").await;
    let tag = "example.test/app:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;

    let deployment = enbi_tests::deployment(
        20,
        build_annotations("github:example/app", tag, "app.stream"),
        kwok_pod_spec(tag, Some("arm64")),
    );
    Api::<Deployment>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");

    let build = eventually("the Pod watcher's NixBuild", WAIT, || async {
        builds_in(&client, &app.name).await.into_iter().next()
    })
    .await;
    assert_eq!(
        build.spec.system, "aarch64-linux",
        "system from the Pods' node arch"
    );
    assert_eq!(build.spec.image_tag, tag);
    let node = finish_builder(
        &client,
        &builds.name,
        &build.name_any(),
        0,
        &success_report(tag),
    )
    .await;
    assert_eq!(node_arch(&client, &node).await, "arm64");
    let done = wait_phase(&client, &app.name, &build.name_any(), Phase::Succeeded).await;
    let status = done.status.clone().expect("status");
    assert_eq!(
        status.image_digest,
        Some(format!("sha256:{}", "d".repeat(64)))
    );
    assert_eq!(status.image_size, Some(4_194_304));
    assert_eq!(status.build_node.as_deref(), Some(node.as_str()));

    set_node_images(&client, Some(&format!("{BUILDER_IMAGE},{tag}"))).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    eventually("all 20 Pods Running", Duration::from_secs(90), || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        let running = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        (running == 20).then_some(())
    })
    .await;
    set_node_images(&client, None).await;

    assert_eq!(
        builds_in(&client, &app.name).await.len(),
        1,
        "one NixBuild for 20 Pods"
    );
    assert_eq!(
        jobs_for(&client, &builds.name, &build.name_any())
            .await
            .len(),
        1,
        "one Job"
    );
    let table = kubectl_get_table(&client, &app.name).await;
    assert_eq!(
        table[0],
        ["Name", "Image Tag", "System", "Status", "Build Node", "Age"]
    );
    assert_eq!(
        &table[1][..5],
        [
            build.name_any().as_str(),
            tag,
            "aarch64-linux",
            "Succeeded",
            node.as_str()
        ]
    );
    assert!(!table[1][5].is_empty());
    let events = Api::<Event>::namespaced(client.clone(), &app.name)
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("WaitingForBuild")),
        "Pods are told which NixBuild they wait for; operator log:\n{}",
        operator.logs()
    );
}

/// One tag for two systems (a Deployment's Pods on amd64 and on arm64 nodes), without a mirror:
/// one NixBuild per system, and each system's image is built and loaded only on nodes of its own
/// architecture, so that no node is ever handed the other architecture's image under the tag.
#[tokio::test]
async fn one_tag_for_two_systems_puts_each_image_only_on_nodes_of_its_system() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, _operator) = setup(&client, "systems", &[]).await;
    let app = TestNamespace::opted_in(&client, "systems-app").await;
    let tag = "example.test/systems:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &app.name);
    for arch in ["amd64", "arm64"] {
        // Two Pods of the tag on each node of the architecture.
        let mut spec = kwok_pod_spec(tag, Some(arch));
        spec["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": arch}}}]);
        let deployment = json!({
            "metadata": {"name": arch},
            "spec": {"replicas": 4, "selector": {"matchLabels": {"app": arch}}, "template": {
                "metadata": {"labels": {"app": arch},
                             "annotations": build_annotations("github:example/app", tag, "app.stream")},
                "spec": spec,
            }},
        });
        deployments
            .create(
                &PostParams::default(),
                &serde_json::from_value(deployment).expect("deployment"),
            )
            .await
            .expect("create");
    }
    let systems = eventually("a NixBuild per system", WAIT, || async {
        let all = builds_in(&client, &app.name).await;
        let systems: BTreeSet<String> = all.iter().map(|b| b.spec.system.clone()).collect();
        (all.len() == 2 && systems.len() == 2).then_some(all)
    })
    .await;
    let present = format!("{BUILDER_IMAGE},{tag}");
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    for build in &systems {
        let name = build.name_any();
        let arch = match build.spec.system.as_str() {
            "x86_64-linux" => "amd64",
            "aarch64-linux" => "arm64",
            other => panic!("unexpected system {other}"),
        };
        // Built on a node of its architecture, then loaded on the other one, where its Pods
        // wait; the fake kubelet's image list stands for the node's containerd.
        let built_on = finish_builder(&client, &builds.name, &name, 0, &success_report(tag)).await;
        wait_phase(&client, &app.name, &name, Phase::Succeeded).await;
        set_images_of(&client, &built_on, Some(&present)).await;
        let loaded_on = finish_builder(&client, &builds.name, &name, 0, &success_report(tag)).await;
        set_images_of(&client, &loaded_on, Some(&present)).await;
        assert_ne!(built_on, loaded_on, "{name}: loaded where its Pods wait");
        for node in [&built_on, &loaded_on] {
            assert_eq!(node_arch(&client, node).await, arch, "{name} on {node}");
        }
        let holders = eventually(&format!("{name} Loaded on two nodes"), WAIT, || async {
            let b = api.get(&name).await.ok()?;
            let nodes = b.status.map(|s| s.image_nodes).unwrap_or_default();
            let loaded: BTreeSet<String> = nodes
                .iter()
                .filter(|n| n.state == ImageNodeState::Loaded)
                .map(|n| n.node.clone())
                .collect();
            (loaded.len() == 2).then_some(nodes)
        })
        .await;
        for entry in holders {
            assert_eq!(
                node_arch(&client, &entry.node).await,
                arch,
                "{name}'s imageNodes"
            );
        }
    }
    // Every builder Pod, build or load, of either NixBuild ran on a node of its own system.
    let pods = Api::<Pod>::namespaced(client.clone(), &builds.name)
        .list(&ListParams::default())
        .await
        .expect("builder Pods")
        .items;
    assert_eq!(pods.len(), 4, "a build and a load per system");
    for pod in pods {
        let build = pod.labels()["enbi.hrzn.ee/nixbuild-name"].clone();
        let system = &systems
            .iter()
            .find(|b| b.name_any() == build)
            .expect("its NixBuild")
            .spec
            .system;
        let node = pod.spec.and_then(|s| s.node_name).expect("scheduled");
        let arch = node_arch(&client, &node).await;
        assert!(
            system.starts_with(if arch == "arm64" { "aarch64" } else { "x86_64" }),
            "{build} ({system}) ran on {node} ({arch})"
        );
    }
    set_node_images(&client, None).await;
}

/// Sets the fake kubelet's image list of one node (`None`: every image present).
async fn set_images_of(client: &Client, node: &str, images: Option<&str>) {
    let patch = json!({"metadata": {"annotations": {"kwok.enbi.test/images": images}}});
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate node");
}

/// Without a mirror, a Pod on another node than the build's gets the image loaded there by a
/// load Job (one per node, whatever the number of Pods); a node whose image went away gets it
/// loaded again once a Pod waits there. The fake kubelet stands for containerd: the load
/// builders end through its exit protocol and "image present" is its node annotation.
#[tokio::test]
async fn pods_on_other_nodes_get_the_image_loaded_there() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, operator) = setup(&client, "spread", &["--reload-after-seconds", "5"]).await;
    let app = TestNamespace::opted_in(&client, "spread-app").await;
    let tag = "example.test/spread:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;

    // Two Pods on each arm64 node.
    let mut spec = kwok_pod_spec(tag, Some("arm64"));
    spec["topologySpreadConstraints"] = json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "app"}}}]);
    let deployment = enbi_tests::deployment(
        4,
        build_annotations("github:example/app", tag, "app.stream"),
        spec,
    );
    Api::<Deployment>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");
    let build = eventually("the Pod watcher's NixBuild", WAIT, || async {
        builds_in(&client, &app.name).await.into_iter().next()
    })
    .await;
    let name = build.name_any();
    let built_on = finish_builder(&client, &builds.name, &name, 0, &success_report(tag)).await;
    wait_phase(&client, &app.name, &name, Phase::Succeeded).await;
    // The fake kubelet's image list stands for the node's containerd, which the builder loaded.
    let present = format!("{BUILDER_IMAGE},{tag}");
    set_images_of(&client, &built_on, Some(&present)).await;

    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let holders = |b: &NixBuild| -> Vec<(String, ImageNodeState)> {
        let nodes = b.status.iter().flat_map(|s| &s.image_nodes);
        nodes.map(|n| (n.node.clone(), n.state)).collect()
    };
    // The other arm64 node gets one load Job for its two Pods.
    let loading = eventually("a load on the other node", WAIT, || async {
        let b = api.get(&name).await.ok()?;
        let h = holders(&b);
        (h.len() == 2 && h[1].1 == ImageNodeState::Loading).then_some(h)
    })
    .await;
    let other = loading[1].0.clone();
    assert_eq!(loading[0], (built_on.clone(), ImageNodeState::Loaded));
    assert_ne!(other, built_on);
    let loaded_on = finish_builder(&client, &builds.name, &name, 0, &success_report(tag)).await;
    assert_eq!(loaded_on, other, "the load ran on the node whose Pods wait");
    set_images_of(&client, &other, Some(&present)).await;
    eventually("the other node Loaded", WAIT, || async {
        let b = api.get(&name).await.ok()?;
        (holders(&b)[1] == (other.clone(), ImageNodeState::Loaded)).then_some(())
    })
    .await;
    let jobs = jobs_for(&client, &builds.name, &name).await;
    assert_eq!(jobs.len(), 2, "the build's Job and one load Job");
    let load = jobs
        .iter()
        .find(|j| j.labels().contains_key("enbi.hrzn.ee/load-round"))
        .expect("a load Job");
    let args = load
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod")
        .containers[1]
        .args
        .clone()
        .unwrap_or_default();
    assert!(args.contains(&tag.to_owned()), "{args:?}");
    let events = events_for(&client, &app.name, &name).await;
    let reasons: BTreeSet<&str> = events.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert!(
        reasons.contains("Loading") && reasons.contains("Loaded"),
        "{reasons:?}"
    );

    // The image is on both nodes now: all four Pods run.
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let running = |node: String| {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let on = |p: &&Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(&node);
            let phases: Vec<Option<String>> = list
                .items
                .iter()
                .filter(on)
                .map(|p| p.status.as_ref().and_then(|s| s.phase.clone()))
                .collect();
            (!phases.is_empty() && phases.iter().all(|p| p.as_deref() == Some("Running")))
                .then_some(())
        }
    };
    eventually("the Pods on both nodes Running", WAIT, || async {
        running(built_on.clone()).await?;
        running(other.clone()).await
    })
    .await;

    // The image goes away on the build node, and a new Pod there waits for it: loaded again.
    set_images_of(&client, &built_on, Some(BUILDER_IMAGE)).await;
    let victim = pods
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(&built_on))
        .expect("a Pod on the build node");
    pods.delete(&victim.name_any(), &Default::default())
        .await
        .expect("delete");
    eventually("a reload on the build node", WAIT, || async {
        let b = api.get(&name).await.ok()?;
        let entry = b
            .status?
            .image_nodes
            .into_iter()
            .find(|n| n.node == built_on)?;
        (entry.state == ImageNodeState::Loading && entry.loads == 1).then_some(())
    })
    .await;
    assert_eq!(
        finish_builder(&client, &builds.name, &name, 0, &success_report(tag)).await,
        built_on
    );
    set_images_of(&client, &built_on, Some(&present)).await;
    eventually("every Pod Running again", WAIT, || async {
        running(built_on.clone()).await?;
        running(other.clone()).await
    })
    .await;
    assert_eq!(
        jobs_for(&client, &builds.name, &name).await.len(),
        3,
        "build, load, reload"
    );
    set_node_images(&client, None).await;
    let build = api.get(&name).await.expect("build");
    assert_eq!(
        build.status.map(|s| s.attempts),
        Some(1),
        "loads are not attempts; log:\n{}",
        operator.logs()
    );
}

/// What `kubectl get nixbuilds` shows: the server-side Table, header row first.
async fn kubectl_get_table(client: &Client, ns: &str) -> Vec<Vec<String>> {
    let request = http::Request::get(format!(
        "/apis/enbi.hrzn.ee/v1alpha1/namespaces/{ns}/nixbuilds"
    ))
    .header("Accept", "application/json;as=Table;g=meta.k8s.io;v=v1")
    .body(Vec::new())
    .expect("request");
    let table: serde_json::Value = client.request(request).await.expect("table");
    let header = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut rows = vec![header];
    for row in table["rows"].as_array().expect("rows") {
        rows.push(
            row["cells"]
                .as_array()
                .expect("cells")
                .iter()
                .map(|c| {
                    c.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| c.to_string())
                })
                .collect(),
        );
    }
    rows
}

#[tokio::test]
async fn failure_reports_reason_log_tail_and_event() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, _operator) = setup(&client, "fail", &[]).await;
    let app = TestNamespace::new(&client, "fail-app").await;
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("broken", spec("example.test/broken:1", "x86_64-linux")),
    )
    .await
    .expect("create");
    let report = BuildReport::Failed(FailureReport {
        reason: FailureReason::EvalFailed,
        message:
            "flake github:example/app does not provide attribute packages.x86_64-linux.app.stream"
                .into(),
        log_tail: "error: flake does not provide attribute\n".into(),
    });
    let node = finish_builder(&client, &builds.name, "broken", 1, &report.encode()).await;
    assert_eq!(node_arch(&client, &node).await, "amd64");
    let failed = wait_phase(&client, &app.name, "broken", Phase::Failed).await;
    let status = failed.status.expect("status");
    assert_eq!(status.failure_reason.as_deref(), Some("EvalFailed"));
    assert!(
        status
            .failure_message
            .is_some_and(|m| m.contains("does not provide attribute"))
    );
    let events = eventually("a Failed Event", WAIT, || async {
        let events = events_for(&client, &app.name, "broken").await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Failed"))
            .then_some(events)
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Scheduled"))
    );
    // A failed build is not retried for a deterministic failure: still one Job.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(jobs_for(&client, &builds.name, "broken").await.len(), 1);
}

#[tokio::test]
async fn repelled_nodes_are_never_used_and_no_node_means_pending() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, _operator) = setup(&client, "repel", &["--node-repel", "kwok-arm64-0"]).await;
    let app = TestNamespace::new(&client, "repel-app").await;
    let nodes = Api::<Node>::all(client.clone());
    let label =
        |value: Option<&str>| json!({"metadata": {"labels": {"enbi.hrzn.ee/repel": value}}});
    nodes
        .patch(
            "kwok-arm64-1",
            &PatchParams::default(),
            &Patch::Merge(&label(Some("true"))),
        )
        .await
        .expect("label");

    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("arm", spec("example.test/arm:1", "aarch64-linux")),
    )
    .await
    .expect("create");
    let pending = eventually("NoEligibleNode", WAIT, || async {
        let b = api.get("arm").await.ok()?;
        let ready = b
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")?
            .clone();
        (ready.reason == "NoEligibleNode").then_some(ready)
    })
    .await;
    assert!(
        pending.message.contains("2 repelled"),
        "{}",
        pending.message
    );
    assert!(jobs_for(&client, &builds.name, "arm").await.is_empty());

    nodes
        .patch(
            "kwok-arm64-1",
            &PatchParams::default(),
            &Patch::Merge(&label(None)),
        )
        .await
        .expect("unlabel");
    let node = finish_builder(
        &client,
        &builds.name,
        "arm",
        0,
        &success_report("example.test/arm:1"),
    )
    .await;
    assert_eq!(node, "kwok-arm64-1", "the flag keeps kwok-arm64-0 out");
    wait_phase(&client, &app.name, "arm", Phase::Succeeded).await;
}

#[tokio::test]
async fn operator_killed_mid_build_resumes_without_a_second_job() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, mut first) = setup(&client, "restart", &[]).await;
    let app = TestNamespace::new(&client, "restart-app").await;
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let tag = "example.test/restart:1";
    api.create(
        &PostParams::default(),
        &NixBuild::new("r", spec(tag, "x86_64-linux")),
    )
    .await
    .expect("create");
    eventually("the Job", WAIT, || async {
        jobs_for(&client, &builds.name, "r")
            .await
            .into_iter()
            .next()
    })
    .await;
    first.kill();

    let _second = Operator::start(
        "restart-2",
        &[
            "--build-namespace",
            &builds.name,
            "--builder-image",
            BUILDER_IMAGE,
            "--listen-address",
            "127.0.0.1:18082",
        ],
    );
    finish_builder(&client, &builds.name, "r", 0, &success_report(tag)).await;
    wait_phase(&client, &app.name, "r", Phase::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        jobs_for(&client, &builds.name, "r").await.len(),
        1,
        "no second Job"
    );
    let succeeded = events_for(&client, &app.name, "r")
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Succeeded"))
        .count();
    assert_eq!(succeeded, 1, "the result is recorded once");
}

#[tokio::test]
async fn garbage_collection_keeps_the_newest() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    // The simulated nodes run no release Job (releases are tested on the real nodes, e2e.rs):
    // without this, each collected build would wait for the release timeout.
    let (builds, _operator) = setup(
        &client,
        "gc",
        &[
            "--keep-succeeded",
            "1",
            "--gc-interval-seconds",
            "1",
            "--keep-images-on-delete",
        ],
    )
    .await;
    let app = TestNamespace::new(&client, "gc-app").await;
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    for i in 0..3 {
        let (name, tag) = (format!("gc{i}"), format!("example.test/gc:{i}"));
        api.create(
            &PostParams::default(),
            &NixBuild::new(&name, spec(&tag, "x86_64-linux")),
        )
        .await
        .expect("create");
        finish_builder(&client, &builds.name, &name, 0, &success_report(&tag)).await;
        wait_phase(&client, &app.name, &name, Phase::Succeeded).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let left = eventually("GC down to one build", WAIT, || async {
        let names: BTreeSet<String> = builds_in(&client, &app.name)
            .await
            .iter()
            .map(|b| b.name_any())
            .collect();
        (names.len() == 1).then_some(names)
    })
    .await;
    assert_eq!(left, BTreeSet::from(["gc2".to_owned()]));
}

/// Day 2: history limits never collect a Succeeded build whose image a Pod runs (the next
/// replica would wait for a rebuild); it goes a retention period after the last such Pod.
#[tokio::test]
async fn history_limits_keep_a_build_whose_image_a_pod_uses_until_after_its_last_use() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, operator) = setup(
        &client,
        "gc-use",
        &[
            "--keep-succeeded",
            "0",
            "--gc-interval-seconds",
            "1",
            "--retain-after-last-use-seconds",
            "3",
            // No release Job runs on the simulated nodes (see garbage_collection_keeps_the_newest).
            "--keep-images-on-delete",
        ],
    )
    .await;
    let app = TestNamespace::new(&client, "gc-use-app").await;
    let tag = "example.test/used:1";
    // A Pod without enbi annotations that runs the image, in another namespace.
    let other = TestNamespace::new(&client, "gc-use-pods").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &other.name);
    pods.create(
        &PostParams::default(),
        &enbi_tests::kwok_pod("user", tag, json!({}), None),
    )
    .await
    .expect("pod");
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("used", spec(tag, "x86_64-linux")),
    )
    .await
    .expect("create");
    finish_builder(&client, &builds.name, "used", 0, &success_report(tag)).await;
    wait_phase(&client, &app.name, "used", Phase::Succeeded).await;
    // keep-succeeded 0 would delete it at the next tick; the Pod keeps it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kept = api.get_opt("used").await.expect("get");
    assert!(
        kept.is_some(),
        "in use, so kept; operator log:\n{}",
        operator.logs()
    );

    let kept = kept.expect("kept");
    assert!(
        kept.annotations().contains_key(enbi_core::keys::LAST_USED),
        "its use is recorded on it"
    );

    pods.delete("user", &Default::default())
        .await
        .expect("delete");
    eventually("collected after the retention", WAIT, || async {
        api.get_opt("used").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn policy_denies_before_anything_runs() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, _operator) = setup(
        &client,
        "policy",
        &["--allowed-image-tags", "example.test/*"],
    )
    .await;
    let app = TestNamespace::new(&client, "policy-app").await;
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("nginx", spec("nginx:latest", "x86_64-linux")),
    )
    .await
    .expect("create");
    let denied = wait_phase(&client, &app.name, "nginx", Phase::Failed).await;
    let status = denied.status.expect("status");
    assert_eq!(status.failure_reason.as_deref(), Some("PolicyDenied"));
    let message = status.failure_message.unwrap_or_default();
    assert!(
        message.contains("docker.io/library/nginx:latest matches no allowed pattern"),
        "{message}"
    );
    eventually("a Failed Event", WAIT, || async {
        events_for(&client, &app.name, "nginx")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("Failed"))
            .then_some(())
    })
    .await;
    assert!(
        jobs_for(&client, &builds.name, "nginx").await.is_empty(),
        "nothing ran"
    );
}

#[tokio::test]
async fn malformed_pod_annotations_warn_and_build_nothing() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (_builds, _operator) = setup(&client, "annot", &[]).await;
    let app = TestNamespace::opted_in(&client, "annot-app").await;
    let tag = "example.test/annot:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let pod = kwok_pod("p", tag, build_annotations("not a flake", tag, "app"), None);
    Api::<Pod>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create");
    let warning = eventually("an InvalidBuildAnnotations Warning", WAIT, || async {
        events_for(&client, &app.name, "p")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidBuildAnnotations"))
    })
    .await;
    set_node_images(&client, None).await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(
        warning
            .note
            .unwrap_or_default()
            .contains("annotation enbi.hrzn.ee/nixbuild-flakeUrl must be")
    );
    assert!(
        builds_in(&client, &app.name).await.is_empty(),
        "no NixBuild for bad annotations"
    );
}

#[tokio::test]
async fn pods_in_a_namespace_not_opted_in_get_one_warning_and_no_build() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (_builds, _operator) = setup(&client, "optin", &[]).await;
    let app = TestNamespace::new(&client, "optin-app").await;
    let tag = "example.test/optin:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let pod = kwok_pod(
        "p",
        tag,
        build_annotations("github:example/app", tag, "app"),
        None,
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    let warning = eventually("a PodBuildsNotEnabled Warning", WAIT, || async {
        events_for(&client, &app.name, "p")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PodBuildsNotEnabled"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(
        note.contains(&format!(
            "kubectl label namespace {} enbi.hrzn.ee/pod-builds=enabled",
            app.name
        )),
        "{note}"
    );
    // The kubelet keeps retrying the pull (the Pod changes), and still: one Warning, no build.
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_node_images(&client, None).await;
    let warnings = events_for(&client, &app.name, "p")
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("PodBuildsNotEnabled"))
        .count();
    assert_eq!(warnings, 1, "one Warning per Pod");
    assert!(
        builds_in(&client, &app.name).await.is_empty(),
        "no NixBuild outside opted-in namespaces"
    );
    let pod = pods.get("p").await.expect("pod");
    assert!(
        pod.spec
            .and_then(|s| s.scheduling_gates)
            .unwrap_or_default()
            .is_empty(),
        "not gated"
    );
}

/// A namespace's fetch Secret (its `enbi.hrzn.ee/fetch-secret` annotation) goes to the builds
/// its Pods ask for; each builder Job gets a copy of the Secret's known keys, owned by the Job
/// and mounted into its `build` container alone.
#[tokio::test]
async fn a_namespaces_fetch_secret_reaches_its_pods_builds_as_a_copy_owned_by_the_job() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let app = TestNamespace::opted_in(&client, "fetch-app").await;
    let (builds, _operator) =
        setup(&client, "fetch", &["--fetch-secret-namespaces", &app.name]).await;
    Api::<Namespace>::all(client.clone())
        .patch(
            &app.name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"enbi.hrzn.ee/fetch-secret": "creds"}}}),
            ),
        )
        .await
        .expect("annotate the namespace");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"netrc": "machine git.example login u password p\n", "unrelated": "x"},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the Secret");
    let tag = "example.test/private:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let pod = kwok_pod(
        "private",
        tag,
        build_annotations("git+https://git.example/app", tag, "app.stream"),
        Some("arm64"),
    );
    Api::<Pod>::namespaced(client.clone(), &app.name)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the Pod");

    let build = eventually("the Pod watcher's NixBuild", WAIT, || async {
        builds_in(&client, &app.name).await.into_iter().next()
    })
    .await;
    assert_eq!(
        build
            .spec
            .fetch_secret_ref
            .as_ref()
            .map(|s| s.name.as_str()),
        Some("creds")
    );
    let job = eventually("the builder Job", WAIT, || async {
        jobs_for(&client, &builds.name, &build.name_any())
            .await
            .into_iter()
            .next()
    })
    .await;
    let copy = eventually("the Job's copy of the Secret", WAIT, || async {
        Api::<Secret>::namespaced(client.clone(), &builds.name)
            .get_opt(&job.name_any())
            .await
            .ok()
            .flatten()
    })
    .await;
    set_node_images(&client, None).await;
    let keys: Vec<&String> = copy.data.iter().flatten().map(|(k, _)| k).collect();
    assert_eq!(keys, ["netrc"], "only the keys enbi reads");
    let owner = &copy.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(owner.uid.clone())),
        ("Job", job.uid())
    );
    let pod_spec = job
        .spec
        .and_then(|s| s.template.spec)
        .expect("the Job's Pod spec");
    let mounting: Vec<&str> = pod_spec
        .containers
        .iter()
        .filter(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "fetch-credentials")
        })
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(mounting, ["build"]);
}

/// Two namespaces share 2 build slots; one queues 20 builds, then the other asks for one. The
/// next slot that frees goes to the namespace with fewer running builds: the single build
/// starts then, however many of the flood still wait. The figure (flood builds started after
/// the single build was queued, before it started) is printed for the record.
#[tokio::test]
async fn a_flooding_namespace_delays_another_namespaces_build_by_at_most_one_slot() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let (builds, _operator) = setup(&client, "fair", &["--max-concurrent-builds", "2"]).await;
    let flood = TestNamespace::new(&client, "fair-flood").await;
    let quiet = TestNamespace::new(&client, "fair-quiet").await;
    let flood_api = Api::<NixBuild>::namespaced(client.clone(), &flood.name);
    let tag = |i: usize| format!("example.test/flood-{i}:1");
    for i in 0..20 {
        flood_api
            .create(
                &PostParams::default(),
                &NixBuild::new(&format!("flood-{i}"), spec(&tag(i), "x86_64-linux")),
            )
            .await
            .expect("create");
    }
    let started = |phase: Phase| matches!(phase, Phase::Building | Phase::Succeeded);
    let count_started = || async {
        builds_in(&client, &flood.name)
            .await
            .iter()
            .filter(|b| started(b.phase()))
            .count()
    };
    // Twenty first reconciles (finalizer, then status) before the figure starts; a fresh-clone
    // CI run once saw them take over 60 s, cause not found, so this step alone waits longer.
    eventually("2 flood builds running, 18 waiting", 3 * WAIT, || async {
        let list = builds_in(&client, &flood.name).await;
        let waiting = list
            .iter()
            .filter(|b| b.status.is_some() && b.phase() == Phase::Pending)
            .count();
        (count_started().await == 2 && waiting == 18).then_some(())
    })
    .await;

    Api::<NixBuild>::namespaced(client.clone(), &quiet.name)
        .create(
            &PostParams::default(),
            &NixBuild::new("single", spec("example.test/single:1", "x86_64-linux")),
        )
        .await
        .expect("create");
    let queued = eventually("the single build queued", WAIT, || async {
        let list = builds_in(&client, &quiet.name).await;
        let single = list.into_iter().next()?;
        single
            .status
            .as_ref()
            .is_some_and(enbi_core::machine::is_queued)
            .then_some(single)
    })
    .await;
    let message = queued
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let before = count_started().await;

    // Free one slot: the oldest running flood build finishes.
    let running = builds_in(&client, &flood.name)
        .await
        .into_iter()
        .find(|b| b.phase() == Phase::Building)
        .expect("a running flood build");
    let running_tag = running.spec.image_tag.clone();
    finish_builder(
        &client,
        &builds.name,
        &running.name_any(),
        0,
        &success_report(&running_tag),
    )
    .await;
    wait_phase(&client, &quiet.name, "single", Phase::Building).await;
    let after = count_started().await;
    let overtook = after - before;
    println!(
        "fairness: {before} flood builds had started when the single build was queued ({message}); \
         {overtook} more started before it"
    );
    assert_eq!(overtook, 0, "the freed slot went to the other namespace");
    assert_eq!(
        jobs_for(&client, &builds.name, "single").await.len(),
        1,
        "its Job was made"
    );
}
