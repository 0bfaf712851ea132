//! A node kind of your own, validated and run.
//!
//! Registers a `vip-check` kind next to the built-in catalogue, compiles a flow that uses it
//! with `use:`, prints the compiled flow's version and graph, then runs two customers through
//! it on an in-memory SQLite store: the big spender is thanked, the other is not.
//!
//! Run: `cargo run --example custom_kind`

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;

use canvas_engine::policy::Policy;
use canvas_engine::registry::{NodeKind, PluginCx};
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::state::{Event, InboxItem, ProfileUpdate};
use canvas_engine::store::{SqliteStore, Store};
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
    /// Pure: reads the customer, decides the output.
    fn run(
        &self,
        with: &serde_json::Value,
        cx: &mut PluginCx<'_>,
    ) -> Result<Option<String>, String> {
        let min = with
            .get("min_spend")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::MAX);
        let spend = cx
            .customer
            .attributes
            .get("lifetime_spend")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        Ok(if spend >= min {
            None
        } else {
            Some("regular".to_owned())
        })
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

    // Run it: the kind's `run` decides each customer's path.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = SqliteStore::memory().await?;
        let runtime = Runtime::new(store, FlowSet::new([flow]), Policy::default(), registry);
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-02T10:00:00Z")?.to_utc();
        let mut items = Vec::new();
        for (id, spend) in [("big-spender", 8200), ("newcomer", 120)] {
            let mut set = serde_json::Map::new();
            set.insert("phone".into(), serde_json::json!("+8613800000000"));
            set.insert("lifetime_spend".into(), serde_json::json!(spend));
            items.push(InboxItem::Profile(ProfileUpdate {
                id: None,
                customer_id: id.into(),
                set,
                timezone: None,
                at: now,
            }));
            items.push(InboxItem::Event(Event {
                id: format!("order-{id}"),
                customer_id: id.into(),
                name: "order_paid".into(),
                data: serde_json::json!({ "amount": 300 }),
                occurred_at: now,
            }));
        }
        runtime.store.enqueue(&items).await?;
        runtime.process_inbox(now).await?;
        let sent = runtime.store.outbox(None).await?;
        for row in &sent {
            println!(
                "sent {} {} to {}",
                row.channel,
                row.template.as_deref().unwrap_or("-"),
                row.customer_id
            );
        }
        if sent.len() != 1 || sent[0].customer_id != "big-spender" {
            return Err::<(), Box<dyn std::error::Error>>(
                "only the big spender should be thanked".into(),
            );
        }
        Ok(())
    })
}
