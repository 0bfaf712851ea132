//! The store suite's harness and fixtures, shared by `store.rs` and `store_daemon.rs`.

#![allow(dead_code)] // each suite uses part of it

use std::future::Future;
use std::sync::Arc;

use canvas_engine::state::{
    Arm, Batch, Conversion, Customer, Enrolment, Event, HistoryEntry, OutboxKind, OutboxRow, Run,
    RunStatus, SentMark, Time,
};
use canvas_engine::store::{Counts, Database, PgStore, Store};
use chrono::{DateTime, Duration};
use serde_json::{Map, json};

// ---- harness ----------------------------------------------------------------------------------

pub const PG_ENV: &str = "CANVAS_TEST_POSTGRES_URL";
/// The local server at its standard address: what the tests use when `PG_ENV` is unset.
pub const PG_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The Postgres server the tests use: `CANVAS_TEST_POSTGRES_URL`, else the local server at
/// its standard address. A Postgres test never passes unrun: when the server cannot be
/// reached it fails, saying how to point at one or how to leave those tests out visibly.
pub fn pg_url() -> String {
    std::env::var(PG_ENV)
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| PG_DEFAULT.to_owned())
}

/// Why a Postgres test failed to start, and the two ways on.
pub fn pg_unreachable(url: &str, error: &dyn std::fmt::Display) -> String {
    format!(
        "Postgres at {url} cannot be reached: {error}. Start it, point {PG_ENV} at a server, \
         or leave the Postgres tests out so the summary counts them as filtered out: \
         cargo test --workspace -- --skip postgres"
    )
}

pub async fn with_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let db = Database::connect(&url)
        .await
        .expect("open the SQLite store");
    test(Arc::new(db)).await;
}

pub async fn with_postgres<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_postgres_at(&pg_url(), name, test).await
}

/// `with_postgres` on the server at `url`.
pub async fn with_postgres_at<F, Fut>(url: &str, name: &str, test: F)
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let short: String = name.chars().take(24).collect();
    let schema = format!("canvas_test_{short}_{}_{nanos}", std::process::id());
    let store = PgStore::connect_with_schema(url, &schema)
        .await
        .unwrap_or_else(|e| panic!("{}", pg_unreachable(url, &e)));
    assert_eq!(store.schema(), Some(schema.as_str()));
    let db = Arc::new(Database::Postgres(store.clone()));
    // Run the test on a task so a failing assertion still drops the schema.
    let outcome = tokio::spawn(test(db)).await;
    store.close().await;
    let admin = sqlx::PgPool::connect(url)
        .await
        .expect("connect to Postgres");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&admin)
        .await
        .expect("drop the test schema");
    admin.close().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Each listed `async fn NAME(db: Arc<Database>)` becomes `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::with_sqlite(super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::with_postgres(stringify!($name), super::$name).await
                }
            )*
        }
    };
}

// ---- fixtures ---------------------------------------------------------------------------------

/// 2026-01-01T00:00:00.123Z plus `minutes`: times carry milliseconds, which must survive.
pub fn t(minutes: i64) -> Time {
    DateTime::from_timestamp_millis(1_767_225_600_123).expect("time") + Duration::minutes(minutes)
}

pub fn customer(id: &str) -> Customer {
    let mut c = Customer::new(id, t(0));
    c.attributes = json!({
        "name": "Lǐ \"Xiǎo\" Méi\n\\ 😀",
        "birthday": "1990-03-14",
        "phone": "+8613800000000",
        "member": { "tier": "gold", "points": 12_345, "ratio": 0.1, "big": 9_007_199_254_740_993_u64 },
        "tags": ["vip", null, true, -1.5e-7],
        "z_last": 1,
        "a_first": 2,
    })
    .as_object()
    .expect("object")
    .clone();
    c.timezone = Some("Asia/Shanghai".into());
    c.sends = vec![SentMark {
        at: t(-60),
        channel: "sms".into(),
    }];
    c.cooldowns = json!({ "gift": "2025-12-01T00:00:00Z" })
        .as_object()
        .expect("object")
        .clone();
    c
}

pub fn event(id: &str, customer_id: &str, at: Time) -> Event {
    Event {
        id: id.into(),
        customer_id: customer_id.into(),
        name: "order_paid".into(),
        data: json!({ "order_id": "O-1", "amount": 129.5, "items": [{ "sku": "coat" }] }),
        occurred_at: at,
    }
}

pub fn run(customer_id: &str, flow: &str, n: u32, wake_at: Option<Time>) -> Run {
    let mut vars = Map::new();
    vars.insert("coupon".into(), json!("C-1"));
    vars.insert("response".into(), json!({ "ok": true, "n": [1, 2, 3] }));
    Run {
        id: format!("{flow}/{customer_id}/{n}"),
        flow: flow.into(),
        version: "v1hash".into(),
        customer_id: customer_id.into(),
        status: RunStatus::Waiting,
        step: Some("wait-order".into()),
        wake_at,
        waiting_for: Some("order_paid".into()),
        vars,
        event: Some(event(&format!("e-{customer_id}-{n}"), customer_id, t(0))),
        arm: Arm::Control,
        splits: [("ab".to_owned(), "control".to_owned())].into(),
        last_touch: Some("welcome".into()),
        goal_until: Some(t(14 * 24 * 60)),
        converted_at: None,
        outcome: None,
        seq: 3,
        entered_at: t(0),
        updated_at: t(5),
    }
}

pub fn ended(mut r: Run, goal_until: Option<Time>, converted_at: Option<Time>) -> Run {
    r.status = RunStatus::Ended;
    r.step = None;
    r.wake_at = None;
    r.waiting_for = None;
    r.goal_until = goal_until;
    r.converted_at = converted_at;
    r.outcome = Some("completed".into());
    r.seq += 1;
    r
}

pub fn history(r: &Run, seq: u32, step: &str) -> HistoryEntry {
    HistoryEntry {
        run_id: r.id.clone(),
        seq,
        flow: r.flow.clone(),
        customer_id: r.customer_id.clone(),
        step: step.into(),
        at: t(i64::from(seq)),
        action: "sent".into(),
        detail: json!({ "channel": "sms", "template": "care/thanks", "why": null }),
    }
}

pub fn outbox(r: &Run, step: &str) -> OutboxRow {
    OutboxRow {
        key: format!("{}/{step}", r.id),
        kind: OutboxKind::Message,
        run_id: r.id.clone(),
        flow: r.flow.clone(),
        customer_id: r.customer_id.clone(),
        step: step.into(),
        channel: "sms".into(),
        address: Some("+8613800000000".into()),
        template: Some("care/thanks".into()),
        payload: json!({ "text": "谢谢! Thanks for your order 🎁" }),
        transactional: false,
        created_at: t(2),
    }
}

pub fn enrolment(customer_id: &str, flow: &str, active_run: Option<&str>) -> Enrolment {
    Enrolment {
        flow: flow.into(),
        customer_id: customer_id.into(),
        entries: 2,
        last_entered_at: Some(t(0)),
        active_run: active_run.map(str::to_owned),
        in_segment: true,
    }
}

pub fn conversion(r: &Run) -> Conversion {
    Conversion {
        run_id: r.id.clone(),
        flow: r.flow.clone(),
        version: r.version.clone(),
        customer_id: r.customer_id.clone(),
        arm: r.arm,
        last_touch: r.last_touch.clone(),
        event_id: "e-goal".into(),
        at: t(90),
    }
}

pub async fn commit(db: &Database, batch: &Batch) {
    db.commit(batch).await.expect("commit");
}

pub async fn counts(db: &Database) -> Counts {
    db.counts().await.expect("counts")
}

// ---- customer leases ---------------------------------------------------------------------------

pub fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|&id| id.to_owned()).collect()
}

/// Claim `list` for `owner` at `now` until `until`: the ids it now holds.
pub async fn lease(
    db: &Database,
    list: &[&str],
    owner: &str,
    now: Time,
    until: Time,
) -> Vec<String> {
    db.claim_customers(&ids(list), owner, now, until)
        .await
        .expect("claim customers")
}

pub async fn release(db: &Database, list: &[&str], owner: &str) {
    db.release_customers(&ids(list), owner)
        .await
        .expect("release customers");
}
