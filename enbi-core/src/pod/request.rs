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

/// Why a Pod's annotations describe no build enbi can make; the message names the annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {0} is missing")]
    Missing(&'static str),
    #[error("the node's architecture is unknown to enbi; set {POD_SYSTEM}")]
    UnknownArchitecture,
    /// Values the CRD's own rules refuse: each annotation with what is wrong with it.
    #[error("{}", .0.iter().map(|(key, problem)| format!("annotation {key} {problem}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<(&'static str, String)>),
}

/// The NixBuild spec the annotations describe, checked with the CRD's own rules.
pub fn spec(
    annotations: &BTreeMap<String, String>,
    node_arch: Option<&str>,
) -> Result<NixBuildSpec, AnnotationError> {
    let get = |key: &'static str| {
        annotations
            .get(key)
            .cloned()
            .ok_or(AnnotationError::Missing(key))
    };
    let system = match annotations.get(POD_SYSTEM) {
        Some(s) => s.clone(),
        None => node_arch
            .and_then(system::from_arch)
            .map(|s| s.nix.to_owned())
            .ok_or(AnnotationError::UnknownArchitecture)?,
    };
    let spec = NixBuildSpec {
        flake_url: get(keys::POD_FLAKE_URL)?,
        package_name: get(keys::POD_PACKAGE_NAME)?,
        image_tag: get(keys::POD_IMAGE_TAG)?,
        system,
        fetch_secret_ref: None,
        resources: None,
    };
    spec.validate().map_err(|report| {
        AnnotationError::Invalid(
            report
                .iter()
                .map(|(path, e)| {
                    let key = match path.to_string().as_str() {
                        "flake_url" => keys::POD_FLAKE_URL,
                        "package_name" => keys::POD_PACKAGE_NAME,
                        "image_tag" => keys::POD_IMAGE_TAG,
                        _ => POD_SYSTEM,
                    };
                    (key, e.message().to_string())
                })
                .collect(),
        )
    })?;
    Ok(spec)
}
