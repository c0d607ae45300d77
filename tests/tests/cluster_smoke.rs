//! The local cluster runs enbi's API and the Jobs enbi-core renders: the CRD is served and
//! enforces its rules, and a builder Job placed for aarch64-linux lands on an arm64 node, runs,
//! and its termination message is read back into a build decision.

use std::time::Duration;

use enbi_core::crd::{NixBuild, NixBuildSpec, NixBuildStatus, Phase};
use enbi_core::job::{self, BuilderSettings, JobState};
use enbi_core::machine::{self, Observation};
use enbi_core::placement::{self, NodeView};
use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport, ImageReport, Timings};
use enbi_tests::{TestNamespace, eventually, install_crd, require_cluster};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

fn spec() -> NixBuildSpec {
    NixBuildSpec {
        flake_url: "git+https://nossa.ee/~talya/chog?rev=f5d531177a7330e9b270c15cca5df0eb72b8684c"
            .into(),
        package_name: "chog-docker.stream-layered".into(),
        image_tag: "nossa.ee/talya/chog:f5d531177a7330e9b270c15cca5df0eb72b8684c".into(),
        system: "aarch64-linux".into(),
        fetch_secret_ref: None,
        resources: None,
    }
}

#[tokio::test]
async fn crd_is_established_and_enforces_its_rules() {
    let client = require_cluster!();
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd").await;
    let api = Api::<NixBuild>::namespaced(client.clone(), &ns.name);

    let mut bad = spec();
    bad.system = "aarch64-darwin".into();
    let err = api
        .create(&PostParams::default(), &NixBuild::new("bad", bad))
        .await
        .expect_err("refused");
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .contains("spec.system must be one of x86_64-linux"),
        "{}",
        status.message
    );

    api.create(&PostParams::default(), &NixBuild::new("good", spec()))
        .await
        .expect("valid spec accepted");
    let change = json!({"spec": {"imageTag": "nossa.ee/talya/chog:other"}});
    let err = api
        .patch("good", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .expect_err("immutable");
    assert!(err.to_string().contains("spec is immutable"), "{err}");
}

/// The arch of every Ready node, as placement sees it.
async fn nodes(client: &Client) -> Vec<NodeView> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    nodes.items.iter().map(NodeView::from).collect()
}

/// Runs one attempt of `build` as a real Job in `ns` and returns the decision the state
/// machine makes from what the cluster reports, after the fake kubelet ends the builder with
/// `exit_code` and `message`.
async fn run_attempt(
    client: &Client,
    ns: &str,
    build: &NixBuild,
    exit_code: i32,
    message: &str,
) -> machine::Decision {
    let placement = placement::place(&build.spec.system, &nodes(client).await, &[], None)
        .expect("an arm64 node");
    let settings = BuilderSettings {
        namespace: ns.into(),
        image: "localhost/enbi:test".into(),
        ..Default::default()
    };
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": settings.service_account}}))
            .expect("sa");
    let _ = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await;
    let manifest = job::render(
        build,
        &job::Purpose::Build(1),
        placement.affinity,
        None,
        &settings,
    );
    let jobs = Api::<Job>::namespaced(client.clone(), ns);
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &manifest)
        .await
        .expect("create the builder Job");
    let job_name = manifest.name_any();
    let selector = ListParams::default().labels(&format!("job-name={job_name}"));

    let pod = eventually(
        "the builder Pod to run",
        Duration::from_secs(60),
        || async {
            let list = pods.list(&selector).await.ok()?;
            list.items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        },
    )
    .await;
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("scheduled");
    let node_arch = Api::<Node>::all(client.clone())
        .get(&node)
        .await
        .expect("node")
        .labels()
        .get("kubernetes.io/arch")
        .cloned();
    assert_eq!(
        node_arch.as_deref(),
        Some("arm64"),
        "aarch64-linux builds run on arm64 nodes"
    );
    let mid = job::observe(&jobs.get(&job_name).await.expect("job"), Some(&pod));
    assert_eq!(mid.state, JobState::Running);

    let finish = json!({"metadata": {"annotations": {
        "kwok.enbi.test/exit-code": exit_code.to_string(),
        "kwok.enbi.test/termination-message": message,
    }}});
    pods.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&finish),
    )
    .await
    .expect("annotate");

    let view = eventually("the Job to finish", Duration::from_secs(60), || async {
        let job = jobs.get(&job_name).await.ok()?;
        let pod = pods.get(&pod.name_any()).await.ok();
        let view = job::observe(&job, pod.as_ref());
        matches!(view.state, JobState::Succeeded | JobState::Failed { .. }).then_some(view)
    })
    .await;
    assert_eq!(view.node.as_deref(), Some(node.as_str()));

    let mut building = build.clone();
    building.status = Some(NixBuildStatus {
        phase: Some(Phase::Building),
        attempts: 1,
        ..Default::default()
    });
    let obs = Observation {
        build: &building,
        job: Some(&view),
        policy: Ok(()),
        fetch_secret: Ok(()),
        placement: Err(placement::NoEligibleNode("unused once building".into())),
        capacity: Ok(()),
        spread: Default::default(),
        fault: None,
        other_systems: vec![],
        now: k8s_openapi::jiff::Timestamp::now(),
    };
    machine::decide(obs, &machine::Settings::default())
}

fn build(ns: &str, name: &str) -> NixBuild {
    let mut b = NixBuild::new(name, spec());
    b.metadata.namespace = Some(ns.into());
    b.metadata.uid = Some(format!("uid-{name}"));
    b.metadata.generation = Some(1);
    b
}

#[tokio::test]
async fn builder_job_succeeds_on_an_arm64_node_and_its_report_is_read() {
    let client = require_cluster!();
    let ns = TestNamespace::new(&client, "job-ok").await;
    let b = build(&ns.name, "ok");
    let report = BuildReport::Succeeded(ImageReport {
        image_tag: b.spec.image_tag.clone(),
        digest: format!("sha256:{}", "c".repeat(64)),
        size: 112_199_680,
        provenance: enbi_core::report::Provenance {
            store_path: "/nix/store/x-chog".into(),
            ..Default::default()
        },
        bytes_streamed: 112_199_680,
        imported: true,
        timings: Timings::default(),
    });
    let d = run_attempt(&client, &ns.name, &b, 0, &report.encode()).await;
    let status = d.status;
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.image_size, Some(112_199_680));
    assert!(status.build_node.is_some_and(|n| n.contains("arm64")));
}

#[tokio::test]
async fn builder_job_failure_carries_reason_and_log_tail() {
    let client = require_cluster!();
    let ns = TestNamespace::new(&client, "job-fail").await;
    let b = build(&ns.name, "fail");
    let report = BuildReport::Failed(FailureReport {
        reason: FailureReason::EvalFailed,
        message: "flake has no attribute packages.aarch64-linux.chog".into(),
        log_tail: "error: attribute 'chog' missing\n".into(),
    });
    let d = run_attempt(&client, &ns.name, &b, 1, &report.encode()).await;
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.failure_reason.as_deref(), Some("EvalFailed"));
    assert!(
        d.status
            .failure_message
            .is_some_and(|m| m.contains("attribute 'chog' missing"))
    );
}
