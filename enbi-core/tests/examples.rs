//! The manifests in `examples/` stay valid: the NixBuild passes the CRD's rules (garde and the
//! CEL admission rules, evaluated locally), and the Deployment's Pods ask for the same build,
//! whose tag is their container image and the example flake's image name.

mod common;

use enbi_core::crd::{NixBuild, NixBuildSpec};
use enbi_core::pod::findings::{self, Finding};
use garde::Validate;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, Pod};
use kube::Resource;

const NIXBUILD: &str = include_str!("../../examples/nixbuild.yaml");
const DEPLOYMENT: &str = include_str!("../../examples/deployment.yaml");
const FLAKE: &str = include_str!("../../examples/flake/flake.nix");

fn admitted(build: &NixBuild) -> Result<(), String> {
    common::admitted(
        &serde_json::to_value(build).expect("NixBuilds serialise"),
        None,
    )
}

fn example_build() -> NixBuild {
    serde_yaml::from_str(NIXBUILD).expect("examples/nixbuild.yaml is a NixBuild")
}

/// A Pod of the example Deployment on a node of `arch`, its containers waiting for their image.
fn failing_pod(arch_node: &str) -> Pod {
    let deployment: Deployment =
        serde_yaml::from_str(DEPLOYMENT).expect("examples/deployment.yaml is a Deployment");
    let template = deployment.spec.expect("spec").template;
    let mut spec = template.spec.expect("pod spec");
    spec.node_name = Some(arch_node.into());
    let statuses = spec
        .containers
        .iter()
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ErrImagePull".into()),
                    message: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: Some(spec),
        status: Some(k8s_openapi::api::core::v1::PodStatus {
            container_statuses: Some(statuses),
            ..Default::default()
        }),
    }
}

#[test]
fn example_nixbuild_is_valid() {
    let build = example_build();
    let raw: serde_yaml::Value = serde_yaml::from_str(NIXBUILD).unwrap();
    assert_eq!(
        raw["apiVersion"].as_str(),
        Some(NixBuild::api_version(&()).as_ref())
    );
    assert_eq!(raw["kind"].as_str(), Some(NixBuild::kind(&()).as_ref()));
    build.spec.validate().unwrap();
    admitted(&build).unwrap();
}

#[test]
fn example_deployment_asks_for_the_example_build() {
    let pod = failing_pod("amd-1");
    let image = pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().containers[0]
            .image_pull_policy
            .as_deref(),
        Some("IfNotPresent")
    );
    let findings = findings::inspect(&pod, Some("amd64"));
    let [Finding::Build(request)] = &findings[..] else {
        panic!("expected one build, got {findings:?}");
    };
    // inspect only asks for builds whose spec passes the CRD's rules; check again all the same.
    request.spec.validate().unwrap();
    assert_eq!(request.spec.image_tag, image);
    assert_eq!(request.node.as_deref(), Some("amd-1"));
    // The same build as examples/nixbuild.yaml (under another name: the Pod watcher's).
    let NixBuildSpec {
        flake_url,
        package_name,
        image_tag,
        system,
        fetch_secret_ref,
        resources,
    } = example_build().spec;
    assert_eq!((fetch_secret_ref, resources), (None, None));
    assert_eq!(
        (flake_url, package_name, image_tag, system),
        (
            request.spec.flake_url.clone(),
            request.spec.package_name.clone(),
            request.spec.image_tag.clone(),
            request.spec.system.clone()
        )
    );
}

#[test]
fn example_flake_names_the_image_and_package() {
    let build = example_build();
    let (name, tag) = build.spec.image_tag.rsplit_once(':').unwrap();
    assert!(
        FLAKE.contains(&format!("name = \"{name}\";")),
        "flake image name {name}"
    );
    assert!(
        FLAKE.contains(&format!("tag = \"{tag}\";")),
        "flake image tag {tag}"
    );
    assert!(FLAKE.contains(&format!(
        "{} = pkgs.dockerTools.streamLayeredImage",
        build.spec.package_name
    )));
    for system in ["x86_64-linux", "aarch64-linux"] {
        assert!(
            FLAKE.contains(&format!("\"{system}\"")),
            "flake builds {system}"
        );
    }
}
