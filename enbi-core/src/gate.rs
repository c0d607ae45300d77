//! Scheduling gates for Pods whose image enbi has yet to build: `Pod -> Admission` when a Pod
//! is created, `(request, NixBuild) -> release?` while it waits.
//!
//! A gated Pod (`spec.schedulingGates` holds [`GATE`]) is not scheduled, so no kubelet tries to
//! pull its image and nothing backs off: when the build succeeds, the gate goes and the Pod
//! starts at once. The admission webhook adds the gate and the resolved
//! `enbi.hrzn.ee/nixbuild-system` annotation (a gated Pod has no node to take the architecture
//! from), and nothing else: it has no side effects. The Pod watcher sees the gated Pod a moment
//! later and creates its NixBuild. Every gate has a way out: the build succeeds, the NixBuild is
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

use crate::crd::{ImageNodeState, NixBuild, Phase};
use crate::podwatch::{self, ANNOTATION_IMAGE_TAG, ANNOTATION_SYSTEM, BuildRequest};
use crate::{naming, reference, system};

/// The scheduling gate enbi adds and removes.
pub const GATE: &str = "enbi.hrzn.ee/image";

const ARCH_LABEL: &str = crate::placement::ARCH_LABEL;
/// The node label the narrowed affinity selects on.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What the admission webhook does with a Pod being created.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Leave it as it is; `warning` (for the client) says why when the Pod asked for enbi.
    Allow { warning: Option<String> },
    /// Gate it until NixBuild `build` has loaded its image: apply `patch` (JSON patch ops).
    Gate { build: String, patch: Vec<Value> },
}

impl Admission {
    fn allow() -> Self {
        Self::Allow { warning: None }
    }
    fn warn(warning: String) -> Self {
        Self::Allow {
            warning: Some(warning),
        }
    }
}

/// Whether the Pod carries enbi's gate.
pub fn is_gated(spec: &PodSpec) -> bool {
    spec.scheduling_gates
        .iter()
        .flatten()
        .any(|g| g.name == GATE)
}

/// Decides what to do with a Pod being created. `node_archs` maps node names to their
/// `kubernetes.io/arch`; `phase_of` gives the phase of a NixBuild in the Pod's namespace.
pub fn admit(
    pod: &Pod,
    node_archs: &BTreeMap<String, String>,
    phase_of: impl Fn(&str) -> Option<Phase>,
) -> Admission {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let (Some(tag), Some(spec)) = (annotations.get(ANNOTATION_IMAGE_TAG), pod.spec.as_ref()) else {
        return Admission::allow();
    };
    if is_gated(spec) {
        return Admission::allow();
    }
    let ours: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| {
            c.image
                .as_deref()
                .is_some_and(|i| reference::same_image(i, tag))
        })
        .collect();
    if ours.is_empty() {
        return Admission::allow();
    }
    if ours
        .iter()
        .all(|c| c.image_pull_policy.as_deref() == Some("Always"))
    {
        return Admission::warn(format!(
            "enbi: imagePullPolicy Always never uses an image enbi loads onto a node; use \
             IfNotPresent or Never for {tag}"
        ));
    }
    let system = match annotations.get(ANNOTATION_SYSTEM) {
        Some(s) => Some(s.clone()),
        None => system_of(spec, node_archs),
    };
    let Some(system) = system else {
        return Admission::warn(format!(
            "enbi: not gated: the nodes this Pod may run on have several architectures; set \
             {ANNOTATION_SYSTEM} (or a {ARCH_LABEL} nodeSelector) to build before it is scheduled"
        ));
    };
    let mut with_system = annotations.clone();
    with_system.insert(ANNOTATION_SYSTEM.into(), system.clone());
    let spec_of_build = match podwatch::request(&with_system, None) {
        Ok(s) => s,
        Err(message) => return Admission::warn(format!("enbi: not gated: {message}")),
    };
    let build = naming::nixbuild_name(&spec_of_build);
    if phase_of(&build) == Some(Phase::Succeeded) {
        return Admission::allow();
    }
    let gate = json!({"name": GATE});
    let mut patch = vec![if spec.scheduling_gates.is_some() {
        json!({"op": "add", "path": "/spec/schedulingGates/-", "value": gate})
    } else {
        json!({"op": "add", "path": "/spec/schedulingGates", "value": [gate]})
    }];
    if !annotations.contains_key(ANNOTATION_SYSTEM) {
        patch.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", ANNOTATION_SYSTEM.replace('/', "~1")),
            "value": system,
        }));
    }
    Admission::Gate { build, patch }
}

/// The Nix system of the nodes the Pod can run on, from its `kubernetes.io/arch` node selector,
/// else the node it names (`nodeName` or a hostname selector), else the one architecture of
/// every node; `None` when that leaves more than one (or none).
fn system_of(spec: &PodSpec, node_archs: &BTreeMap<String, String>) -> Option<String> {
    let selector = spec.node_selector.as_ref();
    let arch = selector
        .and_then(|s| s.get(ARCH_LABEL).cloned())
        .or_else(|| {
            let node = spec
                .node_name
                .as_ref()
                .or_else(|| selector.and_then(|s| s.get(HOSTNAME_LABEL)))?;
            node_archs.get(node).cloned()
        })
        .or_else(|| {
            let archs: BTreeSet<&String> = node_archs.values().collect();
            match archs.into_iter().collect::<Vec<_>>()[..] {
                [one] => Some(one.clone()),
                _ => None,
            }
        })?;
    system::from_arch(&arch).map(|s| s.nix.to_owned())
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
        .position(|g| g.name == GATE)?;
    let path = format!("/spec/schedulingGates/{index}");
    Some(vec![
        json!({"op": "test", "path": format!("{path}/name"), "value": GATE}),
        json!({"op": "remove", "path": path}),
    ])
}

/// The nodes that hold the image of NixBuild `build` once it Succeeded: its `status.imageNodes`
/// in state `Loaded`, and its build node unless `imageNodes` says otherwise of it.
pub fn image_holders(build: &NixBuild) -> BTreeSet<String> {
    let Some(status) = build
        .status
        .as_ref()
        .filter(|_| build.phase() == Phase::Succeeded)
    else {
        return BTreeSet::new();
    };
    let mut nodes: BTreeSet<String> = status
        .image_nodes
        .iter()
        .filter(|n| n.state == ImageNodeState::Loaded)
        .map(|n| n.node.clone())
        .collect();
    if let Some(node) = &status.build_node
        && !status.image_nodes.iter().any(|n| &n.node == node)
    {
        nodes.insert(node.clone());
    }
    nodes
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
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let terms = required
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let hostnames: BTreeSet<String> = holders
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
        .filter_map(|node| node.metadata.labels.as_ref()?.get(HOSTNAME_LABEL).cloned())
        .collect();
    if hostnames.is_empty() {
        return None;
    }
    let expression = NodeSelectorRequirement {
        key: HOSTNAME_LABEL.into(),
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
/// that holds the image (`status.imageNodes`, or the build node): elsewhere the new Pod might
/// land on a node without it again, and be deleted again. Only a Pod made before the image
/// landed there: one made after it that still waits means the image went away, which a reload
/// fixes (`spread`), not another Pod.
pub fn recreate(pod: &Pod, build: Option<&NixBuild>) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    // Whether the node holds the image, and since when (if known).
    let holds = build
        .filter(|b| b.phase() == Phase::Succeeded)
        .and_then(|b| b.status.as_ref())
        .zip(node)
        .and_then(
            |(status, node)| match status.image_nodes.iter().find(|n| n.node == node) {
                Some(entry) => {
                    (entry.state == ImageNodeState::Loaded).then(|| Some(entry.since.clone()))
                }
                None if status.image_nodes.is_empty()
                    && status.build_node.as_deref() == Some(node) =>
                {
                    Some(status.completion_time.clone())
                }
                None => None,
            },
        );
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
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use crate::crd::NixBuildStatus;
    use crate::podwatch::{ANNOTATION_FLAKE_URL, ANNOTATION_PACKAGE_NAME};

    const TAG: &str = "example.test/app:v1";

    fn pod(annotations: Value, spec: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "apps", "annotations": annotations},
            "spec": spec,
        }))
        .expect("pod")
    }

    fn annotations() -> Value {
        json!({
            ANNOTATION_FLAKE_URL: "github:example/app",
            ANNOTATION_IMAGE_TAG: TAG,
            ANNOTATION_PACKAGE_NAME: "app.stream",
        })
    }

    fn spec(extra: Value) -> Value {
        let mut s = json!({"containers": [{"name": "app", "image": TAG, "imagePullPolicy": "IfNotPresent"}]});
        for (k, v) in extra.as_object().expect("object") {
            s[k] = v.clone();
        }
        s
    }

    fn archs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
            .collect()
    }

    fn build(phase: Option<Phase>) -> NixBuild {
        let mut b = NixBuild::new(
            "b",
            crate::crd::NixBuildSpec {
                flake_url: "github:example/app".into(),
                package_name: "app.stream".into(),
                image_tag: TAG.into(),
                system: "x86_64-linux".into(),
            },
        );
        b.status = phase.map(|phase| NixBuildStatus {
            phase: Some(phase),
            ..Default::default()
        });
        b
    }

    /// What, the Pod, the nodes' archs, and the expected patch (`None`: not gated).
    type Case<'a> = (
        &'a str,
        Pod,
        &'a BTreeMap<String, String>,
        Option<Vec<Value>>,
    );

    #[test]
    fn admission_table() {
        let mixed = archs(&[("a1", "arm64"), ("x1", "amd64")]);
        let amd = archs(&[("x1", "amd64"), ("x2", "amd64")]);
        let nothing_built = |_: &str| None;
        let system_patch = json!({"op": "add", "path": "/metadata/annotations/enbi.hrzn.ee~1nixbuild-system", "value": "x86_64-linux"});
        let gate_patch =
            json!({"op": "add", "path": "/spec/schedulingGates", "value": [{"name": GATE}]});
        let mut with_system = annotations();
        with_system[ANNOTATION_SYSTEM] = json!("aarch64-linux");
        let mut bad = annotations();
        bad[ANNOTATION_FLAKE_URL] = json!("not a flake");
        let cases: Vec<Case<'_>> = vec![
            ("not annotated", pod(json!({}), spec(json!({}))), &amd, None),
            (
                "one arch in the cluster",
                pod(annotations(), spec(json!({}))),
                &amd,
                Some(vec![gate_patch.clone(), system_patch.clone()]),
            ),
            (
                "arch selector",
                pod(
                    annotations(),
                    spec(json!({"nodeSelector": {ARCH_LABEL: "amd64"}})),
                ),
                &mixed,
                Some(vec![gate_patch.clone(), system_patch.clone()]),
            ),
            (
                "hostname selector",
                pod(
                    annotations(),
                    spec(json!({"nodeSelector": {HOSTNAME_LABEL: "x1"}})),
                ),
                &mixed,
                Some(vec![gate_patch.clone(), system_patch.clone()]),
            ),
            (
                "system annotation kept as it is",
                pod(with_system.clone(), spec(json!({}))),
                &mixed,
                Some(vec![gate_patch.clone()]),
            ),
            (
                "other gates are kept",
                pod(
                    with_system,
                    spec(json!({"schedulingGates": [{"name": "other"}]})),
                ),
                &mixed,
                Some(vec![
                    json!({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": GATE}}),
                ]),
            ),
            (
                "several archs, no hint",
                pod(annotations(), spec(json!({}))),
                &mixed,
                None,
            ),
            ("bad annotations", pod(bad, spec(json!({}))), &amd, None),
            (
                "image is not the tag",
                pod(
                    annotations(),
                    json!({"containers": [{"name": "app", "image": "other:v1"}]}),
                ),
                &amd,
                None,
            ),
            (
                "pull policy Always",
                pod(
                    annotations(),
                    json!({"containers": [{"name": "app", "image": TAG, "imagePullPolicy": "Always"}]}),
                ),
                &amd,
                None,
            ),
            (
                "already gated",
                pod(
                    annotations(),
                    spec(json!({"schedulingGates": [{"name": GATE}]})),
                ),
                &amd,
                None,
            ),
            (
                "init container",
                pod(
                    annotations(),
                    json!({"initContainers": [{"name": "i", "image": TAG}], "containers": [{"name": "app", "image": "busybox"}]}),
                ),
                &amd,
                Some(vec![gate_patch.clone(), system_patch.clone()]),
            ),
        ];
        for (what, pod, nodes, want) in cases {
            let got = admit(&pod, nodes, nothing_built);
            match (got, want) {
                (Admission::Gate { build, patch }, Some(want)) => {
                    assert_eq!(patch, want, "{what}");
                    assert!(naming::is_dns_label(&build), "{what}");
                }
                (Admission::Allow { .. }, None) => {}
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn warnings_say_why_a_pod_asking_for_enbi_is_not_gated() {
        let amd = archs(&[("x1", "amd64")]);
        let mut bad = annotations();
        bad[ANNOTATION_FLAKE_URL] = json!("not a flake");
        let Admission::Allow { warning: Some(w) } =
            admit(&pod(bad, spec(json!({}))), &amd, |_| None)
        else {
            panic!("a warning")
        };
        assert!(
            w.contains("annotation enbi.hrzn.ee/nixbuild-flakeUrl"),
            "{w}"
        );
        let mixed = archs(&[("a1", "arm64"), ("x1", "amd64")]);
        let Admission::Allow { warning: Some(w) } =
            admit(&pod(annotations(), spec(json!({}))), &mixed, |_| None)
        else {
            panic!("a warning")
        };
        assert!(w.contains(ANNOTATION_SYSTEM), "{w}");
        assert_eq!(
            admit(&pod(json!({}), spec(json!({}))), &amd, |_| None),
            Admission::Allow { warning: None }
        );
    }

    #[test]
    fn a_pod_whose_build_succeeded_is_never_gated() {
        let amd = archs(&[("x1", "amd64")]);
        let p = pod(annotations(), spec(json!({})));
        let Admission::Gate { build, .. } = admit(&p, &amd, |_| None) else {
            panic!("gated while nothing is built")
        };
        for phase in [Phase::Pending, Phase::Building, Phase::Failed] {
            assert!(
                matches!(
                    admit(&p, &amd, |n| (n == build).then_some(phase)),
                    Admission::Gate { .. }
                ),
                "{phase:?}"
            );
        }
        assert_eq!(
            admit(&p, &amd, |n| (n == build).then_some(Phase::Succeeded)),
            Admission::Allow { warning: None }
        );
    }

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
            spec(json!({"schedulingGates": [{"name": "other"}, {"name": GATE}]})),
        );
        let patch = ungate_patch(p.spec.as_ref().expect("spec")).expect("a patch");
        assert_eq!(
            patch,
            [
                json!({"op": "test", "path": "/spec/schedulingGates/1/name", "value": GATE}),
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
            serde_json::from_value(json!({"name": GATE})).expect("gate"),
        ]);
        assert!(
            !recreate(&gated, Some(&done)),
            "a gated Pod is ungated instead"
        );
    }

    fn node(name: &str, extra: Value) -> Node {
        let mut n = json!({
            "metadata": {"name": name, "labels": {HOSTNAME_LABEL: name, ARCH_LABEL: "amd64"}},
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
        json!({"key": HOSTNAME_LABEL, "operator": "In", "values": values})
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
        let arm = node("arm", json!({"labels": {ARCH_LABEL: "arm64"}}));
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
        let selector = json!({"nodeSelector": {ARCH_LABEL: "amd64"}});
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

    #[test]
    fn the_image_is_held_by_loaded_nodes_and_the_build_node() {
        let since = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut b = build(Some(Phase::Succeeded));
        let status = b.status.as_mut().expect("status");
        status.build_node = Some("n1".into());
        assert_eq!(image_holders(&b), BTreeSet::from(["n1".to_owned()]));
        let status = b.status.as_mut().expect("status");
        let mut loading = crate::spread::loaded("n3", 1, since.clone());
        loading.state = ImageNodeState::Loading;
        status.image_nodes = vec![
            crate::spread::loaded("n1", 1, since.clone()),
            crate::spread::loaded("n2", 1, since.clone()),
            loading,
        ];
        assert_eq!(
            image_holders(&b),
            BTreeSet::from(["n1".to_owned(), "n2".to_owned()])
        );
        let status = b.status.as_mut().expect("status");
        status.image_nodes[0].state = ImageNodeState::Failed;
        assert_eq!(
            image_holders(&b),
            BTreeSet::from(["n2".to_owned()]),
            "the build node's image went away"
        );
        b.status.as_mut().expect("status").phase = Some(Phase::Failed);
        assert!(image_holders(&b).is_empty(), "not built");
    }
}
