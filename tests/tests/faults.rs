//! Faults on the real local cluster: a builder past its deadline, a leader replica killed while
//! another waits, the apiserver and etcd restarted during builds, a builder's node deleted.

use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, build_namespace, eventually, finish_builder,
    nixbuild_spec as spec, require_cluster, success_report, wait_phase,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

const WAIT: Duration = Duration::from_secs(90);
/// How long a Job's completion may take to show after the control plane was down: the
/// kube-controller-manager's Job controller retries each failed status update with a doubling
/// delay (up to 1000 s), so a restart of a few seconds on a busy machine delays the Jobs' status
/// by minutes, however fast the builders end.
const RECOVERY: Duration = Duration::from_secs(300);

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
    let _operator = Operator::for_builds(
        "deadline",
        &builds.name,
        18083,
        &["--build-timeout-seconds", "3"],
        &[],
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
    let leader = ["--leader-election", "--lease-namespace", &builds.name];
    let mut a = Operator::for_builds("leader-a", &builds.name, 18084, &leader, &[]);
    eventually("replica a to lead", WAIT, || async {
        a.logs().contains("became leader").then_some(())
    })
    .await;
    let b = Operator::for_builds("leader-b", &builds.name, 18085, &leader, &[]);
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

/// Builds in flight survive a control-plane component's crash and restart: the Jobs stay one
/// per build and every build ends Succeeded.
async fn builds_survive_restart_of(component: &str) {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, &format!("{component}-b")).await;
    let app = TestNamespace::new(&client, &format!("{component}-app")).await;
    let _operator = Operator::for_builds(
        component,
        &builds.name,
        18086,
        &["--max-builds-per-node", "0"],
        &[],
    );
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let names = ["s0", "s1", "s2"];
    for name in names {
        api.create(
            &PostParams::default(),
            &NixBuild::new(name, spec(&format!("example.test/{name}:1"))),
        )
        .await
        .expect("create");
    }
    eventually("three Jobs", WAIT, || async {
        (job_count(&client, &builds.name).await == 3).then_some(())
    })
    .await;
    // The builders run (the fake kubelet has played its stages) before the crash: a stage it
    // was applying at that very moment is not retried, and that would test kwok, not enbi.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &builds.name);
    eventually("three builders running", WAIT, || async {
        let list = pods.list(&ListParams::default()).await.ok()?.items;
        let running = list
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        (running == 3).then_some(())
    })
    .await;

    let component = component.to_owned();
    tokio::task::spawn_blocking(move || enbi_tests::restart_component(&component))
        .await
        .expect("restart");
    let client = eventually("the apiserver back", WAIT, || async {
        enbi_tests::cluster().await
    })
    .await;

    // After a restart the fake kubelet may take a while to run the builders again: annotate each
    // builder Pod whatever its phase, and let it end when it runs.
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &builds.name);
    for name in names {
        let selector = format!("enbi.hrzn.ee/nixbuild-name={name}");
        let report = success_report(&format!("example.test/{name}:1"));
        let patch = serde_json::json!({"metadata": {"annotations": {
            "kwok.enbi.test/exit-code": "0",
            "kwok.enbi.test/termination-message": report,
        }}});
        eventually("the builder Pod annotated", WAIT, || async {
            let pod = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .next()?;
            let name = kube::ResourceExt::name_any(&pod);
            pods.patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .ok()
        })
        .await;
    }
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    for name in names {
        eventually(&format!("{name} Succeeded"), RECOVERY, || async {
            api.get(name)
                .await
                .ok()
                .filter(|b| b.phase() == Phase::Succeeded)
        })
        .await;
    }
    assert_eq!(
        job_count(&client, &builds.name).await,
        3,
        "still one Job per build"
    );
}

#[tokio::test]
async fn builds_survive_an_apiserver_restart() {
    builds_survive_restart_of("kube-apiserver").await;
}

#[tokio::test]
async fn builds_survive_an_etcd_restart() {
    builds_survive_restart_of("etcd").await;
}

/// A builder's node is deleted (scaled down, lost): Kubernetes removes its orphaned Pod (the
/// pod GC, after its quarantine), the Job fails without a report, and enbi retries the build
/// (`BuilderLost`) on a node that exists.
#[tokio::test]
async fn a_builder_whose_node_is_deleted_is_retried_elsewhere() {
    use k8s_openapi::api::core::v1::{Node, Pod};
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "nodeloss-b").await;
    let app = TestNamespace::new(&client, "nodeloss-app").await;
    let _operator = Operator::for_builds("nodeloss", &builds.name, 18087, &[], &[]);
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    let tag = "example.test/nodeloss:1";
    api.create(&PostParams::default(), &NixBuild::new("lost", spec(tag)))
        .await
        .expect("create");
    let pods = Api::<Pod>::namespaced(client.clone(), &builds.name);
    let node = eventually("the first builder scheduled", WAIT, || async {
        let pod = pods
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .next()?;
        pod.spec?.node_name
    })
    .await;

    let deleted = std::time::Instant::now();
    Api::<Node>::all(client.clone())
        .delete(&node, &Default::default())
        .await
        .expect("delete the build node");
    let retrying = eventually(
        "the loss noticed (pod GC quarantine is 40 s)",
        Duration::from_secs(180),
        || async {
            let status = api.get("lost").await.ok()?.status?;
            (status.failure_reason.as_deref() == Some("BuilderLost")).then_some(status)
        },
    )
    .await;
    eprintln!("node loss noticed after {:?}", deleted.elapsed());
    assert_eq!(
        retrying.attempts, 1,
        "no second Job before the loss is known"
    );
    // The node comes back (kwok's nodes are made by `up`), and so does room for attempt 2.
    tokio::task::spawn_blocking(|| {
        let up = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/up");
        std::process::Command::new(up)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("up")
    })
    .await
    .expect("up");
    let node2 = finish_builder(&client, &builds.name, "lost", 0, &success_report(tag)).await;
    let done = wait_phase(&client, &app.name, "lost", Phase::Succeeded).await;
    let status = done.status.expect("status");
    assert_eq!(status.attempts, 2);
    assert_eq!(status.build_node.as_deref(), Some(node2.as_str()));
    assert_eq!(
        job_count(&client, &builds.name).await,
        2,
        "one Job per attempt"
    );
}
