//! The Pod watcher's plan for one Pod: `(Pod, what the caches say, settings) -> [PodAction]`,
//! the requests to make and the Events to publish, in order. The watcher only carries them out
//! (with its own memory of what it already created and said), so every choice it makes, and
//! every text a user reads on a Pod, is here and tested without a cluster.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::findings::{self, Finding};
use super::gate::{self, is_gated};
use super::request::BuildRequest;
use crate::crd::{NixBuild, Phase};
use crate::event::Event;
use crate::policy::{self, Policy};
use crate::{keys, optin};

/// How the Pod watcher acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Delete controller-owned Pods in back-off once their image is loaded.
    pub recreate: bool,
    /// Narrow a gated Pod's node affinity to the nodes holding its image as it is ungated.
    pub narrow: bool,
}

/// One thing to do for a Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum PodAction {
    /// Make sure the NixBuild exists: create it unless the cache has it (or this process just
    /// created it).
    EnsureBuild(BuildRequest),
    /// Reconcile the Succeeded NixBuild `build` now: a Pod waits for its image (on a node where
    /// it may have to be loaded).
    Wake { build: String },
    /// Remove enbi's scheduling gate; `narrow_for`: narrow the Pod's node affinity to the nodes
    /// holding the image of that NixBuild in the same patch (`gate::ungate_plan`).
    Ungate {
        why: String,
        narrow_for: Option<String>,
    },
    /// Delete the Pod (waiting in back-off on a node that now holds its image) for its
    /// controller to make a new one.
    Recreate { build: String },
    /// Publish an Event on the Pod, once per Pod and `(reason, key)`.
    Announce(Notice),
}

/// An Event for a Pod. `key` names what it is about: the watcher publishes each
/// `(reason, key)` once per Pod, however often the Pod changes. `build`: the NixBuild it is
/// about (the Event's `related` object), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub key: String,
    pub build: Option<String>,
    pub event: Event,
}

impl Notice {
    fn about_build(build: &str, event: Event) -> Self {
        Self {
            key: build.to_owned(),
            build: Some(build.to_owned()),
            event,
        }
    }

    fn keyed(key: &str, event: Event) -> Self {
        Self {
            key: key.to_owned(),
            build: None,
            event,
        }
    }
}

/// Whether the Pod asks enbi for anything now (a build, a hint, or its gate's removal):
/// [`plan`] is empty for any other, so the watcher need not ask whether its namespace opts in.
pub fn asks(pod: &Pod, node_arch: Option<&str>) -> bool {
    pod.spec.as_ref().is_some_and(is_gated) || !findings::inspect(pod, node_arch).is_empty()
}

/// What to do for `pod` now. `node_arch`: the `kubernetes.io/arch` of its node, if known;
/// `opted_in`: whether its namespace lets Pods ask for builds; `build_of`: the cached NixBuild
/// of that name in the Pod's namespace. A build the policy refuses is not made: the Pod is
/// told why (`BuildRefused`) and let go if gated.
pub fn plan(
    pod: &Pod,
    node_arch: Option<&str>,
    opted_in: bool,
    build_of: impl Fn(&str) -> Option<Arc<NixBuild>>,
    policy: &Policy,
    settings: Settings,
) -> Vec<PodAction> {
    let findings = findings::inspect(pod, node_arch);
    let gated = pod.spec.as_ref().is_some_and(is_gated);
    if findings.is_empty() && !gated {
        return vec![];
    }
    let mut actions = vec![];
    if !opted_in {
        let namespace = pod.namespace().unwrap_or_default();
        actions.push(PodAction::Announce(Notice::keyed(
            &namespace,
            Event::warning("PodBuildsNotEnabled", optin::not_enabled_note(&namespace)),
        )));
        if gated {
            actions.push(PodAction::Ungate {
                why: "its namespace no longer opts in".into(),
                narrow_for: None,
            });
        }
        return actions;
    }
    if gated
        && !findings.iter().any(|f| matches!(f, Finding::Build(_)))
        && let Some(why) = gate::release(None, None)
    {
        actions.push(PodAction::Ungate {
            why,
            narrow_for: None,
        });
    }
    for finding in findings {
        match finding {
            Finding::Build(request) => {
                let namespace = pod.namespace().unwrap_or_default();
                if let Err(denial) = policy::check(policy, &namespace, &request.spec) {
                    let note = format!(
                        "No NixBuild for {}: the operator's policy refuses it: {denial}",
                        request.spec.image_tag
                    );
                    actions.push(PodAction::Announce(Notice::keyed(
                        &denial.to_string(),
                        Event::warning("BuildRefused", note),
                    )));
                    if gated {
                        actions.push(PodAction::Ungate {
                            why: "the policy refuses its build".into(),
                            narrow_for: None,
                        });
                    }
                    continue;
                }
                let build = build_of(&request.name);
                let build = build.as_deref();
                let succeeded = build.is_some_and(|b| b.phase() == Phase::Succeeded);
                let name = request.name.clone();
                let notices = waiting_notices(&request, build, gated);
                actions.push(PodAction::EnsureBuild(request.clone()));
                if succeeded {
                    actions.push(PodAction::Wake {
                        build: name.clone(),
                    });
                }
                // A Pod let go or replaced now waits no more: it is told nothing.
                let mut goes = false;
                if gated {
                    if let Some(why) = gate::release(Some(&request), build) {
                        goes = true;
                        actions.push(PodAction::Ungate {
                            why,
                            narrow_for: (settings.narrow && succeeded).then(|| name.clone()),
                        });
                    }
                } else if settings.recreate && gate::recreate(pod, build) {
                    goes = true;
                    actions.push(PodAction::Recreate { build: name });
                }
                if !goes {
                    actions.extend(notices.into_iter().map(PodAction::Announce));
                }
            }
            Finding::InvalidAnnotations(error) => {
                let message = error.to_string();
                actions.push(PodAction::Announce(Notice::keyed(
                    &message,
                    Event::warning("InvalidBuildAnnotations", message.clone()),
                )));
            }
            Finding::PullAlways { container } => {
                let note = format!(
                    "Container {container} has imagePullPolicy: Always, so the kubelet never uses an image \
                     enbi loads onto the node; use IfNotPresent or Never. No build started."
                );
                actions.push(PodAction::Announce(Notice::keyed(
                    &container,
                    Event::warning("ImagePullPolicyAlways", note),
                )));
            }
            Finding::CrashLoop { container } => {
                let note = format!(
                    "Container {container} crash-loops on an image that is present; if it was built for \
                     another architecture (exec format error), check the system of its NixBuild. No build started."
                );
                actions.push(PodAction::Announce(Notice::keyed(
                    &container,
                    Event::warning("CrashLoopOnLoadedImage", note),
                )));
            }
        }
    }
    actions
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
) -> Vec<Notice> {
    let name = &request.name;
    let mut notices = vec![Notice::about_build(
        name,
        Event::normal(
            "WaitingForBuild",
            format!(
                "Waiting for NixBuild {name} to build and load {}; its status and Events show the progress",
                request.spec.image_tag
            ),
        ),
    )];
    if let Some(build) = build.filter(|b| b.phase() == Phase::Failed) {
        let status = build.status.as_ref();
        let reason = status.and_then(|s| s.failure_reason.as_deref());
        let message = status.and_then(|s| s.failure_message.as_deref());
        notices.push(Notice::about_build(
            name,
            Event::warning(
                "BuildFailed",
                format!(
                "NixBuild {name} failed ({}): {}; fix it or set {} on it to build again{}",
                reason.unwrap_or("unknown reason"),
                message.unwrap_or("see its status"),
                keys::RETRY,
                if gated {
                    format!(
                        ". The Pod stays gated ({}) until the build succeeds; deleting the NixBuild \
                         lets it be scheduled without the image",
                        keys::GATE
                    )
                } else {
                    String::new()
                },
                ),
            ),
        ));
    }
    notices
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::EventType;
    use crate::pod::fixtures::{TAG, annotations, build, pod, spec};
    use crate::pod::request;

    fn settings() -> Settings {
        Settings {
            recreate: true,
            narrow: true,
        }
    }

    fn gated_pod() -> Pod {
        let mut a = annotations();
        a[keys::POD_SYSTEM] = json!("x86_64-linux");
        pod(a, spec(json!({"schedulingGates": [{"name": keys::GATE}]})))
    }

    fn names(actions: &[PodAction]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                PodAction::EnsureBuild(_) => "ensure".into(),
                PodAction::Wake { .. } => "wake".into(),
                PodAction::Ungate { narrow_for, .. } => {
                    format!(
                        "ungate{}",
                        if narrow_for.is_some() { "+narrow" } else { "" }
                    )
                }
                PodAction::Recreate { .. } => "recreate".into(),
                PodAction::Announce(n) => n.event.reason.to_owned(),
            })
            .collect()
    }

    #[test]
    fn a_pod_that_asks_for_nothing_gets_nothing() {
        let plain = pod(json!({}), spec(json!({})));
        assert!(
            plan(
                &plain,
                Some("amd64"),
                true,
                |_| None,
                &Policy::default(),
                settings()
            )
            .is_empty()
        );
    }

    #[test]
    fn a_gated_pod_waits_for_its_build_then_goes_narrowed_only_if_asked() {
        let p = gated_pod();
        let none = plan(&p, None, true, |_| None, &Policy::default(), settings());
        assert_eq!(names(&none), ["ensure", "WaitingForBuild"]);

        let pending = build(Some(Phase::Pending));
        let waiting = plan(
            &p,
            None,
            true,
            |_| Some(Arc::new(pending.clone())),
            &Policy::default(),
            settings(),
        );
        assert_eq!(names(&waiting), ["ensure", "WaitingForBuild"]);

        let succeeded = build(Some(Phase::Succeeded));
        let done = plan(
            &p,
            None,
            true,
            |_| Some(Arc::new(succeeded.clone())),
            &Policy::default(),
            settings(),
        );
        assert_eq!(names(&done), ["ensure", "wake", "ungate+narrow"]);
        let plain = Settings {
            narrow: false,
            ..settings()
        };
        let done = plan(
            &p,
            None,
            true,
            |_| Some(Arc::new(succeeded.clone())),
            &Policy::default(),
            plain,
        );
        assert_eq!(names(&done), ["ensure", "wake", "ungate"]);
    }

    #[test]
    fn a_build_the_policy_refuses_is_not_made_and_the_pod_is_told_and_let_go() {
        let policy = Policy {
            protected_registries: vec!["example.test".into()],
            ..Policy::default()
        };
        let actions = plan(&gated_pod(), None, true, |_| None, &policy, settings());
        assert_eq!(names(&actions), ["BuildRefused", "ungate"]);
        let PodAction::Announce(notice) = &actions[0] else {
            panic!("an Event first")
        };
        assert_eq!(notice.event.type_, EventType::Warning);
        assert!(
            notice.event.note.contains(
                "spec.imageTag example.test/app:v1 is under the protected registry example.test"
            ),
            "{}",
            notice.event.note
        );
    }

    #[test]
    fn a_namespace_not_opted_in_gets_a_warning_and_its_gated_pods_go() {
        let actions = plan(
            &gated_pod(),
            None,
            false,
            |_| None,
            &Policy::default(),
            settings(),
        );
        assert_eq!(names(&actions), ["PodBuildsNotEnabled", "ungate"]);
        let PodAction::Announce(notice) = &actions[0] else {
            panic!("an Event first")
        };
        assert_eq!(notice.key, "apps");
        assert!(notice.event.note.contains(keys::POD_BUILDS));
    }

    #[test]
    fn a_controlled_pod_in_back_off_is_recreated_where_the_image_now_is() {
        let mut p = pod(
            annotations(),
            spec(json!({"nodeName": "n1", "containers": [{"name": "app", "image": TAG}]})),
        );
        p.metadata.owner_references = Some(vec![serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true
        })).expect("owner")]);
        p.status = Some(
            serde_json::from_value(json!({"containerStatuses": [
                {"name": "app", "ready": false, "restartCount": 0, "image": TAG, "imageID": "",
                 "state": {"waiting": {"reason": "ImagePullBackOff"}}}
            ]}))
            .expect("status"),
        );
        let mut succeeded = build(Some(Phase::Succeeded));
        if let Some(s) = succeeded.status.as_mut() {
            s.build_node = Some("n1".into());
        }
        let actions = plan(
            &p,
            Some("amd64"),
            true,
            |_| Some(Arc::new(succeeded.clone())),
            &Policy::default(),
            settings(),
        );
        assert_eq!(names(&actions), ["ensure", "wake", "recreate"]);
        let off = Settings {
            recreate: false,
            ..settings()
        };
        let actions = plan(
            &p,
            Some("amd64"),
            true,
            |_| Some(Arc::new(succeeded.clone())),
            &Policy::default(),
            off,
        );
        assert_eq!(names(&actions), ["ensure", "wake", "WaitingForBuild"]);
    }

    fn request() -> BuildRequest {
        let spec = request::spec(
            &serde_json::from_value(annotations()).expect("annotations"),
            Some("arm64"),
        )
        .expect("spec");
        BuildRequest {
            name: crate::naming::nixbuild_name(&spec),
            spec,
            node: Some("arm-1".into()),
            containers: vec!["app".into()],
        }
    }

    #[test]
    fn a_waiting_pod_is_told_once_per_build_not_per_phase() {
        let request = request();
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
            assert_eq!(notices[0].event.reason, "WaitingForBuild");
            assert!(notices[0].event.note.contains(&request.name));
            keys.extend(notices.into_iter().map(|n| (n.event.reason, n.key)));
        }
        assert_eq!(keys.len(), 1, "one Event however the phase moves: {keys:?}");

        build.status = Some(crate::crd::NixBuildStatus {
            phase: Some(Phase::Failed),
            failure_reason: Some("BuildFailed".into()),
            failure_message: Some("nix build exited 1".into()),
            ..Default::default()
        });
        let gated = waiting_notices(&request, Some(&build), true);
        assert!(
            gated[1].event.note.contains("stays gated"),
            "{}",
            gated[1].event.note
        );
        let notices = waiting_notices(&request, Some(&build), false);
        assert_eq!(notices.len(), 2);
        assert!(
            keys.contains(&(notices[0].event.reason, notices[0].key.clone())),
            "still the same WaitingForBuild"
        );
        assert_eq!(notices[1].event.type_, EventType::Warning);
        assert_eq!(notices[1].event.reason, "BuildFailed");
        assert!(notices[1].event.note.contains("nix build exited 1"));
    }
}
