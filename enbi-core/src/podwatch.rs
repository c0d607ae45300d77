//! What a Pod asks of enbi: `Pod -> findings`.
//!
//! A Pod opts in with the annotations `enbi.hrzn.ee/nixbuild-flakeUrl`, `-imageTag` and
//! `-packageName` (and optionally `-system`). Only a container or init container waiting because
//! its image is missing (`ErrImagePull`, `ImagePullBackOff`, `ErrImageNeverPull`), whose image is
//! the annotated tag, asks for a build; so does a Pod that enbi's admission webhook gated (see
//! `gate`) before it was scheduled. Every Pod of a Deployment maps to the same NixBuild name,
//! so however many fail, one build is made.

use std::collections::BTreeMap;

use garde::Validate;
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSpec, PodStatus};

use crate::crd::{NixBuild, NixBuildSpec, Phase};
use crate::{naming, reference, system};

pub const ANNOTATION_FLAKE_URL: &str = "enbi.hrzn.ee/nixbuild-flakeUrl";
pub const ANNOTATION_IMAGE_TAG: &str = "enbi.hrzn.ee/nixbuild-imageTag";
pub const ANNOTATION_PACKAGE_NAME: &str = "enbi.hrzn.ee/nixbuild-packageName";
pub const ANNOTATION_SYSTEM: &str = "enbi.hrzn.ee/nixbuild-system";

/// Waiting reasons that mean "the image is not on this node".
const MISSING_IMAGE: [&str; 3] = ["ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"];

/// A build a Pod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The NixBuild's name: equal for equal specs.
    pub name: String,
    pub spec: NixBuildSpec,
    /// The node the Pod is on, where the image is wanted.
    pub node: Option<String>,
    /// The containers waiting for the image.
    pub containers: Vec<String>,
}

/// What enbi concludes about one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Build this (or find the NixBuild already building it).
    Build(BuildRequest),
    /// The annotations are present but unusable; the message names the annotation. No build.
    InvalidAnnotations(String),
    /// A container waits for the annotated image with `imagePullPolicy: Always`: the kubelet
    /// will always pull from the registry and never use a node-loaded image. No build.
    PullAlways { container: String },
    /// A container crash-loops on the annotated image, which is present: not a missing image
    /// (perhaps built for another architecture). No build.
    CrashLoop { container: String },
}

/// Whether the Pod can ask for anything: [`inspect`] finds nothing in a Pod without the image
/// tag annotation, so the operator need not keep it.
pub fn annotated(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_IMAGE_TAG))
}

/// The Pod's findings; empty when the Pod has not opted in or needs nothing.
/// `node_arch` is the `kubernetes.io/arch` of the Pod's node, if known.
pub fn inspect(pod: &Pod, node_arch: Option<&str>) -> Vec<Finding> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let Some(tag) = annotations.get(ANNOTATION_IMAGE_TAG) else {
        return vec![];
    };
    let Some(spec) = pod.spec.as_ref() else {
        return vec![];
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let mut findings = vec![];
    let mut missing = vec![];
    if crate::gate::is_gated(spec) {
        // Gated by enbi: not scheduled, so no status yet; every container of the tag waits.
        missing = containers
            .filter(|c| {
                c.image
                    .as_deref()
                    .is_some_and(|image| reference::same_image(image, tag))
            })
            .map(|c| c.name.clone())
            .collect();
    } else if let Some(status) = pod.status.as_ref() {
        inspect_statuses(spec, status, tag, &mut findings, &mut missing);
    }
    if !missing.is_empty() {
        findings.push(match request(annotations, node_arch) {
            Ok(spec) => Finding::Build(BuildRequest {
                name: naming::nixbuild_name(&spec),
                spec,
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                containers: missing,
            }),
            Err(message) => Finding::InvalidAnnotations(message),
        });
    }
    findings
}

/// Containers of `tag` that wait because the image is missing (into `missing`), or that show
/// why a build would not help (into `findings`).
fn inspect_statuses(
    spec: &PodSpec,
    status: &PodStatus,
    tag: &str,
    findings: &mut Vec<Finding>,
    missing: &mut Vec<String>,
) {
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    let ours: Vec<(&Container, &ContainerStatus)> = statuses
        .filter_map(|s| {
            containers
                .clone()
                .find(|c| c.name == s.name)
                .map(|c| (c, s))
        })
        .filter(|(c, _)| {
            c.image
                .as_deref()
                .is_some_and(|image| reference::same_image(image, tag))
        })
        .collect();
    let waiting = |s: &ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|st| st.waiting.as_ref())
            .and_then(|w| w.reason.clone())
            .unwrap_or_default()
    };

    for (container, status) in &ours {
        let reason = waiting(status);
        if MISSING_IMAGE.contains(&reason.as_str()) {
            if container.image_pull_policy.as_deref() == Some("Always") {
                findings.push(Finding::PullAlways {
                    container: container.name.clone(),
                });
            } else {
                missing.push(container.name.clone());
            }
        } else if reason == "CrashLoopBackOff" {
            findings.push(Finding::CrashLoop {
                container: container.name.clone(),
            });
        }
    }
}

/// An Event to publish on a Pod. `key` names what it is about (the NixBuild): the Pod watcher
/// publishes each `(reason, key)` once per Pod, however often the Pod changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNotice {
    pub warning: bool,
    pub reason: &'static str,
    pub key: String,
    pub note: String,
}

/// The Events a Pod waiting for `request` needs, given its NixBuild as cached (`None`: not
/// seen yet, e.g. just created):
/// - `WaitingForBuild`, once per Pod and NixBuild: which NixBuild makes the missing image. It
///   does not say the build's phase and is not said again when the phase changes: the progress
///   is the NixBuild's own (status, Events), and the Pod starts by itself once the image is on
///   its node.
/// - `BuildFailed` (Warning), once per Pod and NixBuild, when the build has Failed while the
///   Pod still waits: the Pod will not start until the build is fixed or retried. A `gated`
///   Pod is told how to let it go without the build.
pub fn waiting_notices(
    request: &BuildRequest,
    build: Option<&NixBuild>,
    gated: bool,
) -> Vec<PodNotice> {
    let name = &request.name;
    let mut notices = vec![PodNotice {
        warning: false,
        reason: "WaitingForBuild",
        key: name.clone(),
        note: format!(
            "Waiting for NixBuild {name} to build and load {}; its status and Events show the progress",
            request.spec.image_tag
        ),
    }];
    if let Some(build) = build.filter(|b| b.phase() == Phase::Failed) {
        let status = build.status.as_ref();
        let reason = status.and_then(|s| s.failure_reason.as_deref());
        let message = status.and_then(|s| s.failure_message.as_deref());
        notices.push(PodNotice {
            warning: true,
            reason: "BuildFailed",
            key: name.clone(),
            note: format!(
                "NixBuild {name} failed ({}): {}; fix it or set {} on it to build again{}",
                reason.unwrap_or("unknown reason"),
                message.unwrap_or("see its status"),
                crate::crd::ANNOTATION_RETRY,
                if gated {
                    format!(
                        ". The Pod stays gated ({}) until the build succeeds; deleting the NixBuild \
                         lets it be scheduled without the image",
                        crate::gate::GATE
                    )
                } else {
                    String::new()
                },
            ),
        });
    }
    notices
}

/// The NixBuild spec the annotations describe, checked with the CRD's own rules.
pub(crate) fn request(
    annotations: &BTreeMap<String, String>,
    node_arch: Option<&str>,
) -> Result<NixBuildSpec, String> {
    let get = |key: &str| {
        annotations
            .get(key)
            .cloned()
            .ok_or_else(|| format!("annotation {key} is missing"))
    };
    let system = match annotations.get(ANNOTATION_SYSTEM) {
        Some(s) => s.clone(),
        None => node_arch
            .and_then(system::from_arch)
            .map(|s| s.nix.to_owned())
            .ok_or_else(|| {
                format!("the node's architecture is unknown to enbi; set {ANNOTATION_SYSTEM}")
            })?,
    };
    let spec = NixBuildSpec {
        flake_url: get(ANNOTATION_FLAKE_URL)?,
        package_name: get(ANNOTATION_PACKAGE_NAME)?,
        image_tag: get(ANNOTATION_IMAGE_TAG)?,
        system,
    };
    spec.validate().map_err(|report| {
        let messages: Vec<String> = report
            .iter()
            .map(|(path, e)| {
                let key = match path.to_string().as_str() {
                    "flake_url" => ANNOTATION_FLAKE_URL,
                    "package_name" => ANNOTATION_PACKAGE_NAME,
                    "image_tag" => ANNOTATION_IMAGE_TAG,
                    _ => ANNOTATION_SYSTEM,
                };
                format!("annotation {key} {}", e.message())
            })
            .collect();
        messages.join("; ")
    })?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const TAG: &str = "nossa.ee/talya/chog:f5d5";

    fn annotations() -> Value {
        json!({
            ANNOTATION_FLAKE_URL: "git+https://nossa.ee/~talya/chog?rev=f5d5",
            ANNOTATION_IMAGE_TAG: TAG,
            ANNOTATION_PACKAGE_NAME: "chog-docker.stream-layered",
        })
    }

    fn pod(annotations: Value, image: &str, policy: &str, waiting: &str, init: bool) -> Pod {
        let container = json!({"name": "app", "image": image, "imagePullPolicy": policy});
        let status = json!({"name": "app", "ready": false, "restartCount": 0, "image": image, "imageID": "",
                            "state": {"waiting": {"reason": waiting}}});
        let (containers, statuses) = if init {
            (
                json!({"initContainers": [container], "containers": [{"name": "main", "image": "busybox"}], "nodeName": "arm-1"}),
                json!({"initContainerStatuses": [status]}),
            )
        } else {
            (
                json!({"containers": [container], "nodeName": "arm-1"}),
                json!({"containerStatuses": [status]}),
            )
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "apps", "annotations": annotations},
            "spec": containers,
            "status": statuses,
        }))
        .expect("pod")
    }

    fn build_of(findings: &[Finding]) -> &BuildRequest {
        match findings {
            [Finding::Build(r)] => r,
            other => panic!("expected one build, got {other:?}"),
        }
    }

    #[test]
    fn pods_not_annotated_with_a_tag_find_nothing_so_need_not_be_kept() {
        let flake = "github:o/r";
        for (annotations, kept) in [
            (annotations(), true),
            (json!({ANNOTATION_IMAGE_TAG: TAG}), true),
            (
                json!({ANNOTATION_FLAKE_URL: flake, ANNOTATION_PACKAGE_NAME: "app"}),
                false,
            ),
            (json!({"example.com/owner": "team"}), false),
            (json!(null), false),
        ] {
            for waiting in ["ErrImagePull", "ImagePullBackOff", "CrashLoopBackOff"] {
                let p = pod(annotations.clone(), TAG, "IfNotPresent", waiting, false);
                assert_eq!(annotated(&p), kept, "{annotations}");
                if !kept {
                    assert_eq!(
                        inspect(&p, Some("arm64")),
                        vec![],
                        "{annotations} {waiting}"
                    );
                }
            }
        }
    }

    #[test]
    fn missing_image_asks_for_a_build_on_the_nodes_arch() {
        for reason in MISSING_IMAGE {
            for init in [false, true] {
                let f = inspect(
                    &pod(annotations(), TAG, "IfNotPresent", reason, init),
                    Some("arm64"),
                );
                let r = build_of(&f);
                assert_eq!(r.spec.system, "aarch64-linux");
                assert_eq!(r.spec.image_tag, TAG);
                assert_eq!(r.node.as_deref(), Some("arm-1"));
                assert_eq!(r.containers, ["app"]);
                assert_eq!(r.name, naming::nixbuild_name(&r.spec));
            }
        }
    }

    #[test]
    fn normalised_references_match_and_others_do_not() {
        let mut a = annotations();
        a[ANNOTATION_IMAGE_TAG] = json!("docker.io/library/chog:1");
        assert!(matches!(
            inspect(
                &pod(a.clone(), "chog:1", "IfNotPresent", "ErrImagePull", false),
                Some("amd64")
            )[..],
            [Finding::Build(_)]
        ));
        assert!(
            inspect(
                &pod(a, "chog:2", "IfNotPresent", "ErrImagePull", false),
                Some("amd64")
            )
            .is_empty()
        );
    }

    #[test]
    fn a_gated_pod_asks_for_its_build_before_any_pull() {
        let mut a = annotations();
        a[ANNOTATION_SYSTEM] = json!("x86_64-linux");
        let gated: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "apps", "annotations": a},
            "spec": {
                "schedulingGates": [{"name": crate::gate::GATE}],
                "containers": [{"name": "app", "image": TAG}, {"name": "side", "image": "busybox"}],
            },
        }))
        .expect("pod");
        let f = inspect(&gated, None);
        let r = build_of(&f);
        assert_eq!(r.spec.system, "x86_64-linux");
        assert_eq!(r.node, None);
        assert_eq!(r.containers, ["app"]);
    }

    #[test]
    fn system_annotation_wins_over_the_node() {
        let mut a = annotations();
        a[ANNOTATION_SYSTEM] = json!("x86_64-linux");
        let f = inspect(
            &pod(a, TAG, "IfNotPresent", "ErrImagePull", false),
            Some("arm64"),
        );
        assert_eq!(build_of(&f).spec.system, "x86_64-linux");
    }

    #[test]
    fn many_pods_one_name() {
        let names: std::collections::BTreeSet<String> = (0..20)
            .map(|_| {
                build_of(&inspect(
                    &pod(
                        annotations(),
                        TAG,
                        "IfNotPresent",
                        "ImagePullBackOff",
                        false,
                    ),
                    Some("arm64"),
                ))
                .name
                .clone()
            })
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn not_opted_in_or_not_missing_is_nothing() {
        assert!(
            inspect(
                &pod(json!({}), TAG, "IfNotPresent", "ErrImagePull", false),
                Some("arm64")
            )
            .is_empty()
        );
        assert!(
            inspect(
                &pod(
                    annotations(),
                    TAG,
                    "IfNotPresent",
                    "ContainerCreating",
                    false
                ),
                Some("arm64")
            )
            .is_empty()
        );
    }

    #[test]
    fn pull_always_warns_instead_of_building() {
        let f = inspect(
            &pod(annotations(), TAG, "Always", "ErrImagePull", false),
            Some("arm64"),
        );
        assert_eq!(
            f,
            [Finding::PullAlways {
                container: "app".into()
            }]
        );
    }

    #[test]
    fn crash_loop_of_a_present_image_is_a_hint_not_a_build() {
        let f = inspect(
            &pod(
                annotations(),
                TAG,
                "IfNotPresent",
                "CrashLoopBackOff",
                false,
            ),
            Some("arm64"),
        );
        assert_eq!(
            f,
            [Finding::CrashLoop {
                container: "app".into()
            }]
        );
    }

    proptest::proptest! {
        /// Whatever the annotations hold, inspecting never panics, and a build is only asked
        /// for with values that pass the CRD's own rules.
        #[test]
        fn arbitrary_annotations_never_build_invalid_specs(
            flake in "\\PC{0,80}", package in "\\PC{0,40}", tag in "\\PC{0,60}", system in proptest::option::of("\\PC{0,20}"),
        ) {
            let mut a = json!({ANNOTATION_FLAKE_URL: flake, ANNOTATION_PACKAGE_NAME: package, ANNOTATION_IMAGE_TAG: tag.clone()});
            if let Some(system) = system {
                a[ANNOTATION_SYSTEM] = json!(system);
            }
            for finding in inspect(&pod(a, &tag, "IfNotPresent", "ErrImagePull", false), Some("arm64")) {
                if let Finding::Build(r) = finding {
                    proptest::prop_assert!(r.spec.validate().is_ok());
                    proptest::prop_assert!(naming::is_dns_label(&r.name));
                }
            }
        }
    }

    #[test]
    fn bad_annotations_name_the_annotation() {
        let mut a = annotations();
        a[ANNOTATION_FLAKE_URL] = json!("not a flake");
        let f = inspect(
            &pod(a, TAG, "IfNotPresent", "ErrImagePull", false),
            Some("arm64"),
        );
        let [Finding::InvalidAnnotations(m)] = &f[..] else {
            panic!("{f:?}")
        };
        assert!(
            m.contains("annotation enbi.hrzn.ee/nixbuild-flakeUrl must be"),
            "{m}"
        );

        let mut a = annotations();
        a.as_object_mut()
            .expect("object")
            .remove(ANNOTATION_PACKAGE_NAME);
        let f = inspect(
            &pod(a, TAG, "IfNotPresent", "ErrImagePull", false),
            Some("arm64"),
        );
        assert_eq!(
            f,
            [Finding::InvalidAnnotations(format!(
                "annotation {ANNOTATION_PACKAGE_NAME} is missing"
            ))]
        );

        let f = inspect(
            &pod(annotations(), TAG, "IfNotPresent", "ErrImagePull", false),
            Some("sparc"),
        );
        assert!(
            matches!(&f[..], [Finding::InvalidAnnotations(m)] if m.contains(ANNOTATION_SYSTEM))
        );
    }

    #[test]
    fn a_waiting_pod_is_told_once_per_build_not_per_phase() {
        let p = pod(annotations(), TAG, "IfNotPresent", "ErrImagePull", false);
        let Some(Finding::Build(request)) = inspect(&p, Some("arm64")).pop() else {
            panic!("a build request");
        };
        let mut build = NixBuild::new(&request.name, request.spec.clone());
        let mut keys = std::collections::BTreeSet::new();
        for phase in [
            None,
            Some(Phase::Pending),
            Some(Phase::Building),
            Some(Phase::Succeeded),
        ] {
            let cached = phase.map(|phase| {
                build.status = Some(crate::crd::NixBuildStatus {
                    phase: Some(phase),
                    ..Default::default()
                });
                &build
            });
            let notices = waiting_notices(&request, cached, false);
            assert_eq!(notices.len(), 1, "{phase:?}");
            assert_eq!(notices[0].reason, "WaitingForBuild");
            assert!(notices[0].note.contains(&request.name));
            keys.extend(notices.into_iter().map(|n| (n.reason, n.key)));
        }
        assert_eq!(keys.len(), 1, "one Event however the phase moves: {keys:?}");

        build.status = Some(crate::crd::NixBuildStatus {
            phase: Some(Phase::Failed),
            failure_reason: Some("BuildFailed".into()),
            failure_message: Some("nix build exited 1".into()),
            ..Default::default()
        });
        let gated = waiting_notices(&request, Some(&build), true);
        assert!(gated[1].note.contains("stays gated"), "{}", gated[1].note);
        let notices = waiting_notices(&request, Some(&build), false);
        assert_eq!(notices.len(), 2);
        assert!(
            keys.contains(&(notices[0].reason, notices[0].key.clone())),
            "still the same WaitingForBuild"
        );
        assert!(notices[1].warning);
        assert_eq!(notices[1].reason, "BuildFailed");
        assert!(notices[1].note.contains("nix build exited 1"));
    }
}
