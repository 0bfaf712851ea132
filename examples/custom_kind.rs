//! Embedding the compiler with a node kind of your own.
//!
//! Registers a `vip-check` kind next to the built-in catalogue, compiles a flow that uses it
//! with `use:`, and prints the compiled flow's version and its graph.
//!
//! Run: `cargo run --example custom_kind`

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;

use canvas_engine::registry::NodeKind;
use canvas_engine::template::TemplateDir;

/// Routes customers above a spend threshold to `next`, the rest to `regular`.
#[derive(Debug)]
struct VipCheck;

impl NodeKind for VipCheck {
    fn name(&self) -> &str {
        "vip-check"
    }
    fn description(&self) -> &str {
        "continue when lifetime spend is at least `min_spend`; otherwise take `regular`"
    }
    fn outputs(&self) -> &[&str] {
        &["regular"]
    }
    fn check(&self, with: &serde_json::Value) -> Result<(), String> {
        match with.get("min_spend").and_then(serde_json::Value::as_f64) {
            Some(v) if v > 0.0 => Ok(()),
            _ => Err("needs `with: { min_spend: 1000 }` with a positive amount".to_owned()),
        }
    }
}

const FLOW: &str = r#"
flow: vip-thanks
trigger:
  event: order_paid
steps:
  - id: vip
    use: vip-check
    with: { min_spend: 5000 }
    on: { regular: done }
  - id: thanks
    send: sms
    template: birthday/day
  - id: done
    exit: finished
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = canvas_nodes::catalogue();
    registry.add_kind(Arc::new(VipCheck));
    let templates = TemplateDir::scan(Path::new("flows/templates"));
    let compiled =
        canvas_engine::compile(Path::new("vip-thanks.yaml"), FLOW, &registry, &templates);
    let Some(flow) = compiled.flow else {
        for d in &compiled.diagnostics {
            println!("{}", d.headline());
        }
        return Err("the example flow does not compile".into());
    };
    println!("compiled `{}` version {}", flow.id, flow.hash.short());
    print!("{}", canvas_engine::render::mermaid(&flow));

    // The same kind refuses bad settings with a located diagnostic.
    let bad = FLOW.replace("min_spend: 5000", "min_spend: -1");
    let broken = canvas_engine::compile(Path::new("vip-thanks.yaml"), &bad, &registry, &templates);
    for d in &broken.diagnostics {
        println!("{}", d.headline());
    }
    if broken.diagnostics.is_empty() {
        return Err("bad settings were accepted".into());
    }
    Ok(())
}
