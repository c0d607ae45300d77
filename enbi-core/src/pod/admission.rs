//! What the admission webhook does with a Pod being created: `Pod -> Admission`.
//!
//! It gates a Pod whose annotated image enbi has yet to build (see `gate`) and adds the
//! resolved `enbi.hrzn.ee/nixbuild-system` annotation (a gated Pod has no node to take the
//! architecture from), and nothing else: it has no side effects. The Pod watcher sees the gated
//! Pod a moment later and creates its NixBuild.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde_json::{Value, json};

use super::gate::is_gated;
use super::{request, using_tag};
use crate::crd::Phase;
use crate::keys::{self, ARCH_LABEL, POD_SYSTEM};
use crate::policy::{self, Policy};
use crate::{naming, system};

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

/// Decides what to do with a Pod being created in `namespace`. `node_archs` maps node names to
/// their `kubernetes.io/arch`; `phase_of` gives the phase of a NixBuild in the Pod's namespace.
/// A Pod whose build the policy refuses is not gated (no build will come).
pub fn admit(
    pod: &Pod,
    namespace: &str,
    node_archs: &BTreeMap<String, String>,
    policy: &Policy,
    phase_of: impl Fn(&str) -> Option<Phase>,
) -> Admission {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let (Some(tag), Some(spec)) = (annotations.get(keys::POD_IMAGE_TAG), pod.spec.as_ref()) else {
        return Admission::allow();
    };
    if is_gated(spec) {
        return Admission::allow();
    }
    let ours: Vec<_> = using_tag(spec, tag).collect();
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
    let system = match annotations.get(keys::POD_SYSTEM) {
        Some(s) => Some(s.clone()),
        None => system_of(spec, node_archs),
    };
    let Some(system) = system else {
        return Admission::warn(format!(
            "enbi: not gated: the nodes this Pod may run on have several architectures; set \
             {POD_SYSTEM} (or a {ARCH_LABEL} nodeSelector) to build before it is scheduled"
        ));
    };
    let mut with_system = annotations.clone();
    with_system.insert(keys::POD_SYSTEM.into(), system.clone());
    let spec_of_build = match request::spec(&with_system, None) {
        Ok(s) => s,
        Err(message) => return Admission::warn(format!("enbi: not gated: {message}")),
    };
    if let Err(denial) = policy::check(policy, namespace, &spec_of_build) {
        return Admission::warn(format!("enbi: not gated, no build: {denial}"));
    }
    let build = naming::nixbuild_name(&spec_of_build);
    if phase_of(&build) == Some(Phase::Succeeded) {
        return Admission::allow();
    }
    let gate = json!({"name": keys::GATE});
    let mut patch = vec![if spec.scheduling_gates.is_some() {
        json!({"op": "add", "path": "/spec/schedulingGates/-", "value": gate})
    } else {
        json!({"op": "add", "path": "/spec/schedulingGates", "value": [gate]})
    }];
    if !annotations.contains_key(keys::POD_SYSTEM) {
        patch.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", keys::POD_SYSTEM.replace('/', "~1")),
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
        .and_then(|s| s.get(keys::ARCH_LABEL).cloned())
        .or_else(|| {
            let node = spec
                .node_name
                .as_ref()
                .or_else(|| selector.and_then(|s| s.get(keys::HOSTNAME_LABEL)))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::fixtures::{TAG, annotations, archs, pod, spec};

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
            json!({"op": "add", "path": "/spec/schedulingGates", "value": [{"name": keys::GATE}]});
        let mut with_system = annotations();
        with_system[keys::POD_SYSTEM] = json!("aarch64-linux");
        let mut bad = annotations();
        bad[keys::POD_FLAKE_URL] = json!("not a flake");
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
                    spec(json!({"nodeSelector": {keys::ARCH_LABEL: "amd64"}})),
                ),
                &mixed,
                Some(vec![gate_patch.clone(), system_patch.clone()]),
            ),
            (
                "hostname selector",
                pod(
                    annotations(),
                    spec(json!({"nodeSelector": {keys::HOSTNAME_LABEL: "x1"}})),
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
                    json!({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": keys::GATE}}),
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
                    spec(json!({"schedulingGates": [{"name": keys::GATE}]})),
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
            let got = admit(&pod, "ns", nodes, &Policy::default(), nothing_built);
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
        bad[keys::POD_FLAKE_URL] = json!("not a flake");
        let Admission::Allow { warning: Some(w) } = admit(
            &pod(bad, spec(json!({}))),
            "ns",
            &amd,
            &Policy::default(),
            |_| None,
        ) else {
            panic!("a warning")
        };
        assert!(
            w.contains("annotation enbi.hrzn.ee/nixbuild-flakeUrl"),
            "{w}"
        );
        let mixed = archs(&[("a1", "arm64"), ("x1", "amd64")]);
        let Admission::Allow { warning: Some(w) } = admit(
            &pod(annotations(), spec(json!({}))),
            "ns",
            &mixed,
            &Policy::default(),
            |_| None,
        ) else {
            panic!("a warning")
        };
        assert!(w.contains(keys::POD_SYSTEM), "{w}");
        assert_eq!(
            admit(
                &pod(json!({}), spec(json!({}))),
                "ns",
                &amd,
                &Policy::default(),
                |_| None
            ),
            Admission::Allow { warning: None }
        );
    }

    #[test]
    fn a_pod_whose_build_the_policy_refuses_is_not_gated() {
        let amd = archs(&[("n1", "amd64")]);
        let policy = Policy {
            protected_registries: vec!["example.test".into()],
            ..Policy::default()
        };
        let p = pod(annotations(), spec(json!({})));
        let Admission::Allow { warning: Some(w) } = admit(&p, "ns", &amd, &policy, |_| None) else {
            panic!("not gated, with a warning")
        };
        assert!(w.contains("not gated, no build: spec.imageTag"), "{w}");
    }

    #[test]
    fn a_pod_whose_build_succeeded_is_never_gated() {
        let amd = archs(&[("x1", "amd64")]);
        let p = pod(annotations(), spec(json!({})));
        let Admission::Gate { build, .. } = admit(&p, "ns", &amd, &Policy::default(), |_| None)
        else {
            panic!("gated while nothing is built")
        };
        for phase in [Phase::Pending, Phase::Building, Phase::Failed] {
            assert!(
                matches!(
                    admit(&p, "ns", &amd, &Policy::default(), |n| (n == build)
                        .then_some(phase)),
                    Admission::Gate { .. }
                ),
                "{phase:?}"
            );
        }
        assert_eq!(
            admit(&p, "ns", &amd, &Policy::default(), |n| (n == build)
                .then_some(Phase::Succeeded)),
            Admission::Allow { warning: None }
        );
    }
}
