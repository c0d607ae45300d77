//! Faults of the installation that the operator cannot fix alone (the build namespace missing,
//! RBAC refusing the builder Job, no builder image) show where users look: the Ready condition
//! of every NixBuild held up, one Event on it, and a failing `/readyz` that says why. Once
//! fixed, builds go on by themselves.

use std::io::{Read, Write};
use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_tests::{
    OPERATOR_LOCK, Operator, TestNamespace, build_namespace, eventually, install_crd, jobs_for,
    kubeconfig_path, nixbuild_spec as spec, require_cluster,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// `/readyz` of the operator on `port`: status code and body.
fn readyz(port: u16) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// Waits until the NixBuild's Ready condition has `reason`; returns the condition.
async fn ready_reason(api: &Api<NixBuild>, name: &str, reason: &str) -> Condition {
    eventually(&format!("Ready reason {reason}"), WAIT, || async {
        let build = api.get(name).await.ok()?;
        let ready = build
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (ready.reason == reason).then_some(ready)
    })
    .await
}

/// The Events on NixBuild `name` with `reason`, after the operator had time to retry a few
/// times (its backoff starts at 1 s), so that repeats would show.
async fn events_after_retries(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    tokio::time::sleep(Duration::from_secs(8)).await;
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

async fn readyz_says(port: u16, code: u16, text: &str) -> String {
    eventually(&format!("/readyz {code} saying {text}"), WAIT, || async {
        readyz(port).filter(|(c, body)| *c == code && body.contains(text))
    })
    .await
    .1
}

#[tokio::test]
async fn a_missing_build_namespace_holds_builds_until_it_exists() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    install_crd(&client).await;
    let app = TestNamespace::new(&client, "nsmissing-app").await;
    let missing = format!("{}-builds", app.name);
    let _operator = Operator::for_builds("nsmissing", &missing, 18091, &[], &[]);
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("b", spec("example.test/nsmissing:1")),
    )
    .await
    .expect("create");

    let ready = ready_reason(&api, "b", "BuildNamespaceMissing").await;
    assert_eq!(ready.status, "False");
    assert!(
        ready
            .message
            .contains(&format!("build namespace {missing} does not exist")),
        "{}",
        ready.message
    );
    assert_eq!(api.get("b").await.expect("get").phase(), Phase::Pending);
    let body = readyz_says(18091, 503, "BuildNamespaceMissing").await;
    assert!(body.contains(&missing), "{body}");
    let events = events_after_retries(&client, &app.name, "b", "BuildNamespaceMissing").await;
    assert_eq!(events.len(), 1, "one Event: {events:?}");
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));

    // Fixed: the namespace (deleted with the test) and its builder ServiceAccount.
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": missing}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create the build namespace");
    let builds = TestNamespace { name: missing };
    let sa = serde_json::from_value(json!({"metadata": {"name": "enbi-builder"}})).expect("sa");
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &builds.name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("builder ServiceAccount");
    eventually("the build to go on", Duration::from_secs(120), || async {
        (api.get("b").await.ok()?.phase() == Phase::Building).then_some(())
    })
    .await;
    assert_eq!(jobs_for(&client, &builds.name, "b").await.len(), 1);
    readyz_says(18091, 200, "ok").await;
}

/// A ClusterRole and its binding, deleted at the end of the test (left behind if it fails:
/// they bind only the test's own identity).
async fn bind_role(client: &Client, name: &str, user: &str, rules: serde_json::Value) {
    let role: ClusterRole =
        serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).expect("role");
    Api::<ClusterRole>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("enbi-tests").force(),
            &Patch::Apply(&role),
        )
        .await
        .expect("ClusterRole");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .expect("binding");
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("enbi-tests").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("ClusterRoleBinding");
}

/// Everything the operator needs (as the Timoni module grants it), with `job_verbs` on Jobs.
fn operator_rules(job_verbs: &[&str]) -> serde_json::Value {
    json!([
        {"apiGroups": ["enbi.hrzn.ee"], "resources": ["nixbuilds"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["enbi.hrzn.ee"], "resources": ["nixbuilds/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["enbi.hrzn.ee"], "resources": ["nixbuilds/finalizers"], "verbs": ["update"]},
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": job_verbs},
    ])
}

#[tokio::test]
async fn rbac_refusing_the_builder_job_holds_builds_until_granted() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "rbac-b").await;
    let app = TestNamespace::new(&client, "rbac-app").await;
    let user = format!("system:serviceaccount:{}:enbi-operator", app.name);
    let role = format!("{}-operator", app.name);
    bind_role(
        &client,
        &role,
        &user,
        operator_rules(&["get", "list", "watch"]),
    )
    .await;
    // The operator acts as that identity: the admin kubeconfig, impersonating it.
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path()).expect("kubeconfig"))
            .expect("yaml");
    for user_entry in kubeconfig["users"].as_sequence_mut().expect("users") {
        user_entry["user"]["as"] = user.clone().into();
    }
    let restricted = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        restricted.path(),
        serde_yaml::to_string(&kubeconfig).expect("yaml"),
    )
    .expect("write kubeconfig");
    let restricted_path = restricted.path().to_string_lossy().into_owned();
    let _operator = Operator::for_builds(
        "rbac",
        &builds.name,
        18092,
        &[],
        &[("KUBECONFIG", &restricted_path)],
    );
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("r", spec("example.test/rbac:1")),
    )
    .await
    .expect("create");

    let ready = ready_reason(&api, "r", "OperatorForbidden").await;
    assert!(ready.message.contains("on jobs.batch"), "{}", ready.message);
    assert!(
        ready
            .message
            .contains(&format!("User \"{user}\" cannot patch resource \"jobs\"")),
        "the apiserver's words name the identity and verb: {}",
        ready.message
    );
    let body = readyz_says(18092, 503, "OperatorForbidden").await;
    assert!(body.contains("jobs.batch"), "{body}");
    let events = events_after_retries(&client, &app.name, "r", "OperatorForbidden").await;
    assert_eq!(events.len(), 1, "one Event: {events:?}");
    assert!(jobs_for(&client, &builds.name, "r").await.is_empty());

    bind_role(
        &client,
        &role,
        &user,
        operator_rules(&["get", "list", "watch", "create", "patch", "delete"]),
    )
    .await;
    eventually("the build to go on", Duration::from_secs(120), || async {
        (api.get("r").await.ok()?.phase() == Phase::Building).then_some(())
    })
    .await;
    readyz_says(18092, 200, "ok").await;
    let _ = Api::<ClusterRoleBinding>::all(client.clone())
        .delete(&role, &DeleteParams::default())
        .await;
    let _ = Api::<ClusterRole>::all(client.clone())
        .delete(&role, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn no_builder_image_holds_builds_and_readyz_says_so() {
    let client = require_cluster!();
    let _serial = OPERATOR_LOCK.lock().await;
    let builds = build_namespace(&client, "noimage-b").await;
    let app = TestNamespace::new(&client, "noimage-app").await;
    let _operator = Operator::for_builds(
        "noimage",
        &builds.name,
        18093,
        &["--builder-image", ""],
        &[],
    );
    let body = readyz_says(18093, 503, "BuilderImageUnset").await;
    assert!(body.contains("--builder-image"), "{body}");
    let api = Api::<NixBuild>::namespaced(client.clone(), &app.name);
    api.create(
        &PostParams::default(),
        &NixBuild::new("n", spec("example.test/noimage:1")),
    )
    .await
    .expect("create");
    let ready = ready_reason(&api, "n", "BuilderImageUnset").await;
    assert!(
        ready.message.contains("ENBI_BUILDER_IMAGE"),
        "{}",
        ready.message
    );
    assert_eq!(api.get("n").await.expect("get").phase(), Phase::Pending);
    let events = events_after_retries(&client, &app.name, "n", "BuilderImageUnset").await;
    assert_eq!(events.len(), 1, "one Event: {events:?}");
    assert!(jobs_for(&client, &builds.name, "n").await.is_empty());
    readyz_says(18093, 503, "BuilderImageUnset").await;
}
