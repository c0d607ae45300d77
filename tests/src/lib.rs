//! Support for enbi's integration tests: a client for the local cluster (`tests/cluster/up`),
//! a fresh namespace per test, and polling helpers.
//!
//! Without a reachable cluster a test fails in CI (`CI=true`) and elsewhere prints a loud
//! `SKIPPED` line straight to stderr (past the test harness's capture) and returns.

pub mod cases;
pub mod host;

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use enbi_core::crd::NixBuild;
use enbi_core::keys;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

/// The admin kubeconfig `tests/cluster/up` writes, unless `KUBECONFIG` names another.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster/.state/kubeconfig")
        })
}

/// Something a test needs is missing: a failure in CI (`CI=true`), elsewhere a loud `SKIPPED`
/// line on stderr (past the harness's capture) and `false`, so the test returns.
pub fn unavailable(what: &str, why: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI needs {what}: {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {}: needs {what}: {why}",
        std::thread::current().name().unwrap_or("test")
    );
    false
}

/// A client for the local cluster, or `None` (after saying so loudly) when there is none
/// outside CI. In CI a missing cluster is a failure.
pub async fn cluster() -> Option<Client> {
    match connect().await {
        Ok(client) => Some(client),
        Err(why) => {
            unavailable(
                "the local cluster",
                &format!("{why}; start one with tests/cluster/up"),
            );
            None
        }
    }
}

async fn connect() -> Result<Client, String> {
    let path = kubeconfig_path();
    let kubeconfig =
        Kubeconfig::read_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let client = Client::try_from(config).map_err(|e| e.to_string())?;
    client
        .apiserver_version()
        .await
        .map_err(|e| format!("apiserver unreachable: {e}"))?;
    Ok(client)
}

/// Returns from the test when there is no cluster (see [`cluster`]).
#[macro_export]
macro_rules! require_cluster {
    () => {
        match $crate::cluster().await {
            Some(client) => client,
            None => return,
        }
    };
}

/// A namespace for one test, deleted when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Creates `enbi-test-<prefix>-<random>`.
    pub async fn new(client: &Client, prefix: &str) -> Self {
        Self::with_labels(client, prefix, serde_json::json!({})).await
    }

    /// [`TestNamespace::new`], opted in to builds from Pod annotations
    /// (`enbi.hrzn.ee/pod-builds=enabled`).
    pub async fn opted_in(client: &Client, prefix: &str) -> Self {
        let labels = serde_json::json!({keys::POD_BUILDS: keys::POD_BUILDS_ENABLED});
        Self::with_labels(client, prefix, labels).await
    }

    async fn with_labels(client: &Client, prefix: &str, mut labels: serde_json::Value) -> Self {
        labels["enbi.test/namespace"] = "true".into();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("enbi-test-{prefix}-{:x}", nanos ^ std::process::id());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("valid namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await, and the test's client needs the test's runtime (blocked here), so
        // delete through a fresh client on a thread and runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = runtime {
                rt.block_on(async {
                    if let Ok(client) = connect().await {
                        // The test's operator is gone: its finalizers would keep the namespace
                        // terminating for ever (and a later CRD deletion with it). And the
                        // NixBuilds go now, not when the namespace controller gets to them: the
                        // next test's operator would meanwhile take them up (and put its
                        // finalizer back).
                        let builds = Api::<NixBuild>::namespaced(client.clone(), &name);
                        let unhold = json!({"metadata": {"finalizers": null}});
                        for build in builds
                            .list(&Default::default())
                            .await
                            .map(|l| l.items)
                            .unwrap_or_default()
                        {
                            let _ = builds
                                .patch(
                                    &build.name_any(),
                                    &Default::default(),
                                    &Patch::Merge(&unhold),
                                )
                                .await;
                        }
                        let _ = builds
                            .delete_collection(&DeleteParams::background(), &Default::default())
                            .await;
                        let _ = Api::<Namespace>::all(client)
                            .delete(&name, &DeleteParams::background())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Polls `check` every 200 ms until it yields a value, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies the NixBuild CRD (exactly what `enbi-operator crd` prints) and waits until the
/// apiserver serves it.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};

    let crd = enbi_core::crd::NixBuild::crd();
    let name = crd.metadata.name.clone().expect("CRD has a name");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("enbi-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply the CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD Established within 30 s")
    .expect("watch the CRD");
}

/// A running `enbi-operator run` process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Operator {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Operator {
    /// The operator binary next to this test's executable (`cargo build` puts both in the same
    /// profile directory; `tests/run` builds it first).
    pub fn binary() -> PathBuf {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target profile directory");
        let bin = dir.join("enbi-operator");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build -p enbi-operator` first",
            bin.display()
        );
        bin
    }

    /// Starts the operator with `args`, logging to a file under the target directory.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with_env(name, args, &[])
    }

    /// [`Operator::start`] with extra environment variables (e.g. `OTEL_*`).
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let bin = Self::binary();
        let log = bin.with_file_name(format!("operator-{name}.log"));
        let file = std::fs::File::create(&log).expect("operator log file");
        let child = std::process::Command::new(&bin)
            .arg("run")
            .args(args)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start enbi-operator");
        Self { child, log }
    }

    /// Starts the operator with builder Jobs in `build_ns`, `/readyz` and `/metrics` on
    /// `127.0.0.1:<port>`, then `extra` flags and `env` variables: the start-up most tests share.
    pub fn for_builds(
        name: &str,
        build_ns: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--build-namespace", build_ns, "--listen-address", &listen];
        args.extend_from_slice(extra);
        Self::start_with_env(name, &args, env)
    }

    /// Kills the process at once, as a crash or a node loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    /// Kills the operator; when a test fails, prints its log's tail, so that CI shows why.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `GET http://127.0.0.1:<port><path>` (an operator's `/readyz` or `/metrics`): status code and
/// body, `None` while nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// Serialises tests that run an operator: each watches every namespace, so two at once would
/// both act on every NixBuild.
pub static OPERATOR_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sets the fake kubelet's image list on every kwok node (`None`: every image present), the
/// switch between "image missing" and "image present" in the local cluster.
pub async fn set_node_images(client: &Client, images: Option<&str>) {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{ListParams, Patch, PatchParams};
    let nodes = Api::<Node>::all(client.clone());
    let list = nodes
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .expect("list kwok nodes");
    let patch = serde_json::json!({"metadata": {"annotations": {"kwok.enbi.test/images": images}}});
    for node in list.items {
        let name = node.metadata.name.unwrap_or_default();
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("annotate node");
    }
}

/// Kills a control-plane component of the local cluster (SIGKILL) and starts it again with
/// `tests/cluster/up`, as a crash and a restart would.
pub fn restart_component(name: &str) {
    restart_components(&[name], &[]);
}

/// Kills control-plane components of the local cluster (SIGKILL) and starts them again with
/// `tests/cluster/up`, run with `env` added to its environment (e.g.
/// `ENBI_APISERVER_FEATURE_GATES`).
pub fn restart_components(names: &[&str], env: &[(&str, &str)]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cluster");
    let state =
        std::env::var_os("ENBI_CLUSTER_STATE").map_or_else(|| dir.join(".state"), PathBuf::from);
    for name in names {
        let pid = std::fs::read_to_string(state.join(format!("pids/{name}.pid")))
            .expect("component pid file");
        let status = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {name}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let up = std::process::Command::new(dir.join("up"))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("up");
    assert!(up.success(), "tests/cluster/up restarts {names:?}");
}

/// A namespace for builder Jobs, with the builder ServiceAccount the Jobs name, after making sure
/// the CRD is installed.
pub async fn build_namespace(client: &Client, prefix: &str) -> TestNamespace {
    use k8s_openapi::api::core::v1::ServiceAccount;
    install_crd(client).await;
    let ns = TestNamespace::new(client, prefix).await;
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "enbi-builder"}}))
            .expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("builder ServiceAccount");
    ns
}

/// The spec of a NixBuild of `tag` from `github:example/app#packages.x86_64-linux.app`.
pub fn nixbuild_spec(tag: &str) -> enbi_core::crd::NixBuildSpec {
    enbi_core::crd::NixBuildSpec {
        flake_url: "github:example/app".into(),
        package_name: "app".into(),
        image_tag: tag.into(),
        system: "x86_64-linux".into(),
        fetch_secret_ref: None,
        resources: None,
    }
}

/// The report a builder writes after loading `tag`.
pub fn success_report(tag: &str) -> String {
    use enbi_core::report::{BuildReport, ImageReport, Timings};
    BuildReport::Succeeded(ImageReport {
        image_tag: tag.into(),
        digest: format!("sha256:{}", "d".repeat(64)),
        size: 4_194_304,
        provenance: enbi_core::report::Provenance {
            store_path: "/nix/store/x-app".into(),
            ..Default::default()
        },
        bytes_streamed: 4_194_304,
        imported: true,
        timings: Timings::default(),
    })
    .encode()
}

/// Waits for a Running builder Pod of NixBuild `build` in `build_ns` and ends it through the
/// fake kubelet's exit protocol with `exit_code` and termination `message`; returns its node.
pub async fn finish_builder(
    client: &Client,
    build_ns: &str,
    build: &str,
    exit_code: i32,
    message: &str,
) -> String {
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    use kube::api::{ListParams, Patch, PatchParams};
    let pods = Api::<Pod>::namespaced(client.clone(), build_ns);
    let selector = format!("enbi.hrzn.ee/nixbuild-name={build}");
    let pod = eventually(
        "the builder Pod to run",
        Duration::from_secs(90),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            // Not one already told to exit (it runs on for a moment).
            list.items.into_iter().find(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && !p.annotations().contains_key("kwok.enbi.test/exit-code")
            })
        },
    )
    .await;
    let patch = serde_json::json!({"metadata": {"annotations": {
        "kwok.enbi.test/exit-code": exit_code.to_string(),
        "kwok.enbi.test/termination-message": message,
    }}});
    pods.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .expect("end the builder");
    pod.spec.and_then(|s| s.node_name).expect("scheduled")
}

/// Waits up to a minute for NixBuild `ns/name` to reach `phase`.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: enbi_core::crd::Phase,
) -> enbi_core::crd::NixBuild {
    let api = Api::<enbi_core::crd::NixBuild>::namespaced(client.clone(), ns);
    eventually(
        &format!("NixBuild {name} to be {phase:?}"),
        Duration::from_secs(60),
        || async { api.get(name).await.ok().filter(|b| b.phase() == phase) },
    )
    .await
}

/// The builder Jobs of NixBuild `build` (every attempt) in `build_ns`.
pub async fn jobs_for(
    client: &Client,
    build_ns: &str,
    build: &str,
) -> Vec<k8s_openapi::api::batch::v1::Job> {
    use kube::api::ListParams;
    let selector = format!("enbi.hrzn.ee/nixbuild-name={build}");
    Api::<k8s_openapi::api::batch::v1::Job>::namespaced(client.clone(), build_ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list Jobs")
        .items
}

/// A Mutating- and a ValidatingWebhookConfiguration (as the Timoni module's) that send the Pods
/// and NixBuilds of one namespace to an operator on this host at `https://127.0.0.1:<port>`;
/// deleted when dropped. The operator patches in its CA bundle ([`Webhook::operator_args`]).
#[derive(Debug)]
pub struct Webhook {
    pub name: String,
    pub port: u16,
}

impl Webhook {
    /// Installs the configuration for Pods created in `namespace`.
    pub async fn install(client: &Client, namespace: &str, port: u16) -> Self {
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
        };
        let name = format!("enbi-test-{namespace}");
        let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "pods.enbi.hrzn.ee",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate-pods")},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "matchConditions": [{"name": "asks-for-a-build", "expression":
                    "has(object.metadata.annotations) && 'enbi.hrzn.ee/nixbuild-imageTag' in object.metadata.annotations"}],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 5,
            }],
        }))
        .expect("webhook configuration");
        let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
        let _ = api.delete(&name, &DeleteParams::default()).await;
        api.create(&PostParams::default(), &config)
            .await
            .expect("create the MutatingWebhookConfiguration");
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "nixbuilds.enbi.hrzn.ee",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate-nixbuilds")},
                "rules": [{"apiGroups": ["enbi.hrzn.ee"], "apiVersions": ["v1alpha1"],
                           "operations": ["CREATE"], "resources": ["nixbuilds"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "timeoutSeconds": 5,
            }],
        }))
        .expect("validating webhook configuration");
        let api = Api::<ValidatingWebhookConfiguration>::all(client.clone());
        let _ = api.delete(&name, &DeleteParams::default()).await;
        api.create(&PostParams::default(), &config)
            .await
            .expect("create the ValidatingWebhookConfiguration");
        Self { name, port }
    }

    /// The operator flags that serve this webhook on 127.0.0.1.
    pub fn operator_args(&self) -> Vec<String> {
        [
            "--webhook-configuration",
            &self.name,
            "--webhook-address",
            &format!("127.0.0.1:{}", self.port),
            "--webhook-hosts",
            "127.0.0.1",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Waits until the operator has patched its CA bundle into both configurations (then the
    /// apiserver trusts it).
    pub async fn wait_ready(&self, client: &Client) {
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
        };
        let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
        let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
        let has_bundle =
            |config: Option<k8s_openapi::api::admissionregistration::v1::WebhookClientConfig>| {
                config
                    .and_then(|c| c.ca_bundle)
                    .is_some_and(|b| !b.0.is_empty())
            };
        eventually(
            "the webhooks' CA bundle",
            Duration::from_secs(60),
            || async {
                let m = mutating
                    .get(&self.name)
                    .await
                    .ok()?
                    .webhooks?
                    .first()?
                    .client_config
                    .clone();
                let v = validating
                    .get(&self.name)
                    .await
                    .ok()?
                    .webhooks?
                    .first()?
                    .client_config
                    .clone();
                (has_bundle(Some(m)) && has_bundle(Some(v))).then_some(())
            },
        )
        .await;
        // The operator loads the certificate right after patching the bundle.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
        };
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = runtime {
                rt.block_on(async {
                    if let Ok(client) = connect().await {
                        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
                            .delete(&name, &DeleteParams::default())
                            .await;
                        let _ = Api::<ValidatingWebhookConfiguration>::all(client)
                            .delete(&name, &DeleteParams::default())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Whether the Pod carries enbi's scheduling gate.
pub fn is_gated(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(enbi_core::pod::gate::is_gated)
}

/// The annotations with which a Pod asks enbi for `tag`, built from `flake`'s
/// `packages.<system>.<package>`.
pub fn build_annotations(flake: &str, tag: &str, package: &str) -> serde_json::Value {
    serde_json::json!({
        "enbi.hrzn.ee/nixbuild-flakeUrl": flake,
        "enbi.hrzn.ee/nixbuild-imageTag": tag,
        "enbi.hrzn.ee/nixbuild-packageName": package,
    })
}

/// A Pod spec (JSON) with one container of `tag` (`IfNotPresent`) for the kwok nodes, of
/// architecture `arch` if given.
pub fn kwok_pod_spec(tag: &str, arch: Option<&str>) -> serde_json::Value {
    let mut selector = serde_json::json!({"type": "kwok"});
    if let Some(arch) = arch {
        selector["kubernetes.io/arch"] = arch.into();
    }
    serde_json::json!({
        "nodeSelector": selector,
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists"}],
        "containers": [{"name": "app", "image": tag, "imagePullPolicy": "IfNotPresent"}],
    })
}

/// A Pod `name` with `annotations` and [`kwok_pod_spec`].
pub fn kwok_pod(
    name: &str,
    tag: &str,
    annotations: serde_json::Value,
    arch: Option<&str>,
) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": kwok_pod_spec(tag, arch),
    }))
    .expect("pod")
}

/// A Deployment `app` of `replicas` Pods labelled `app: app` with `annotations` and `spec` (e.g.
/// [`kwok_pod_spec`]).
pub fn deployment(
    replicas: i32,
    annotations: serde_json::Value,
    spec: serde_json::Value,
) -> k8s_openapi::api::apps::v1::Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}, "annotations": annotations},
                "spec": spec,
            },
        },
    }))
    .expect("deployment")
}
