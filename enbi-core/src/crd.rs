//! The `NixBuild` API (`enbi.hrzn.ee/v1alpha1`), defined once: the CRD the apiserver enforces is
//! generated from these types, and the same rules validate values that never pass admission.

use std::collections::BTreeMap;

use garde::Validate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::validation::{self, FLAKE_URL, IMAGE_TAG, PACKAGE_NAME, SECRET_NAME, garde_rules};

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
    /// Secret in this namespace with credentials to fetch a private flake (keys `access-tokens`,
    /// `netrc`, `ssh-privatekey` with `known_hosts`); only the build's `build` container sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[garde(dive)]
    pub fetch_secret_ref: Option<SecretRef>,
    /// What the builder may use, over the operator's defaults; the policy caps each amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[garde(skip)]
    pub resources: Option<Box<BuildResources>>,
}

/// A Secret in the NixBuild's own namespace.
#[derive(KubeSchema, Validate, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretRef {
    #[x_kube(validation = SECRET_NAME.cel())]
    #[schemars(extend("maxLength" = SECRET_NAME.max_len))]
    #[garde(custom(garde_rules::secret_name))]
    pub name: String,
}

/// A build's own requests, limits and deadline (`spec.resources`).
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "camelCase")]
pub struct BuildResources {
    /// Requests of the build container, in place of the operator's defaults.
    #[serde(default, skip_serializing_if = "ResourceAmounts::is_empty")]
    pub requests: ResourceAmounts,
    /// Limits of the build container, in place of the operator's defaults.
    #[serde(default, skip_serializing_if = "ResourceAmounts::is_empty")]
    pub limits: ResourceAmounts,
    /// Seconds the builder Job may run (its `activeDeadlineSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub deadline_seconds: Option<i64>,
}

/// Amounts of the resources a build may ask for, as Kubernetes quantities (`2`, `500m`, `4Gi`).
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 64))]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 64))]
    pub memory: Option<String>,
    #[serde(
        default,
        rename = "ephemeral-storage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("maxLength" = 64))]
    pub ephemeral_storage: Option<String>,
}

impl ResourceAmounts {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
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
    pub provenance: Option<crate::report::Provenance>,
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

    /// The nodes that hold the build's image, each with since when (if known): once it
    /// Succeeded, the nodes `status.imageNodes` says are `Loaded`, and the build node unless
    /// `imageNodes` says otherwise of it (it holds the image since completion). The one answer
    /// to "where is this image" that gating, narrowing, recreating and loading share.
    pub fn image_holders(&self) -> BTreeMap<String, Option<Time>> {
        let Some(status) = self
            .status
            .as_ref()
            .filter(|_| self.phase() == Phase::Succeeded)
        else {
            return BTreeMap::new();
        };
        let mut nodes: BTreeMap<String, Option<Time>> = status
            .image_nodes
            .iter()
            .filter(|n| n.state == ImageNodeState::Loaded)
            .map(|n| (n.node.clone(), Some(n.since.clone())))
            .collect();
        if let Some(node) = &status.build_node
            && !status.image_nodes.iter().any(|n| &n.node == node)
        {
            nodes.insert(node.clone(), status.completion_time.clone());
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kube::CustomResourceExt;

    use super::*;
    use crate::pod::fixtures::build;
    use crate::spread::loaded;

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
            fetch_secret_ref: None,
            resources: None,
        };
        assert_eq!(
            spec.installable(),
            "github:o/r#packages.aarch64-linux.app.stream"
        );
    }

    #[test]
    fn the_image_is_held_by_loaded_nodes_and_the_build_node() {
        let since = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut b = build(Some(Phase::Succeeded));
        let status = b.status.as_mut().expect("status");
        status.build_node = Some("n1".into());
        assert_eq!(
            b.image_holders().into_keys().collect::<BTreeSet<_>>(),
            BTreeSet::from(["n1".to_owned()])
        );
        let status = b.status.as_mut().expect("status");
        let mut loading = loaded("n3", 1, since.clone());
        loading.state = ImageNodeState::Loading;
        status.image_nodes = vec![
            loaded("n1", 1, since.clone()),
            loaded("n2", 1, since.clone()),
            loading,
        ];
        assert_eq!(
            b.image_holders().into_keys().collect::<BTreeSet<_>>(),
            BTreeSet::from(["n1".to_owned(), "n2".to_owned()])
        );
        let status = b.status.as_mut().expect("status");
        status.image_nodes[0].state = ImageNodeState::Failed;
        assert_eq!(
            b.image_holders().into_keys().collect::<BTreeSet<_>>(),
            BTreeSet::from(["n2".to_owned()]),
            "the build node's image went away"
        );
        b.status.as_mut().expect("status").phase = Some(Phase::Failed);
        assert!(
            b.image_holders()
                .into_keys()
                .collect::<BTreeSet<_>>()
                .is_empty(),
            "not built"
        );
    }
}
