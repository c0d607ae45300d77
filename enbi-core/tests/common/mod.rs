//! Admission as the apiserver does it, for the integration tests of this crate.

use serde_json::Value;

/// The CRD's schema and CEL rules applied to `object` (an update from `old` when set), evaluated
/// locally with kube's CEL validator.
pub fn admitted(object: &Value, old: Option<&Value>) -> Result<(), String> {
    let crd = <enbi_core::crd::NixBuild as kube::CustomResourceExt>::crd();
    let schema = serde_json::to_value(
        &crd.spec.versions[0]
            .schema
            .as_ref()
            .expect("the derived CRD has a schema")
            .open_api_v3_schema,
    )
    .expect("schemas serialise");
    kube::core::cel::Validator::new()
        .validate(&schema, object, old)
        .map_err(|e| e.to_string())
}
