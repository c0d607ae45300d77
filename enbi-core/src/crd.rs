//! The `NixBuild` API (`enbi.hrzn.ee/v1alpha1`), defined once: the CRD the apiserver enforces is
//! generated from these types, and the same rules validate values that never pass admission.

use garde::Validate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::validation::{self, FLAKE_URL, IMAGE_TAG, PACKAGE_NAME, garde_rules};

/// API group of every enbi resource, label and annotation.
pub const GROUP: &str = "enbi.hrzn.ee";
/// Set (or change) this annotation on a Failed NixBuild to build it again.
pub const ANNOTATION_RETRY: &str = "enbi.hrzn.ee/retry";

/// What to build and what to call the image. Immutable: a different build is a new NixBuild.
#[derive(
    CustomResource, KubeSchema, Validate, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash,
)]
#[kube(
    group = "enbi.hrzn.ee",
    version = "v1alpha1",
    kind = "NixBuild",
    namespaced,
    doc = "A Nix flake package to build into a container image on a node of the matching architecture.",
    status = "NixBuildStatus",
    shortname = "nb",
    category = "enbi",
    printcolumn = r#"{"name":"Image Tag","type":"string","jsonPath":".spec.imageTag"}"#,
    printcolumn = r#"{"name":"System","type":"string","jsonPath":".spec.system"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Build Node","type":"string","jsonPath":".status.buildNode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("spec is immutable: create a new NixBuild to build something else"))]
#[serde(rename_all = "camelCase")]
pub struct NixBuildSpec {
    /// Flake reference to build from, e.g. `git+https://host/repo?rev=<commit>`.
    #[x_kube(validation = FLAKE_URL.cel())]
    #[schemars(extend("maxLength" = FLAKE_URL.max_len))]
    #[garde(custom(garde_rules::flake_url))]
    pub flake_url: String,
    /// Attribute below `packages.<system>` that yields a `streamLayeredImage` script or an image archive.
    #[x_kube(validation = PACKAGE_NAME.cel())]
    #[schemars(extend("maxLength" = PACKAGE_NAME.max_len))]
    #[garde(custom(garde_rules::package_name))]
    pub package_name: String,
    /// Reference the image is stored under in the node's containerd, exactly as Pods will name it.
    #[x_kube(validation = IMAGE_TAG.cel())]
    #[schemars(extend("maxLength" = IMAGE_TAG.max_len))]
    #[garde(custom(garde_rules::image_tag))]
    pub image_tag: String,
    /// Nix system to build for, e.g. `aarch64-linux`; it picks the node architecture.
    #[x_kube(validation = validation::system_cel())]
    #[schemars(extend("maxLength" = 64))]
    #[garde(custom(garde_rules::system))]
    pub system: String,
}

/// Where a build is in its life.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Phase {
    /// Accepted, waiting for a node, a concurrency slot or a retry.
    #[default]
    Pending,
    /// A builder Job is running.
    Building,
    /// The image is in the build node's containerd.
    Succeeded,
    /// The build ended without an image; `failureReason` says why.
    Failed,
}

/// What enbi observed about a build.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NixBuildStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Builder Job of the current attempt (in the build namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_job_name: Option<String>,
    /// Node the builder ran on, which now holds the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Image size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<i64>,
    /// Where the image came from: the locked flake, the derivation and its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<crate::result::Provenance>,
    /// The nodes enbi loaded the image on (the build node first) or is loading it on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub image_nodes: Vec<ImageNode>,
    /// `Ready` (kstatus), `Success` and `Complete` (as the first enbi reported them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Builder Jobs started so far, including the current one.
    #[serde(default)]
    pub attempts: u32,
    /// The last `enbi.hrzn.ee/retry` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_retry: Option<String>,
    /// `attempts` when that retry began: each retry gets a fresh budget of attempts.
    /// Omitted while 0, so status stays writable against a CRD from before retries existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_base_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Why the build failed, with the last lines of the builder's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_message: Option<String>,
    /// When a failed attempt will be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// The image on one node.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageNode {
    pub node: String,
    pub state: ImageNodeState,
    /// Load Jobs started for this node so far (0 on the build node, which the build loaded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loads: u32,
    /// When the image was loaded there (Loaded), the load began (Loading) or failed (Failed).
    pub since: Time,
    /// The image digest on that node, when it differs from the build's (a build that is not
    /// reproducible made another image there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why the last load failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Whether a node holds the image, as enbi last saw it.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageNodeState {
    /// A load Job is putting the image on the node.
    Loading,
    /// enbi put the image on the node (it may have been removed since, e.g. unpinned and
    /// collected; a Pod waiting there makes enbi load it again).
    Loaded,
    /// The last load failed; `message` says why.
    Failed,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl NixBuildSpec {
    /// The flake output enbi builds: `<flakeUrl>#packages.<system>.<packageName>`.
    pub fn installable(&self) -> String {
        format!(
            "{}#packages.{}.{}",
            self.flake_url, self.system, self.package_name
        )
    }
}

impl NixBuild {
    pub fn phase(&self) -> Phase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn crd_yaml() {
        insta::assert_yaml_snapshot!(NixBuild::crd());
    }

    #[test]
    fn printer_columns_are_the_first_enbis() {
        let crd = NixBuild::crd();
        let version = &crd.spec.versions[0];
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        // kubectl adds NAME in front.
        assert_eq!(
            columns,
            ["Image Tag", "System", "Status", "Build Node", "Age"]
        );
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["nb".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
    }

    #[test]
    fn installable_is_the_flake_output() {
        let spec = NixBuildSpec {
            flake_url: "github:o/r".into(),
            package_name: "app.stream".into(),
            image_tag: "app:1".into(),
            system: "aarch64-linux".into(),
        };
        assert_eq!(
            spec.installable(),
            "github:o/r#packages.aarch64-linux.app.stream"
        );
    }
}
