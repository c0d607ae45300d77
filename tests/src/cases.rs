//! The shared table of spec field values (`tests/cases/spec-fields.yaml`), read by enbi-core's
//! validation tests and by the cluster's bad-input test.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct FieldCase {
    /// The spec field, as the API names it (`flakeUrl`).
    pub field: String,
    value: String,
    repeat: Option<String>,
    #[serde(default)]
    times: usize,
    #[serde(default)]
    suffix: String,
    pub valid: bool,
}

impl FieldCase {
    pub fn value(&self) -> String {
        format!(
            "{}{}{}",
            self.value,
            self.repeat
                .as_deref()
                .unwrap_or_default()
                .repeat(self.times),
            self.suffix
        )
    }
}

pub fn spec_fields() -> Vec<FieldCase> {
    serde_yaml::from_str(include_str!("../cases/spec-fields.yaml"))
        .expect("tests/cases/spec-fields.yaml parses")
}
