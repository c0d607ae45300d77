//! What a Pod needs from enbi now: `Pod -> findings`.
//!
//! Only a container or init container waiting because its image is missing (`ErrImagePull`,
//! `ImagePullBackOff`, `ErrImageNeverPull`), whose image is the annotated tag, asks for a build;
//! so does a Pod that enbi's admission webhook gated (see `gate`) before it was scheduled.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodSpec, PodStatus};

use super::gate::is_gated;
use super::request::{self, AnnotationError, BuildRequest};
use super::{statuses_using_tag, using_tag};
use crate::keys;
use crate::naming;

/// Waiting reasons that mean "the image is not on this node".
const MISSING_IMAGE: [&str; 3] = ["ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"];

/// What enbi concludes about one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Build this (or find the NixBuild already building it).
    Build(BuildRequest),
    /// The annotations are present but unusable. No build.
    InvalidAnnotations(AnnotationError),
    /// A container waits for the annotated image with `imagePullPolicy: Always`: the kubelet
    /// will always pull from the registry and never use a node-loaded image. No build.
    PullAlways { container: String },
    /// A container crash-loops on the annotated image, which is present: not a missing image
    /// (perhaps built for another architecture). No build.
    CrashLoop { container: String },
}

/// The Pod's findings; empty when the Pod has not opted in or needs nothing.
/// `node_arch` is the `kubernetes.io/arch` of the Pod's node, if known.
pub fn inspect(pod: &Pod, node_arch: Option<&str>) -> Vec<Finding> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let Some(tag) = annotations.get(keys::POD_IMAGE_TAG) else {
        return vec![];
    };
    let Some(spec) = pod.spec.as_ref() else {
        return vec![];
    };
    let mut findings = vec![];
    let mut missing = vec![];
    if is_gated(spec) {
        // Gated by enbi: not scheduled, so no status yet; every container of the tag waits.
        missing = using_tag(spec, tag).map(|c| c.name.clone()).collect();
    } else if let Some(status) = pod.status.as_ref() {
        inspect_statuses(spec, status, tag, &mut findings, &mut missing);
    }
    if !missing.is_empty() {
        findings.push(match request::spec(annotations, node_arch) {
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
    let ours = statuses_using_tag(spec, status, tag);
    let waiting = |s: &ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|st| st.waiting.as_ref())
            .and_then(|w| w.reason.clone())
            .unwrap_or_default()
    };

    for (container, status) in ours {
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use garde::Validate;

    use crate::keys::POD_PACKAGE_NAME;
    use crate::pod::request::annotated;

    const TAG: &str = "nossa.ee/talya/chog:f5d5";

    fn annotations() -> Value {
        json!({
            keys::POD_FLAKE_URL: "git+https://nossa.ee/~talya/chog?rev=f5d5",
            keys::POD_IMAGE_TAG: TAG,
            keys::POD_PACKAGE_NAME: "chog-docker.stream-layered",
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
            (json!({keys::POD_IMAGE_TAG: TAG}), true),
            (
                json!({keys::POD_FLAKE_URL: flake, keys::POD_PACKAGE_NAME: "app"}),
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
        a[keys::POD_IMAGE_TAG] = json!("docker.io/library/chog:1");
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
        a[keys::POD_SYSTEM] = json!("x86_64-linux");
        let gated: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "apps", "annotations": a},
            "spec": {
                "schedulingGates": [{"name": keys::GATE}],
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
        a[keys::POD_SYSTEM] = json!("x86_64-linux");
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
            let mut a = json!({keys::POD_FLAKE_URL: flake, keys::POD_PACKAGE_NAME: package, keys::POD_IMAGE_TAG: tag.clone()});
            if let Some(system) = system {
                a[keys::POD_SYSTEM] = json!(system);
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
        a[keys::POD_FLAKE_URL] = json!("not a flake");
        let f = inspect(
            &pod(a, TAG, "IfNotPresent", "ErrImagePull", false),
            Some("arm64"),
        );
        let [Finding::InvalidAnnotations(e)] = &f[..] else {
            panic!("{f:?}")
        };
        let m = e.to_string();
        assert!(
            m.contains("annotation enbi.hrzn.ee/nixbuild-flakeUrl must be"),
            "{m}"
        );

        let mut a = annotations();
        a.as_object_mut()
            .expect("object")
            .remove(keys::POD_PACKAGE_NAME);
        let f = inspect(
            &pod(a, TAG, "IfNotPresent", "ErrImagePull", false),
            Some("arm64"),
        );
        assert_eq!(
            f,
            [Finding::InvalidAnnotations(AnnotationError::Missing(
                POD_PACKAGE_NAME
            ))]
        );

        let f = inspect(
            &pod(annotations(), TAG, "IfNotPresent", "ErrImagePull", false),
            Some("sparc"),
        );
        assert_eq!(
            f,
            [Finding::InvalidAnnotations(
                AnnotationError::UnknownArchitecture
            )]
        );
        assert!(
            AnnotationError::UnknownArchitecture
                .to_string()
                .contains(keys::POD_SYSTEM)
        );
    }
}
