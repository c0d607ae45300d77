//! One table of good and bad spec values, checked against both the CRD's CEL rules (evaluated
//! locally, as the apiserver would) and the garde validators used outside admission.

mod common;

use enbi_core::crd::{NixBuildSpec, SecretRef};
use garde::Validate;
use serde_json::json;

/// A valid spec to start from; each row changes one field.
fn base() -> NixBuildSpec {
    NixBuildSpec {
        flake_url: "git+https://nossa.ee/~talya/chog?rev=f5d531177a7330e9b270c15cca5df0eb72b8684c"
            .into(),
        package_name: "chog-docker.stream-layered".into(),
        image_tag: "nossa.ee/talya/chog:f5d531177a7330e9b270c15cca5df0eb72b8684c".into(),
        system: "aarch64-linux".into(),
        fetch_secret_ref: None,
        resources: None,
    }
}

fn with(field: &str, value: &str) -> NixBuildSpec {
    let mut spec = base();
    match field {
        "flakeUrl" => spec.flake_url = value.into(),
        "packageName" => spec.package_name = value.into(),
        "imageTag" => spec.image_tag = value.into(),
        "system" => spec.system = value.into(),
        "fetchSecretRef.name" => spec.fetch_secret_ref = Some(SecretRef { name: value.into() }),
        other => panic!("unknown field {other}"),
    }
    spec
}

fn object(spec: &NixBuildSpec) -> serde_json::Value {
    json!({
        "apiVersion": "enbi.hrzn.ee/v1alpha1",
        "kind": "NixBuild",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": spec,
    })
}

/// The CRD's CEL rules for one object, as the apiserver evaluates them (on update when `old` is set).
fn admitted_over(spec: &NixBuildSpec, old: Option<&NixBuildSpec>) -> Result<(), String> {
    common::admitted(&object(spec), old.map(object).as_ref())
}

fn admitted(spec: &NixBuildSpec) -> Result<(), String> {
    admitted_over(spec, None)
}

/// The CRD's `maxLength` for a spec field. The apiserver refuses a longer value before any CEL
/// rule runs; the local CEL validator does not check it.
fn max_length(field: &str) -> usize {
    let crd = serde_json::to_value(<enbi_core::crd::NixBuild as kube::CustomResourceExt>::crd())
        .expect("the CRD serialises");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let max = field
        .split('.')
        .fold(&schema["properties"]["spec"], |s, f| &s["properties"][f])["maxLength"]
        .clone();
    usize::try_from(max.as_u64().expect("every spec field has a maxLength"))
        .expect("maxLength fits usize")
}

#[test]
fn base_spec_is_valid_everywhere() {
    assert!(base().validate().is_ok());
    admitted(&base()).unwrap();
}

#[test]
fn cel_and_garde_agree_with_the_table() {
    let cases = enbi_tests::cases::spec_fields();
    assert!(
        cases.iter().filter(|c| !c.valid).count() >= 50,
        "the table keeps at least 50 bad values"
    );
    for case in cases {
        let (field, value, valid) = (case.field.as_str(), case.value(), case.valid);
        let spec = with(field, &value);
        let garde = spec.validate();
        let max = max_length(field);
        let cel = if value.len() <= max {
            admitted(&spec)
        } else {
            Err(format!(
                "spec.{field}: Too long: may not be more than {max} bytes"
            ))
        };
        let shown = if value.len() > 60 {
            format!("{}...", &value[..60])
        } else {
            value.clone()
        };
        assert_eq!(
            garde.is_ok(),
            valid,
            "garde on {field}={shown:?}: {garde:?}"
        );
        assert_eq!(cel.is_ok(), valid, "CEL on {field}={shown:?}: {cel:?}");
        if !valid {
            let needle = format!("spec.{field}");
            let snake: String = field
                .chars()
                .flat_map(|c| {
                    if c.is_uppercase() {
                        vec!['_', c.to_ascii_lowercase()]
                    } else {
                        vec![c]
                    }
                })
                .collect();
            assert!(
                garde
                    .unwrap_err()
                    .to_string()
                    .starts_with(&format!("{snake}: must be")),
                "garde message names {needle}"
            );
            assert!(
                cel.unwrap_err().contains(&needle),
                "CEL message names {needle}"
            );
        }
    }
}

#[test]
fn spec_is_immutable() {
    let err = admitted_over(&with("imageTag", "nginx:2"), Some(&base())).unwrap_err();
    assert!(err.contains("spec is immutable"), "{err}");
    admitted_over(&base(), Some(&base())).unwrap();
}
