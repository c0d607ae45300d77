//! Scheduling gates against the local cluster: the operator's admission webhook (served on this
//! host, called by the real apiserver over TLS with the CA the operator made) gates annotated
//! Pods, the Pod watcher creates their NixBuild at once, and the gate goes when the build
//! succeeds, or when its NixBuild is deleted. Builders and Pods run on kwok nodes (the fake
//! kubelet's exit protocol); `e2e.rs` runs a gated Pod on a real kubelet.

use std::time::{Duration, Instant};

use enbi_core::crd::{NixBuild, NixBuildSpec, Phase};
use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, Webhook, build_namespace, eventually, finish_builder,
    is_gated, jobs_for, require_cluster, set_node_images, success_report, wait_phase,
};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const BUILDER_IMAGE: &str = "localhost/enbi:test";
const WAIT: Duration = Duration::from_secs(60);
const FLAKE: &str = "github:example/app";

/// The app namespace (opted in), the build namespace, its webhook configuration and an operator
/// serving the webhook on `port`.
struct Setup {
    app: TestNamespace,
    builds: TestNamespace,
    operator: Operator,
    _webhook: Webhook,
}

async fn setup(client: &Client, name: &str, port: u16) -> Setup {
    setup_with(client, name, port, &[]).await
}

/// [`setup`] with extra operator flags.
async fn setup_with(client: &Client, name: &str, port: u16, extra: &[&str]) -> Setup {
    let builds = build_namespace(client, &format!("{name}-b")).await;
    let app = TestNamespace::opted_in(client, &format!("{name}-app")).await;
    let webhook = Webhook::install(client, &app.name, port).await;
    let mut args: Vec<String> = [
        "--build-namespace",
        &builds.name,
        "--builder-image",
        BUILDER_IMAGE,
        "--listen-address",
        "127.0.0.1:18091",
        "--max-builds-per-node",
        "0",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(webhook.operator_args());
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The webhook's Secret goes to the build namespace, deleted with it.
    let operator = Operator::start_with_env(name, &args, &[("POD_NAMESPACE", &builds.name)]);
    webhook.wait_ready(client).await;
    Setup {
        app,
        builds,
        operator,
        _webhook: webhook,
    }
}

fn annotations(tag: &str, flake: &str) -> serde_json::Value {
    enbi_tests::build_annotations(flake, tag, "app.stream")
}

/// A Pod of `tag` on the kwok nodes of one architecture.
fn pod(name: &str, tag: &str, annotations: serde_json::Value) -> Pod {
    enbi_tests::kwok_pod(name, tag, annotations, Some("amd64"))
}

async fn builds_in(client: &Client, ns: &str) -> Vec<NixBuild> {
    Api::<NixBuild>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

#[tokio::test]
async fn a_gated_deployment_gets_one_build_and_its_twenty_pods_are_ungated() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let s = setup(&client, "gate20", 19461).await;
    let tag = "example.test/gated:v1";
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let deployment = enbi_tests::deployment(
        20,
        annotations(tag, FLAKE),
        enbi_tests::kwok_pod_spec(tag, Some("amd64")),
    );
    let created = Instant::now();
    Api::<Deployment>::namespaced(client.clone(), &s.app.name)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");

    // The NixBuild comes from the gated Pods at once, before any pull.
    let build = eventually("the NixBuild of the gated Pods", WAIT, || async {
        builds_in(&client, &s.app.name).await.into_iter().next()
    })
    .await;
    eprintln!(
        "gates: first NixBuild {:?} after the Deployment was created",
        created.elapsed()
    );
    assert_eq!(build.spec.system, "x86_64-linux", "from the arch selector");
    let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);
    let gated = eventually("20 gated Pods", WAIT, || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        (list.items.len() == 20).then_some(list.items)
    })
    .await;
    for p in &gated {
        assert!(is_gated(p), "{} is not gated", p.name_any());
        assert_eq!(node_of(p), None, "a gated Pod is not scheduled");
        assert_eq!(
            p.annotations()
                .get("enbi.hrzn.ee/nixbuild-system")
                .map(String::as_str),
            Some("x86_64-linux"),
            "the webhook records the system it resolved"
        );
    }

    finish_builder(
        &client,
        &s.builds.name,
        &build.name_any(),
        0,
        &success_report(tag),
    )
    .await;
    wait_phase(&client, &s.app.name, &build.name_any(), Phase::Succeeded).await;
    set_node_images(&client, Some(&format!("{BUILDER_IMAGE},{tag}"))).await;
    eventually(
        "all 20 Pods ungated and Running",
        Duration::from_secs(90),
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let running = list
                .items
                .iter()
                .filter(|p| !is_gated(p))
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (running == 20).then_some(())
        },
    )
    .await;
    set_node_images(&client, None).await;
    assert_eq!(
        builds_in(&client, &s.app.name).await.len(),
        1,
        "one NixBuild"
    );
    assert_eq!(
        jobs_for(&client, &s.builds.name, &build.name_any())
            .await
            .len(),
        1,
        "one Job"
    );
    let pulls_failed = Api::<Event>::namespaced(client.clone(), &s.app.name)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.note
                .as_deref()
                .is_some_and(|n| n.contains("ErrImagePull"))
        })
        .count();
    assert_eq!(
        pulls_failed,
        0,
        "no Pod tried to pull; operator log:\n{}",
        s.operator.logs()
    );
}

#[tokio::test]
async fn a_failed_build_keeps_its_pod_gated_with_a_warning_until_a_retry_succeeds() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let s = setup(&client, "gatefail", 19462).await;
    let tag = "example.test/gatefail:v1";
    let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);
    pods.create(
        &PostParams::default(),
        &pod("p", tag, annotations(tag, FLAKE)),
    )
    .await
    .expect("create");
    let build = eventually("the NixBuild", WAIT, || async {
        builds_in(&client, &s.app.name).await.into_iter().next()
    })
    .await;
    let name = build.name_any();
    let report = BuildReport::Failed(FailureReport {
        reason: FailureReason::BuildFailed,
        message: "builder for '/nix/store/x-app.drv' failed".into(),
        log_tail: "error: build failed\n".into(),
    });
    finish_builder(&client, &s.builds.name, &name, 1, &report.encode()).await;
    wait_phase(&client, &s.app.name, &name, Phase::Failed).await;
    let warning = eventually("a BuildFailed Warning on the Pod", WAIT, || async {
        events_for(&client, &s.app.name, "p")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("BuildFailed"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("failed (BuildFailed)"), "{note}");
    assert!(
        note.contains("enbi.hrzn.ee/retry"),
        "says how to retry: {note}"
    );
    assert!(note.contains("stays gated"), "{note}");
    assert!(is_gated(&pods.get("p").await.expect("pod")), "still gated");

    // Retry: a second attempt, which succeeds, and the Pod is ungated.
    Api::<NixBuild>::namespaced(client.clone(), &s.app.name)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"enbi.hrzn.ee/retry": "1"}}})),
        )
        .await
        .expect("retry");
    eventually("the retry's Job", WAIT, || async {
        (jobs_for(&client, &s.builds.name, &name).await.len() == 2).then_some(())
    })
    .await;
    finish_builder(&client, &s.builds.name, &name, 0, &success_report(tag)).await;
    wait_phase(&client, &s.app.name, &name, Phase::Succeeded).await;
    eventually("the Pod ungated and scheduled", WAIT, || async {
        let p = pods.get("p").await.ok()?;
        (!is_gated(&p) && node_of(&p).is_some()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_the_nixbuild_ungates_its_pods() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let s = setup(&client, "gatedel", 19463).await;
    let tag = "example.test/gatedel:v1";
    let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);
    pods.create(
        &PostParams::default(),
        &pod("p", tag, annotations(tag, FLAKE)),
    )
    .await
    .expect("create");
    let build = eventually("the NixBuild", WAIT, || async {
        builds_in(&client, &s.app.name).await.into_iter().next()
    })
    .await;
    assert!(is_gated(&pods.get("p").await.expect("pod")));
    Api::<NixBuild>::namespaced(client.clone(), &s.app.name)
        .delete(&build.name_any(), &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the Pod ungated", WAIT, || async {
        let p = pods.get("p").await.ok()?;
        (!is_gated(&p)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn pods_that_need_no_build_or_cannot_have_one_are_not_gated() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let s = setup(&client, "nogate", 19464).await;
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);

    // Already built: a Succeeded NixBuild for exactly what the Pod asks.
    let built = "example.test/built:v1";
    let spec = NixBuildSpec {
        flake_url: FLAKE.into(),
        package_name: "app.stream".into(),
        image_tag: built.into(),
        system: "x86_64-linux".into(),
        fetch_secret_ref: None,
        resources: None,
    };
    let name = enbi_core::naming::nixbuild_name(&spec);
    Api::<NixBuild>::namespaced(client.clone(), &s.app.name)
        .create(&PostParams::default(), &NixBuild::new(&name, spec))
        .await
        .expect("create the NixBuild");
    finish_builder(&client, &s.builds.name, &name, 0, &success_report(built)).await;
    wait_phase(&client, &s.app.name, &name, Phase::Succeeded).await;
    // The webhook's own cache sees the phase a moment after the controller wrote it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = pods
        .create(
            &PostParams::default(),
            &pod("built", built, annotations(built, FLAKE)),
        )
        .await
        .expect("create");
    assert!(!is_gated(&p), "a Pod whose build Succeeded is never gated");

    // Bad annotations: not gated, and a Warning once the pull fails.
    let bad = "example.test/bad:v1";
    let p = pods
        .create(
            &PostParams::default(),
            &pod("bad", bad, annotations(bad, "not a flake")),
        )
        .await
        .expect("create");
    assert!(!is_gated(&p), "bad annotations are not gated");
    let warning = eventually("an InvalidBuildAnnotations Warning", WAIT, || async {
        events_for(&client, &s.app.name, "bad")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidBuildAnnotations"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));

    // A namespace that has not opted in, even though a webhook configuration (trusting the
    // operator's CA) sends its Pods to the webhook: neither gated nor built.
    let other = TestNamespace::new(&client, "nogate-other").await;
    let other_webhook = Webhook::install(&client, &other.name, 19464).await;
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let ours = configs
        .get(&format!("enbi-test-{}", s.app.name))
        .await
        .expect("config");
    let mut theirs = configs.get(&other_webhook.name).await.expect("config");
    if let (Some(to), Some(from)) = (theirs.webhooks.as_mut(), ours.webhooks.as_ref()) {
        to[0].client_config.ca_bundle = from[0].client_config.ca_bundle.clone();
    }
    configs
        .replace(&other_webhook.name, &PostParams::default(), &theirs)
        .await
        .expect("trust the operator's CA");
    let tag = "example.test/notoptedin:v1";
    let p = Api::<Pod>::namespaced(client.clone(), &other.name)
        .create(
            &PostParams::default(),
            &pod("p", tag, annotations(tag, FLAKE)),
        )
        .await
        .expect("create");
    assert!(!is_gated(&p), "not opted in: not gated");
    eventually("a PodBuildsNotEnabled Warning", WAIT, || async {
        events_for(&client, &other.name, "p")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PodBuildsNotEnabled"))
    })
    .await;
    set_node_images(&client, None).await;
    assert!(
        builds_in(&client, &other.name).await.is_empty(),
        "not built"
    );
    assert_eq!(
        builds_in(&client, &s.app.name).await.len(),
        1,
        "only the NixBuild made beforehand"
    );
}

#[tokio::test]
async fn with_the_webhook_down_pods_take_the_pull_failure_path() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "gatedown-b").await;
    let app = TestNamespace::opted_in(&client, "gatedown-app").await;
    // The configuration is there, nothing listens at its URL.
    let _webhook = Webhook::install(&client, &app.name, 19465).await;
    let _operator = Operator::start(
        "gatedown",
        &[
            "--build-namespace",
            &builds.name,
            "--builder-image",
            BUILDER_IMAGE,
            "--listen-address",
            "127.0.0.1:18092",
        ],
    );
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let tag = "example.test/down:v1";
    let pods = Api::<Pod>::namespaced(client.clone(), &app.name);
    let p = pods
        .create(
            &PostParams::default(),
            &pod("p", tag, annotations(tag, FLAKE)),
        )
        .await
        .expect("admitted although the webhook is down");
    assert!(!is_gated(&p));
    let build = eventually("the NixBuild after the failed pull", WAIT, || async {
        builds_in(&client, &app.name).await.into_iter().next()
    })
    .await;
    finish_builder(
        &client,
        &builds.name,
        &build.name_any(),
        0,
        &success_report(tag),
    )
    .await;
    wait_phase(&client, &app.name, &build.name_any(), Phase::Succeeded).await;
    set_node_images(&client, Some(&format!("{BUILDER_IMAGE},{tag}"))).await;
    eventually("the Pod Running", Duration::from_secs(90), || async {
        let p = pods.get("p").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    set_node_images(&client, None).await;
}

/// The Pod's required node selector terms, as JSON (`null` without).
fn required_terms(pod: &Pod) -> serde_json::Value {
    let value = serde_json::to_value(pod).expect("pod");
    value["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .clone()
}

#[tokio::test]
async fn narrowing_ungates_pods_onto_the_node_that_holds_their_image_and_is_off_by_default() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let kwok_term =
        json!({"matchExpressions": [{"key": "type", "operator": "In", "values": ["kwok"]}]});
    for narrow in [true, false] {
        let name = if narrow { "narrow" } else { "nonarrow" };
        let extra: &[&str] = if narrow {
            &["--narrow-gated-pods"]
        } else {
            &[]
        };
        let s = setup_with(&client, name, 19465, extra).await;
        let tag = format!("example.test/{name}:v1");
        let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);
        // One Pod without node affinity (narrowing sets it), one with a required term (narrowing
        // adds to it): both may run on either amd64 kwok node.
        let plain = pod("plain", &tag, annotations(&tag, FLAKE));
        let mut termed = pod("termed", &tag, annotations(&tag, FLAKE));
        termed.spec.as_mut().expect("spec").affinity = Some(
            serde_json::from_value(json!({"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [kwok_term]}}}))
            .expect("affinity"),
        );
        for p in [&plain, &termed] {
            let created = pods
                .create(&PostParams::default(), p)
                .await
                .expect("create");
            assert!(is_gated(&created), "{} is gated", created.name_any());
        }
        let build = eventually("the NixBuild", WAIT, || async {
            builds_in(&client, &s.app.name).await.into_iter().next()
        })
        .await;
        let node = finish_builder(
            &client,
            &s.builds.name,
            &build.name_any(),
            0,
            &success_report(&tag),
        )
        .await;
        wait_phase(&client, &s.app.name, &build.name_any(), Phase::Succeeded).await;
        for (which, before) in [
            ("plain", serde_json::Value::Null),
            ("termed", json!([kwok_term])),
        ] {
            let got = eventually(&format!("{which} ungated and scheduled"), WAIT, || async {
                let p = pods.get(which).await.ok()?;
                (!is_gated(&p) && node_of(&p).is_some()).then_some(p)
            })
            .await;
            let terms = required_terms(&got);
            if narrow {
                let hostname =
                    json!({"key": "kubernetes.io/hostname", "operator": "In", "values": [node]});
                let want = match &before {
                    serde_json::Value::Null => json!([{"matchExpressions": [hostname]}]),
                    _ => {
                        json!([{"matchExpressions": [kwok_term["matchExpressions"][0], hostname]}])
                    }
                };
                assert_eq!(terms, want, "{which}: narrowed to the build node {node}");
                assert_eq!(
                    node_of(&got),
                    Some(node.as_str()),
                    "{which} runs where the image is"
                );
            } else {
                assert_eq!(terms, before, "{which}: its affinity is left as it was");
            }
        }
        let narrowed = || async {
            events_for(&client, &s.app.name, "plain")
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("NodeAffinityNarrowed"))
        };
        if narrow {
            eventually("a NodeAffinityNarrowed Event", WAIT, narrowed).await;
        } else {
            assert!(narrowed().await.is_none(), "not narrowed: no Event");
        }
    }
    set_node_images(&client, None).await;
}

/// With the default policy (the public registries protected), a NixBuild tagged under Docker
/// Hub is refused at admission, its message naming the field and the rule; a Pod asking for
/// such a build is neither gated nor given a NixBuild, and is told why (`BuildRefused`).
#[tokio::test]
async fn a_tag_under_a_public_registry_is_refused_at_admission_and_its_pod_is_not_gated() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let s = setup(&client, "refuse", 19466).await;
    let tag = "nginx:enbi-planted";
    let api = Api::<NixBuild>::namespaced(client.clone(), &s.app.name);
    let refused = api
        .create(
            &PostParams::default(),
            &NixBuild::new("planted", enbi_tests::nixbuild_spec(tag)),
        )
        .await
        .expect_err("refused at admission");
    let message = refused.to_string();
    assert!(
        message.contains(
            "spec.imageTag docker.io/library/nginx:enbi-planted is under the protected registry docker.io"
        ),
        "{message}"
    );
    api.create(
        &PostParams::default(),
        &NixBuild::new("own", enbi_tests::nixbuild_spec("localhost/refuse/app:1")),
    )
    .await
    .expect("a localhost tag is admitted");

    // The nodes lack the image: the Pod's pull fails, which is when the watcher looks at it.
    set_node_images(&client, Some(BUILDER_IMAGE)).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &s.app.name);
    let created = pods
        .create(
            &PostParams::default(),
            &pod("planter", tag, annotations(tag, FLAKE)),
        )
        .await
        .expect("create the Pod");
    assert!(!is_gated(&created), "not gated");
    let event = eventually("a BuildRefused Event on the Pod", WAIT, || async {
        events_for(&client, &s.app.name, "planter")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("BuildRefused"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.unwrap_or_default();
    assert!(note.contains("protected registry docker.io"), "{note}");
    let names: Vec<String> = builds_in(&client, &s.app.name)
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    assert_eq!(names, ["own"], "no NixBuild for the Pod");
    set_node_images(&client, None).await;
}
