//! Canvas engine: the `canvas/v1` flow language — loader with spans, diagnostics, compiler
//! into a petgraph DAG — and, in later layers, the executor and stores.

pub mod compile;
pub mod de;
pub mod diagnostic;
pub mod duration;
pub mod eval;
pub mod expr;
pub mod flow;
pub mod local_time;
pub mod model;
pub mod policy;
pub mod project;
pub mod redact;
pub mod registry;
pub mod render;
pub mod schema;
pub mod schema_types;
mod scope;
pub mod sms;
pub mod template;
pub mod yaml;

pub use compile::{Compiled, compile};
pub use diagnostic::{Code, Diagnostic};
pub use flow::{CompiledFlow, FlowHash};
pub use project::{Validation, validate_paths};
pub use registry::{ChannelSpec, NodeKind, Registry};
pub mod clock;
pub mod executor;
pub mod runtime;
pub mod scenario;
pub mod state;
pub mod stats;
pub mod store;
pub mod testing;
