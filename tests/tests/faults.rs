//! Faults on the real local cluster: a builder past its deadline, and a leader replica killed
//! while another waits.

use std::time::Duration;

use enbi_core::crd::{NixBuild, NixBuildSpec, Phase};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, eventually, install_crd, require_cluster,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn spec(tag: &str) -> NixBuildSpec {
    NixBuildSpec {
        flake_url: "github:example/app".into(),
        package_name: "app".into(),
        image_tag: tag.into(),
        system: "x86_64-linux".into(),
    }
}

async fn build_namespace(client: &Client, name: &str) -> TestNamespace {
    install_crd(client).await;
    let ns = TestNamespace::new(client, name).await;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "enbi-builder"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("sa");
    ns
}

async fn job_count(client: &Client, ns: &str) -> usize {
    Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("jobs")
        .items
        .len()
}

#[tokio::test]
async fn a_builder_past_its_deadline_fails_with_deadline_exceeded() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "deadline-b").await;
    let app = TestNamespace::new(&client, "deadline-app").await;
    let _operator = Operator::start(
        "deadline",
        &[
            "--build-namespace",
            &builds.name,
            "--build-timeout-seconds",
            "3",
            "--listen-address",
            "127.0.0.1:18083",
        ],
    );
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("slow", spec("example.test/slow:1")),
    )
    .await
    .expect("create");
    let failed = eventually("DeadlineExceeded", WAIT, || async {
        api.get("slow")
            .await
            .ok()
            .filter(|b| b.phase() == Phase::Failed)
    })
    .await;
    let status = failed.status.expect("status");
    assert_eq!(status.failure_reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        status.attempts, 1,
        "a deadline is not retried: the same build would time out again"
    );
}

#[tokio::test]
async fn killing_the_leader_hands_over_without_duplicate_jobs() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "leader-b").await;
    let app = TestNamespace::new(&client, "leader-app").await;
    let args = |port: &'static str| {
        vec![
            "--build-namespace".to_owned(),
            builds.name.clone(),
            "--leader-election".into(),
            "--lease-namespace".into(),
            builds.name.clone(),
            "--listen-address".into(),
            format!("127.0.0.1:{port}"),
        ]
    };
    let a_args = args("18084");
    let mut a = Operator::start(
        "leader-a",
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    eventually("replica a to lead", WAIT, || async {
        a.logs().contains("became leader").then_some(())
    })
    .await;
    let b_args = args("18085");
    let b = Operator::start(
        "leader-b",
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!b.logs().contains("became leader"), "only one leader");

    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("one", spec("example.test/one:1")),
    )
    .await
    .expect("create");
    eventually("a's Job", WAIT, || async {
        (job_count(&client, &builds.name).await == 1).then_some(())
    })
    .await;

    a.kill();
    let killed = std::time::Instant::now();
    eventually("replica b to lead", Duration::from_secs(40), || async {
        b.logs().contains("became leader").then_some(())
    })
    .await;
    let handover = killed.elapsed();
    assert!(
        handover < Duration::from_secs(30),
        "took over in {handover:?}, the lease is 15 s"
    );

    api.create(
        &PostParams::default(),
        &NixBuild::new("two", spec("example.test/two:1")),
    )
    .await
    .expect("create");
    eventually("b's Job", WAIT, || async {
        (job_count(&client, &builds.name).await == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        job_count(&client, &builds.name).await,
        2,
        "one Job per build across the handover"
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("leader handover took {handover:?}\n").as_bytes(),
    );
}
