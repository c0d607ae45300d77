//! The builder Job for one attempt of one NixBuild, and what the operator reads back from it.
//!
//! **Two containers.** The flake's code (its evaluation, its build, its stream script) runs in
//! the `build` container, which has no containerd socket, no API token and no host path but
//! what its store mode needs; in `node-daemon` mode it runs as an unprivileged user, so the
//! node's Nix daemon treats it as untrusted. It writes one line saying what it built, then the
//! image, into a FIFO in an `emptyDir` shared with the `load` container, which runs only enbi's
//! own code with the socket, checks what it reads and imports it: the image never touches the
//! disk, and nothing the flake runs can reach containerd. The `load` container's termination
//! message is the report.
//!
//! **Where Jobs live.** The `load` container needs the node's containerd socket as root: the
//! namespace builders run in must allow host paths, which no tenant namespace should. So every
//! builder Job lives in one dedicated build namespace. Owner references cannot cross namespaces, so a Job is
//! linked to its NixBuild by labels (namespace, name, UID, attempt) and a deterministic name; the
//! NixBuild's finalizer deletes it, and `ttlSecondsAfterFinished` cleans up finished ones.
//!
//! **User namespaces.** In `pod` mode the build container is root in the Pod, and Nix builds the
//! flake as that root. With [`BuilderSettings::user_namespaces`] (the default) the Pod runs with
//! `hostUsers: false`: its uid 0 is an unprivileged uid on the node, so a flake that escapes
//! the build acts as nobody there. That also lets Nix's own sandbox run inside it, which needs
//! two more things of the build container, each granted only inside the user namespace: a `/proc`
//! the runtime does not mask (`procMount: Unmasked`; the kernel refuses a fresh `/proc` over a
//! masked one, and the apiserver accepts it only with `hostUsers: false`), a seccomp profile
//! that lets it create namespaces (`Unconfined`: the runtime's default refuses `unshare` to a
//! container without `CAP_SYS_ADMIN`), and `CAP_SETFCAP` (the kernel lets a process map uid 0
//! into a new user namespace, as Nix maps its sandbox's uid to the container's root, only with
//! it), a capability of the Pod's user namespace only. Nodes whose runtime cannot run
//! user-namespaced Pods (runc < 1.2, containerd < 2.0, Kubernetes < 1.33 without its feature
//! gate) refuse such Pods: the setting turns it off there, leaving the build container root on
//! the node, without Nix's sandbox. `node-daemon` mode is unchanged: there the node's daemon
//! builds, as its own build users.
//!
//! The Job runs once (`backoffLimit: 0`): the operator retries failed attempts itself, with its
//! own backoff, so every attempt is visible in status.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::crd::NixBuild;
use crate::defaults;
use crate::keys;
use crate::naming;
use crate::resources;
use crate::trace::TraceContext;

/// `app.kubernetes.io/name` of every builder Job and Pod.
pub const BUILDER_NAME: &str = "enbi-builder";
/// The container that evaluates and builds the flake and streams the image into the pipe.
pub const BUILD_CONTAINER: &str = "build";
/// The container that loads the image from the pipe into containerd and writes the report.
pub const LOAD_CONTAINER: &str = "load";
/// The one container of a release Job.
pub const RELEASE_CONTAINER: &str = "release";
/// The `emptyDir` both containers share, and the FIFO in it.
/// The build container's home (Nix's caches) in `node-daemon` mode, where it is not root.
const BUILD_HOME: &str = "/home/build";
/// The capabilities of the build container in a user namespace (of that namespace only, never
/// the node's): Nix, as root, maps its sandbox's uid to the container's uid 0, which the kernel
/// allows only with `SETFCAP`, and moves each output out of the sandbox after it made it
/// read-only, which needs `DAC_OVERRIDE`.
pub const SANDBOX_CAPABILITIES: [&str; 2] = ["DAC_OVERRIDE", "SETFCAP"];
/// The unprivileged user the build container runs as in `node-daemon` mode (`nobody`).
pub const BUILD_USER: i64 = 65534;

/// Where the builder's Nix store is (the operator's `--store-mode`, the builder's `--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum StoreMode {
    /// The builder image's own store: self-contained, nothing from the node but containerd.
    Pod,
    /// The node's Nix daemon, through its socket: shares the node's store and cache across builds.
    NodeDaemon,
}

impl StoreMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreMode::Pod => "pod",
            StoreMode::NodeDaemon => "node-daemon",
        }
    }
}

/// How builders run, from the operator's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderSettings {
    pub image: String,
    pub namespace: String,
    pub service_account: String,
    /// containerd's socket on the node (mounted at the same path).
    pub containerd_socket: String,
    /// containerd namespace the kubelet's CRI uses.
    pub containerd_namespace: String,
    pub store: StoreMode,
    /// In [`StoreMode::Pod`], run the builder Pod in a user namespace of its own (`hostUsers:
    /// false`) with what Nix's sandbox needs in the build container; see the module docs.
    pub user_namespaces: bool,
    /// Node path of the Nix daemon socket, for [`StoreMode::NodeDaemon`].
    pub nix_daemon_socket: String,
    pub active_deadline_seconds: i64,
    pub ttl_seconds_after_finished: i32,
    /// Pin images so the kubelet's image GC keeps them.
    pub pin: bool,
    /// Replace an existing tag that names another image.
    pub allow_overwrite: bool,
    pub resources: Option<ResourceRequirements>,
    /// Extra environment, e.g. `OTEL_EXPORTER_OTLP_*` for the builder's spans.
    pub env: Vec<EnvVar>,
    /// Tolerations of the builder Pods; placement counts a tainted node only if they tolerate it.
    pub tolerations: Vec<Toleration>,
    pub cache: Cache,
}

/// Binary caches: builders substitute from them, and push every build's closure to one, so
/// that a load on another node, or a rebuild after a node is lost, substitutes instead of
/// building.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cache {
    /// Nix's `extra-substituters`, e.g. `http://cache.example`.
    pub substituters: Vec<String>,
    /// Nix's `extra-trusted-public-keys`, `name:base64`.
    pub trusted_public_keys: Vec<String>,
    /// Store URL each build's closure is copied to (`nix copy --to`), e.g. `http://cache.example`.
    pub push_to: Option<String>,
    /// Secret of the build namespace whose key `secret-key` signs what is pushed.
    pub signing_secret: Option<String>,
}

impl Default for BuilderSettings {
    fn default() -> Self {
        Self {
            image: defaults::BUILDER_IMAGE.into(),
            namespace: defaults::BUILD_NAMESPACE.into(),
            service_account: defaults::BUILDER_SERVICE_ACCOUNT.into(),
            containerd_socket: defaults::CONTAINERD_SOCKET.into(),
            containerd_namespace: defaults::CONTAINERD_NAMESPACE.into(),
            store: StoreMode::Pod,
            user_namespaces: true,
            nix_daemon_socket: defaults::NIX_DAEMON_SOCKET.into(),
            active_deadline_seconds: defaults::BUILD_TIMEOUT_SECONDS,
            ttl_seconds_after_finished: defaults::JOB_TTL_SECONDS,
            pin: true,
            allow_overwrite: false,
            resources: None,
            env: vec![],
            tolerations: vec![],
            cache: Cache::default(),
        }
    }
}

/// What a builder Job is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Attempt `n` of the build.
    Build(u32),
    /// Load `round` on `node`: the locked flake built again there, so that Pods on that node
    /// get the image (see `spread`).
    Load { node: String, round: u32 },
}

/// The labels that tie a Job (and its Pod) to one attempt, or one load, of one NixBuild.
pub fn labels(build: &NixBuild, purpose: &Purpose) -> BTreeMap<String, String> {
    let (key, value) = match purpose {
        Purpose::Build(attempt) => (keys::ATTEMPT, attempt.to_string()),
        Purpose::Load { round, .. } => (keys::LOAD_ROUND, round.to_string()),
    };
    let mut labels = owner_labels(build);
    labels.insert(key.into(), value);
    labels
}

/// The labels that tie any Job of enbi's (and its Pod) to its NixBuild.
fn owner_labels(build: &NixBuild) -> BTreeMap<String, String> {
    BTreeMap::from([
        (keys::NAME.into(), BUILDER_NAME.into()),
        (keys::MANAGED_BY.into(), "enbi".into()),
        (
            keys::BUILD_NAMESPACE.into(),
            build.namespace().unwrap_or_default(),
        ),
        (keys::BUILD_NAME.into(), build.name_any()),
        (keys::BUILD_UID.into(), build.uid().unwrap_or_default()),
    ])
}

/// The Job name for `attempt` of `build`.
pub fn name(build: &NixBuild, attempt: u32) -> String {
    naming::job_name(
        &build.namespace().unwrap_or_default(),
        &build.name_any(),
        &build.uid().unwrap_or_default(),
        attempt,
    )
}

/// The Job name for load `round` of `build` on `node`.
pub fn load_name(build: &NixBuild, node: &str, round: u32) -> String {
    naming::load_job_name(
        &build.namespace().unwrap_or_default(),
        &build.name_any(),
        &build.uid().unwrap_or_default(),
        node,
        round,
    )
}

/// The Job name for the release of `build`'s image on `node`.
pub fn release_name(build: &NixBuild, node: &str) -> String {
    naming::release_job_name(
        &build.namespace().unwrap_or_default(),
        &build.name_any(),
        &build.uid().unwrap_or_default(),
        node,
    )
}

/// Whether a Job is a release Job (which is no build: it takes no build slot).
pub fn is_release(job: &Job) -> bool {
    job.labels().contains_key(keys::RELEASE)
}

impl Purpose {
    pub fn job_name(&self, build: &NixBuild) -> String {
        match self {
            Purpose::Build(attempt) => name(build, *attempt),
            Purpose::Load { node, round } => load_name(build, node, *round),
        }
    }
}

fn host_path(name: &str, path: &str, type_: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Default::default()
    };
    (volume, mount(name, path, false))
}

/// A Secret as a volume that its owner and group may read (0440).
fn secret_volume(name: &str, secret: String) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// No capabilities, no privilege escalation; `user` 0 says root explicitly.
fn security_context(user: Option<i64>, read_only_root: bool) -> SecurityContext {
    SecurityContext {
        run_as_user: user,
        run_as_group: user,
        run_as_non_root: Some(user != Some(0)),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: read_only_root.then_some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The Job for `purpose` of `build`, placed by `affinity`, its builder joining trace `trace`
/// (`TRACEPARENT`): the context is the build's and never changes, so re-applying the same Job
/// is a no-op. A load builds the flake as the build locked it (its provenance), so that every
/// node gets the same image even if the flake's branch moved on.
pub fn render(
    build: &NixBuild,
    purpose: &Purpose,
    affinity: Affinity,
    trace: Option<&TraceContext>,
    settings: &BuilderSettings,
) -> Job {
    let spec = &build.spec;
    let labels = labels(build, purpose);
    let flake_url = match purpose {
        Purpose::Build(_) => &spec.flake_url,
        Purpose::Load { .. } => build
            .status
            .as_ref()
            .and_then(|s| s.provenance.as_ref()?.locked_flake.as_ref())
            .unwrap_or(&spec.flake_url),
    };
    // The builder stops nix and the import itself, within the Job's deadline, so it can still
    // report DeadlineExceeded: 3/4 of the deadline for nix, 1/6 for the import, the rest for
    // scheduling and the report. At least 12 s, so that neither limit rounds down to zero.
    let active_deadline =
        resources::deadline_seconds(settings.active_deadline_seconds, spec.resources.as_deref());
    let deadline = active_deadline.max(12);
    let build_timeout = (deadline * 3 / 4).to_string();
    let import_timeout = (deadline / 6).to_string();
    let strings = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let fetch_credentials = spec.fetch_secret_ref.is_some();
    let build_args = strings(&[
        "build",
        "--image-pipe",
        defaults::IMAGE_PIPE,
        "--flake-url",
        flake_url,
        "--package-name",
        &spec.package_name,
        "--system",
        &spec.system,
        "--store",
        settings.store.as_str(),
        "--build-timeout",
        &build_timeout,
    ])
    .into_iter()
    .chain(
        fetch_credentials
            .then(|| strings(&["--fetch-credentials", defaults::FETCH_CREDENTIALS_DIR]))
            .into_iter()
            .flatten(),
    )
    .chain(cache_args(&settings.cache))
    .collect();
    let load_args = strings(&[
        "load",
        "--image-pipe",
        defaults::IMAGE_PIPE,
        "--image-tag",
        &spec.image_tag,
        "--containerd-address",
        &settings.containerd_socket,
        "--containerd-namespace",
        &settings.containerd_namespace,
        "--build-timeout",
        &build_timeout,
        "--import-timeout",
        &import_timeout,
    ])
    .into_iter()
    .chain(settings.pin.then(|| "--pin".to_owned()))
    .chain(
        settings
            .allow_overwrite
            .then(|| "--allow-overwrite".to_owned()),
    )
    .collect();

    let handoff = (
        empty_dir("handoff"),
        mount("handoff", defaults::HANDOFF_DIR, false),
    );
    let (containerd, containerd_mount) =
        host_path("containerd", &settings.containerd_socket, "Socket");
    let mut volumes = vec![handoff.0, containerd];
    let mut build_mounts = vec![handoff.1.clone()];
    let mut build_env = vec![];
    let mut build_user = Some(0);
    let user_namespaced = settings.store == StoreMode::Pod && settings.user_namespaces;
    if settings.store == StoreMode::NodeDaemon {
        let (v, m) = host_path("nix-daemon", &settings.nix_daemon_socket, "Socket");
        let (sv, mut sm) = host_path("nix-store", "/nix/store", "Directory");
        sm.read_only = Some(true);
        volumes.extend([v, sv, empty_dir("home")]);
        build_mounts.extend([m, sm, mount("home", BUILD_HOME, false)]);
        build_env.push(env("HOME", BUILD_HOME));
        build_user = Some(BUILD_USER);
    }
    // The build container's Secrets, read-only: the fetch credentials' copy, which bears the
    // Job's name (`fetch::copy`), and the cache's signing key, only where something is pushed.
    let signing_secret = settings
        .cache
        .push_to
        .as_ref()
        .and(settings.cache.signing_secret.clone());
    let secrets: Vec<(&str, String, &str)> = [
        (
            "fetch-credentials",
            fetch_credentials.then(|| purpose.job_name(build)),
            defaults::FETCH_CREDENTIALS_DIR,
        ),
        (
            "cache-signing-key",
            signing_secret,
            defaults::CACHE_SIGNING_KEY_DIR,
        ),
    ]
    .into_iter()
    .filter_map(|(volume, secret, dir)| Some((volume, secret?, dir)))
    .collect();
    for (volume, secret, dir) in &secrets {
        volumes.push(secret_volume(volume, secret.clone()));
        build_mounts.push(mount(volume, dir, true));
    }
    // Readable by the build user alone: their group is the Pod's fsGroup, the build user's.
    let fs_group = build_user.filter(|user| !secrets.is_empty() && *user != 0);
    let mut common_env: Vec<EnvVar> = trace
        .map(|t| env("TRACEPARENT", &t.to_string()))
        .into_iter()
        .collect();
    common_env.push(EnvVar {
        name: "ENBI_NODE_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "spec.nodeName".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    common_env.extend(settings.env.iter().cloned());
    build_env.extend(common_env.iter().cloned());

    let build_container = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(settings.image.clone()),
        args: Some(build_args),
        env: Some(build_env),
        volume_mounts: Some(build_mounts),
        resources: resources::requirements(settings.resources.as_ref(), spec.resources.as_deref()),
        // If it dies, the end of its log says why (the load container reports the build's
        // failures itself, from what the build container tells it).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Root only in `pod` mode, where the image's own /nix store is root's; never any
        // escalation, and no capability but, in a user namespace, what Nix's sandbox needs there.
        security_context: Some(if user_namespaced {
            SecurityContext {
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    add: Some(SANDBOX_CAPABILITIES.map(str::to_owned).to_vec()),
                }),
                proc_mount: Some("Unmasked".into()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "Unconfined".into(),
                    ..Default::default()
                }),
                ..security_context(build_user, false)
            }
        } else {
            security_context(build_user, false)
        }),
        ..Default::default()
    };
    let load_container = Container {
        name: LOAD_CONTAINER.into(),
        image: Some(settings.image.clone()),
        args: Some(load_args),
        env: Some(common_env),
        volume_mounts: Some(vec![handoff.1, containerd_mount]),
        // The report is the termination message; if the loader dies before writing it, the
        // kubelet puts the log's end there instead, which the operator shows as the reason.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Root only to reach the root-owned containerd socket.
        security_context: Some(security_context(Some(0), true)),
        ..Default::default()
    };

    let metadata = ObjectMeta {
        name: Some(purpose.job_name(build)),
        namespace: Some(settings.namespace.clone()),
        labels: Some(labels),
        annotations: match purpose {
            Purpose::Build(_) => None,
            Purpose::Load { node, .. } => {
                Some(BTreeMap::from([(keys::LOAD_NODE.into(), node.clone())]))
            }
        },
        ..Default::default()
    };
    let pod = PodSpec {
        affinity: Some(affinity),
        host_users: user_namespaced.then_some(false),
        containers: vec![build_container, load_container],
        volumes: Some(volumes),
        security_context: fs_group.map(|group| PodSecurityContext {
            fs_group: Some(group),
            ..Default::default()
        }),
        ..Default::default()
    };
    // `kubectl logs job/<name>` shows the build's log (nix's output).
    job(metadata, active_deadline, BUILD_CONTAINER, pod, settings)
}

/// The build container's binary-cache flags.
fn cache_args(cache: &Cache) -> Vec<String> {
    let mut args = vec![];
    let mut list = |flag: &str, values: &[String]| {
        if !values.is_empty() {
            args.extend([flag.to_owned(), values.join(",")]);
        }
    };
    list("--substituters", &cache.substituters);
    list("--trusted-public-keys", &cache.trusted_public_keys);
    if let Some(to) = &cache.push_to {
        args.extend(["--push-to".to_owned(), to.clone()]);
        if cache.signing_secret.is_some() {
            args.extend([
                "--push-signing-key".to_owned(),
                format!("{}/secret-key", defaults::CACHE_SIGNING_KEY_DIR),
            ]);
        }
    }
    args
}

/// What a release Job releases, on which node (`release::Plan::target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseTarget<'a> {
    pub node: &'a str,
    /// The normalised tag.
    pub tag: &'a str,
    /// The image's digest on that node.
    pub digest: &'a str,
    pub keep_digest_reference: bool,
}

/// The release Job of `build`'s image on a node (see `release`):
/// one container, enbi's own code, with the containerd socket; placed on the node by name,
/// past the scheduler, so that it also runs on a cordoned node being drained.
pub fn render_release(
    build: &NixBuild,
    target: &ReleaseTarget,
    deadline_seconds: i64,
    settings: &BuilderSettings,
) -> Job {
    let node = target.node;
    let args: Vec<String> = [
        "release",
        "--image-tag",
        target.tag,
        "--image-digest",
        target.digest,
        "--containerd-address",
        &settings.containerd_socket,
        "--containerd-namespace",
        &settings.containerd_namespace,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(
        target
            .keep_digest_reference
            .then(|| "--keep-digest-reference".to_owned()),
    )
    .collect();
    let (containerd, containerd_mount) =
        host_path("containerd", &settings.containerd_socket, "Socket");
    let container = Container {
        name: RELEASE_CONTAINER.into(),
        image: Some(settings.image.clone()),
        args: Some(args),
        volume_mounts: Some(vec![containerd_mount]),
        resources: settings.resources.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Root only to reach the root-owned containerd socket.
        security_context: Some(security_context(Some(0), true)),
        ..Default::default()
    };
    let mut labels = owner_labels(build);
    labels.insert(keys::RELEASE.into(), "true".into());
    let metadata = ObjectMeta {
        name: Some(release_name(build, node)),
        namespace: Some(settings.namespace.clone()),
        labels: Some(labels),
        annotations: Some(BTreeMap::from([(
            keys::RELEASE_NODE.into(),
            node.to_owned(),
        )])),
        ..Default::default()
    };
    let pod = PodSpec {
        node_name: Some(node.to_owned()),
        containers: vec![container],
        volumes: Some(vec![containerd]),
        ..Default::default()
    };
    job(metadata, deadline_seconds, RELEASE_CONTAINER, pod, settings)
}

/// A Job of enbi's around `pod`: run once, never restarted (the operator retries), its Pod
/// with no API token, no service links, the default seccomp profile and the builders'
/// tolerations, `kubectl logs` showing `log_container`.
fn job(
    metadata: ObjectMeta,
    deadline_seconds: i64,
    log_container: &str,
    pod: PodSpec,
    settings: &BuilderSettings,
) -> Job {
    Job {
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(deadline_seconds),
            ttl_seconds_after_finished: Some(settings.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: metadata.labels.clone(),
                    annotations: Some(BTreeMap::from([(
                        "kubectl.kubernetes.io/default-container".into(),
                        log_container.into(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(settings.service_account.clone()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    tolerations: (!settings.tolerations.is_empty())
                        .then(|| settings.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..pod.security_context.clone().unwrap_or_default()
                    }),
                    ..pod
                }),
            },
            ..Default::default()
        }),
        metadata,
        status: None,
    }
}

/// Where a builder Job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Created; its Pod is not running yet.
    Pending,
    Running,
    Succeeded,
    /// Failed; `reason` is the Job's `Failed` condition reason (e.g. `DeadlineExceeded`).
    Failed {
        reason: Option<String>,
    },
}

/// What the operator reads back from a builder Job and its Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobView {
    pub name: String,
    pub state: JobState,
    /// The node the Pod was scheduled to.
    pub node: Option<String>,
    /// The load container's termination message (the report, or its log's end).
    pub termination_message: Option<String>,
    /// Whether the load container terminated (false if its Pod vanished first).
    pub terminated: bool,
    /// When the Job completed (its `status.completionTime`), if it did.
    pub completed: Option<k8s_openapi::jiff::Timestamp>,
}

/// Reads a builder Job and its Pod (if the Pod still exists).
pub fn observe(job: &Job, pod: Option<&Pod>) -> JobView {
    let condition = |type_: &str| {
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_ && c.status == "True"))
    };
    let terminated = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_ref())
        // The container that reports: a builder's `load`, a release Job's `release`.
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.name == LOAD_CONTAINER || c.name == RELEASE_CONTAINER)
        })
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let pod_running = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Running");
    let state = if condition("Complete").is_some() {
        JobState::Succeeded
    } else if let Some(failed) = condition("Failed") {
        JobState::Failed {
            reason: failed.reason.clone(),
        }
    } else if pod_running || job.status.as_ref().and_then(|s| s.ready).unwrap_or(0) > 0 {
        JobState::Running
    } else {
        JobState::Pending
    };
    JobView {
        name: job.name_any(),
        state,
        node: pod
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.node_name.clone()),
        termination_message: terminated
            .and_then(|t| t.message.clone())
            .filter(|m| !m.is_empty()),
        terminated: terminated.is_some(),
        completed: job
            .status
            .as_ref()
            .and_then(|s| s.completion_time.as_ref())
            .map(|t| t.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NixBuildSpec;
    use crate::placement::{NodeView, place};

    pub(crate) fn build() -> NixBuild {
        let mut b = NixBuild::new(
            "chog-5d74cd57bb",
            NixBuildSpec {
                flake_url:
                    "git+https://nossa.ee/~talya/chog?rev=f5d531177a7330e9b270c15cca5df0eb72b8684c"
                        .into(),
                package_name: "chog-docker.stream-layered".into(),
                image_tag: "nossa.ee/talya/chog:f5d531177a7330e9b270c15cca5df0eb72b8684c".into(),
                system: "aarch64-linux".into(),
                fetch_secret_ref: None,
                resources: None,
            },
        );
        b.metadata.namespace = Some("apps".into());
        b.metadata.uid = Some("4f1c7a52-0d1e-4c2a-9a57-1d0f3a8e9b10".into());
        b.metadata.generation = Some(1);
        b
    }

    fn arm_node() -> NodeView {
        NodeView {
            name: "cass".into(),
            arch: Some("arm64".into()),
            os: Some("linux".into()),
            ready: true,
            schedulable: true,
            repel_label: false,
            unsupported: None,
        }
    }

    #[test]
    fn rendered_job() {
        let placement = place(
            "aarch64-linux",
            &[arm_node()],
            &["lamb".into()],
            Some("cass"),
        )
        .expect("placed");
        let job = render(
            &build(),
            &Purpose::Build(1),
            placement.affinity,
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_ref(),
            &BuilderSettings::default(),
        );
        insta::assert_yaml_snapshot!(job);
    }

    #[test]
    fn fetch_credentials_reach_the_build_container_alone() {
        let mut build = build();
        build.spec.fetch_secret_ref = Some(crate::crd::SecretRef {
            name: "creds".into(),
        });
        for (store, fs_group) in [
            (StoreMode::Pod, None),
            (StoreMode::NodeDaemon, Some(BUILD_USER)),
        ] {
            let settings = BuilderSettings {
                store,
                ..Default::default()
            };
            let purpose = Purpose::Load {
                node: "n1".into(),
                round: 1,
            };
            let job = render(&build, &purpose, Affinity::default(), None, &settings);
            let pod = job.spec.expect("spec").template.spec.expect("pod spec");
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.secret.clone())
                .expect("a Secret volume");
            // The copy beside the Job, not the user's Secret, which is in another namespace.
            assert_eq!(volume.secret_name, Some(purpose.job_name(&build)));
            let [build_container, load_container] = &pod.containers[..] else {
                panic!("two containers")
            };
            let mounted = |c: &Container| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.mount_path == defaults::FETCH_CREDENTIALS_DIR)
            };
            assert!(mounted(build_container) && !mounted(load_container));
            let args = build_container.args.clone().expect("args");
            assert!(
                args.windows(2)
                    .any(|w| w == ["--fetch-credentials", defaults::FETCH_CREDENTIALS_DIR])
            );
            assert_eq!(
                pod.security_context.and_then(|c| c.fs_group),
                fs_group,
                "{store:?}"
            );
        }
    }

    #[test]
    fn the_build_container_gets_the_caches_and_the_signing_key_only_to_push() {
        let cache = Cache {
            substituters: vec!["http://cache.example".into(), "https://c2.example".into()],
            trusted_public_keys: vec!["cache.example-1:AAAA".into()],
            push_to: Some("http://cache.example".into()),
            signing_secret: Some("cache-key".into()),
        };
        for (push_to, signs) in [(cache.push_to.clone(), true), (None, false)] {
            let settings = BuilderSettings {
                store: StoreMode::NodeDaemon,
                cache: Cache {
                    push_to,
                    ..cache.clone()
                },
                ..Default::default()
            };
            let job = render(
                &build(),
                &Purpose::Build(1),
                Affinity::default(),
                None,
                &settings,
            );
            let pod = job.spec.expect("spec").template.spec.expect("pod spec");
            let args = pod.containers[0].args.clone().expect("args");
            let after = |flag: &str| {
                args.iter()
                    .position(|a| a == flag)
                    .map(|i| args[i + 1].as_str())
            };
            assert_eq!(
                after("--substituters"),
                Some("http://cache.example,https://c2.example")
            );
            assert_eq!(after("--trusted-public-keys"), Some("cache.example-1:AAAA"));
            assert_eq!(after("--push-to").is_some(), signs);
            assert_eq!(
                after("--push-signing-key"),
                signs.then_some("/run/enbi-cache/secret-key")
            );
            let key_volume = pod
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.secret.as_ref()?.secret_name.clone());
            assert_eq!(key_volume, signs.then(|| "cache-key".to_owned()));
            let load_mounts = pod.containers[1].volume_mounts.clone().expect("mounts");
            assert!(!load_mounts.iter().any(|m| m.name == "cache-signing-key"));
            assert_eq!(
                pod.security_context.and_then(|c| c.fs_group),
                signs.then_some(BUILD_USER)
            );
        }
    }

    #[test]
    fn node_daemon_mode_mounts_the_socket_and_store_read_only() {
        let settings = BuilderSettings {
            store: StoreMode::NodeDaemon,
            ..Default::default()
        };
        let job = render(
            &build(),
            &Purpose::Build(2),
            Affinity::default(),
            None,
            &settings,
        );
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        let mounts = pod.containers[0].volume_mounts.clone().expect("mounts");
        let store = mounts
            .iter()
            .find(|m| m.mount_path == "/nix/store")
            .expect("store mounted");
        assert_eq!(store.read_only, Some(true));
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == "/nix/var/nix/daemon-socket/socket")
        );
        assert!(
            !pod.containers[0]
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "TRACEPARENT"),
            "no TRACEPARENT without a trace"
        );
        assert!(
            pod.containers[0]
                .args
                .as_ref()
                .expect("args")
                .contains(&"node-daemon".to_owned())
        );
    }

    /// In `pod` mode the builder Pod gets a user namespace of its own, and the build container
    /// (alone) what Nix's sandbox needs in it; off, or in `node-daemon` mode, none of it.
    #[test]
    fn pod_mode_builds_in_a_user_namespace_unless_turned_off() {
        for (store, user_namespaces, expected) in [
            (StoreMode::Pod, true, true),
            (StoreMode::Pod, false, false),
            (StoreMode::NodeDaemon, true, false),
            (StoreMode::NodeDaemon, false, false),
        ] {
            let settings = BuilderSettings {
                store,
                user_namespaces,
                ..Default::default()
            };
            let job = render(
                &build(),
                &Purpose::Build(1),
                Affinity::default(),
                None,
                &settings,
            );
            let pod = job.spec.expect("spec").template.spec.expect("pod spec");
            let case = format!("{store:?}, user_namespaces {user_namespaces}");
            assert_eq!(pod.host_users, expected.then_some(false), "{case}");
            let [build, load] = &pod.containers[..] else {
                panic!("two containers: {:?}", pod.containers)
            };
            let build_ctx = build.security_context.clone().expect("context");
            let seccomp = |c: &SecurityContext| c.seccomp_profile.clone().map(|p| p.type_);
            assert_eq!(
                build_ctx.proc_mount.as_deref(),
                expected.then_some("Unmasked"),
                "{case}"
            );
            assert_eq!(
                seccomp(&build_ctx).as_deref(),
                expected.then_some("Unconfined"),
                "{case}"
            );
            // Never privileged nor escalating; no capability but CAP_SETFCAP, and that only of
            // the Pod's own user namespace.
            assert_eq!(build_ctx.privileged, Some(false), "{case}");
            assert_eq!(build_ctx.allow_privilege_escalation, Some(false), "{case}");
            let caps = build_ctx.capabilities.expect("capabilities");
            assert_eq!(caps.drop, Some(vec!["ALL".into()]), "{case}");
            assert_eq!(
                caps.add,
                expected.then(|| vec!["DAC_OVERRIDE".to_owned(), "SETFCAP".to_owned()]),
                "{case}"
            );
            // The load container (enbi's own code, with the socket) keeps the Pod's defaults.
            let load_ctx = load.security_context.clone().expect("context");
            assert_eq!(
                (load_ctx.proc_mount.clone(), seccomp(&load_ctx)),
                (None, None),
                "{case}"
            );
            let pod_seccomp = pod.security_context.and_then(|c| c.seccomp_profile);
            assert_eq!(
                pod_seccomp.map(|p| p.type_).as_deref(),
                Some("RuntimeDefault"),
                "{case}"
            );
        }
    }

    /// The flake's code never shares a container with the containerd socket, in either mode.
    #[test]
    fn only_the_load_container_reaches_containerd() {
        for store in [StoreMode::Pod, StoreMode::NodeDaemon] {
            let settings = BuilderSettings {
                store,
                ..Default::default()
            };
            let job = render(
                &build(),
                &Purpose::Build(1),
                Affinity::default(),
                None,
                &settings,
            );
            let pod = job.spec.expect("spec").template.spec.expect("pod spec");
            let [build, load] = &pod.containers[..] else {
                panic!("two containers: {:?}", pod.containers)
            };
            assert_eq!((build.name.as_str(), load.name.as_str()), ("build", "load"));
            let socket = &settings.containerd_socket;
            let paths = |c: &Container| -> Vec<String> {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .map(|m| m.mount_path.clone())
                    .collect()
            };
            assert!(
                !paths(build).contains(socket),
                "{store:?}: {:?}",
                paths(build)
            );
            assert!(paths(load).contains(socket));
            assert!(paths(build).contains(&"/run/enbi".to_owned()));
            assert!(paths(load).contains(&"/run/enbi".to_owned()));
            let build_ctx = build.security_context.clone().expect("context");
            assert_eq!(
                build_ctx.capabilities.and_then(|c| c.drop),
                Some(vec!["ALL".into()])
            );
            assert_eq!(build_ctx.allow_privilege_escalation, Some(false));
            let user = build_ctx.run_as_user;
            match store {
                StoreMode::Pod => assert_eq!(user, Some(0)),
                StoreMode::NodeDaemon => {
                    assert_eq!(user, Some(BUILD_USER));
                    assert_eq!(build_ctx.run_as_non_root, Some(true));
                }
            }
            assert_eq!(pod.automount_service_account_token, Some(false));
            let load_args = load.args.clone().expect("args");
            assert_eq!(load_args[0], "load");
            assert!(load_args.contains(&build_tag()));
            assert!(!build.args.clone().expect("args").contains(&build_tag()));
        }
    }

    fn build_tag() -> String {
        build().spec.image_tag
    }

    #[test]
    fn tolerations_go_to_the_pod() {
        let job = render(
            &build(),
            &Purpose::Build(1),
            Affinity::default(),
            None,
            &BuilderSettings::default(),
        );
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        assert_eq!(pod.tolerations, None, "none by default");
        let toleration = Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        let settings = BuilderSettings {
            tolerations: vec![toleration.clone()],
            ..Default::default()
        };
        let job = render(
            &build(),
            &Purpose::Build(1),
            Affinity::default(),
            None,
            &settings,
        );
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        assert_eq!(pod.tolerations, Some(vec![toleration]));
    }

    /// A load builds the flake as the build locked it, on its node, under its own name.
    #[test]
    fn a_load_job_builds_the_locked_flake() {
        let mut b = build();
        b.status = Some(crate::crd::NixBuildStatus {
            provenance: Some(crate::report::Provenance {
                locked_flake: Some(
                    "git+https://nossa.ee/~talya/chog?narHash=sha256-x&rev=f5d5".into(),
                ),
                store_path: "/nix/store/x".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let purpose = Purpose::Load {
            node: "cass".into(),
            round: 2,
        };
        let job = render(
            &b,
            &purpose,
            Affinity::default(),
            None,
            &BuilderSettings::default(),
        );
        assert_eq!(job.metadata.name, Some(load_name(&b, "cass", 2)));
        assert_ne!(job.metadata.name, Some(name(&b, 2)));
        let labels = job.metadata.labels.clone().expect("labels");
        assert_eq!(labels.get(keys::LOAD_ROUND).map(String::as_str), Some("2"));
        assert_eq!(labels.get(keys::ATTEMPT), None);
        assert_eq!(
            job.metadata
                .annotations
                .expect("annotations")
                .get(keys::LOAD_NODE),
            Some(&"cass".to_owned())
        );
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        let args = pod.containers[0].args.clone().expect("args");
        let flake = args.iter().position(|a| a == "--flake-url").expect("flake") + 1;
        assert_eq!(
            args[flake],
            "git+https://nossa.ee/~talya/chog?narHash=sha256-x&rev=f5d5"
        );
    }

    #[test]
    fn a_release_job_runs_enbis_own_code_on_its_node_by_name() {
        let mut b = build();
        b.status = Some(crate::crd::NixBuildStatus {
            image_digest: Some("sha256:d".into()),
            build_node: Some("cass".into()),
            ..Default::default()
        });
        let mut plan = crate::release::plan(&b, []).expect("a plan");
        let settings = BuilderSettings::default();
        let target = plan.target("cass").expect("cass");
        let job = render_release(&b, &target, 120, &settings);
        assert!(is_release(&job));
        assert_eq!(job.metadata.name, Some(release_name(&b, "cass")));
        let spec = job.spec.expect("spec");
        assert_eq!(spec.active_deadline_seconds, Some(120));
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.node_name.as_deref(), Some("cass"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let [container] = &pod.containers[..] else {
            panic!("one container")
        };
        assert_eq!(container.image.as_deref(), Some(settings.image.as_str()));
        let args = container.args.clone().expect("args");
        assert_eq!(
            &args[..5],
            [
                "release",
                "--image-tag",
                &plan.tag,
                "--image-digest",
                "sha256:d"
            ]
        );
        assert!(!args.contains(&"--keep-digest-reference".to_owned()));
        // Another NixBuild's image has the digest reference: kept.
        plan.kept
            .insert(crate::reference::digest_reference(&plan.tag, "sha256:d"));
        let target = plan.target("cass").expect("cass");
        let job = render_release(&b, &target, 120, &settings);
        let args = job
            .spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers[0].args.clone());
        assert!(
            args.flatten()
                .expect("args")
                .contains(&"--keep-digest-reference".to_owned())
        );
    }

    #[test]
    fn job_names_are_per_attempt_and_within_limits() {
        let b = build();
        assert_ne!(name(&b, 1), name(&b, 2));
        assert!(naming::is_dns_label(&name(&b, 1)));
    }

    fn job(status: serde_json::Value) -> Job {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "j"}, "status": status}))
            .expect("job")
    }

    fn pod(phase: &str, terminated: Option<serde_json::Value>) -> Pod {
        let state = terminated
            .map(|t| serde_json::json!({"terminated": t}))
            .unwrap_or(serde_json::json!({"running": {}}));
        serde_json::from_value(serde_json::json!({
            "spec": {"nodeName": "cass", "containers": []},
            "status": {"phase": phase, "containerStatuses": [{"name": "load", "state": state, "ready": false, "restartCount": 0, "image": "i", "imageID": ""}]}
        }))
        .expect("pod")
    }

    #[test]
    fn observes_job_and_pod() {
        let v = observe(&job(serde_json::json!({})), None);
        assert_eq!(
            (v.state, v.node, v.terminated),
            (JobState::Pending, None, false)
        );

        let v = observe(
            &job(serde_json::json!({"active": 1})),
            Some(&pod("Running", None)),
        );
        assert_eq!(
            (v.state, v.node.as_deref()),
            (JobState::Running, Some("cass"))
        );

        let done = job(serde_json::json!({"conditions": [{"type": "Complete", "status": "True"}]}));
        let v = observe(
            &done,
            Some(&pod(
                "Succeeded",
                Some(serde_json::json!({"exitCode": 0, "message": "{}"})),
            )),
        );
        assert_eq!(
            (v.state, v.termination_message.as_deref(), v.terminated),
            (JobState::Succeeded, Some("{}"), true)
        );

        let deadline = job(
            serde_json::json!({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}),
        );
        let v = observe(&deadline, None);
        assert_eq!(
            v.state,
            JobState::Failed {
                reason: Some("DeadlineExceeded".into())
            }
        );
        assert!(!v.terminated);
    }
}
