//! Which namespaces the Pod-annotation path serves.
//!
//! Annotating a Pod makes enbi build a flake of the Pod author's choice into a node's
//! containerd: as much power as creating a NixBuild. So the Pod watcher and the admission
//! webhook act only in namespaces that opted in with the label `enbi.hrzn.ee/pod-builds=enabled`
//! (a namespace label, which tenants usually cannot set), unless the operator is configured to
//! serve every namespace. A Pod elsewhere gets one Warning saying how to opt in.

use crate::keys::{self, POD_BUILDS, POD_BUILDS_ENABLED};
use std::collections::BTreeMap;

/// Which namespaces the Pod-annotation path serves (`--pod-builds-namespaces`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PodBuildNamespaces {
    /// Only namespaces labelled `enbi.hrzn.ee/pod-builds=enabled` (the default).
    #[default]
    Labelled,
    /// Every namespace (the watcher's `--watch-namespaces` still applies).
    All,
}

/// Whether Pods in `namespace`, with these labels, may ask for builds. `watched`: the
/// namespaces the Pod watcher watches (empty: all). A namespace it does not watch never opts
/// in, whatever its labels: the webhook would gate its Pods and no one would let them go.
pub fn allows(
    mode: PodBuildNamespaces,
    watched: &[String],
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    (watched.is_empty() || watched.iter().any(|w| w == namespace))
        && (mode == PodBuildNamespaces::All
            || labels.get(keys::POD_BUILDS).map(String::as_str) == Some(keys::POD_BUILDS_ENABLED))
}

/// The Warning an annotated Pod gets in a namespace that has not opted in.
pub fn not_enabled_note(namespace: &str) -> String {
    format!(
        "Namespace {namespace} has not opted in to builds from Pod annotations, so enbi ignores this \
         Pod's enbi.hrzn.ee/nixbuild-* annotations. To opt in: \
         kubectl label namespace {namespace} {POD_BUILDS}={POD_BUILDS_ENABLED}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_label_opts_in_unless_all() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let cases = [
            (PodBuildNamespaces::Labelled, labels(&[]), false),
            (
                PodBuildNamespaces::Labelled,
                labels(&[(keys::POD_BUILDS, "enabled")]),
                true,
            ),
            (
                PodBuildNamespaces::Labelled,
                labels(&[(keys::POD_BUILDS, "true")]),
                false,
            ),
            (
                PodBuildNamespaces::Labelled,
                labels(&[(keys::POD_BUILDS, "disabled")]),
                false,
            ),
            (
                PodBuildNamespaces::Labelled,
                labels(&[("enbi.hrzn.ee/other", "enabled")]),
                false,
            ),
            (PodBuildNamespaces::All, labels(&[]), true),
            (
                PodBuildNamespaces::All,
                labels(&[(keys::POD_BUILDS, "disabled")]),
                true,
            ),
        ];
        for (mode, labels, want) in cases {
            assert_eq!(
                allows(mode, &[], "apps", &labels),
                want,
                "{mode:?} {labels:?}"
            );
            let watched = ["apps".to_owned()];
            assert_eq!(allows(mode, &watched, "apps", &labels), want);
            assert!(
                !allows(mode, &watched, "other", &labels),
                "a namespace the watcher does not watch never opts in"
            );
        }
    }

    #[test]
    fn the_note_gives_the_command() {
        let note = not_enabled_note("team-a");
        assert!(
            note.contains("kubectl label namespace team-a enbi.hrzn.ee/pod-builds=enabled"),
            "{note}"
        );
    }
}
