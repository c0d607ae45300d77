//! The builder Job for one attempt of one NixBuild, and what the operator reads back from it.
//!
//! **Where Jobs live.** Builders need the node's containerd socket and run as root: the namespace
//! they run in must allow privileged Pods, which no tenant namespace should. So every builder Job
//! lives in one dedicated build namespace. Owner references cannot cross namespaces, so a Job is
//! linked to its NixBuild by labels (namespace, name, UID, attempt) and a deterministic name; the
//! NixBuild's finalizer deletes it, and `ttlSecondsAfterFinished` cleans up finished ones.
//!
//! The Job runs once (`backoffLimit: 0`): the operator retries failed attempts itself, with its
//! own backoff, so every attempt is visible in status.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::crd::NixBuild;
use crate::naming;
use crate::trace::TraceContext;

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_BUILD_NAMESPACE: &str = "enbi.hrzn.ee/nixbuild-namespace";
pub const LABEL_BUILD_NAME: &str = "enbi.hrzn.ee/nixbuild-name";
pub const LABEL_BUILD_UID: &str = "enbi.hrzn.ee/nixbuild-uid";
pub const LABEL_ATTEMPT: &str = "enbi.hrzn.ee/attempt";
/// `app.kubernetes.io/name` of every builder Job and Pod.
pub const BUILDER_NAME: &str = "enbi-builder";
/// The builder's container name.
pub const CONTAINER: &str = "builder";

/// Where the builder's Nix store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Default for BuilderSettings {
    fn default() -> Self {
        Self {
            // The image the repository's flake builds, loaded onto nodes like any enbi image.
            image: concat!("localhost/enbi:", env!("CARGO_PKG_VERSION")).into(),
            namespace: "enbi-builds".into(),
            service_account: "enbi-builder".into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            containerd_namespace: "k8s.io".into(),
            store: StoreMode::Pod,
            nix_daemon_socket: "/nix/var/nix/daemon-socket/socket".into(),
            active_deadline_seconds: 3600,
            ttl_seconds_after_finished: 3600,
            pin: true,
            allow_overwrite: false,
            resources: None,
            env: vec![],
            tolerations: vec![],
        }
    }
}

/// The labels that tie a Job (and its Pod) to one attempt of one NixBuild.
pub fn labels(build: &NixBuild, attempt: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.into(), BUILDER_NAME.into()),
        (LABEL_MANAGED_BY.into(), "enbi".into()),
        (
            LABEL_BUILD_NAMESPACE.into(),
            build.namespace().unwrap_or_default(),
        ),
        (LABEL_BUILD_NAME.into(), build.name_any()),
        (LABEL_BUILD_UID.into(), build.uid().unwrap_or_default()),
        (LABEL_ATTEMPT.into(), attempt.to_string()),
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

fn host_path(name: &str, path: &str, type_: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(type_.into()),
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    };
    (volume, mount)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The Job for `attempt` of `build`, placed by `affinity`, its builder joining trace `trace`
/// (`TRACEPARENT`): the context is the build's and never changes, so re-applying the same Job
/// is a no-op.
pub fn render(
    build: &NixBuild,
    attempt: u32,
    affinity: Affinity,
    trace: Option<&TraceContext>,
    settings: &BuilderSettings,
) -> Job {
    let spec = &build.spec;
    let labels = labels(build, attempt);
    // The builder stops nix and the import itself, within the Job's deadline, so it can still
    // report DeadlineExceeded: 3/4 of the deadline for nix, 1/6 for the import, the rest for
    // scheduling and the report. At least 12 s, so that neither limit rounds down to zero.
    let deadline = settings.active_deadline_seconds.max(12);
    let build_timeout = (deadline * 3 / 4).to_string();
    let import_timeout = (deadline / 6).to_string();
    let args = [
        "build",
        "--flake-url",
        &spec.flake_url,
        "--package-name",
        &spec.package_name,
        "--system",
        &spec.system,
        "--image-tag",
        &spec.image_tag,
        "--containerd-address",
        &settings.containerd_socket,
        "--containerd-namespace",
        &settings.containerd_namespace,
        "--store",
        settings.store.as_str(),
        "--build-timeout",
        &build_timeout,
        "--import-timeout",
        &import_timeout,
    ]
    .into_iter()
    .map(String::from)
    .chain(settings.pin.then(|| "--pin".to_owned()))
    .chain(
        settings
            .allow_overwrite
            .then(|| "--allow-overwrite".to_owned()),
    )
    .collect();

    let (mut volumes, mut mounts): (Vec<_>, Vec<_>) = [host_path(
        "containerd",
        &settings.containerd_socket,
        "Socket",
    )]
    .into_iter()
    .unzip();
    if settings.store == StoreMode::NodeDaemon {
        let (v, m) = host_path("nix-daemon", &settings.nix_daemon_socket, "Socket");
        let (sv, mut sm) = host_path("nix-store", "/nix/store", "Directory");
        sm.read_only = Some(true);
        volumes.extend([v, sv]);
        mounts.extend([m, sm]);
    }
    let mut env_vars: Vec<EnvVar> = trace
        .map(|t| env("TRACEPARENT", &t.to_string()))
        .into_iter()
        .collect();
    env_vars.push(EnvVar {
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
    env_vars.extend(settings.env.iter().cloned());

    let container = Container {
        name: CONTAINER.into(),
        image: Some(settings.image.clone()),
        args: Some(args),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        resources: settings.resources.clone(),
        // The report is the termination message; if the builder dies before writing it, the
        // kubelet puts the log's end there instead, which the operator shows as the reason.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            // Root only to reach the root-owned containerd socket; no capabilities, no escalation.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    Job {
        metadata: ObjectMeta {
            name: Some(name(build, attempt)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(settings.active_deadline_seconds),
            ttl_seconds_after_finished: Some(settings.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(settings.service_account.clone()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    affinity: Some(affinity),
                    tolerations: (!settings.tolerations.is_empty())
                        .then(|| settings.tolerations.clone()),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
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
    /// The builder container's termination message (its report, or the log's end).
    pub termination_message: Option<String>,
    /// Whether the builder container terminated (false if its Pod vanished first).
    pub terminated: bool,
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
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER))
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
            1,
            placement.affinity,
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_ref(),
            &BuilderSettings::default(),
        );
        insta::assert_yaml_snapshot!(job);
    }

    #[test]
    fn node_daemon_mode_mounts_the_socket_and_store_read_only() {
        let settings = BuilderSettings {
            store: StoreMode::NodeDaemon,
            ..Default::default()
        };
        let job = render(&build(), 2, Affinity::default(), None, &settings);
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

    #[test]
    fn tolerations_go_to_the_pod() {
        let job = render(
            &build(),
            1,
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
        let job = render(&build(), 1, Affinity::default(), None, &settings);
        let pod = job.spec.expect("spec").template.spec.expect("pod spec");
        assert_eq!(pod.tolerations, Some(vec![toleration]));
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
            "status": {"phase": phase, "containerStatuses": [{"name": "builder", "state": state, "ready": false, "restartCount": 0, "image": "i", "imageID": ""}]}
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
