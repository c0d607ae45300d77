//! Scheduling gates for Pods whose image enbi has yet to build: `(request, NixBuild) ->
//! release?` while a gated Pod waits, and the patch that lets it go; and which Pods waiting in
//! the kubelet's back-off to recreate.
//!
//! A gated Pod (`spec.schedulingGates` holds [`keys::GATE`]) is not scheduled, so no kubelet tries to
//! pull its image and nothing backs off: when the build succeeds, the gate goes and the Pod
//! starts at once. The admission webhook adds the gate (`admission`). Every gate has a way out: the build succeeds, the NixBuild is
//! deleted, or the Pod stops asking for a valid build; a failed build keeps its Pods gated until
//! it is retried (`enbi.hrzn.ee/retry`) or deleted.
//!
//! Optionally (`--narrow-gated-pods`, never with a mirror), the gate goes together with a
//! narrowing of the Pod's required node affinity to the nodes that hold the image
//! ([`narrow_patch`]): the Pod then starts at once where the image is, instead of waiting on
//! another node for enbi to load it there. Kubernetes lets a gated Pod's scheduling directives
//! only be tightened ("mutable Pod scheduling directives"): `nodeSelectorTerms` may be set when
//! there is no required node affinity, otherwise only expressions may be added to each existing
//! term; the patch does only that.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec};
use serde_json::{Value, json};

use super::request::BuildRequest;
use crate::crd::{NixBuild, Phase};
use crate::event::Event;
use crate::keys;

/// Whether the Pod carries enbi's gate.
pub fn is_gated(spec: &PodSpec) -> bool {
    spec.scheduling_gates
        .iter()
        .flatten()
        .any(|g| g.name == keys::GATE)
}

/// Why a gated Pod's gate should go now, or `None` to keep waiting. `request` is what the Pod
/// asks for (`None`: no valid build any more), `build` its NixBuild as cached (`None`: being
/// created).
pub fn release(request: Option<&BuildRequest>, build: Option<&NixBuild>) -> Option<String> {
    let Some(request) = request else {
        return Some("the Pod no longer asks for a build enbi can make".into());
    };
    let build = build?;
    if build.metadata.deletion_timestamp.is_some() {
        return Some(format!(
            "NixBuild {} was deleted; the Pod is scheduled without waiting for it",
            request.name
        ));
    }
    (build.phase() == Phase::Succeeded).then(|| {
        format!(
            "NixBuild {} loaded {}",
            request.name, request.spec.image_tag
        )
    })
}

/// The JSON patch that removes enbi's gate, guarded by a test so that a concurrent change to
/// the gates fails the patch instead of removing another gate.
pub fn ungate_patch(spec: &PodSpec) -> Option<Vec<Value>> {
    let index = spec
        .scheduling_gates
        .as_ref()?
        .iter()
        .position(|g| g.name == keys::GATE)?;
    let path = format!("/spec/schedulingGates/{index}");
    Some(vec![
        json!({"op": "test", "path": format!("{path}/name"), "value": keys::GATE}),
        json!({"op": "remove", "path": path}),
    ])
}

/// How to let a gated Pod go: JSON patches to try in order, each a fallback for the one before
/// when the apiserver refuses it as invalid (422).
#[derive(Debug, Clone, PartialEq)]
pub struct UngatePlan {
    pub attempts: Vec<UngateAttempt>,
}

/// One patch, and the Event to publish on the Pod when it is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct UngateAttempt {
    pub patch: Vec<Value>,
    pub event: Option<Event>,
}

/// The plan that removes enbi's gate from a Pod whose spec is `spec` (as it is now), or `None`
/// when it has none. With `narrow` (the NixBuild whose image the Pod waits for, and the nodes
/// holding it), the first attempt also narrows the Pod's node affinity to the holders it can
/// run on ([`narrow_patch`]), and the second removes only the gate: a narrowing the apiserver
/// refuses (a rule of another version, say) must not keep the Pod gated.
pub fn ungate_plan(spec: &PodSpec, narrow: Option<(&NixBuild, &[&Node])>) -> Option<UngatePlan> {
    let ungate = ungate_patch(spec)?;
    let mut attempts = vec![];
    if let Some((build, holders)) = narrow
        && let Some(ops) = narrow_patch(spec, holders)
    {
        let nodes: Vec<String> = fitting(spec, holders).into_iter().collect();
        attempts.push(UngateAttempt {
            patch: ops.into_iter().chain(ungate.clone()).collect(),
            event: Some(Event::normal(
                "NodeAffinityNarrowed",
                format!(
                    "Node affinity narrowed, as the scheduling gate went, to the nodes that \
                     hold the image of NixBuild {} and that the Pod can run on ({}; \
                     --narrow-gated-pods).",
                    build.metadata.name.as_deref().unwrap_or_default(),
                    nodes.join(", ")
                ),
            )),
        });
    }
    attempts.push(UngateAttempt {
        patch: ungate,
        event: None,
    });
    Some(UngatePlan { attempts })
}

/// The Pod's required node selector terms (none: it may go anywhere).
fn required_terms(spec: &PodSpec) -> &[NodeSelectorTerm] {
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default()
}

/// The `kubernetes.io/hostname` of each node among `holders` that the Pod could run on: Ready,
/// not cordoned, no taint it does not tolerate, its `nodeSelector` and one of its required
/// node selector terms matched.
fn fitting(spec: &PodSpec, holders: &[&Node]) -> BTreeSet<String> {
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let terms = required_terms(spec);
    holders
        .iter()
        .filter(|node| {
            let view = crate::placement::NodeView::new(node, tolerations);
            let labels = node.metadata.labels.clone().unwrap_or_default();
            let name = node.metadata.name.as_deref().unwrap_or_default();
            view.ready
                && view.schedulable
                && spec
                    .node_selector
                    .iter()
                    .flatten()
                    .all(|(k, v)| labels.get(k) == Some(v))
                && (terms.is_empty() || terms.iter().any(|t| term_matches(t, &labels, name)))
        })
        .filter_map(|node| {
            node.metadata
                .labels
                .as_ref()?
                .get(keys::HOSTNAME_LABEL)
                .cloned()
        })
        .collect()
}

/// JSON patch operations that narrow a gated Pod's required node affinity to the nodes among
/// `holders` (those that hold its image) that it could run on: Ready, not cordoned, no
/// `NoSchedule`/`NoExecute` taint the Pod does not tolerate, its `nodeSelector` and one of its
/// required node selector terms matched. Only additions, as Kubernetes allows on a gated Pod:
/// without required node affinity, one term `kubernetes.io/hostname In [holders]`; with it, that
/// expression added to each term (terms are ORed, expressions ANDed), after a test that the
/// terms are still those read. `None` when no holder fits (the Pod is left to go anywhere, and
/// enbi loads the image where it lands) or the Pod is already narrowed to them.
///
/// The Pod's preferences, anti-affinity and topology spread are not weighed: a Pod whose
/// required anti-affinity allows one replica per node can stay Pending once more replicas than
/// holders exist. That is why narrowing is a setting, off by default.
pub fn narrow_patch(spec: &PodSpec, holders: &[&Node]) -> Option<Vec<Value>> {
    let hostnames = fitting(spec, holders);
    let terms = required_terms(spec);
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if hostnames.is_empty() {
        return None;
    }
    let expression = NodeSelectorRequirement {
        key: keys::HOSTNAME_LABEL.into(),
        operator: "In".into(),
        values: Some(hostnames.into_iter().collect()),
    };
    let narrowed = |t: &NodeSelectorTerm| {
        t.match_expressions
            .iter()
            .flatten()
            .any(|e| *e == expression)
    };
    if !terms.is_empty() && terms.iter().all(narrowed) {
        return None;
    }
    let expression = serde_json::to_value(&expression).ok()?;
    let term = json!({"matchExpressions": [expression]});
    let node_affinity = "/spec/affinity/nodeAffinity";
    let required_path = format!("{node_affinity}/requiredDuringSchedulingIgnoredDuringExecution");
    let affinity = spec.affinity.as_ref();
    Some(if affinity.is_none() {
        vec![json!({"op": "add", "path": "/spec/affinity", "value":
            {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}})]
    } else if affinity.and_then(|a| a.node_affinity.as_ref()).is_none() {
        vec![json!({"op": "add", "path": node_affinity, "value":
            {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}})]
    } else if required.is_none() {
        vec![json!({"op": "add", "path": required_path, "value": {"nodeSelectorTerms": [term]}})]
    } else if terms.is_empty() {
        vec![
            json!({"op": "add", "path": format!("{required_path}/nodeSelectorTerms"), "value": [term]}),
        ]
    } else {
        let mut ops = vec![
            json!({"op": "test", "path": format!("{required_path}/nodeSelectorTerms"),
            "value": serde_json::to_value(terms).ok()?}),
        ];
        ops.extend(terms.iter().enumerate().map(|(i, t)| {
            let path = format!("{required_path}/nodeSelectorTerms/{i}/matchExpressions");
            if t.match_expressions.is_some() {
                json!({"op": "add", "path": format!("{path}/-"), "value": expression})
            } else {
                json!({"op": "add", "path": path, "value": [expression]})
            }
        }));
        ops
    })
}

/// Whether a node with `labels` and `name` matches a node selector term (its expressions and
/// fields ANDed; a term with neither matches nothing), by the scheduler's rules.
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let fields_of = BTreeMap::from([("metadata.name".to_owned(), name.to_owned())]);
    expressions.iter().all(|r| requirement_matches(r, labels))
        && fields.iter().all(|r| requirement_matches(r, &fields_of))
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    let compare = |ordering| {
        let bound = values.first().and_then(|v| number(v));
        value
            .and_then(|v| number(v))
            .zip(bound)
            .is_some_and(|(v, b)| v.cmp(&b) == ordering)
    };
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => compare(std::cmp::Ordering::Greater),
        "Lt" => compare(std::cmp::Ordering::Less),
        _ => false,
    }
}

/// Kinds of controllers whose waiting Pods may be deleted to skip the kubelet's back-off: they
/// make a new Pod at once. Not Jobs (a deleted Pod counts as a failure towards `backoffLimit`),
/// never a bare Pod (nothing would make it again).
const RECREATED_BY: [&str; 3] = ["ReplicaSet", "StatefulSet", "DaemonSet"];

/// Whether to delete a Pod that waits in the kubelet's back-off for an image that `build` has
/// now loaded, so that its controller makes a new one, which starts at once. Only on a node
/// that holds the image (`NixBuild::image_holders`): elsewhere the new Pod might
/// land on a node without it again, and be deleted again. Only a Pod made before the image
/// landed there: one made after it that still waits means the image went away, which a reload
/// fixes (`spread`), not another Pod.
pub fn recreate(pod: &Pod, build: Option<&NixBuild>) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    // Whether the node holds the image, and since when (if known).
    let holds = build
        .zip(node)
        .and_then(|(build, node)| build.image_holders().remove(node));
    let created = pod.metadata.creation_timestamp.as_ref();
    let succeeded = holds.is_some_and(|since| match (created, since) {
        (Some(created), Some(since)) => created.0 <= since.0,
        _ => true,
    });
    let gated = pod.spec.as_ref().is_some_and(is_gated);
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    succeeded
        && !gated
        && pod.metadata.deletion_timestamp.is_none()
        && controller.is_some_and(|o| RECREATED_BY.contains(&o.kind.as_str()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::pod::fixtures::{annotations, build, pod, spec};

    #[test]
    fn the_gate_goes_when_the_build_succeeds_or_is_deleted_or_the_pod_asks_for_nothing() {
        let request = BuildRequest {
            name: "b".into(),
            spec: build(None).spec,
            node: None,
            containers: vec!["app".into()],
        };
        let mut deleted = build(Some(Phase::Building));
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let cases = [
            ("being created", Some(&request), None, false),
            (
                "pending",
                Some(&request),
                Some(build(Some(Phase::Pending))),
                false,
            ),
            ("no status yet", Some(&request), Some(build(None)), false),
            (
                "building",
                Some(&request),
                Some(build(Some(Phase::Building))),
                false,
            ),
            (
                "failed: stays gated until retried",
                Some(&request),
                Some(build(Some(Phase::Failed))),
                false,
            ),
            (
                "succeeded",
                Some(&request),
                Some(build(Some(Phase::Succeeded))),
                true,
            ),
            ("deleted", Some(&request), Some(deleted), true),
            ("no valid request", None, None, true),
        ];
        for (what, request, build, want) in cases {
            assert_eq!(release(request, build.as_ref()).is_some(), want, "{what}");
        }
    }

    #[test]
    fn ungating_removes_only_our_gate() {
        let p = pod(
            annotations(),
            spec(json!({"schedulingGates": [{"name": "other"}, {"name": keys::GATE}]})),
        );
        let patch = ungate_patch(p.spec.as_ref().expect("spec")).expect("a patch");
        assert_eq!(
            patch,
            [
                json!({"op": "test", "path": "/spec/schedulingGates/1/name", "value": keys::GATE}),
                json!({"op": "remove", "path": "/spec/schedulingGates/1"}),
            ]
        );
        let p = pod(
            annotations(),
            spec(json!({"schedulingGates": [{"name": "other"}]})),
        );
        assert_eq!(ungate_patch(p.spec.as_ref().expect("spec")), None);
    }

    #[test]
    fn only_controlled_waiting_pods_are_recreated() {
        let owned = |kind: &str, controller: bool| {
            let mut p = pod(annotations(), spec(json!({"nodeName": "n1"})));
            p.metadata.owner_references = Some(vec![serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": kind, "name": "o", "uid": "u", "controller": controller,
            }))
            .expect("owner")]);
            p
        };
        let mut done = build(Some(Phase::Succeeded));
        if let Some(s) = done.status.as_mut() {
            s.build_node = Some("n1".into());
        }
        let mut elsewhere = done.clone();
        if let Some(s) = elsewhere.status.as_mut() {
            s.build_node = Some("n2".into());
        }
        let cases = [
            (
                "image on another node",
                owned("ReplicaSet", true),
                Some(elsewhere),
                false,
            ),
            (
                "ReplicaSet",
                owned("ReplicaSet", true),
                Some(done.clone()),
                true,
            ),
            (
                "StatefulSet",
                owned("StatefulSet", true),
                Some(done.clone()),
                true,
            ),
            (
                "DaemonSet",
                owned("DaemonSet", true),
                Some(done.clone()),
                true,
            ),
            ("Job", owned("Job", true), Some(done.clone()), false),
            (
                "not the controller",
                owned("ReplicaSet", false),
                Some(done.clone()),
                false,
            ),
            (
                "bare Pod",
                pod(annotations(), spec(json!({"nodeName": "n1"}))),
                Some(done.clone()),
                false,
            ),
            (
                "build not done",
                owned("ReplicaSet", true),
                Some(build(Some(Phase::Building))),
                false,
            ),
            ("no build", owned("ReplicaSet", true), None, false),
        ];
        for (what, pod, build, want) in cases {
            assert_eq!(recreate(&pod, build.as_ref()), want, "{what}");
        }
        // A node enbi loaded the image on counts; a Pod made after it landed there does not (the
        // image went away: a reload, not a new Pod).
        let mut loaded = done.clone();
        let since = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time");
        if let Some(s) = loaded.status.as_mut() {
            s.build_node = Some("n2".into());
            s.image_nodes = ["n2", "n1"]
                .iter()
                .map(|n| crate::spread::loaded(n, 1, Time(since)))
                .collect();
        }
        let mut old = owned("ReplicaSet", true);
        old.metadata.creation_timestamp = Some(Time(
            since - k8s_openapi::jiff::SignedDuration::from_secs(5),
        ));
        assert!(
            recreate(&old, Some(&loaded)),
            "made before the image landed on its node"
        );
        let mut young = old.clone();
        young.metadata.creation_timestamp = Some(Time(
            since + k8s_openapi::jiff::SignedDuration::from_secs(5),
        ));
        assert!(!recreate(&young, Some(&loaded)), "made after it landed");
        let mut gated = owned("ReplicaSet", true);
        gated.spec.as_mut().expect("spec").scheduling_gates = Some(vec![
            serde_json::from_value(json!({"name": keys::GATE})).expect("gate"),
        ]);
        assert!(
            !recreate(&gated, Some(&done)),
            "a gated Pod is ungated instead"
        );
    }

    fn node(name: &str, extra: Value) -> Node {
        let mut n = json!({
            "metadata": {"name": name, "labels": {keys::HOSTNAME_LABEL: name, keys::ARCH_LABEL: "amd64"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        if let Some(spec) = extra.get("spec") {
            n["spec"] = spec.clone();
        }
        if let Some(labels) = extra.get("labels").and_then(Value::as_object) {
            for (k, v) in labels {
                n["metadata"]["labels"][k] = v.clone();
            }
        }
        serde_json::from_value(n).expect("node")
    }

    fn hostnames(values: &[&str]) -> Value {
        json!({"key": keys::HOSTNAME_LABEL, "operator": "In", "values": values})
    }

    const REQUIRED: &str =
        "/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution";

    #[test]
    fn narrowing_only_adds_what_a_gated_pod_may_get() {
        let (n1, n2) = (node("n1", json!({})), node("n2", json!({})));
        let holders = [&n1, &n2];
        let term = json!({"matchExpressions": [hostnames(&["n1", "n2"])]});
        let zone = json!({"key": "zone", "operator": "In", "values": ["a"]});
        let narrow = |extra: Value| {
            let p = pod(annotations(), spec(extra));
            narrow_patch(p.spec.as_ref().expect("spec"), &holders)
        };
        let cases = [
            (
                "no affinity: set it",
                json!({}),
                vec![json!({"op": "add", "path": "/spec/affinity", "value":
                    {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}})],
            ),
            (
                "pod anti-affinity only: add nodeAffinity next to it",
                json!({"affinity": {"podAntiAffinity": {}}}),
                vec![
                    json!({"op": "add", "path": "/spec/affinity/nodeAffinity", "value":
                    {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}),
                ],
            ),
            (
                "only preferred node affinity: add the required part",
                json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}}),
                vec![
                    json!({"op": "add", "path": REQUIRED, "value": {"nodeSelectorTerms": [term]}}),
                ],
            ),
            (
                "required terms: the expression is added to each, after a test",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                    {"nodeSelectorTerms": [{"matchExpressions": [zone]}, {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}),
                vec![
                    json!({"op": "test", "path": format!("{REQUIRED}/nodeSelectorTerms"), "value":
                        [{"matchExpressions": [zone]}, {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}),
                    // n1 has no zone label: only n2 (through the second term) fits.
                    json!({"op": "add", "path": format!("{REQUIRED}/nodeSelectorTerms/0/matchExpressions/-"), "value": hostnames(&["n2"])}),
                    json!({"op": "add", "path": format!("{REQUIRED}/nodeSelectorTerms/1/matchExpressions"), "value": [hostnames(&["n2"])]}),
                ],
            ),
        ];
        for (what, extra, want) in cases {
            assert_eq!(narrow(extra), Some(want), "{what}");
        }
        // Already narrowed to exactly these nodes: nothing to add.
        assert_eq!(
            narrow(
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [term]}}}})
            ),
            None
        );
    }

    #[test]
    fn narrowing_keeps_only_holders_the_pod_could_run_on_or_does_nothing() {
        let tainted = node(
            "tainted",
            json!({"spec": {"taints": [{"key": "dedicated", "value": "builds", "effect": "NoSchedule"}]}}),
        );
        let cordoned = node("cordoned", json!({"spec": {"unschedulable": true}}));
        let arm = node("arm", json!({"labels": {keys::ARCH_LABEL: "arm64"}}));
        let ok = node("ok", json!({}));
        let mut not_ready = node("notready", json!({}));
        not_ready.status = None;
        let narrow = |extra: Value, holders: &[&Node]| {
            let p = pod(annotations(), spec(extra));
            narrow_patch(p.spec.as_ref().expect("spec"), holders)
        };
        let only = |names: &[&str]| {
            Some(vec![json!({"op": "add", "path": "/spec/affinity", "value":
                {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                    {"nodeSelectorTerms": [{"matchExpressions": [hostnames(names)]}]}}}})])
        };
        let all = [&tainted, &cordoned, &arm, &ok, &not_ready];
        let selector = json!({"nodeSelector": {keys::ARCH_LABEL: "amd64"}});
        assert_eq!(narrow(selector.clone(), &all), only(&["ok"]));
        assert_eq!(narrow(json!({}), &all), only(&["arm", "ok"]));
        let tolerating = json!({"tolerations": [{"key": "dedicated", "operator": "Exists"}]});
        assert_eq!(narrow(tolerating, &all), only(&["arm", "ok", "tainted"]));
        // No holder fits: the Pod goes anywhere, and enbi loads the image where it lands.
        assert_eq!(narrow(selector, &[&tainted, &arm, &not_ready]), None);
        assert_eq!(narrow(json!({}), &[]), None);
        let other_zone = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}]}}}});
        assert_eq!(narrow(other_zone, &all), None);
    }

    #[test]
    fn node_selector_operators() {
        let labels = BTreeMap::from([
            ("a".to_owned(), "x".to_owned()),
            ("n".to_owned(), "5".to_owned()),
        ]);
        let r = |key: &str, operator: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        };
        let cases = [
            (r("a", "In", &["x", "y"]), true),
            (r("a", "In", &["y"]), false),
            (r("a", "NotIn", &["y"]), true),
            (r("b", "NotIn", &["y"]), true),
            (r("a", "Exists", &[]), true),
            (r("b", "Exists", &[]), false),
            (r("b", "DoesNotExist", &[]), true),
            (r("n", "Gt", &["4"]), true),
            (r("n", "Gt", &["5"]), false),
            (r("n", "Lt", &["6"]), true),
            (r("a", "Gt", &["1"]), false),
            (r("a", "Bogus", &[]), false),
        ];
        for (requirement, want) in cases {
            assert_eq!(
                requirement_matches(&requirement, &labels),
                want,
                "{requirement:?}"
            );
        }
        assert!(
            !term_matches(&NodeSelectorTerm::default(), &labels, "n"),
            "an empty term matches nothing"
        );
    }
}
