//! Nobody fails to enter, or stops, without a visible reason: an expression that cannot be
//! evaluated at run time (a missing attribute read without `has()`) is stored as a failure
//! of its flow step, per customer, counted — on a SQLite file and on Postgres.

mod common;

use std::sync::Arc;

use canvas_engine::policy::Policy;
use canvas_engine::registry::Registry;
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::state::{Event, InboxItem, Time};
use canvas_engine::store::{Database, Store};
use common::*;

const FLOW: &str = "flow: vip
name: VIP
timezone: UTC
trigger:
  event: order_paid
  where: customer.orders_count > 3
exit:
  - when: customer.tier == 'gone'
steps:
  - id: wait-back
    wait: { until: customer.renewal_date }
  - id: hold
    wait: { for: 1d }
  - id: done
    exit: welcomed
";

fn runtime(db: Arc<Database>) -> Runtime<Database> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("vip.yaml"), FLOW).expect("write flow");
    let v = canvas_engine::validate_paths(&[dir.path().to_path_buf()], &Registry::new())
        .expect("read flow");
    assert!(v.is_valid(), "{:#?}", v.diagnostics);
    Runtime::new(
        (*db).clone(),
        FlowSet::new(v.flows().cloned()),
        Policy::default(),
        Registry::new(),
    )
}

fn order(id: &str, customer: &str, at: Time) -> InboxItem {
    InboxItem::Event(Event {
        id: id.to_owned(),
        customer_id: customer.to_owned(),
        name: "order_paid".to_owned(),
        data: serde_json::json!({}),
        occurred_at: at,
    })
}

/// Defect: a trigger `where` reading a missing attribute failed only at `debug`: nobody
/// entered and nothing said why. Now each failure is counted per flow step and customer.
async fn a_failing_trigger_where_is_counted_per_step_and_customer(db: Arc<Database>) {
    let rt = runtime(db);
    rt.register_versions(t(0)).await.expect("versions");
    rt.store
        .enqueue(&[order("e1", "c1", t(1)), order("e2", "c1", t(2))])
        .await
        .expect("enqueue");
    rt.process_inbox(t(3)).await.expect("pass");
    rt.store
        .enqueue(&[order("e3", "c2", t(4))])
        .await
        .expect("enqueue");
    rt.process_inbox(t(5)).await.expect("pass");

    assert!(rt.store.runs("c1").await.expect("runs").is_empty());
    let counts = rt.store.failure_counts(Some("vip")).await.expect("counts");
    assert_eq!(counts.len(), 1, "{counts:#?}");
    let c = &counts[0];
    assert_eq!((c.step.as_str(), c.count, c.customers), ("trigger", 3, 2));
    assert_eq!((c.last_customer.as_str(), c.last_at), ("c2", t(5)));
    assert!(
        c.last_error.contains("trigger `where`") && c.last_error.contains("orders_count"),
        "{}",
        c.last_error
    );
    let mine = rt.store.failures("c1").await.expect("failures");
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].count, mine[0].at), (2, t(3)));
    assert!(
        rt.store
            .failure_counts(Some("other"))
            .await
            .expect("counts")
            .is_empty()
    );
}

/// Defect: an exit rule that could not be evaluated was taken as false without a trace, and
/// a step that ended a run with an error was visible only in that run's history. Both are
/// counted at their step now.
async fn failing_exit_rules_and_steps_are_counted(db: Arc<Database>) {
    let rt = runtime(db);
    rt.register_versions(t(0)).await.expect("versions");
    let mut c3 = canvas_engine::state::ProfileUpdate {
        id: None,
        customer_id: "c3".into(),
        set: serde_json::Map::new(),
        timezone: None,
        at: t(1),
    };
    c3.set.insert("orders_count".into(), serde_json::json!(5));
    let mut later = c3.clone();
    later.at = t(3);
    later
        .set
        .insert("first_name".into(), serde_json::json!("Ann"));
    rt.store
        .enqueue(&[InboxItem::Profile(c3), order("e4", "c3", t(2))])
        .await
        .expect("enqueue");
    rt.process_inbox(t(3)).await.expect("pass");
    // The run waits at `hold`; a profile change checks the exit rule, which cannot be read.
    rt.store
        .enqueue(&[InboxItem::Profile(later)])
        .await
        .expect("enqueue");
    rt.process_inbox(t(4)).await.expect("pass");
    let runs = rt.store.runs("c3").await.expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].step.as_deref(), Some("hold"), "{runs:#?}");
    let counts = rt.store.failure_counts(Some("vip")).await.expect("counts");
    let steps: Vec<(&str, u64)> = counts.iter().map(|c| (c.step.as_str(), c.count)).collect();
    assert!(steps.contains(&("wait-back", 1)), "{counts:#?}");
    let wait = counts
        .iter()
        .find(|c| c.step == "wait-back")
        .expect("wait-back");
    assert!(
        wait.last_error.contains("renewal_date"),
        "{}",
        wait.last_error
    );
    assert!(steps.contains(&("exit", 1)), "{counts:#?}");
}

store_tests!(
    a_failing_trigger_where_is_counted_per_step_and_customer,
    failing_exit_rules_and_steps_are_counted,
);
