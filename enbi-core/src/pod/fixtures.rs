//! Pods and NixBuilds for the Pod side's tests.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::crd::{NixBuild, NixBuildSpec, NixBuildStatus, Phase};
use crate::keys;
use k8s_openapi::api::core::v1::Pod;

pub const TAG: &str = "example.test/app:v1";

pub fn pod(annotations: Value, spec: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "apps", "annotations": annotations},
        "spec": spec,
    }))
    .expect("pod")
}

pub fn annotations() -> Value {
    json!({
        keys::POD_FLAKE_URL: "github:example/app",
        keys::POD_IMAGE_TAG: TAG,
        keys::POD_PACKAGE_NAME: "app.stream",
    })
}

pub fn spec(extra: Value) -> Value {
    let mut s =
        json!({"containers": [{"name": "app", "image": TAG, "imagePullPolicy": "IfNotPresent"}]});
    for (k, v) in extra.as_object().expect("object") {
        s[k] = v.clone();
    }
    s
}

pub fn archs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
        .collect()
}

pub fn build(phase: Option<Phase>) -> NixBuild {
    let mut b = NixBuild::new(
        "b",
        NixBuildSpec {
            flake_url: "github:example/app".into(),
            package_name: "app.stream".into(),
            image_tag: TAG.into(),
            system: "x86_64-linux".into(),
            fetch_secret_ref: None,
            resources: None,
        },
    );
    b.status = phase.map(|phase| NixBuildStatus {
        phase: Some(phase),
        ..Default::default()
    });
    b
}
