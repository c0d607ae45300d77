//! Where a build may run: a node of the system's architecture, Ready, schedulable and not
//! repelled (by the operator's `--node-repel` list or the node label `enbi.hrzn.ee/repel`).
//! A node with a `NoSchedule`/`NoExecute` taint counts only if the builders tolerate it (the
//! operator's `--builder-tolerations`; none by default). A node whose container runtime enbi
//! cannot load into (`unsupported_runtime`: CRI-O, Docker, containerd before 1.7) never counts.
//!
//! The result is both a verdict (is there any such node now?) and the node affinity that makes
//! the scheduler keep to it, so a build never lands on a repelled or wrong-arch node even if the
//! node set changes between the decision and the scheduling.

use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PreferredSchedulingTerm, Taint, Toleration,
};

use crate::keys::{self, ARCH_LABEL, OS_LABEL};
use crate::system;

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub arch: Option<String>,
    pub os: Option<String>,
    pub ready: bool,
    /// Not cordoned and no `NoSchedule`/`NoExecute` taint the builders do not tolerate.
    pub schedulable: bool,
    pub repel_label: bool,
    /// Why enbi cannot load images on it, from the runtime it reports.
    pub unsupported: Option<String>,
}

/// Why enbi cannot load images into a node's runtime, from `status.nodeInfo.
/// containerRuntimeVersion` (`containerd://2.1.4`): it talks to containerd only, and
/// containerd before 1.7 ignores the pin and is out of support. A runtime it does not know
/// (a simulated node's, say) is given the benefit of the doubt.
pub fn unsupported_runtime(version: &str) -> Option<String> {
    let (name, release) = version.split_once("://")?;
    match name {
        "containerd" => {
            let mut parts = release.trim_start_matches('v').split('.');
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            ((major, minor) < (1, 7))
                .then(|| format!("containerd {release} (enbi needs containerd 1.7 or later)"))
        }
        "cri-o" | "docker" => Some(format!("{name} (enbi loads images into containerd only)")),
        _ => None,
    }
}

impl From<&Node> for NodeView {
    /// The node as seen by builders that tolerate no taint.
    fn from(node: &Node) -> Self {
        NodeView::new(node, &[])
    }
}

/// Whether `toleration` tolerates `taint`, by the Kubernetes rules: an empty key with `Exists`
/// tolerates everything, an empty effect matches every effect, `Equal` (the default) compares
/// values.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let key = toleration.key.as_deref().unwrap_or_default();
    let exists = toleration.operator.as_deref() == Some("Exists");
    let effect = toleration.effect.as_deref().unwrap_or_default();
    (effect.is_empty() || effect == taint.effect)
        && ((key.is_empty() && exists)
            || (key == taint.key
                && (exists
                    || toleration.value.as_deref().unwrap_or_default()
                        == taint.value.as_deref().unwrap_or_default())))
}

impl NodeView {
    /// The node as seen by builders with `tolerations`.
    pub fn new(node: &Node, tolerations: &[Toleration]) -> Self {
        let labels = node.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        let spec = node.spec.as_ref();
        let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|ts| {
            ts.iter().any(|t| {
                (t.effect == "NoSchedule" || t.effect == "NoExecute")
                    && !tolerations.iter().any(|tol| tolerates(tol, t))
            })
        });
        let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            arch: label(keys::ARCH_LABEL),
            os: label(keys::OS_LABEL),
            ready,
            schedulable: !cordoned && !tainted,
            repel_label: labels.is_some_and(|l| l.contains_key(keys::REPEL)),
            unsupported: node
                .status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .and_then(|i| unsupported_runtime(&i.container_runtime_version)),
        }
    }
}

/// Where a build may go.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub affinity: Affinity,
    /// Nodes that qualify now, sorted by name.
    pub eligible: Vec<String>,
}

/// No node can take the build now; the message says what was excluded and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoEligibleNode(pub String);

/// Places a build for `nix_system`, avoiding `repelled` nodes, preferring `preferred` (the node
/// of the Pod that asked for the image, so the image lands where it is needed).
pub fn place(
    nix_system: &str,
    nodes: &[NodeView],
    repelled: &[String],
    preferred: Option<&str>,
) -> Result<Placement, NoEligibleNode> {
    let Some(sys) = system::from_nix(nix_system) else {
        return Err(NoEligibleNode(format!("unknown system {nix_system:?}")));
    };
    let of_arch: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.arch.as_deref() == Some(sys.arch) && n.os.as_deref() == Some(system::OS))
        .collect();
    let is_repelled = |n: &NodeView| n.repel_label || repelled.contains(&n.name);
    let mut eligible: Vec<String> = of_arch
        .iter()
        .filter(|n| n.ready && n.schedulable && !is_repelled(n) && n.unsupported.is_none())
        .map(|n| n.name.clone())
        .collect();
    eligible.sort();
    if eligible.is_empty() {
        let count = |f: &dyn Fn(&NodeView) -> bool| of_arch.iter().filter(|n| f(n)).count();
        return Err(NoEligibleNode(format!(
            "no node can build {nix_system}: {} node(s) with {ARCH_LABEL}={} and {OS_LABEL}={}, \
             of which {} repelled, {} not Ready, {} cordoned or tainted{}",
            of_arch.len(),
            sys.arch,
            system::OS,
            count(&|n| is_repelled(n)),
            count(&|n| !n.ready),
            count(&|n| !n.schedulable),
            unsupported_list(&of_arch),
        )));
    }
    // The scheduler must keep off nodes enbi cannot load into, as off repelled ones.
    let avoided: Vec<String> = of_arch
        .iter()
        .filter(|n| n.unsupported.is_some())
        .map(|n| n.name.clone())
        .chain(repelled.iter().cloned())
        .collect();
    Ok(Placement {
        affinity: affinity(sys.arch, &avoided, preferred),
        eligible,
    })
}

/// `, 1 with an unsupported runtime (n: why)` for the nodes enbi cannot load into, or nothing.
fn unsupported_list(nodes: &[&NodeView]) -> String {
    let reasons: Vec<String> = nodes
        .iter()
        .filter_map(|n| Some(format!("{}: {}", n.name, n.unsupported.as_ref()?)))
        .collect();
    if reasons.is_empty() {
        return String::new();
    }
    format!(
        ", {} with an unsupported container runtime ({})",
        reasons.len(),
        reasons.join("; ")
    )
}

/// Places a load of the build's image on `node` (see `spread`): a load builds there, so the node
/// must be one `place` would build on.
pub fn place_on(
    nix_system: &str,
    nodes: &[NodeView],
    repelled: &[String],
    node: &str,
) -> Result<Placement, NoEligibleNode> {
    let mut placement = place(nix_system, nodes, repelled, Some(node))?;
    if !placement.eligible.iter().any(|n| n == node) {
        return Err(NoEligibleNode(format!(
            "node {node} cannot build {nix_system} ({}); eligible: {}",
            nodes
                .iter()
                .find(|n| n.name == node)
                .and_then(|n| n.unsupported.clone())
                .unwrap_or_else(|| {
                    "another architecture, repelled, not Ready, cordoned or tainted".to_owned()
                }),
            placement.eligible.join(", ")
        )));
    }
    let required = placement
        .affinity
        .node_affinity
        .as_mut()
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_mut()
        })
        .and_then(|r| r.node_selector_terms.first_mut());
    if let Some(term) = required {
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(requirement(
                "metadata.name",
                "In",
                Some(vec![node.to_owned()]),
            ));
    }
    placement.eligible = vec![node.to_owned()];
    Ok(placement)
}

fn requirement(key: &str, operator: &str, values: Option<Vec<String>>) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values,
    }
}

fn affinity(arch: &str, repelled: &[String], preferred: Option<&str>) -> Affinity {
    let mut repelled: Vec<String> = repelled.to_vec();
    repelled.sort();
    repelled.dedup();
    let required = NodeSelectorTerm {
        match_expressions: Some(vec![
            requirement(keys::ARCH_LABEL, "In", Some(vec![arch.to_owned()])),
            requirement(keys::OS_LABEL, "In", Some(vec![system::OS.to_owned()])),
            requirement(keys::REPEL, "DoesNotExist", None),
        ]),
        // The apiserver allows exactly one value in an `In`/`NotIn` field selector, so one
        // requirement per repelled node (the requirements of a term are ANDed).
        match_fields: (!repelled.is_empty()).then(|| {
            repelled
                .into_iter()
                .map(|node| requirement("metadata.name", "NotIn", Some(vec![node])))
                .collect()
        }),
    };
    let preferred = preferred.map(|node| {
        vec![PreferredSchedulingTerm {
            weight: 100,
            preference: NodeSelectorTerm {
                match_fields: Some(vec![requirement(
                    "metadata.name",
                    "In",
                    Some(vec![node.to_owned()]),
                )]),
                ..Default::default()
            },
        }]
    });
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![required],
            }),
            preferred_during_scheduling_ignored_during_execution: preferred,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, arch: &str) -> NodeView {
        NodeView {
            name: name.into(),
            arch: Some(arch.into()),
            os: Some("linux".into()),
            ready: true,
            schedulable: true,
            repel_label: false,
            unsupported: None,
        }
    }

    fn cluster() -> Vec<NodeView> {
        vec![
            node("amd-0", "amd64"),
            node("amd-1", "amd64"),
            node("arm-0", "arm64"),
            node("arm-1", "arm64"),
        ]
    }

    #[test]
    fn only_nodes_of_the_arch_are_eligible() {
        assert_eq!(
            place("aarch64-linux", &cluster(), &[], None)
                .expect("placed")
                .eligible,
            ["arm-0", "arm-1"]
        );
        assert_eq!(
            place("x86_64-linux", &cluster(), &[], None)
                .expect("placed")
                .eligible,
            ["amd-0", "amd-1"]
        );
    }

    #[test]
    fn repel_by_flag_and_by_label() {
        let mut nodes = cluster();
        nodes[3].repel_label = true;
        let p = place("aarch64-linux", &nodes, &["arm-0".into()], None);
        let err = p.expect_err("all arm64 nodes repelled");
        assert!(
            err.0.contains("2 node(s) with kubernetes.io/arch=arm64"),
            "{err}"
        );
        assert!(err.0.contains("2 repelled"), "{err}");
        let p = place("aarch64-linux", &nodes, &[], None).expect("arm-0 left");
        assert_eq!(p.eligible, ["arm-0"]);
    }

    #[test]
    fn not_ready_cordoned_and_wrong_os_are_excluded() {
        let mut nodes = cluster();
        nodes[2].ready = false;
        nodes[3].schedulable = false;
        let err = place("aarch64-linux", &nodes, &[], None).expect_err("none left");
        assert!(
            err.0.contains("1 not Ready, 1 cordoned or tainted"),
            "{err}"
        );
        nodes[0].os = Some("windows".into());
        assert_eq!(
            place("x86_64-linux", &nodes, &[], None)
                .expect("amd-1")
                .eligible,
            ["amd-1"]
        );
        assert!(place("riscv64-linux", &nodes, &[], None).is_err());
        assert!(place("aarch64-darwin", &nodes, &[], None).is_err());
    }

    #[test]
    fn runtimes_enbi_cannot_load_into_are_named() {
        for (version, unsupported) in [
            ("containerd://2.4.2", false),
            ("containerd://1.7.22", false),
            ("containerd://v1.7.0-k3s1", false),
            ("containerd://1.6.38", true),
            ("cri-o://1.33.1", true),
            ("docker://28.0.1", true),
            ("kwok-0.8.0", false),
            ("", false),
        ] {
            assert_eq!(
                unsupported_runtime(version).is_some(),
                unsupported,
                "{version}"
            );
        }
        assert_eq!(
            unsupported_runtime("cri-o://1.33.1").as_deref(),
            Some("cri-o (enbi loads images into containerd only)")
        );
    }

    #[test]
    fn nodes_with_an_unsupported_runtime_are_excluded_and_avoided() {
        let mut nodes = cluster();
        nodes[2].unsupported = unsupported_runtime("cri-o://1.33.1");
        let p = place("aarch64-linux", &nodes, &[], None).expect("arm-1 left");
        assert_eq!(p.eligible, ["arm-1"]);
        let yaml = serde_json::to_value(&p.affinity).expect("serialises");
        assert_eq!(
            yaml["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchFields"],
            serde_json::json!([{"key": "metadata.name", "operator": "NotIn", "values": ["arm-0"]}])
        );
        nodes[3].unsupported = unsupported_runtime("containerd://1.6.38");
        let err = place("aarch64-linux", &nodes, &[], None).expect_err("none left");
        assert!(
            err.0.ends_with(
                ", 2 with an unsupported container runtime (arm-0: cri-o (enbi loads images into \
                 containerd only); arm-1: containerd 1.6.38 (enbi needs containerd 1.7 or later))"
            ),
            "{err}"
        );
    }

    #[test]
    fn affinity_requires_arch_os_and_no_repel_and_prefers_the_asking_node() {
        let p = place(
            "aarch64-linux",
            &cluster(),
            &["amd-0".into(), "amd-0".into()],
            Some("arm-1"),
        )
        .expect("placed");
        let yaml = serde_json::to_value(&p.affinity).expect("serialises");
        let na = &yaml["nodeAffinity"];
        let term = &na["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0];
        assert_eq!(
            term["matchExpressions"][0],
            serde_json::json!({"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]})
        );
        assert_eq!(term["matchExpressions"][2]["operator"], "DoesNotExist");
        assert_eq!(
            term["matchFields"][0]["values"],
            serde_json::json!(["amd-0"])
        );
        let two =
            place("aarch64-linux", &cluster(), &["b".into(), "a".into()], None).expect("placed");
        let yaml = serde_json::to_value(&two.affinity).expect("serialises");
        assert_eq!(
            yaml["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchFields"],
            serde_json::json!([
                {"key": "metadata.name", "operator": "NotIn", "values": ["a"]},
                {"key": "metadata.name", "operator": "NotIn", "values": ["b"]},
            ]),
            "one value per field requirement, as the apiserver demands"
        );
        assert_eq!(
            na["preferredDuringSchedulingIgnoredDuringExecution"][0]["preference"]["matchFields"]
                [0]["values"],
            serde_json::json!(["arm-1"])
        );
    }

    #[test]
    fn node_view_reads_labels_conditions_and_taints() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {"kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux", "enbi.hrzn.ee/repel": ""}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        })).expect("valid node");
        let v = NodeView::from(&node);
        assert_eq!((v.ready, v.schedulable, v.repel_label), (true, false, true));
        assert_eq!(v.arch.as_deref(), Some("arm64"));
    }

    fn toleration(key: &str, operator: &str, value: &str, effect: &str) -> Toleration {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Toleration {
            key: some(key),
            operator: some(operator),
            value: some(value),
            effect: some(effect),
            ..Default::default()
        }
    }

    #[test]
    fn tolerated_taints_keep_a_node_schedulable() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux"}},
            "spec": {"taints": [
                {"key": "dedicated", "value": "builds", "effect": "NoSchedule"},
                {"key": "soft", "effect": "PreferNoSchedule"},
            ]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        })).expect("valid node");
        let schedulable = |tols: &[Toleration]| NodeView::new(&node, tols).schedulable;
        assert!(!schedulable(&[]), "an untolerated NoSchedule taint");
        assert!(schedulable(&[toleration(
            "dedicated",
            "Equal",
            "builds",
            "NoSchedule"
        )]));
        assert!(schedulable(&[toleration("dedicated", "", "builds", "")]));
        assert!(schedulable(&[toleration("dedicated", "Exists", "", "")]));
        assert!(
            schedulable(&[toleration("", "Exists", "", "")]),
            "tolerate all"
        );
        assert!(!schedulable(&[toleration(
            "dedicated",
            "Equal",
            "other",
            ""
        )]));
        assert!(!schedulable(&[toleration(
            "dedicated",
            "Exists",
            "",
            "NoExecute"
        )]));
        assert!(!schedulable(&[toleration("other", "Exists", "", "")]));
        let p = place(
            "x86_64-linux",
            &[NodeView::new(
                &node,
                &[toleration("dedicated", "Exists", "", "")],
            )],
            &[],
            None,
        )
        .expect("tolerated node placed");
        assert_eq!(p.eligible, ["n"]);
    }

    #[test]
    fn a_load_is_placed_on_its_node_only_if_that_node_could_build() {
        let p = place_on("aarch64-linux", &cluster(), &[], "arm-1").expect("placed");
        assert_eq!(p.eligible, ["arm-1"]);
        let yaml = serde_json::to_value(&p.affinity).expect("serialises");
        let term = &yaml["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0];
        assert_eq!(
            term["matchFields"],
            serde_json::json!([{"key": "metadata.name", "operator": "In", "values": ["arm-1"]}])
        );
        assert_eq!(
            term["matchExpressions"][0]["values"],
            serde_json::json!(["arm64"])
        );
        let err = place_on("aarch64-linux", &cluster(), &[], "amd-0").expect_err("other arch");
        assert!(err.0.contains("node amd-0 cannot build"), "{err}");
        let err = place_on("aarch64-linux", &cluster(), &["arm-1".into()], "arm-1")
            .expect_err("repelled");
        assert!(err.0.contains("eligible: arm-0"), "{err}");
    }
}
