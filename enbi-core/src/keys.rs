//! Every name enbi shares with other programs, in one place: annotations and labels that users,
//! kubectl, the kubelet or other controllers read or write, the finalizer, the field manager and
//! the scheduling gate. Each enbi-owned key is built from the API group (`key!`), so that none
//! is spelled twice. Names of enbi's own objects (Jobs, containers) stay with what makes them.

/// The API group, written once: every enbi-owned key below is `<group>/<name>`.
macro_rules! group {
    () => {
        "enbi.hrzn.ee"
    };
}

/// `<group>/<name>`, as a `&'static str` at compile time.
macro_rules! key {
    ($name:literal) => {
        concat!(group!(), "/", $name)
    };
}

/// API group of every enbi resource, label and annotation.
pub const GROUP: &str = group!();
/// The version of the NixBuild API.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of a NixBuild.
pub const API_VERSION: &str = concat!(group!(), "/v1alpha1");
/// What every enbi-owned key starts with (the Pod watcher keeps only such annotations).
pub const PREFIX: &str = key!("");

/// Field manager of every server-side apply enbi makes, and the controller named in its Events.
pub const MANAGER: &str = "enbi-operator";
/// Removes the NixBuild's Jobs (and releases its images) before the NixBuild goes.
pub const FINALIZER: &str = key!("cleanup");
/// The scheduling gate the admission webhook adds and the Pod watcher removes.
pub const GATE: &str = key!("image");

// NixBuild annotations.
/// Set (or change) it on a Failed NixBuild to build it again.
pub const RETRY: &str = key!("retry");
/// The W3C `traceparent` of the build's trace.
pub const TRACEPARENT: &str = key!("traceparent");
/// Set by the Pod watcher: the node whose Pod needs the image (placement prefers it).
pub const WANTED_ON_NODE: &str = key!("wanted-on-node");
/// Set by garbage collection: when the last Pod using the build's image was gone (RFC 3339).
pub const LAST_USED: &str = key!("last-used");
/// Set by the Pod watcher: the first Pod that asked for the build.
pub const REQUESTED_BY_POD: &str = key!("requested-by-pod");

// Pod annotations: what a Pod asks enbi to build.
pub const POD_FLAKE_URL: &str = key!("nixbuild-flakeUrl");
pub const POD_IMAGE_TAG: &str = key!("nixbuild-imageTag");
pub const POD_PACKAGE_NAME: &str = key!("nixbuild-packageName");
pub const POD_SYSTEM: &str = key!("nixbuild-system");

// Namespace annotations.
/// The fetch Secret (`spec.fetchSecretRef`) of the NixBuilds its annotated Pods ask for.
pub const NAMESPACE_FETCH_SECRET: &str = key!("fetch-secret");

// Labels.
/// On a Namespace: `enabled` lets its annotated Pods ask for builds.
pub const POD_BUILDS: &str = key!("pod-builds");
/// The value of [`POD_BUILDS`] that opts a namespace in.
pub const POD_BUILDS_ENABLED: &str = "enabled";
/// On a Node: never build there.
pub const REPEL: &str = key!("repel");
/// On builder Jobs and Pods: the NixBuild they belong to (Jobs live in another namespace, so
/// owner references cannot link them).
pub const BUILD_NAMESPACE: &str = key!("nixbuild-namespace");
pub const BUILD_NAME: &str = key!("nixbuild-name");
pub const BUILD_UID: &str = key!("nixbuild-uid");
/// On build Jobs: the attempt.
pub const ATTEMPT: &str = key!("attempt");
/// On load Jobs (instead of the attempt): the round of loads on their node.
pub const LOAD_ROUND: &str = key!("load-round");
/// On load Jobs: the node they load the image on (an annotation: node names may be too long for
/// a label value).
pub const LOAD_NODE: &str = key!("load-node");
/// On release Jobs (value `true`): they release a deleted NixBuild's image (see `release`).
pub const RELEASE: &str = key!("release");
/// On release Jobs: the node they release the image on (an annotation, as [`LOAD_NODE`]).
pub const RELEASE_NODE: &str = key!("release-node");
/// On NixBuilds the Pod watcher made (value `enbi-pod-watcher`).
pub const CREATED_BY: &str = "app.kubernetes.io/created-by";
pub const NAME: &str = "app.kubernetes.io/name";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

// The webhook's serving certificate Secret.
pub const CERT_NOT_AFTER: &str = key!("not-after");
pub const CERT_HOSTS: &str = key!("hosts");

// containerd image labels the loader sets.
/// The Nix store path the image was streamed from.
pub const IMAGE_STORE_PATH: &str = key!("store-path");
/// Its NixBuild is gone, but a container used it when it was released: the next release on the
/// node removes it once none does (a load that claims it again clears the label).
pub const RELEASED: &str = key!("released");

// Well-known Kubernetes node labels enbi reads.
pub const ARCH_LABEL: &str = "kubernetes.io/arch";
pub const OS_LABEL: &str = "kubernetes.io/os";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

#[cfg(test)]
mod tests {
    use kube::Resource;

    use super::*;
    use crate::crd::NixBuild;

    #[test]
    fn keys_are_built_from_the_group_the_crd_declares() {
        assert_eq!(NixBuild::group(&()), GROUP);
        assert_eq!(NixBuild::api_version(&()), API_VERSION);
        assert_eq!(NixBuild::version(&()), VERSION);
        assert_eq!(FINALIZER, "enbi.hrzn.ee/cleanup");
        for key in [FINALIZER, GATE, RETRY, POD_IMAGE_TAG, BUILD_UID, LOAD_NODE] {
            assert!(key.starts_with(PREFIX), "{key}");
        }
    }
}
