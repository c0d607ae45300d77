//! Getting a Succeeded build's image onto every node where Pods wait for it.
//!
//! A build loads its image into one node's containerd. A Pod on another node (or on the build
//! node after the image was removed there) then waits: the kubelet cannot pull an image that no
//! registry has. A mirror such as Spegel serves it from the build node; where none runs, enbi
//! loads it there itself with a **load Job**: the same two-container builder Pod as a build,
//! pinned to that node, building the flake *as the build locked it* (`status.provenance`) and
//! streaming the image into that node's containerd.
//!
//! Why a rebuild and not a copy from the build node: Nix builds are reproducible and content
//! addressed, so the node's store (or a binary cache) usually has the output and the "build" is
//! an evaluation and a store lookup; a rebuild needs nothing from the build node, which may be
//! gone (replaced, drained, its image collected); and it keeps every guarantee of a build: the
//! flake's code runs without the containerd socket, the loader checks the stream, the same caps
//! on concurrent builds apply, and the builder's spans join the build's trace. The cost is a
//! full build where neither the node nor a cache has the output; the loader says so when the
//! digest differs from the build's (a build that is not reproducible), in status and an Event.
//!
//! One load at a time per node, however many Pods wait there: a node's entry in
//! `status.imageNodes` is `Loading` while its Job runs. A node that holds the image (`Loaded`)
//! while a Pod still waits there is loaded again after `reload_after` (the image was removed,
//! e.g. unpinned and collected by the kubelet); the wait lets a Pod in image-pull back-off start
//! on its own first. A failed load is tried again the same way. Each further reload of a node
//! waits twice as long (up to 64 times `reload_after`) and says so in a Warning: Pods that still
//! wait after the image was loaded again are refused it by something enbi cannot change (e.g. a
//! kubelet that insists on verifying a pull), and a load every minute would not help them. With
//! a mirror (`mirror`), enbi loads only on the build node, where the mirror gets the image from,
//! unless no node in the cluster holds the image any more (the build node was replaced, say):
//! then a mirror has nothing to serve, and enbi loads where Pods wait, as without one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Affinity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::backoff;
use crate::capacity::{self, Full};
use crate::crd::{ImageNode, ImageNodeState, NixBuildStatus};
use crate::event::{Event, EventType};
use crate::job::{JobState, JobView};
use crate::placement::{self, NoEligibleNode, NodeView};
use crate::report::BuildReport;

/// How enbi spreads images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A mirror (e.g. Spegel) spreads images between nodes: load only on the build node.
    pub mirror: bool,
    /// How long a Pod may still wait on a node enbi loaded (or failed to load) before it loads
    /// there again.
    pub reload_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mirror: false,
            reload_after: Duration::from_secs(60),
        }
    }
}

/// Whether a load may start on a node now, as the operator's placement and capacity say.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// It may, with this affinity (the node itself).
    Open(Affinity),
    /// Not now: a cap on concurrent builds is reached.
    Queued(Full),
    /// Never: the node cannot build this system (architecture, repelled, ...).
    Impossible(NoEligibleNode),
}

/// Whether a load of an image for `system` may start on `node` now: the node must be one enbi
/// would build on (`placement::place_on`), and the caps on running builds (`running`: their
/// nodes) must allow one more there.
pub fn slot(
    system: &str,
    nodes: &[NodeView],
    repelled: &[String],
    node: &str,
    running: &[Option<String>],
    limits: capacity::Limits,
) -> Slot {
    match placement::place_on(system, nodes, repelled, node) {
        Err(e) => Slot::Impossible(e),
        Ok(p) => match capacity::check(running, &p.eligible, limits) {
            Err(full) => Slot::Queued(full),
            Ok(()) => Slot::Open(p.affinity),
        },
    }
}

/// What the operator observed for spreading a Succeeded build.
#[derive(Debug, Default)]
pub struct Observation<'a> {
    /// Nodes where Pods wait for the image, each with whether a load may start there.
    pub waiting: BTreeMap<String, Slot>,
    /// The current load Job of each node being loaded, if it exists.
    pub jobs: BTreeMap<String, &'a JobView>,
    /// The names of the cluster's nodes now.
    pub nodes: BTreeSet<String>,
}

/// A load Job to create (or re-apply).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadPlan {
    pub node: String,
    pub round: u32,
    pub affinity: Affinity,
}

/// What to change.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub loads: Vec<LoadPlan>,
    pub events: Vec<Event>,
    pub requeue_after: Option<Duration>,
}

/// Updates `status.imageNodes` of a Succeeded build and says which loads to start.
pub fn decide(
    status: &mut NixBuildStatus,
    obs: &Observation<'_>,
    settings: &Settings,
    now: Timestamp,
) -> Outcome {
    let mut out = Outcome::default();
    // The build node holds the image unless `imageNodes` says otherwise of it
    // (`NixBuild::image_holders`); builds that succeeded before enbi tracked nodes have no entry.
    if let Some(node) = &status.build_node
        && !status.image_nodes.iter().any(|e| &e.node == node)
    {
        status.image_nodes.push(loaded(
            node,
            0,
            status.completion_time.clone().unwrap_or(Time(now)),
        ));
    }
    let build_digest = status.image_digest.clone();
    for entry in &mut status.image_nodes {
        if entry.state == ImageNodeState::Loading {
            finish_load(entry, obs, build_digest.as_deref(), now, &mut out);
        }
    }
    // With a mirror, a node that holds the image serves every other; with none left, enbi
    // loads wherever Pods wait.
    let mirrored = settings.mirror
        && status.image_nodes.iter().any(|e| {
            e.state == ImageNodeState::Loaded && e.digest.is_none() && obs.nodes.contains(&e.node)
        });
    for (node, gate) in &obs.waiting {
        let held = status
            .image_nodes
            .iter()
            .any(|e| &e.node == node && e.state != ImageNodeState::Failed);
        if mirrored && !held {
            continue;
        }
        let index = status.image_nodes.iter().position(|e| &e.node == node);
        let round = match index.map(|i| &status.image_nodes[i]) {
            None => 1,
            Some(e) if e.state == ImageNodeState::Loading => continue,
            Some(e) => {
                let due = e.since.0 + reload_wait(settings.reload_after, reloads(status, e));
                if due > now {
                    let wait = Duration::try_from(due.duration_since(now)).unwrap_or_default();
                    out.requeue_after = Some(out.requeue_after.map_or(wait, |w| w.min(wait)));
                    continue;
                }
                e.loads + 1
            }
        };
        let affinity = match gate {
            Slot::Open(affinity) => affinity.clone(),
            Slot::Queued(_) => {
                // Nothing wakes a Succeeded build when a slot frees up: look again.
                let wait = Duration::from_secs(10);
                out.requeue_after = Some(out.requeue_after.map_or(wait, |w| w.min(wait)));
                continue;
            }
            Slot::Impossible(why) => {
                let message = format!(
                    "Pods wait for the image on node {node}, but enbi cannot load it there: {why}"
                );
                let entry = ImageNode {
                    node: node.clone(),
                    state: ImageNodeState::Failed,
                    loads: index.map_or(0, |i| status.image_nodes[i].loads),
                    since: Time(now),
                    digest: None,
                    message: Some(message.clone()),
                };
                let changed = index.map(|i| &status.image_nodes[i].message) != Some(&entry.message);
                upsert(&mut status.image_nodes, index, entry);
                if changed {
                    out.events.push(Event::warning("LoadImpossible", message));
                }
                continue;
            }
        };
        let reloads = index.map_or(0, |i| reloads(status, &status.image_nodes[i]));
        let (type_, reason, why) = match index {
            None => (
                EventType::Normal,
                "Loading",
                format!("Pods on node {node} wait for the image"),
            ),
            Some(_) if reloads == 0 => (
                EventType::Normal,
                "Reloading",
                format!("Pods on node {node} still wait for the image"),
            ),
            Some(_) => (
                EventType::Warning,
                "Reloading",
                format!(
                    "Pods on node {node} still wait for the image although enbi loaded it there again {reloads} time(s) (if it is there, something refuses it: see \"Pods still fail their pulls on a node that holds the image\" in enbi's README); next time in {}s at the earliest",
                    reload_wait(settings.reload_after, reloads + 1).as_secs()
                ),
            ),
        };
        upsert(
            &mut status.image_nodes,
            index,
            ImageNode {
                node: node.clone(),
                state: ImageNodeState::Loading,
                loads: round,
                since: Time(now),
                digest: None,
                message: None,
            },
        );
        out.events.push(Event {
            type_,
            reason,
            note: format!("{why}: load {round} builds the locked flake there"),
        });
        out.loads.push(LoadPlan {
            node: node.clone(),
            round,
            affinity,
        });
    }
    // Loads under way whose Job is not there (not yet seen, or deleted): apply it again.
    for entry in &status.image_nodes {
        let planned = out.loads.iter().any(|l| l.node == entry.node);
        if entry.state == ImageNodeState::Loading
            && !planned
            && !obs.jobs.contains_key(&entry.node)
            && let Some(Slot::Open(affinity)) = obs.waiting.get(&entry.node)
        {
            out.loads.push(LoadPlan {
                node: entry.node.clone(),
                round: entry.loads,
                affinity: affinity.clone(),
            });
        }
    }
    out
}

/// How often enbi loaded the image on the entry's node again (the build's own load and a node's
/// first load are not reloads).
fn reloads(status: &NixBuildStatus, entry: &ImageNode) -> u32 {
    if status.build_node.as_ref() == Some(&entry.node) {
        entry.loads
    } else {
        entry.loads.saturating_sub(1)
    }
}

/// How long Pods may wait on a node before its next reload, after `reloads` reloads: `base`,
/// doubled by each reload, at most 64 times `base`.
fn reload_wait(base: Duration, reloads: u32) -> Duration {
    backoff::doubling(base, reloads, base.saturating_mul(64))
}

/// The node holds the image since `since`.
pub(crate) fn loaded(node: &str, loads: u32, since: Time) -> ImageNode {
    ImageNode {
        node: node.to_owned(),
        state: ImageNodeState::Loaded,
        loads,
        since,
        digest: None,
        message: None,
    }
}

fn upsert(entries: &mut Vec<ImageNode>, index: Option<usize>, entry: ImageNode) {
    match index {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
}

/// Reads the result of a node's load Job, once it has one.
fn finish_load(
    entry: &mut ImageNode,
    obs: &Observation<'_>,
    build_digest: Option<&str>,
    now: Timestamp,
    out: &mut Outcome,
) {
    let Some(view) = obs.jobs.get(&entry.node) else {
        return;
    };
    let node = entry.node.clone();
    let failed = |entry: &mut ImageNode, out: &mut Outcome, message: String| {
        *entry = ImageNode {
            state: ImageNodeState::Failed,
            since: Time(now),
            message: Some(message.clone()),
            ..entry.clone()
        };
        out.events.push(Event::warning(
            "LoadFailed",
            format!("Loading the image on node {node} failed: {message}"),
        ));
    };
    let report = view.termination_message.as_deref().map(BuildReport::parse);
    match (&view.state, report) {
        (JobState::Pending | JobState::Running, _) => {}
        (JobState::Succeeded, Some(Ok(BuildReport::Succeeded(image)))) => {
            let same = build_digest == Some(image.digest.as_str());
            *entry = loaded(&node, entry.loads, Time(now));
            if same {
                out.events.push(Event {
                    type_: EventType::Normal,
                    reason: "Loaded",
                    note: format!("Image {} loaded on node {node}", image.digest),
                });
            } else {
                entry.digest = Some(image.digest.clone());
                out.events.push(Event::warning(
                    "NotReproducible",
                    format!(
                        "The image loaded on node {node} is {}, not the build's {}: the flake does not build reproducibly, so Pods there run another image",
                        image.digest,
                        build_digest.unwrap_or("(unknown)")
                    ),
                ));
            }
        }
        (_, Some(Ok(BuildReport::Failed(f)))) => {
            failed(entry, out, format!("{}: {}", f.reason.as_str(), f.message))
        }
        (_, Some(Err(e))) => failed(entry, out, format!("InvalidReport: {e}")),
        (JobState::Failed { reason }, None | Some(Ok(BuildReport::Succeeded(_)))) => failed(
            entry,
            out,
            format!(
                "load Job {} failed ({}) without a report",
                view.name,
                reason.as_deref().unwrap_or("no reason")
            ),
        ),
        (JobState::Succeeded, None) => failed(
            entry,
            out,
            format!("load Job {} exited 0 without a report", view.name),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Phase;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    fn succeeded() -> NixBuildStatus {
        NixBuildStatus {
            phase: Some(Phase::Succeeded),
            build_node: Some("a".into()),
            image_digest: Some(DIGEST.into()),
            completion_time: Some(Time(at(0))),
            ..Default::default()
        }
    }

    fn open() -> Slot {
        Slot::Open(Affinity::default())
    }

    fn waiting(nodes: &[(&str, Slot)]) -> Observation<'static> {
        Observation {
            waiting: nodes
                .iter()
                .map(|(n, g)| ((*n).to_owned(), g.clone()))
                .collect(),
            jobs: BTreeMap::new(),
            nodes: ["a", "b", "c"].map(String::from).into(),
        }
    }

    fn report(digest: &str) -> String {
        serde_json::json!({"result": "Succeeded", "imageTag": "docker.io/library/app:1", "digest": digest,
            "size": 10, "storePath": "/nix/store/00000000000000000000000000000000-app", "bytesStreamed": 10,
            "imported": true, "timings": {"buildMs": 1, "importMs": 1, "totalMs": 2}})
        .to_string()
    }

    fn job(state: JobState, message: Option<String>) -> JobView {
        JobView {
            name: "app-l1".into(),
            state,
            node: Some("b".into()),
            termination_message: message,
            terminated: true,
            completed: None,
        }
    }

    /// One decision with Pods waiting on node b.
    fn ask_b(status: &mut NixBuildStatus, settings: &Settings, t: i64) -> Outcome {
        decide(status, &waiting(&[("b", open())]), settings, at(t))
    }

    /// One decision that sees b's load Job as `view` (with Pods still waiting on b or not).
    fn b_job(
        status: &mut NixBuildStatus,
        view: &JobView,
        still_waiting: bool,
        settings: &Settings,
        t: i64,
    ) -> Outcome {
        let mut obs = if still_waiting {
            waiting(&[("b", open())])
        } else {
            waiting(&[])
        };
        obs.jobs.insert("b".into(), view);
        decide(status, &obs, settings, at(t))
    }

    #[test]
    fn the_build_node_holds_the_image_and_nothing_is_loaded_without_waiting_pods() {
        let mut status = succeeded();
        let out = decide(&mut status, &waiting(&[]), &Settings::default(), at(5));
        assert_eq!(out, Outcome::default());
        assert_eq!(status.image_nodes, vec![loaded("a", 0, Time(at(0)))]);
    }

    #[test]
    fn one_load_per_node_however_often_asked() {
        let mut status = succeeded();
        let obs = waiting(&[("b", open()), ("c", open())]);
        let out = decide(&mut status, &obs, &Settings::default(), at(5));
        let nodes: Vec<(&str, u32)> = out
            .loads
            .iter()
            .map(|l| (l.node.as_str(), l.round))
            .collect();
        assert_eq!(nodes, [("b", 1), ("c", 1)]);
        assert_eq!(out.events.len(), 2);
        assert_eq!(status.image_nodes[1].state, ImageNodeState::Loading);
        // Asked again while loading (Job visible): nothing new.
        let running = job(JobState::Running, None);
        let mut obs = waiting(&[("b", open()), ("c", open())]);
        obs.jobs.insert("b".into(), &running);
        obs.jobs.insert("c".into(), &running);
        let out = decide(&mut status, &obs, &Settings::default(), at(6));
        assert_eq!(out, Outcome::default());
    }

    #[test]
    fn a_load_whose_job_is_not_seen_yet_is_applied_again_with_the_same_round() {
        let mut status = succeeded();
        ask_b(&mut status, &Settings::default(), 5);
        let out = ask_b(&mut status, &Settings::default(), 6);
        assert_eq!(out.loads.len(), 1);
        assert_eq!(out.loads[0].round, 1);
        assert!(out.events.is_empty(), "{:?}", out.events);
    }

    #[test]
    fn a_finished_load_marks_the_node_and_a_different_digest_is_a_warning() {
        let settings = Settings::default();
        let mut status = succeeded();
        ask_b(&mut status, &settings, 5);
        let done = job(JobState::Succeeded, Some(report(DIGEST)));
        let out = b_job(&mut status, &done, true, &settings, 9);
        assert_eq!(out.events[0].reason, "Loaded");
        assert!(out.loads.is_empty());
        assert_eq!(status.image_nodes[1], loaded("b", 1, Time(at(9))));

        let mut status = succeeded();
        ask_b(&mut status, &settings, 5);
        let other = format!("sha256:{}", "2".repeat(64));
        let done = job(JobState::Succeeded, Some(report(&other)));
        let out = b_job(&mut status, &done, false, &settings, 9);
        assert_eq!(out.events[0].reason, "NotReproducible");
        assert_eq!(out.events[0].type_, EventType::Warning);
        assert_eq!(status.image_nodes[1].digest, Some(other));
    }

    #[test]
    fn failed_loads_say_why_and_are_tried_again_later() {
        let settings = Settings::default();
        let mut status = succeeded();
        ask_b(&mut status, &settings, 5);
        let failed = job(
            JobState::Failed {
                reason: Some("DeadlineExceeded".into()),
            },
            None,
        );
        let out = b_job(&mut status, &failed, true, &settings, 9);
        assert_eq!(out.events[0].reason, "LoadFailed");
        assert!(
            out.events[0].note.contains("DeadlineExceeded"),
            "{:?}",
            out.events
        );
        assert_eq!(status.image_nodes[1].state, ImageNodeState::Failed);
        assert_eq!(out.requeue_after, Some(Duration::from_secs(60)));
        let out = ask_b(&mut status, &settings, 70);
        assert_eq!(out.loads[0].round, 2);
        assert_eq!(out.events[0].reason, "Reloading");
    }

    /// The image was removed from a node enbi loaded (or the build node): a Pod waiting there
    /// past `reload_after` gets it loaded again; earlier, it is left to its pull back-off.
    #[test]
    fn a_pod_still_waiting_on_a_loaded_node_reloads_it_after_a_while() {
        let settings = Settings {
            reload_after: Duration::from_secs(30),
            ..Default::default()
        };
        let mut status = succeeded();
        let out = decide(&mut status, &waiting(&[("a", open())]), &settings, at(10));
        assert!(out.loads.is_empty());
        assert_eq!(out.requeue_after, Some(Duration::from_secs(20)));
        let out = decide(&mut status, &waiting(&[("a", open())]), &settings, at(30));
        assert_eq!(out.loads[0].node, "a");
        assert_eq!(out.loads[0].round, 1);
    }

    /// Pods that still wait after a reload do not get a load every `reload_after`: each further
    /// reload waits twice as long, and says so in a Warning.
    #[test]
    fn reloads_that_do_not_help_back_off_and_warn() {
        let settings = Settings {
            reload_after: Duration::from_secs(10),
            ..Default::default()
        };
        let mut status = succeeded();
        let done = job(JobState::Succeeded, Some(report(DIGEST)));
        // Load 1 on b (not a reload), done at 1; Pods still wait: reload after 10 s.
        ask_b(&mut status, &settings, 0);
        b_job(&mut status, &done, true, &settings, 1);
        let out = ask_b(&mut status, &settings, 5);
        assert_eq!(out.requeue_after, Some(Duration::from_secs(6)));
        let out = ask_b(&mut status, &settings, 11);
        assert_eq!(out.loads[0].round, 2);
        assert_eq!(out.events[0].type_, EventType::Normal);
        // Reload 1 done at 12; the Pods still wait: the next one waits 20 s, and warns.
        b_job(&mut status, &done, true, &settings, 12);
        let out = ask_b(&mut status, &settings, 22);
        assert!(out.loads.is_empty());
        assert_eq!(out.requeue_after, Some(Duration::from_secs(10)));
        let out = ask_b(&mut status, &settings, 32);
        assert_eq!(out.loads[0].round, 3);
        assert_eq!(out.events[0].type_, EventType::Warning);
        assert!(
            out.events[0].note.contains("next time in 40s"),
            "{:?}",
            out.events
        );
        // The wait stops growing at 64 times.
        assert_eq!(
            reload_wait(settings.reload_after, 30),
            Duration::from_secs(640)
        );
    }

    #[test]
    fn with_a_mirror_only_the_build_node_is_loaded() {
        let settings = Settings {
            mirror: true,
            reload_after: Duration::ZERO,
        };
        let mut status = succeeded();
        let out = decide(
            &mut status,
            &waiting(&[("a", open()), ("b", open())]),
            &settings,
            at(5),
        );
        let nodes: Vec<&str> = out.loads.iter().map(|l| l.node.as_str()).collect();
        assert_eq!(nodes, ["a"]);
    }

    #[test]
    fn with_a_mirror_but_no_node_holding_the_image_enbi_loads_where_pods_wait() {
        let settings = Settings {
            mirror: true,
            reload_after: Duration::ZERO,
        };
        let mut status = succeeded();
        let mut obs = waiting(&[("b", open()), ("c", open())]);
        // The build node "a" is gone (replaced by the autoscaler, say).
        obs.nodes.remove("a");
        let out = decide(&mut status, &obs, &settings, at(5));
        let nodes: Vec<&str> = out.loads.iter().map(|l| l.node.as_str()).collect();
        assert_eq!(nodes, ["b", "c"]);
        assert!(out.events.iter().all(|e| e.reason == "Loading"));

        // While "a" is there, the mirror serves "b" and "c".
        let mut status = succeeded();
        let obs = waiting(&[("b", open()), ("c", open())]);
        assert!(decide(&mut status, &obs, &settings, at(5)).loads.is_empty());
    }

    #[test]
    fn queued_loads_wait_and_impossible_ones_say_why_once() {
        let mut status = succeeded();
        let obs = waiting(&[
            ("b", Slot::Queued(Full::Cluster { running: 4 })),
            ("c", Slot::Impossible(NoEligibleNode("arm64".into()))),
        ]);
        let out = decide(&mut status, &obs, &Settings::default(), at(5));
        assert!(out.loads.is_empty());
        assert_eq!(out.requeue_after, Some(Duration::from_secs(10)));
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].reason, "LoadImpossible");
        assert!(out.events[0].note.contains("node c"), "{:?}", out.events);
        let out = decide(&mut status, &obs, &Settings::default(), at(100));
        assert!(out.events.is_empty(), "said once: {:?}", out.events);
    }
}
