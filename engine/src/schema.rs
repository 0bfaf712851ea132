//! The JSON Schema of the flow language, generated from the raw model.

use crate::model::RawFlow;

/// The schema as pretty JSON with a trailing newline: what `canvas schema` prints and what
/// `schema/flow.schema.json` holds.
pub fn flow_schema_json() -> String {
    let schema = schemars::schema_for!(RawFlow);
    let mut out = serde_json::to_string_pretty(&schema).unwrap_or_default();
    out.push('\n');
    out
}
