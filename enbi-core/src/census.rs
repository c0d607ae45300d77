//! What enbi's gauges and Job counters count, from what the operator observed: the Pods that
//! wait for an enbi image (and why), the image-node pairs of the NixBuilds, and the Jobs that
//! finished between a NixBuild's status and the next one.
//!
//! Every count here is bounded in its labels: a waiting reason from a fixed set, a Job purpose,
//! a result, an image-node state. Names, tags, namespaces and nodes are never labels.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{ImageNodeState, NixBuild, NixBuildStatus, Phase};
use crate::keys;
use crate::pod::gate::is_gated;
use crate::pod::statuses_using_tag;

/// The waiting reason of a Pod held by enbi's scheduling gate (the kubelet's and `kubectl`'s
/// word for a Pod not scheduled because of a gate).
pub const GATED: &str = "SchedulingGated";

/// Every reason [`waiting_reason`] gives: enbi's gate, then the kubelet's reasons for a missing
/// image, in the order a Pod is checked.
pub const WAITING_REASONS: [&str; 4] = [
    GATED,
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
];

/// Why an annotated Pod waits for its enbi image, or `None` if it does not: enbi's gate holds it
/// ([`GATED`]), or a container (init containers first) of the annotated tag waits because the
/// image is not on its node. Any annotated Pod counts, whether or not enbi can build for it.
pub fn waiting_reason(pod: &Pod) -> Option<&'static str> {
    let tag = pod
        .metadata
        .annotations
        .as_ref()?
        .get(keys::POD_IMAGE_TAG)?;
    let spec = pod.spec.as_ref()?;
    if is_gated(spec) {
        return Some(GATED);
    }
    let status = pod.status.as_ref()?;
    statuses_using_tag(spec, status, tag).find_map(|(_, status)| {
        let reason = status.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
        WAITING_REASONS[1..].iter().find(|r| **r == reason).copied()
    })
}

/// The Pods that wait for enbi images, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodCensus {
    /// Pods by [`waiting_reason`] (absent: none).
    pub waiting: BTreeMap<&'static str, u64>,
    /// Seconds since the oldest Pod held by enbi's gate was created (the webhook gates a Pod as
    /// it is created, so this is how long it has been held); 0 when none is.
    pub oldest_gated_seconds: u64,
}

impl PodCensus {
    /// Pods held by enbi's scheduling gate.
    pub fn gated(&self) -> u64 {
        self.waiting.get(GATED).copied().unwrap_or(0)
    }
}

/// Counts the Pods that wait for enbi images among `pods`, at `now`.
pub fn pods<'a>(pods: impl IntoIterator<Item = &'a Pod>, now: Timestamp) -> PodCensus {
    let mut census = PodCensus::default();
    for pod in pods {
        let Some(reason) = waiting_reason(pod) else {
            continue;
        };
        *census.waiting.entry(reason).or_default() += 1;
        if reason == GATED
            && let Some(created) = &pod.metadata.creation_timestamp
        {
            let age = now.duration_since(created.0).as_secs().max(0);
            let age = u64::try_from(age).unwrap_or(0);
            census.oldest_gated_seconds = census.oldest_gated_seconds.max(age);
        }
    }
    census
}

/// Image-node pairs of Succeeded NixBuilds by state: `loaded` is where the image is (the build
/// node and the nodes a load Job put it on, `NixBuild::image_holders`), `loading` where a load
/// Job runs, `failed` where the last load failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageNodes {
    pub loaded: u64,
    pub loading: u64,
    pub failed: u64,
}

/// Counts the image-node pairs of `builds`.
pub fn image_nodes<'a>(builds: impl IntoIterator<Item = &'a NixBuild>) -> ImageNodes {
    let mut count = ImageNodes::default();
    let n = |x: usize| u64::try_from(x).unwrap_or(u64::MAX);
    for build in builds {
        count.loaded += n(build.image_holders().len());
        let Some(status) = build
            .status
            .as_ref()
            .filter(|_| build.phase() == Phase::Succeeded)
        else {
            continue;
        };
        let state =
            |s: ImageNodeState| n(status.image_nodes.iter().filter(|e| e.state == s).count());
        count.loading += state(ImageNodeState::Loading);
        count.failed += state(ImageNodeState::Failed);
    }
    count
}

/// What a Job was for: `build` (an attempt of the build), `load` (the image onto one more
/// node), `release` (the image released from a node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Build,
    Load,
    Release,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Build => "build",
            Purpose::Load => "load",
            Purpose::Release => "release",
        }
    }
}

/// One Job that finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub purpose: Purpose,
    pub succeeded: bool,
}

/// The build and load Jobs whose end the change of a NixBuild's status from `before` to
/// `after` records:
/// - the builder Job of an attempt, when the build leaves `Building` with a result: `Succeeded`
///   (succeeded), `Failed` or a retry scheduled (failed); not when it waits again for another
///   reason (its Job was lost and no node is eligible any more);
/// - a load Job, when its node's entry in `imageNodes` goes from `Loading` to `Loaded`
///   (succeeded) or `Failed` (failed).
pub fn jobs_finished(before: Option<&NixBuildStatus>, after: &NixBuildStatus) -> Vec<Finished> {
    let mut finished = vec![];
    let was = |p: Phase| before.and_then(|s| s.phase) == Some(p);
    if was(Phase::Building) {
        let succeeded = after.phase == Some(Phase::Succeeded);
        let failed = after.phase == Some(Phase::Failed)
            || (after.phase == Some(Phase::Pending) && after.next_attempt_time.is_some());
        if succeeded || failed {
            finished.push(Finished {
                purpose: Purpose::Build,
                succeeded,
            });
        }
    }
    let loading = before
        .iter()
        .flat_map(|s| &s.image_nodes)
        .filter(|e| e.state == ImageNodeState::Loading);
    for entry in loading {
        let now = after.image_nodes.iter().find(|e| e.node == entry.node);
        match now.map(|e| e.state) {
            Some(ImageNodeState::Loaded) => finished.push(Finished {
                purpose: Purpose::Load,
                succeeded: true,
            }),
            Some(ImageNodeState::Failed) => finished.push(Finished {
                purpose: Purpose::Load,
                succeeded: false,
            }),
            _ => {}
        }
    }
    finished
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    use super::*;
    use crate::crd::ImageNode;
    use crate::pod::fixtures::{TAG, annotations, build, pod, spec};

    fn gated() -> serde_json::Value {
        spec(json!({"schedulingGates": [{"name": keys::GATE}]}))
    }

    fn waiting(mut pod: Pod, container: &str, reason: &str) -> Pod {
        pod.status = serde_json::from_value(json!({"containerStatuses": [
            {"name": container, "image": TAG, "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": reason}}}
        ]}))
        .expect("status");
        pod
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("time")
    }

    #[test]
    fn waiting_reasons_of_pods() {
        let annotated = || pod(annotations(), spec(json!({})));
        assert_eq!(waiting_reason(&pod(annotations(), gated())), Some(GATED));
        assert_eq!(
            waiting_reason(&waiting(annotated(), "app", "ImagePullBackOff")),
            Some("ImagePullBackOff")
        );
        assert_eq!(
            waiting_reason(&waiting(annotated(), "app", "ErrImagePull")),
            Some("ErrImagePull")
        );
        assert_eq!(waiting_reason(&annotated()), None, "no status yet");
        assert_eq!(
            waiting_reason(&waiting(annotated(), "app", "CrashLoopBackOff")),
            None,
            "a crash loop does not wait for an image"
        );
        assert_eq!(
            waiting_reason(&waiting(annotated(), "other", "ErrImagePull")),
            None,
            "a container of another image"
        );
        let other_gate = spec(json!({"schedulingGates": [{"name": "example.com/other"}]}));
        assert_eq!(waiting_reason(&pod(annotations(), other_gate)), None);
        assert_eq!(
            waiting_reason(&pod(json!({}), gated())),
            None,
            "not annotated"
        );
    }

    #[test]
    fn census_counts_pods_by_reason_and_the_oldest_gate() {
        let created = |mut p: Pod, second: i64| {
            p.metadata.creation_timestamp = Some(Time(at(second)));
            p
        };
        let annotated = || pod(annotations(), spec(json!({})));
        let pods = [
            created(pod(annotations(), gated()), 100),
            created(pod(annotations(), gated()), 40),
            created(waiting(annotated(), "app", "ImagePullBackOff"), 0),
            created(annotated(), 0),
        ];
        let census = super::pods(&pods, at(160));
        assert_eq!(census.gated(), 2);
        assert_eq!(
            census.waiting,
            BTreeMap::from([(GATED, 2), ("ImagePullBackOff", 1)])
        );
        assert_eq!(
            census.oldest_gated_seconds, 120,
            "the Pod in back-off is older but not gated"
        );
        let ungated = super::pods(&pods[2..], at(160));
        assert_eq!((ungated.gated(), ungated.oldest_gated_seconds), (0, 0));
    }

    fn entry(node: &str, state: ImageNodeState) -> ImageNode {
        ImageNode {
            node: node.into(),
            state,
            loads: 1,
            since: Time(at(0)),
            digest: None,
            message: None,
        }
    }

    #[test]
    fn image_nodes_count_holders_loads_and_failures() {
        let mut b = build(Some(Phase::Succeeded));
        let status = b.status.as_mut().expect("status");
        status.build_node = Some("n1".into());
        status.image_nodes = vec![
            entry("n2", ImageNodeState::Loaded),
            entry("n3", ImageNodeState::Loading),
            entry("n4", ImageNodeState::Failed),
        ];
        let plain = {
            let mut b = build(Some(Phase::Succeeded));
            b.status.as_mut().expect("status").build_node = Some("n1".into());
            b
        };
        let building = build(Some(Phase::Building));
        assert_eq!(
            image_nodes([&b, &plain, &building]),
            ImageNodes {
                loaded: 3,
                loading: 1,
                failed: 1
            },
            "n1 and n2 of the first build, n1 of the second"
        );
    }

    fn status(phase: Phase) -> NixBuildStatus {
        NixBuildStatus {
            phase: Some(phase),
            ..NixBuildStatus::default()
        }
    }

    #[test]
    fn build_jobs_finish_when_an_attempt_has_a_result() {
        let build_job = |succeeded| Finished {
            purpose: Purpose::Build,
            succeeded,
        };
        let building = status(Phase::Building);
        let retry = NixBuildStatus {
            next_attempt_time: Some(Time(at(30))),
            failure_reason: Some("BuilderLost".into()),
            ..status(Phase::Pending)
        };
        let lost = NixBuildStatus {
            failure_reason: Some("from an earlier attempt".into()),
            ..status(Phase::Pending)
        };
        let cases = [
            (
                Some(&building),
                status(Phase::Succeeded),
                vec![build_job(true)],
            ),
            (
                Some(&building),
                status(Phase::Failed),
                vec![build_job(false)],
            ),
            (Some(&building), retry.clone(), vec![build_job(false)]),
            (Some(&building), lost, vec![]),
            (Some(&building), status(Phase::Building), vec![]),
            (None, status(Phase::Building), vec![]),
            (Some(&retry), status(Phase::Building), vec![]),
            // Refused by the policy before a Job was made.
            (Some(&retry), status(Phase::Failed), vec![]),
        ];
        for (before, after, want) in cases {
            assert_eq!(
                jobs_finished(before, &after),
                want,
                "{before:?} -> {after:?}"
            );
        }
    }

    #[test]
    fn load_jobs_finish_when_their_node_leaves_loading() {
        let with = |entries: Vec<ImageNode>| NixBuildStatus {
            image_nodes: entries,
            ..status(Phase::Succeeded)
        };
        let before = with(vec![
            entry("n1", ImageNodeState::Loaded),
            entry("n2", ImageNodeState::Loading),
            entry("n3", ImageNodeState::Loading),
            entry("n4", ImageNodeState::Loading),
        ]);
        let after = with(vec![
            entry("n1", ImageNodeState::Loaded),
            entry("n2", ImageNodeState::Loaded),
            entry("n3", ImageNodeState::Failed),
            entry("n4", ImageNodeState::Loading),
        ]);
        let load = |succeeded| Finished {
            purpose: Purpose::Load,
            succeeded,
        };
        assert_eq!(
            jobs_finished(Some(&before), &after),
            vec![load(true), load(false)]
        );
        assert_eq!(jobs_finished(Some(&after), &after), vec![]);
        assert_eq!(
            jobs_finished(Some(&before), &with(vec![])),
            vec![],
            "entries gone"
        );
    }
}
