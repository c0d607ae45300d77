//! What a Pod asks enbi to build, from its annotations `enbi.hrzn.ee/nixbuild-flakeUrl`,
//! `-imageTag`, `-packageName` and optionally `-system`. Every Pod of a Deployment maps to the
//! same NixBuild name, so however many ask, one build is made.

use std::collections::BTreeMap;

use garde::Validate;
use k8s_openapi::api::core::v1::Pod;

use crate::crd::NixBuildSpec;
use crate::keys::{self, POD_SYSTEM};
use crate::system;

/// A build a Pod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The NixBuild's name: equal for equal specs.
    pub name: String,
    pub spec: NixBuildSpec,
    /// The node the Pod is on, where the image is wanted.
    pub node: Option<String>,
    /// The containers waiting for the image.
    pub containers: Vec<String>,
}

/// Whether the Pod can ask for anything: `findings::inspect` finds nothing in a Pod without the image
/// tag annotation, so the operator need not keep it.
pub fn annotated(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(keys::POD_IMAGE_TAG))
}

/// The NixBuild spec the annotations describe, checked with the CRD's own rules.
pub fn spec(
    annotations: &BTreeMap<String, String>,
    node_arch: Option<&str>,
) -> Result<NixBuildSpec, String> {
    let get = |key: &str| {
        annotations
            .get(key)
            .cloned()
            .ok_or_else(|| format!("annotation {key} is missing"))
    };
    let system = match annotations.get(keys::POD_SYSTEM) {
        Some(s) => s.clone(),
        None => node_arch
            .and_then(system::from_arch)
            .map(|s| s.nix.to_owned())
            .ok_or_else(|| {
                format!("the node's architecture is unknown to enbi; set {POD_SYSTEM}")
            })?,
    };
    let spec = NixBuildSpec {
        flake_url: get(keys::POD_FLAKE_URL)?,
        package_name: get(keys::POD_PACKAGE_NAME)?,
        image_tag: get(keys::POD_IMAGE_TAG)?,
        system,
    };
    spec.validate().map_err(|report| {
        let messages: Vec<String> = report
            .iter()
            .map(|(path, e)| {
                let key = match path.to_string().as_str() {
                    "flake_url" => keys::POD_FLAKE_URL,
                    "package_name" => keys::POD_PACKAGE_NAME,
                    "image_tag" => keys::POD_IMAGE_TAG,
                    _ => keys::POD_SYSTEM,
                };
                format!("annotation {key} {}", e.message())
            })
            .collect();
        messages.join("; ")
    })?;
    Ok(spec)
}
