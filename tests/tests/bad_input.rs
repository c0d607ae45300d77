//! Bad NixBuilds never get in: every bad value of the shared table, and structurally broken
//! specs, applied to the real apiserver, are refused with a message naming the field.

use enbi_core::crd::NixBuild;
use enbi_tests::cases::spec_fields;
use enbi_tests::{TestNamespace, install_crd, require_cluster};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

fn valid_spec() -> Value {
    json!({
        "flakeUrl": "github:example/app",
        "packageName": "app.stream",
        "imageTag": "example.test/app:v1",
        "system": "x86_64-linux",
    })
}

#[tokio::test]
async fn every_bad_spec_is_refused_naming_its_field() {
    let client = require_cluster!();
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "bad").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &ApiResource::erase::<NixBuild>(&()),
    );

    let mut cases: Vec<(String, Value)> = vec![];
    for case in spec_fields().into_iter().filter(|c| !c.valid) {
        let mut spec = valid_spec();
        // A dotted field is a nested one: `fetchSecretRef.name`.
        let slot = case
            .field
            .split('.')
            .fold(&mut spec, |object, key| &mut object[key]);
        *slot = json!(case.value());
        cases.push((case.field.clone(), spec));
    }
    for field in ["flakeUrl", "packageName", "imageTag", "system"] {
        let mut missing = valid_spec();
        missing.as_object_mut().expect("object").remove(field);
        cases.push((field.into(), missing));
        let mut wrong_type = valid_spec();
        wrong_type[field] = json!(42);
        cases.push((field.into(), wrong_type));
        let mut null = valid_spec();
        null[field] = Value::Null;
        cases.push((field.into(), null));
    }

    let mut refused = 0;
    for (i, (field, spec)) in cases.iter().enumerate() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "enbi.hrzn.ee/v1alpha1",
            "kind": "NixBuild",
            "metadata": {"name": format!("bad-{i}")},
            "spec": spec,
        }))
        .expect("object");
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("accepted a bad spec ({field}): {spec}"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{spec}: {}", status.message);
                assert!(
                    status.message.contains(&format!("spec.{field}")),
                    "message names spec.{field}: {}",
                    status.message
                );
                refused += 1;
            }
            Err(e) => panic!("{spec}: {e}"),
        }
    }
    assert!(refused >= 50, "{refused} bad specs refused");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "bad_input: {refused} of {} bad NixBuild specs refused by the apiserver\n",
            cases.len()
        )
        .as_bytes(),
    );
}
