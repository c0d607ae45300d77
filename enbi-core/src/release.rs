//! Releasing a deleted NixBuild's image from the nodes enbi put it on.
//!
//! enbi pins what it loads, so the kubelet's image GC never takes it; left alone, every rollout
//! to a new tag would leave one more pinned image on every node it reached. When a NixBuild goes
//! (deleted by a user, by history limits, with its namespace), its finalizer runs one small
//! release Job per node that may hold the image (enbi's own code, no flake code), and waits for
//! them, bounded by a timeout counted from the deletion: a node that is gone or never answers
//! does not hold the NixBuild for ever.
//!
//! On the node (the `release` command), the pin goes, and the tag and digest references the
//! loader created are removed, so containerd collects the image, unless a container there uses
//! it (then only the pin goes; the kubelet's image GC takes it once unused). Nothing is released
//! while another NixBuild names the same tag (it is that build's image now), and the digest
//! reference stays while another NixBuild's image has the same repository and digest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::crd::NixBuild;
use crate::event::{Event, EventType};
use crate::job::{JobState, JobView, ReleaseTarget};
use crate::reference::{digest_reference, normalise};
use crate::report::MAX_REPORT_BYTES;

/// What to release, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The normalised tag.
    pub tag: String,
    /// Every node that may hold the image, with the digest it has there: the build node and
    /// every node `status.imageNodes` names, whatever its state (a release where the image is
    /// absent costs a few `ctr` calls).
    pub nodes: BTreeMap<String, String>,
    /// Digest references other NixBuilds' images have: kept.
    pub kept: BTreeSet<String>,
}

impl Plan {
    /// Whether the release on a node whose image is `digest` keeps its digest reference.
    pub fn keeps_digest_reference(&self, digest: &str) -> bool {
        self.kept.contains(&digest_reference(&self.tag, digest))
    }

    /// What the release Job on `node` releases, if the plan has the node.
    pub fn target<'a>(&'a self, node: &'a str) -> Option<ReleaseTarget<'a>> {
        let digest = self.nodes.get(node)?;
        Some(ReleaseTarget {
            node,
            tag: &self.tag,
            digest,
            keep_digest_reference: self.keeps_digest_reference(digest),
        })
    }
}

/// Digests a build's image has: the build's, and any other a node got (a build that is not
/// reproducible makes another image on each node that builds it).
fn digests(build: &NixBuild) -> impl Iterator<Item = &String> {
    let status = build.status.iter();
    status.clone().flat_map(|s| &s.image_digest).chain(
        status
            .flat_map(|s| &s.image_nodes)
            .filter_map(|n| n.digest.as_ref()),
    )
}

/// What to release for `build`, which is being deleted, given every NixBuild enbi knows
/// (`build` itself among them or not); `None` when there is nothing to release: it never
/// loaded an image, or another NixBuild that is not being deleted names the same tag.
pub fn plan<'a>(build: &NixBuild, builds: impl IntoIterator<Item = &'a NixBuild>) -> Option<Plan> {
    let status = build.status.as_ref()?;
    let digest = status.image_digest.as_ref()?;
    let tag = normalise(&build.spec.image_tag);
    let mut kept = BTreeSet::new();
    for other in builds {
        if other.uid() == build.uid() || other.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if normalise(&other.spec.image_tag) == tag {
            return None;
        }
        kept.extend(digests(other).map(|d| digest_reference(&other.spec.image_tag, d)));
    }
    let mut nodes: BTreeMap<String, String> = status
        .image_nodes
        .iter()
        .map(|n| {
            (
                n.node.clone(),
                n.digest.clone().unwrap_or_else(|| digest.clone()),
            )
        })
        .collect();
    if let Some(node) = &status.build_node {
        nodes.entry(node.clone()).or_insert_with(|| digest.clone());
    }
    Some(Plan { tag, nodes, kept })
}

/// What the `release` command did on one node: its report, in the release container's
/// termination message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseReport {
    /// A container on the node uses the image: references were kept, only pins removed.
    pub in_use: bool,
    /// References whose pin was removed.
    #[serde(default)]
    pub unpinned: Vec<String>,
    /// References removed.
    #[serde(default)]
    pub removed: Vec<String>,
    /// References of images earlier releases left in use, removed now that none uses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swept: Vec<String>,
}

impl ReleaseReport {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Option<Self> {
        (text.len() <= MAX_REPORT_BYTES)
            .then(|| serde_json::from_str(text.trim()).ok())
            .flatten()
    }

    /// For an Event: what happened on the node, in a few words.
    fn summary(&self) -> String {
        let this = match (self.in_use, self.removed.len(), self.unpinned.len()) {
            (true, _, _) => "in use by a container, unpinned only".to_owned(),
            (false, 0, 0) => "not there".to_owned(),
            (false, 0, _) => "unpinned".to_owned(),
            (false, n, _) => format!("removed ({n} references)"),
        };
        match self.swept.len() {
            0 => this,
            n => format!("{this}; {n} references of earlier releases removed"),
        }
    }
}

/// How the release went on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRelease {
    /// No release Job yet: start one.
    Start,
    Running,
    Released(ReleaseReport),
    /// The node is no longer in the cluster, and the image with it.
    Gone,
    Failed(String),
    TimedOut,
}

/// What the finalizer sees.
#[derive(Debug)]
pub struct Observation<'a> {
    pub plan: &'a Plan,
    /// The release Job of each node that has one.
    pub jobs: BTreeMap<String, &'a JobView>,
    /// The nodes in the cluster now.
    pub nodes: &'a BTreeSet<String>,
    /// When the NixBuild was deleted.
    pub deleted: Timestamp,
    pub now: Timestamp,
    /// How long the release may take in all.
    pub timeout: Duration,
}

/// What the finalizer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Nodes to start a release Job on.
    pub start: Vec<String>,
    /// Every node has an outcome: the finalizer may go.
    pub done: bool,
    pub events: Vec<Event>,
    /// When to look again even if no Job changes: at the timeout.
    pub requeue_after: Option<Duration>,
    /// The outcome on each node.
    pub nodes: BTreeMap<String, NodeRelease>,
}

/// Where the release stands on each node, and what to do.
pub fn progress(obs: &Observation) -> Progress {
    let elapsed = obs.now.duration_since(obs.deleted);
    let left = Duration::try_from(elapsed).map_or(obs.timeout, |e| obs.timeout.saturating_sub(e));
    let timed_out = left.is_zero();
    let nodes: BTreeMap<String, NodeRelease> = obs
        .plan
        .nodes
        .keys()
        .map(|node| {
            let state = match obs.jobs.get(node) {
                _ if !obs.nodes.contains(node) => NodeRelease::Gone,
                Some(job) => match &job.state {
                    JobState::Succeeded => {
                        let text = job.termination_message.as_deref().unwrap_or_default();
                        ReleaseReport::parse(text).map_or_else(
                            || NodeRelease::Failed(format!("unreadable report: {text}")),
                            NodeRelease::Released,
                        )
                    }
                    JobState::Failed { reason } => NodeRelease::Failed(
                        job.termination_message
                            .clone()
                            .or_else(|| reason.clone())
                            .unwrap_or_else(|| "the release Job failed".to_owned()),
                    ),
                    _ if timed_out => NodeRelease::TimedOut,
                    _ => NodeRelease::Running,
                },
                None if timed_out => NodeRelease::TimedOut,
                None => NodeRelease::Start,
            };
            (node.clone(), state)
        })
        .collect();
    let start: Vec<String> = nodes
        .iter()
        .filter(|(_, s)| **s == NodeRelease::Start)
        .map(|(n, _)| n.clone())
        .collect();
    let done = nodes
        .values()
        .all(|s| !matches!(s, NodeRelease::Start | NodeRelease::Running));
    let mut events = vec![];
    if !start.is_empty() {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Releasing",
            note: format!("releasing image {} on {}", obs.plan.tag, start.join(", ")),
        });
    }
    if done {
        events.extend(outcome_events(&obs.plan.tag, &nodes, obs.timeout));
    }
    Progress {
        start,
        done,
        events,
        requeue_after: (!done).then_some(left),
        nodes,
    }
}

/// `Released` for the nodes where it went as planned, a Warning for the others.
fn outcome_events(
    tag: &str,
    nodes: &BTreeMap<String, NodeRelease>,
    timeout: Duration,
) -> Vec<Event> {
    let mut released = vec![];
    let mut failed = vec![];
    for (node, state) in nodes {
        match state {
            NodeRelease::Released(report) => released.push(format!("{node}: {}", report.summary())),
            NodeRelease::Gone => released.push(format!("{node}: node gone")),
            NodeRelease::Failed(why) => failed.push(format!("{node}: {why}")),
            NodeRelease::TimedOut => failed.push(format!(
                "{node}: no answer within {}s (node not ready, or the Job cannot run there)",
                timeout.as_secs()
            )),
            NodeRelease::Start | NodeRelease::Running => {}
        }
    }
    let mut events = vec![];
    if !released.is_empty() {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Released",
            note: format!("image {tag} released: {}", released.join("; ")),
        });
    }
    if !failed.is_empty() {
        events.push(Event {
            type_: EventType::Warning,
            reason: "ReleaseIncomplete",
            note: format!(
                "image {tag} may stay pinned on {}; remove it there with `ctr -n k8s.io images rm` \
                 if no Pod uses it",
                failed.join("; ")
            ),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::crd::{ImageNode, ImageNodeState, NixBuildStatus, Phase};
    use crate::pod::fixtures::build;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    /// A Succeeded build of `tag`, built on `a`, loaded on `b`.
    fn built(name: &str, tag: &str, digest: &str) -> NixBuild {
        let mut b = build(None);
        b.spec.image_tag = tag.to_owned();
        b.metadata.name = Some(name.to_owned());
        b.metadata.uid = Some(format!("uid-{name}"));
        b.status = Some(NixBuildStatus {
            phase: Some(Phase::Succeeded),
            image_digest: Some(digest.to_owned()),
            build_node: Some("a".into()),
            image_nodes: vec![ImageNode {
                node: "b".into(),
                state: ImageNodeState::Loaded,
                since: Time(Timestamp::UNIX_EPOCH),
                loads: 1,
                digest: None,
                message: None,
            }],
            ..Default::default()
        });
        b
    }

    fn deleting(mut b: NixBuild) -> NixBuild {
        b.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        b
    }

    #[test]
    fn plans_every_node_that_may_hold_the_image() {
        let gone = built("x", "app:v1", DIGEST);
        let plan = plan(&gone, [&gone]).expect("a plan");
        assert_eq!(plan.tag, "docker.io/library/app:v1");
        let both = [("a".into(), DIGEST.into()), ("b".into(), DIGEST.into())];
        assert_eq!(plan.nodes, BTreeMap::from(both));
        assert!(!plan.keeps_digest_reference(DIGEST));

        // A node that built another image (not reproducible) releases that one.
        let mut other = gone.clone();
        if let Some(s) = other.status.as_mut() {
            s.image_nodes[0].digest = Some("sha256:b".into());
        }
        let plan = super::plan(&other, []).expect("a plan");
        assert_eq!(plan.nodes["b"], "sha256:b");
        assert_eq!(plan.nodes["a"], DIGEST);
    }

    #[test]
    fn nothing_to_release_without_an_image_or_while_another_build_names_the_tag() {
        let mut failed = built("x", "app:v1", DIGEST);
        if let Some(s) = failed.status.as_mut() {
            s.image_digest = None;
        }
        assert_eq!(plan(&failed, []), None);

        let gone = built("x", "app:v1", DIGEST);
        let same_tag = built("y", "docker.io/library/app:v1", "sha256:other");
        assert_eq!(plan(&gone, [&gone, &same_tag]), None);
        // ...unless that one is being deleted too.
        assert!(plan(&gone, [&deleting(same_tag)]).is_some());
    }

    #[test]
    fn the_digest_reference_stays_while_another_build_has_it() {
        let gone = built("x", "app:v1", DIGEST);
        let same_image = built("y", "app:v2", DIGEST);
        let other_repository = built("z", "other:v1", DIGEST);
        assert!(plan(&gone, [&same_image]).is_some_and(|p| p.keeps_digest_reference(DIGEST)));
        let other = plan(&gone, [&other_repository]).expect("a plan");
        assert!(!other.keeps_digest_reference(DIGEST));
    }

    fn view(state: JobState, message: Option<&str>) -> JobView {
        JobView {
            name: "r".into(),
            state,
            node: None,
            termination_message: message.map(str::to_owned),
            terminated: message.is_some(),
            completed: None,
        }
    }

    fn observe<'a>(
        plan: &'a Plan,
        jobs: BTreeMap<String, &'a JobView>,
        nodes: &'a BTreeSet<String>,
        seconds: i64,
    ) -> Progress {
        progress(&Observation {
            plan,
            jobs,
            nodes,
            deleted: Timestamp::UNIX_EPOCH,
            now: Timestamp::from_second(seconds).expect("a time"),
            timeout: Duration::from_secs(120),
        })
    }

    #[test]
    fn starts_a_job_per_node_then_waits_for_them() {
        let gone = built("x", "app:v1", DIGEST);
        let plan = plan(&gone, []).expect("a plan");
        let nodes = BTreeSet::from(["a".to_owned(), "b".to_owned()]);
        let first = observe(&plan, BTreeMap::new(), &nodes, 0);
        assert_eq!(first.start, ["a", "b"]);
        assert!(!first.done);
        assert_eq!(first.requeue_after, Some(Duration::from_secs(120)));
        assert_eq!(first.events[0].reason, "Releasing");

        let running = view(JobState::Running, None);
        let report = ReleaseReport {
            removed: vec!["docker.io/library/app:v1".into()],
            ..Default::default()
        };
        let released = view(JobState::Succeeded, Some(&report.encode()));
        let waiting = observe(
            &plan,
            BTreeMap::from([("a".into(), &released), ("b".into(), &running)]),
            &nodes,
            30,
        );
        assert!(waiting.start.is_empty() && !waiting.done && waiting.events.is_empty());
        assert_eq!(waiting.requeue_after, Some(Duration::from_secs(90)));
        assert_eq!(waiting.nodes["a"], NodeRelease::Released(report.clone()));

        let in_use = ReleaseReport {
            in_use: true,
            unpinned: vec!["docker.io/library/app:v1".into()],
            ..Default::default()
        };
        let kept = view(JobState::Succeeded, Some(&in_use.encode()));
        let finished = observe(
            &plan,
            BTreeMap::from([("a".into(), &released), ("b".into(), &kept)]),
            &nodes,
            40,
        );
        assert!(finished.done);
        assert_eq!(finished.events.len(), 1, "{:?}", finished.events);
        assert_eq!(finished.events[0].reason, "Released");
        assert_eq!(
            finished.events[0].note,
            "image docker.io/library/app:v1 released: a: removed (1 references); \
             b: in use by a container, unpinned only"
        );
    }

    #[test]
    fn a_gone_node_or_one_that_never_answers_does_not_hold_the_build() {
        let gone = built("x", "app:v1", DIGEST);
        let plan = plan(&gone, []).expect("a plan");
        // b left the cluster; a's Job never ran.
        let nodes = BTreeSet::from(["a".to_owned()]);
        let pending = view(JobState::Pending, None);
        let before = observe(&plan, BTreeMap::from([("a".into(), &pending)]), &nodes, 119);
        assert!(!before.done);
        assert_eq!(before.nodes["b"], NodeRelease::Gone);
        let after = observe(&plan, BTreeMap::from([("a".into(), &pending)]), &nodes, 120);
        assert!(after.done && after.start.is_empty());
        assert_eq!(after.nodes["a"], NodeRelease::TimedOut);
        let reasons: Vec<_> = after.events.iter().map(|e| (e.reason, e.type_)).collect();
        assert_eq!(
            reasons,
            [
                ("Released", EventType::Normal),
                ("ReleaseIncomplete", EventType::Warning)
            ]
        );
        assert!(after.events[1].note.contains("a: no answer within 120s"));
    }

    #[test]
    fn a_failed_release_says_why() {
        let gone = built("x", "app:v1", DIGEST);
        let plan = plan(&gone, []).expect("a plan");
        let nodes = BTreeSet::from(["a".to_owned(), "b".to_owned()]);
        let failed = view(
            JobState::Failed { reason: None },
            Some("error: no containerd socket at /run/containerd/containerd.sock"),
        );
        let done = observe(
            &plan,
            BTreeMap::from([("a".into(), &failed), ("b".into(), &failed)]),
            &nodes,
            5,
        );
        assert!(done.done);
        assert_eq!(done.events.len(), 1);
        assert!(
            done.events[0]
                .note
                .contains("a: error: no containerd socket")
        );
    }
}
