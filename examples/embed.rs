//! Embedding the engine in a Rust program: load the flows, open a SQLite file, feed events,
//! let time pass, and read the outbox — the rows a dispatcher would deliver.
//!
//! Run: `cargo run --example embed` (from the repository root: it reads `flows/`).

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use canvas_engine::clock::{Clock, VirtualClock};
use canvas_engine::policy::Policy;
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::state::{Event, InboxItem, ProfileUpdate};
use canvas_engine::store::{SqliteStore, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = canvas_nodes::catalogue();
    // 1. Load and validate every flow in flows/; refuse to run on errors.
    let validation = canvas_engine::validate_paths(&[PathBuf::from("flows")], &registry)?;
    if !validation.is_valid() {
        return Err(format!(
            "flows/ has {} errors; run `canvas validate`",
            validation.diagnostics.len()
        )
        .into());
    }
    let flows = FlowSet::new(validation.flows().cloned());
    let policy = Policy::load_or_default(std::path::Path::new("."))?;

    // 2. A database file (WAL); the engine's tables are created on first open.
    let dir = std::env::temp_dir().join(format!("canvas-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let store = SqliteStore::open(dir.join("canvas.db")).await?;
        let runtime = Runtime::new(store, flows, policy, registry);
        // Time is injected: a virtual clock here, `SystemClock` in a service.
        let clock = VirtualClock::new(chrono::DateTime::parse_from_rfc3339("2026-03-02T10:00:00+08:00")?.to_utc());
        runtime.register_versions(clock.now()).await?;

        // 3. A customer's profile, then a paid order: post-purchase care starts.
        let mut set = serde_json::Map::new();
        set.insert("first_name".into(), serde_json::json!("Mei"));
        set.insert("phone".into(), serde_json::json!("+8613800000001"));
        set.insert("wechat_id".into(), serde_json::json!("wx-mei"));
        set.insert("orders_count".into(), serde_json::json!(1));
        runtime
            .store
            .enqueue(&[
                InboxItem::Profile(ProfileUpdate {
 id: None, customer_id: "mei".into(), set, timezone: Some("Asia/Shanghai".into()), at: clock.now() }),
                InboxItem::Event(Event {
                    id: "order-1001".into(),
                    customer_id: "mei".into(),
                    name: "order_paid".into(),
                    data: serde_json::json!({ "order_id": "1001", "amount": 399, "items": 1, "category": "coat" }),
                    occurred_at: clock.now(),
                }),
            ])
            .await?;
        runtime.process_inbox(clock.now()).await?;

        // 4. Let time pass: jump from one due timer to the next for a month.
        let end = clock.now() + chrono::Duration::days(30);
        while let Some(next) = runtime.next_due(clock.now()).await? {
            if next > end {
                break;
            }
            clock.advance_to(next);
            runtime.tick(next - chrono::Duration::milliseconds(1), next).await?;
            runtime.fire_due(next).await?;
        }

        // 5. The outbox: what a dispatcher delivers, each row with its idempotency key.
        for row in runtime.store.outbox(Some("mei")).await? {
            let text = row.payload.get("text").and_then(|t| t.as_str()).unwrap_or("").trim();
            println!("{}  {:<7} {:<32} {}", row.created_at.with_timezone(&chrono_tz::Asia::Shanghai).format("%Y-%m-%d %H:%M"), row.channel, row.key, text);
        }
        let counts = runtime.store.counts().await?;
        println!("{} runs, {} steps checkpointed, {} outbox rows", counts.runs, counts.history, counts.outbox);
        if counts.outbox == 0 {
            return Err::<(), Box<dyn std::error::Error>>("post-purchase care sent nothing".into());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}
