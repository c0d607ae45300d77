//! JSON patches: the core plans them as JSON values (it has no client types); this turns them
//! into the typed patch kube sends, in one place.

use kube::api::Patch;
use serde_json::Value;

/// The JSON patch made of `ops` (RFC 6902 operations as JSON values).
pub fn json_patch(ops: Vec<Value>) -> Result<Patch<()>, serde_json::Error> {
    serde_json::from_value(Value::Array(ops)).map(Patch::Json)
}

/// The same operations as `json_patch::Patch`, for an admission response.
pub fn operations(ops: Vec<Value>) -> Result<json_patch::Patch, serde_json::Error> {
    serde_json::from_value(Value::Array(ops))
}
