//! The store contract, one suite for both backends: every test function below runs against a
//! SQLite file (always) and against Postgres when `CANVAS_TEST_POSTGRES_URL` is set (each
//! test in its own schema, dropped at the end).
//!
//! ```sh
//! CANVAS_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo test -p canvas-engine --test store
//! # commit throughput, 1,000-run batches (release mode):
//! CANVAS_TEST_POSTGRES_URL=… cargo test --release -p canvas-engine --test store -- --ignored --nocapture
//! ```

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use canvas_engine::state::{
    Arm, Batch, CallResult, Conversion, Customer, DeliveryOutcome, DeliveryState, DeliveryStatus,
    Enrolment, Event, FlowCounts, FlowVersion, HistoryEntry, InboxItem, Lease, OutboxDepth,
    OutboxKind, OutboxRow, ProfileUpdate, Run, RunStatus, SentMark, Time,
};
use canvas_engine::store::raw::raw_ceiling;
use canvas_engine::store::{Counts, Database, NodeCount, PgStore, SqliteStore, Store, StoreError};
use chrono::{DateTime, Duration};
use serde_json::{Map, json};
use sqlx::Connection;

// ---- harness ----------------------------------------------------------------------------------

const PG_ENV: &str = "CANVAS_TEST_POSTGRES_URL";

async fn with_sqlite<F, Fut>(test: F)
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

async fn with_postgres<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Arc<Database>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(url) = std::env::var(PG_ENV) else {
        eprintln!(
            "\n!!!!! SKIPPED: {PG_ENV} is not set; the Postgres store test `{name}` did not run. \
             Set it, e.g. {PG_ENV}=postgres://postgres@127.0.0.1:5432/test !!!!!\n"
        );
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let short: String = name.chars().take(24).collect();
    let schema = format!("canvas_test_{short}_{}_{nanos}", std::process::id());
    let store = PgStore::connect_with_schema(&url, &schema)
        .await
        .expect("connect to Postgres");
    assert_eq!(store.schema(), Some(schema.as_str()));
    let db = Arc::new(Database::Postgres(store.clone()));
    // Run the test on a task so a failing assertion still drops the schema.
    let outcome = tokio::spawn(test(db)).await;
    store.close().await;
    let admin = sqlx::PgPool::connect(&url)
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

store_tests!(
    enqueue_dedupes_by_event_id_and_keeps_order,
    commit_and_load_roundtrip_every_record,
    run_upsert_waiting_to_ended,
    replayed_commit_adds_no_duplicates,
    duplicate_rows_in_one_batch_last_wins,
    due_orders_limits_and_skips_ended,
    next_wake_after,
    customer_ids_paging,
    counts_and_node_counts,
    batch_of_5000_is_all_or_nothing,
    raw_ceiling_runs_and_cleans_up,
    claim_leases_due_rows_until_the_lease_runs_out,
    claim_respects_the_limit,
    settle_sent_retry_dead,
    concurrent_claims_never_share_a_row,
    pause_and_resume_flows,
    schedule_ticks_fire_once,
    flow_counts_per_outcome,
    leases_go_to_one_owner_until_they_run_out,
    the_holder_extends_its_lease,
    release_frees_only_the_owners_leases,
    concurrent_claimers_never_share_a_customer,
    commit_is_fenced_by_the_lease,
    fenced_commits_race_takeovers,
);

// ---- fixtures ---------------------------------------------------------------------------------

/// 2026-01-01T00:00:00.123Z plus `minutes`: times carry milliseconds, which must survive.
fn t(minutes: i64) -> Time {
    DateTime::from_timestamp_millis(1_767_225_600_123).expect("time") + Duration::minutes(minutes)
}

fn customer(id: &str) -> Customer {
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

fn event(id: &str, customer_id: &str, at: Time) -> Event {
    Event {
        id: id.into(),
        customer_id: customer_id.into(),
        name: "order_paid".into(),
        data: json!({ "order_id": "O-1", "amount": 129.5, "items": [{ "sku": "coat" }] }),
        occurred_at: at,
    }
}

fn run(customer_id: &str, flow: &str, n: u32, wake_at: Option<Time>) -> Run {
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
        last_touch: Some("welcome".into()),
        goal_until: Some(t(14 * 24 * 60)),
        converted_at: None,
        outcome: None,
        seq: 3,
        entered_at: t(0),
        updated_at: t(5),
    }
}

fn ended(mut r: Run, goal_until: Option<Time>, converted_at: Option<Time>) -> Run {
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

fn history(r: &Run, seq: u32, step: &str) -> HistoryEntry {
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

fn outbox(r: &Run, step: &str) -> OutboxRow {
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

fn enrolment(customer_id: &str, flow: &str, active_run: Option<&str>) -> Enrolment {
    Enrolment {
        flow: flow.into(),
        customer_id: customer_id.into(),
        entries: 2,
        last_entered_at: Some(t(0)),
        active_run: active_run.map(str::to_owned),
        in_segment: true,
    }
}

fn conversion(r: &Run) -> Conversion {
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

async fn commit(db: &Database, batch: &Batch) {
    db.commit(batch).await.expect("commit");
}

async fn counts(db: &Database) -> Counts {
    db.counts().await.expect("counts")
}

// ---- the suite ---------------------------------------------------------------------------------

async fn enqueue_dedupes_by_event_id_and_keeps_order(db: Arc<Database>) {
    let e1 = InboxItem::Event(event("e1", "c1", t(1)));
    let profile = InboxItem::Profile(ProfileUpdate {
        id: None,
        customer_id: "c1".into(),
        set: json!({ "tier": "gold", "gone": null })
            .as_object()
            .expect("object")
            .clone(),
        timezone: Some("Europe/Paris".into()),
        at: t(2),
    });
    let e2 = InboxItem::Event(event("e2", "c2", t(0)));
    // A duplicate inside one call, and a second profile update (no id: never a duplicate).
    let accepted = db
        .enqueue(&[
            e1.clone(),
            profile.clone(),
            e2.clone(),
            e1.clone(),
            profile.clone(),
        ])
        .await
        .expect("enqueue");
    assert_eq!(accepted, 4);
    // A duplicate across calls.
    let e3 = InboxItem::Event(event("e3", "c1", t(3)));
    let accepted = db
        .enqueue(&[e2.clone(), e3.clone()])
        .await
        .expect("enqueue");
    assert_eq!(accepted, 1);
    assert_eq!(db.enqueue(&[]).await.expect("enqueue nothing"), 0);
    // Call results dedupe on their run and step.
    let call = InboxItem::CallResult(CallResult {
        run_id: "f/c1/1".into(),
        customer_id: "c1".into(),
        step: "ask-crm".into(),
        response: json!({ "score": 7 }),
        at: t(4),
    });
    assert_eq!(
        db.enqueue(std::slice::from_ref(&call))
            .await
            .expect("enqueue"),
        1
    );
    assert_eq!(
        db.enqueue(std::slice::from_ref(&call))
            .await
            .expect("enqueue"),
        0
    );

    let pending = db.inbox_pending(None, 100).await.expect("pending");
    let items: Vec<&InboxItem> = pending.iter().map(|(_, i)| i).collect();
    assert_eq!(
        items,
        vec![&e1, &profile, &e2, &profile, &e3, &call],
        "arrival order"
    );
    let seqs: Vec<i64> = pending.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "increasing sequence numbers: {seqs:?}"
    );
    let first_two = db.inbox_pending(None, 2).await.expect("pending");
    assert_eq!(first_two, pending[..2].to_vec());
    // Reading on after a sequence number: the next round, while the first still commits.
    let next_two = db.inbox_pending(Some(seqs[1]), 2).await.expect("pending");
    assert_eq!(next_two, pending[2..4].to_vec());
    assert_eq!(counts(&db).await.inbox_pending, 6);

    // Applied items leave the pending list, and a replayed `inbox_done` is harmless.
    let done = Batch {
        inbox_done: vec![seqs[0], seqs[1]],
        ..Batch::default()
    };
    commit(&db, &done).await;
    commit(&db, &done).await;
    let rest = db.inbox_pending(None, 100).await.expect("pending");
    assert_eq!(rest, pending[2..].to_vec());
    assert_eq!(counts(&db).await.inbox_pending, 4);
    // Applied events still dedupe.
    assert_eq!(db.enqueue(&[e1]).await.expect("enqueue"), 0);
}

async fn commit_and_load_roundtrip_every_record(db: Arc<Database>) {
    let c1 = customer("c1");
    let mut c2 = customer("c2");
    c2.timezone = None;
    c2.sends.clear();
    c2.unsubscribed_at = Some(t(5));
    let waiting = run("c1", "post-purchase", 1, Some(t(60)));
    let mut no_event = run("c1", "birthday", 1, None);
    no_event.event = None;
    no_event.vars = Map::new();
    no_event.last_touch = None;
    no_event.goal_until = None;
    no_event.arm = Arm::Treated;
    let converting = ended(run("c1", "win-back", 1, None), Some(t(10_000)), None);
    // Rows read back in the order they were written (the order steps executed), not in key
    // order: `post-purchase/…` before `birthday/…`, at the same instant.
    let h = vec![
        history(&waiting, 1, "welcome"),
        history(&waiting, 2, "wait-order"),
        history(&no_event, 1, "call-her"),
    ];
    let o = vec![outbox(&waiting, "welcome"), {
        let mut task = outbox(&no_event, "call-her");
        task.kind = OutboxKind::Task;
        task.address = None;
        task.template = None;
        task.transactional = true;
        task.payload = json!({ "assign": "store-12", "text": "call her", "due_at": "2026-01-02" });
        task
    }];
    let e = vec![
        enrolment("c1", "post-purchase", Some(&waiting.id)),
        Enrolment {
            in_segment: false,
            last_entered_at: None,
            ..enrolment("c1", "birthday", None)
        },
    ];
    let conv = conversion(&converting);
    let versions = vec![
        FlowVersion {
            flow: "post-purchase".into(),
            version: "v1hash".into(),
            source: "flow: post-purchase\n# 中文 \"quoted\"\n".into(),
            created_at: t(-10),
        },
        FlowVersion {
            flow: "birthday".into(),
            version: "b1".into(),
            source: "flow: birthday\n".into(),
            created_at: t(-20),
        },
    ];
    db.put_flow_versions(&versions).await.expect("put versions");
    db.put_flow_versions(&versions)
        .await
        .expect("put versions again (idempotent)");
    commit(
        &db,
        &Batch {
            customers: vec![c1.clone(), c2.clone()],
            runs: vec![waiting.clone(), no_event.clone(), converting.clone()],
            enrolments: e.clone(),
            history: h.clone(),
            outbox: o.clone(),
            conversions: vec![conv.clone()],
            inbox_done: vec![],
            at: t(0),
            lease: None,
        },
    )
    .await;

    let states = db
        .load(&["c2".into(), "nobody".into(), "c1".into()], t(100))
        .await
        .expect("load");
    assert_eq!(states.len(), 2, "unknown customers are left out");
    assert_eq!(states[0].customer, c2, "in the order asked");
    assert!(states[0].runs.is_empty() && states[0].enrolments.is_empty());
    let s1 = &states[1];
    assert_eq!(s1.customer, c1);
    // JSON survives byte for byte: key order included.
    let keys: Vec<&String> = s1.customer.attributes.keys().collect();
    let want: Vec<&String> = c1.attributes.keys().collect();
    assert_eq!(keys, want);
    assert_eq!(
        serde_json::to_string(&s1.customer.attributes).expect("json"),
        serde_json::to_string(&c1.attributes).expect("json")
    );
    let mut runs = s1.runs.clone();
    runs.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(runs, vec![no_event.clone(), waiting.clone()]);
    assert_eq!(s1.converting, vec![converting.clone()]);
    let mut enrolments = s1.enrolments.clone();
    enrolments.sort_by(|a, b| a.flow.cmp(&b.flow));
    assert_eq!(enrolments, vec![e[1].clone(), e[0].clone()]);
    assert_eq!(
        runs[1].wake_at.map(|w| w.timestamp_millis() % 1000),
        Some(123)
    );

    assert_eq!(db.load(&[], t(0)).await.expect("load nothing"), vec![]);
    let mut all_runs = db.runs("c1").await.expect("runs");
    all_runs.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        all_runs,
        vec![no_event.clone(), waiting.clone(), converting.clone()]
    );
    assert_eq!(db.history(Some("c1")).await.expect("history"), h);
    assert_eq!(db.history(None).await.expect("history"), h);
    assert_eq!(db.history(Some("c2")).await.expect("history"), vec![]);
    assert_eq!(db.outbox(Some("c1")).await.expect("outbox"), o);
    assert_eq!(db.outbox(None).await.expect("outbox"), o);
    assert_eq!(
        db.conversions(Some("win-back")).await.expect("conversions"),
        vec![conv.clone()]
    );
    assert_eq!(db.conversions(None).await.expect("conversions"), vec![conv]);
    assert_eq!(
        db.conversions(Some("birthday")).await.expect("conversions"),
        vec![]
    );
    assert_eq!(
        db.flow_versions(None).await.expect("versions"),
        vec![versions[1].clone(), versions[0].clone()]
    );
    assert_eq!(
        db.flow_versions(Some("post-purchase"))
            .await
            .expect("versions"),
        vec![versions[0].clone()]
    );
}

async fn run_upsert_waiting_to_ended(db: Arc<Database>) {
    let r = run("c1", "care", 1, Some(t(60)));
    commit(
        &db,
        &Batch {
            customers: vec![customer("c1")],
            runs: vec![r.clone()],
            ..Batch::default()
        },
    )
    .await;
    assert_eq!(counts(&db).await.waiting, 1);

    // Ended with the goal window open and no conversion: still loaded, as converting.
    let done = ended(r.clone(), Some(t(1_000)), None);
    commit(
        &db,
        &Batch {
            runs: vec![done.clone()],
            ..Batch::default()
        },
    )
    .await;
    let c = counts(&db).await;
    assert_eq!((c.runs, c.waiting), (1, 0));
    assert_eq!(db.runs("c1").await.expect("runs"), vec![done.clone()]);
    let s = db.load(&["c1".into()], t(100)).await.expect("load");
    assert!(s[0].runs.is_empty());
    assert_eq!(s[0].converting, vec![done.clone()]);
    assert_eq!(
        db.due(t(10_000), 10).await.expect("due"),
        Vec::<String>::new()
    );

    // The window closes…
    let s = db.load(&["c1".into()], t(1_000)).await.expect("load");
    assert!(s[0].converting.is_empty(), "goal_until is exclusive");
    // …or the run converts.
    let converted = ended(r, Some(t(1_000)), Some(t(200)));
    commit(
        &db,
        &Batch {
            runs: vec![converted.clone()],
            ..Batch::default()
        },
    )
    .await;
    let s = db.load(&["c1".into()], t(100)).await.expect("load");
    assert!(s[0].converting.is_empty() && s[0].runs.is_empty());
    assert_eq!(db.runs("c1").await.expect("runs"), vec![converted]);
}

async fn replayed_commit_adds_no_duplicates(db: Arc<Database>) {
    let r = run("c1", "care", 1, Some(t(60)));
    let batch = Batch {
        customers: vec![customer("c1")],
        runs: vec![r.clone()],
        enrolments: vec![enrolment("c1", "care", Some(&r.id))],
        history: vec![history(&r, 1, "welcome"), history(&r, 2, "wait")],
        outbox: vec![outbox(&r, "welcome")],
        conversions: vec![conversion(&r)],
        inbox_done: vec![],
        at: t(0),
        lease: None,
    };
    commit(&db, &batch).await;
    let before = counts(&db).await;
    commit(&db, &batch).await;
    // A replay whose rows differ (e.g. re-rendered) still keeps the first write.
    let mut changed = batch.clone();
    changed.outbox[0].payload = json!({ "text": "second rendering" });
    changed.history[0].action = "skipped".into();
    commit(&db, &changed).await;
    assert_eq!(counts(&db).await, before);
    assert_eq!(
        before,
        Counts {
            customers: 1,
            runs: 1,
            waiting: 1,
            history: 2,
            outbox: 1,
            conversions: 1,
            inbox_pending: 0
        }
    );
    assert_eq!(db.outbox(None).await.expect("outbox"), batch.outbox);
    assert_eq!(db.history(None).await.expect("history"), batch.history);
}

async fn duplicate_rows_in_one_batch_last_wins(db: Arc<Database>) {
    let first = run("c1", "care", 1, Some(t(60)));
    let mut second = first.clone();
    second.step = Some("later".into());
    second.seq += 1;
    let mut c = customer("c1");
    let c_old = c.clone();
    c.timezone = Some("Europe/Berlin".into());
    let e_old = enrolment("c1", "care", None);
    let e_new = Enrolment {
        entries: 3,
        ..e_old.clone()
    };
    commit(
        &db,
        &Batch {
            customers: vec![c_old, c.clone()],
            runs: vec![first, second.clone()],
            enrolments: vec![e_old, e_new.clone()],
            ..Batch::default()
        },
    )
    .await;
    let s = db.load(&["c1".into()], t(0)).await.expect("load");
    assert_eq!(s[0].customer, c);
    assert_eq!(s[0].runs, vec![second]);
    assert_eq!(s[0].enrolments, vec![e_new]);
}

async fn due_orders_limits_and_skips_ended(db: Arc<Database>) {
    let customers: Vec<Customer> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|id| customer(id))
        .collect();
    // An ended run is never due, even with a stale wake_at.
    let mut stale = ended(run("e", "f1", 1, None), Some(t(999)), None);
    stale.wake_at = Some(t(1));
    let runs = vec![
        run("a", "f1", 1, Some(t(30))),
        run("b", "f1", 1, Some(t(10))),
        run("b", "f2", 1, Some(t(5))), // b has two due runs: listed once, at its earliest
        run("c", "f1", 1, Some(t(20))),
        run("d", "f1", 1, None), // waits for an event only
        stale,
        run("e", "f2", 1, Some(t(500))), // not yet
    ];
    commit(
        &db,
        &Batch {
            customers,
            runs,
            ..Batch::default()
        },
    )
    .await;

    let now = t(100);
    assert_eq!(db.due(now, 10).await.expect("due"), vec!["b", "c", "a"]);
    assert_eq!(db.due(now, 2).await.expect("due"), vec!["b", "c"]);
    assert_eq!(db.due(now, 1).await.expect("due"), vec!["b"]);
    assert_eq!(db.due(now, 0).await.expect("due"), Vec::<String>::new());
    assert_eq!(
        db.due(t(10), 10).await.expect("due"),
        vec!["b"],
        "wake_at <= now"
    );
    assert_eq!(db.due(t(0), 10).await.expect("due"), Vec::<String>::new());
    assert_eq!(
        db.due(t(1_000), 10).await.expect("due"),
        vec!["b", "c", "a", "e"]
    );

    // Many due runs of one customer do not starve the limit.
    let many: Vec<Run> = (2..60).map(|n| run("b", "f1", n, Some(t(1)))).collect();
    commit(
        &db,
        &Batch {
            runs: many,
            ..Batch::default()
        },
    )
    .await;
    assert_eq!(db.due(now, 3).await.expect("due"), vec!["b", "c", "a"]);
}

async fn next_wake_after(db: Arc<Database>) {
    assert_eq!(db.next_wake(t(-1_000)).await.expect("next wake"), None);
    let mut gone = ended(run("d", "f1", 1, None), None, None);
    gone.wake_at = Some(t(1));
    let runs = vec![
        run("a", "f1", 1, Some(t(30))),
        run("b", "f1", 1, Some(t(10))),
        run("c", "f1", 1, None),
        gone,
    ];
    commit(
        &db,
        &Batch {
            runs,
            ..Batch::default()
        },
    )
    .await;
    assert_eq!(
        db.next_wake(t(-1_000)).await.expect("next wake"),
        Some(t(10))
    );
    assert_eq!(
        db.next_wake(t(10)).await.expect("next wake"),
        Some(t(30)),
        "strictly after"
    );
    assert_eq!(db.next_wake(t(30)).await.expect("next wake"), None);
}

async fn customer_ids_paging(db: Arc<Database>) {
    let ids: Vec<String> = (0..25).map(|i| format!("cust-{i:03}")).collect();
    let mut shuffled: Vec<Customer> = ids.iter().map(|id| customer(id)).collect();
    shuffled.reverse();
    commit(
        &db,
        &Batch {
            customers: shuffled,
            ..Batch::default()
        },
    )
    .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = db.customer_ids(after.as_deref(), 10).await.expect("page");
        assert!(page.len() <= 10);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, ids);
    assert_eq!(
        db.customer_ids(Some("cust-023"), 10).await.expect("page"),
        vec!["cust-024"]
    );
    assert_eq!(
        db.customer_ids(None, 2).await.expect("page"),
        vec!["cust-000", "cust-001"]
    );
}

async fn counts_and_node_counts(db: Arc<Database>) {
    assert_eq!(counts(&db).await, Counts::default());
    assert_eq!(db.node_counts(None).await.expect("node counts"), vec![]);
    let mut at_gift = run("b", "birthday", 1, Some(t(5)));
    at_gift.step = Some("gift".into());
    let r = run("a", "birthday", 1, Some(t(5)));
    let batch = Batch {
        customers: vec![customer("a"), customer("b"), customer("c")],
        runs: vec![
            r.clone(),
            at_gift,
            run("c", "birthday", 1, None),
            run("c", "care", 1, None),
            ended(run("a", "care", 1, None), None, None),
        ],
        history: vec![history(&r, 1, "welcome"), history(&r, 2, "wait-order")],
        outbox: vec![outbox(&r, "welcome")],
        conversions: vec![conversion(&r)],
        ..Batch::default()
    };
    commit(&db, &batch).await;
    db.enqueue(&[InboxItem::Event(event("x", "a", t(0)))])
        .await
        .expect("enqueue");
    assert_eq!(
        counts(&db).await,
        Counts {
            customers: 3,
            runs: 5,
            waiting: 4,
            history: 2,
            outbox: 1,
            conversions: 1,
            inbox_pending: 1
        }
    );
    let nc = |flow: &str, step: &str, waiting: u64| NodeCount {
        flow: flow.into(),
        step: step.into(),
        waiting,
    };
    assert_eq!(
        db.node_counts(None).await.expect("node counts"),
        vec![
            nc("birthday", "gift", 1),
            nc("birthday", "wait-order", 2),
            nc("care", "wait-order", 1)
        ]
    );
    assert_eq!(
        db.node_counts(Some("care")).await.expect("node counts"),
        vec![nc("care", "wait-order", 1)]
    );
}

/// 5,000 rows per table in one commit; a run that breaks a declared invariant (a waiting run
/// must wait at a step: `CHECK (status <> 'waiting' OR step IS NOT NULL)`) fails the runs
/// upsert, which `commit` issues after the customer, history and outbox inserts — and none
/// of the batch is visible. The same batch, repaired, then commits whole.
async fn batch_of_5000_is_all_or_nothing(db: Arc<Database>) {
    const N: usize = 5_000;
    let mut batch = Batch::default();
    for i in 0..N {
        let id = format!("c{i:05}");
        let r = run(&id, "care", 1, Some(t(60)));
        batch.customers.push(customer(&id));
        batch.history.push(history(&r, 1, "welcome"));
        batch.outbox.push(outbox(&r, "welcome"));
        batch.enrolments.push(enrolment(&id, "care", Some(&r.id)));
        batch.runs.push(r);
    }
    batch.inbox_done = vec![1];
    db.enqueue(&[InboxItem::Event(event("e1", "c00000", t(0)))])
        .await
        .expect("enqueue");
    let mut broken = batch.clone();
    broken.runs[N - 1].step = None;
    let err = db
        .commit(&broken)
        .await
        .expect_err("a waiting run without a step is refused");
    assert!(matches!(err, StoreError::Database(_)), "{err}");
    assert_eq!(
        counts(&db).await,
        Counts {
            inbox_pending: 1,
            ..Counts::default()
        }
    );
    assert_eq!(
        db.load(&["c00000".into()], t(0)).await.expect("load"),
        vec![]
    );

    commit(&db, &batch).await;
    assert_eq!(
        counts(&db).await,
        Counts {
            customers: N as u64,
            runs: N as u64,
            waiting: N as u64,
            history: N as u64,
            outbox: N as u64,
            conversions: 0,
            inbox_pending: 0
        }
    );
}

async fn raw_ceiling_runs_and_cleans_up(db: Arc<Database>) {
    commit(
        &db,
        &Batch {
            customers: vec![customer("c1")],
            runs: vec![run("c1", "care", 1, None)],
            ..Batch::default()
        },
    )
    .await;
    let before = counts(&db).await;
    let report = raw_ceiling(&db, 2_500, 1_000).await.expect("raw ceiling");
    assert_eq!(report.transitions, 2_500);
    assert!(
        report.seconds > 0.0 && report.per_second() > 0.0,
        "{report:?}"
    );
    assert_eq!(counts(&db).await, before, "the benchmark removes its rows");
}

// ---- the daemon: dispatcher leases, pauses, schedule ticks, flow counts ------------------------

/// An outbox row of customer `c1` (one customer keeps the batch's order) due at `due`.
fn due_row(name: &str, due: Time) -> OutboxRow {
    let r = run("c1", "care", 1, None);
    OutboxRow {
        created_at: due,
        ..outbox(&r, name)
    }
}

/// Rows x, a (both due at t(1), x written first), b (t(3)) and c (t(10)), written in the
/// order b, x, a, c.
async fn four_rows(db: &Database) -> Vec<OutboxRow> {
    let rows = vec![
        due_row("b", t(3)),
        due_row("x", t(1)),
        due_row("a", t(1)),
        due_row("c", t(10)),
    ];
    commit(
        db,
        &Batch {
            outbox: rows.clone(),
            ..Batch::default()
        },
    )
    .await;
    rows
}

async fn claim(db: &Database, now: Time, limit: usize, lease_until: Time) -> Vec<String> {
    db.claim_outbox(now, limit, "daemon-1", lease_until)
        .await
        .expect("claim")
        .into_iter()
        .map(|d| d.row.key.rsplit('/').next().unwrap_or_default().to_owned())
        .collect()
}

async fn claim_leases_due_rows_until_the_lease_runs_out(db: Arc<Database>) {
    let rows = four_rows(&db).await;
    let claimed = db
        .claim_outbox(t(5), 10, "daemon-1", t(6))
        .await
        .expect("claim");
    // Earliest due first, then in insertion order; c is not due yet.
    assert_eq!(
        claimed.iter().map(|d| &d.row).collect::<Vec<_>>(),
        vec![&rows[1], &rows[2], &rows[0]]
    );
    assert!(
        claimed
            .iter()
            .all(|d| d.attempts == 0 && d.lease_until == t(6))
    );
    // Leased: nobody else gets them, not even once the lease's instant is reached.
    assert_eq!(claim(&db, t(5), 10, t(6)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(6), 10, t(7)).await, Vec::<String>::new());
    // The lease ran out (the dispatcher died): claimable again.
    assert_eq!(claim(&db, t(7), 10, t(8)).await, vec!["x", "a", "b"]);
    assert_eq!(claim(&db, t(20), 10, t(21)).await, vec!["x", "a", "b", "c"]);
    assert_eq!(claim(&db, t(20), 10, t(21)).await, Vec::<String>::new());
    // A claim changes no delivery state.
    let states = db.deliveries("c1").await.expect("deliveries");
    assert!(
        states
            .iter()
            .all(|s| s.status == DeliveryStatus::Pending && s.attempts == 0),
        "{states:?}"
    );
}

async fn claim_respects_the_limit(db: Arc<Database>) {
    four_rows(&db).await;
    assert_eq!(claim(&db, t(5), 0, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(5), 2, t(60)).await, vec!["x", "a"]);
    assert_eq!(claim(&db, t(5), 2, t(60)).await, vec!["b"]);
    assert_eq!(claim(&db, t(5), 2, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(10), 2, t(60)).await, vec!["c"]);
}

async fn settle_sent_retry_dead(db: Arc<Database>) {
    assert_eq!(
        db.outbox_depth(t(0)).await.expect("depth"),
        OutboxDepth::default()
    );
    db.settle_outbox(&[]).await.expect("settle nothing");
    let rows = four_rows(&db).await;
    let key = |i: usize| rows[i].key.clone();
    assert_eq!(
        db.outbox_depth(t(5)).await.expect("depth"),
        OutboxDepth {
            pending: 4,
            due: 3,
            dead: 0,
            oldest_due: Some(t(1)),
        }
    );
    assert_eq!(claim(&db, t(5), 10, t(6)).await, vec!["x", "a", "b"]);
    db.settle_outbox(&[
        DeliveryOutcome::Sent {
            key: key(1),
            at: t(5),
        },
        DeliveryOutcome::Retry {
            key: key(2),
            attempts: 1,
            next_attempt_at: t(30),
            error: "timeout".into(),
        },
        DeliveryOutcome::Dead {
            key: key(0),
            attempts: 3,
            at: t(5),
            error: "400: not a phone number".into(),
        },
        // Unknown keys are ignored.
        DeliveryOutcome::Sent {
            key: "nobody/x".into(),
            at: t(5),
        },
    ])
    .await
    .expect("settle");
    let state = |i: usize,
                 status,
                 attempts,
                 next: Time,
                 last_error: Option<&str>,
                 sent_at: Option<Time>| DeliveryState {
        row: rows[i].clone(),
        status,
        attempts,
        next_attempt_at: Some(next),
        last_error: last_error.map(str::to_owned),
        sent_at,
    };
    use DeliveryStatus::{Dead, Pending, Sent};
    assert_eq!(
        db.deliveries("c1").await.expect("deliveries"),
        vec![
            state(0, Dead, 3, t(3), Some("400: not a phone number"), None),
            state(1, Sent, 1, t(1), None, Some(t(5))),
            state(2, Pending, 1, t(30), Some("timeout"), None),
            state(3, Pending, 0, t(10), None, None),
        ],
        "in insertion order"
    );
    assert_eq!(db.deliveries("c2").await.expect("deliveries"), vec![]);
    assert_eq!(
        db.outbox_depth(t(20)).await.expect("depth"),
        OutboxDepth {
            pending: 2,
            due: 1,
            dead: 1,
            oldest_due: Some(t(10)),
        }
    );
    // Settling released the lease at once; the retry waits for its time.
    assert_eq!(claim(&db, t(5), 10, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(20), 10, t(60)).await, vec!["c"]);
    let again = db
        .claim_outbox(t(70), 10, "daemon-2", t(80))
        .await
        .expect("claim");
    assert_eq!(
        again
            .iter()
            .map(|d| (d.row.key.clone(), d.attempts))
            .collect::<Vec<_>>(),
        vec![(key(3), 0), (key(2), 1)]
    );
    // A late outcome for a row already settled changes nothing; a second send counts one
    // more attempt and keeps the last error; the last outcome of a key wins.
    db.settle_outbox(&[
        DeliveryOutcome::Retry {
            key: key(1),
            attempts: 2,
            next_attempt_at: t(90),
            error: "late".into(),
        },
        DeliveryOutcome::Retry {
            key: key(0),
            attempts: 4,
            next_attempt_at: t(90),
            error: "late".into(),
        },
        DeliveryOutcome::Sent {
            key: key(2),
            at: t(71),
        },
        DeliveryOutcome::Retry {
            key: key(3),
            attempts: 1,
            next_attempt_at: t(80),
            error: "first".into(),
        },
        DeliveryOutcome::Retry {
            key: key(3),
            attempts: 1,
            next_attempt_at: t(85),
            error: "second".into(),
        },
    ])
    .await
    .expect("settle");
    assert_eq!(
        db.deliveries("c1").await.expect("deliveries"),
        vec![
            state(0, Dead, 3, t(3), Some("400: not a phone number"), None),
            state(1, Sent, 1, t(1), None, Some(t(5))),
            state(2, Sent, 2, t(30), Some("timeout"), Some(t(71))),
            state(3, Pending, 1, t(85), Some("second"), None),
        ]
    );
    assert_eq!(
        db.outbox_depth(t(100)).await.expect("depth"),
        OutboxDepth {
            pending: 1,
            due: 1,
            dead: 1,
            oldest_due: Some(t(85)),
        }
    );
}

/// Two dispatchers (tasks on their own connections) claim from one outbox at the same time:
/// every row is claimed exactly once.
async fn concurrent_claims_never_share_a_row(db: Arc<Database>) {
    const N: usize = 300;
    let rows: Vec<OutboxRow> = (0..N)
        .map(|i| {
            let r = run(&format!("c{i:03}"), "care", 1, None);
            OutboxRow {
                created_at: t(i64::try_from(i % 7).expect("small")),
                ..outbox(&r, "welcome")
            }
        })
        .collect();
    commit(
        &db,
        &Batch {
            outbox: rows.clone(),
            ..Batch::default()
        },
    )
    .await;
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let dispatcher = |owner: &'static str| {
        let db = db.clone();
        let start = start.clone();
        tokio::spawn(async move {
            start.wait().await;
            let mut keys = Vec::new();
            loop {
                let claimed = db
                    .claim_outbox(t(10), 7, owner, t(60))
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    break keys;
                }
                keys.extend(claimed.into_iter().map(|d| d.row.key));
                tokio::task::yield_now().await;
            }
        })
    };
    let (one, two) = (dispatcher("daemon-1"), dispatcher("daemon-2"));
    let one = one.await.expect("dispatcher 1");
    let two = two.await.expect("dispatcher 2");
    let mut all: Vec<String> = one.iter().chain(&two).cloned().collect();
    all.sort();
    let total = all.len();
    all.dedup();
    assert_eq!(total, all.len(), "a row was claimed twice");
    let mut want: Vec<String> = rows.into_iter().map(|r| r.key).collect();
    want.sort();
    assert_eq!(all, want, "every row claimed");
}

async fn pause_and_resume_flows(db: Arc<Database>) {
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        Vec::<String>::new()
    );
    db.set_paused("winback", true, t(1)).await.expect("pause");
    db.set_paused("birthday", true, t(2)).await.expect("pause");
    db.set_paused("winback", true, t(3))
        .await
        .expect("pause again (idempotent)");
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        vec!["birthday", "winback"]
    );
    db.set_paused("winback", false, t(4)).await.expect("resume");
    db.set_paused("care", false, t(5))
        .await
        .expect("resume a flow never paused");
    assert_eq!(db.paused_flows().await.expect("paused"), vec!["birthday"]);
    db.set_paused("winback", true, t(6)).await.expect("pause");
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        vec!["birthday", "winback"]
    );
}

async fn schedule_ticks_fire_once(db: Arc<Database>) {
    assert_eq!(db.last_fire("daily").await.expect("last fire"), None);
    assert!(db.claim_fire("daily", t(0), t(0)).await.expect("claim"));
    assert!(!db.claim_fire("daily", t(0), t(1)).await.expect("claim"));
    assert!(db.claim_fire("weekly", t(0), t(0)).await.expect("claim"));
    assert!(
        db.claim_fire("daily", t(1_440), t(1_440))
            .await
            .expect("claim")
    );
    // A missed older tick can still be claimed; the last fire is the latest tick.
    assert!(
        db.claim_fire("daily", t(-1_440), t(1_441))
            .await
            .expect("claim")
    );
    assert_eq!(
        db.last_fire("daily").await.expect("last fire"),
        Some(t(1_440))
    );
    assert_eq!(db.last_fire("weekly").await.expect("last fire"), Some(t(0)));
    // Daemons racing for one tick: exactly one wins.
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.claim_fire("hourly", t(60), t(60)).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        if racer.await.expect("racer").expect("claim") {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        db.last_fire("hourly").await.expect("last fire"),
        Some(t(60))
    );
}

async fn flow_counts_per_outcome(db: Arc<Database>) {
    assert_eq!(db.flow_counts(None).await.expect("flow counts"), vec![]);
    let with_outcome = |r: Run, outcome: &str| Run {
        outcome: Some(outcome.into()),
        ..ended(r, None, None)
    };
    let waiting = run("c1", "care", 1, Some(t(60)));
    let completed = ended(run("c2", "care", 1, None), None, Some(t(30)));
    let timed_out = with_outcome(run("c3", "care", 1, None), "timeout");
    let exited = with_outcome(run("c4", "care", 1, None), "exited");
    let errored = with_outcome(run("c5", "care", 1, None), "error");
    let birthday = run("c1", "birthday", 1, None);
    commit(
        &db,
        &Batch {
            runs: vec![
                waiting.clone(),
                completed.clone(),
                timed_out,
                exited,
                errored,
                birthday,
            ],
            conversions: vec![conversion(&completed), conversion(&waiting)],
            ..Batch::default()
        },
    )
    .await;
    let care = FlowCounts {
        flow: "care".into(),
        entered: 5,
        waiting: 1,
        completed: 2,
        exited: 1,
        errored: 1,
        converted: 2,
    };
    let birthday = FlowCounts {
        flow: "birthday".into(),
        entered: 1,
        waiting: 1,
        ..FlowCounts::default()
    };
    assert_eq!(
        db.flow_counts(None).await.expect("flow counts"),
        vec![birthday, care.clone()],
        "by flow"
    );
    assert_eq!(
        db.flow_counts(Some("care")).await.expect("flow counts"),
        vec![care]
    );
    assert_eq!(
        db.flow_counts(Some("nope")).await.expect("flow counts"),
        vec![]
    );
}

// ---- customer leases ---------------------------------------------------------------------------

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|&id| id.to_owned()).collect()
}

/// Claim `list` for `owner` at `now` until `until`: the ids it now holds.
async fn lease(db: &Database, list: &[&str], owner: &str, now: Time, until: Time) -> Vec<String> {
    db.claim_customers(&ids(list), owner, now, until)
        .await
        .expect("claim customers")
}

async fn release(db: &Database, list: &[&str], owner: &str) {
    db.release_customers(&ids(list), owner)
        .await
        .expect("release customers");
}

const NONE: Vec<String> = Vec::new();

async fn leases_go_to_one_owner_until_they_run_out(db: Arc<Database>) {
    assert_eq!(lease(&db, &[], "d1", t(0), t(5)).await, NONE);
    // Free ids: all taken, in the order given, each once.
    assert_eq!(
        lease(&db, &["c3", "c1", "c2", "c1"], "d1", t(0), t(5)).await,
        ids(&["c3", "c1", "c2"])
    );
    // Held: another owner gets only the free one, up to the lease's last instant.
    assert_eq!(
        lease(&db, &["c2", "c4", "c1"], "d2", t(1), t(9)).await,
        ids(&["c4"])
    );
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d2", t(4), t(9)).await,
        NONE
    );
    // Run out (`until <= now`): the next claimer takes them.
    assert_eq!(
        lease(&db, &["c2", "c1"], "d2", t(5), t(9)).await,
        ids(&["c2", "c1"])
    );
    // The first owner, back from a stall, keeps only what nobody took over.
    assert_eq!(
        lease(&db, &["c1", "c2", "c3", "c4"], "d1", t(6), t(9)).await,
        ids(&["c3"])
    );
}

async fn the_holder_extends_its_lease(db: Arc<Database>) {
    assert_eq!(
        lease(&db, &["c1", "c2"], "d1", t(0), t(5)).await,
        ids(&["c1", "c2"])
    );
    // Claiming its own lease again extends it; c2, not extended, runs out at t(5).
    assert_eq!(lease(&db, &["c1"], "d1", t(4), t(10)).await, ids(&["c1"]));
    assert_eq!(
        lease(&db, &["c1", "c2"], "d2", t(6), t(20)).await,
        ids(&["c2"])
    );
    assert_eq!(lease(&db, &["c1"], "d2", t(9), t(20)).await, NONE);
    // A lease that ran out but was not taken over is still the owner's to extend.
    assert_eq!(lease(&db, &["c1"], "d1", t(12), t(30)).await, ids(&["c1"]));
    assert_eq!(lease(&db, &["c1"], "d2", t(20), t(40)).await, NONE);
    assert_eq!(lease(&db, &["c1"], "d2", t(30), t(40)).await, ids(&["c1"]));
    // A lease can also be shortened by its holder (`until` is what the last claim says).
    assert_eq!(lease(&db, &["c1"], "d2", t(31), t(32)).await, ids(&["c1"]));
    assert_eq!(lease(&db, &["c1"], "d1", t(32), t(40)).await, ids(&["c1"]));
}

async fn release_frees_only_the_owners_leases(db: Arc<Database>) {
    lease(&db, &["c1", "c2"], "d1", t(0), t(5)).await;
    lease(&db, &["c3"], "d2", t(0), t(5)).await;
    release(&db, &[], "d1").await;
    release(&db, &["c1", "c3", "nobody"], "d1").await;
    // c1 is free at once; c2 is still d1's, c3 still d2's.
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d3", t(1), t(5)).await,
        ids(&["c1"])
    );
    // Releasing again leaves the new holder's lease alone.
    release(&db, &["c1"], "d1").await;
    assert_eq!(lease(&db, &["c1"], "d1", t(2), t(5)).await, NONE);
    release(&db, &["c3"], "d2").await;
    assert_eq!(
        lease(&db, &["c3", "c2", "c1"], "d1", t(2), t(5)).await,
        ids(&["c3", "c2"])
    );
}

/// Daemons (tasks on their own connections) claim overlapping sets of customers at the same
/// moment, half of them listing theirs backwards: every id goes to exactly one of them — on
/// free ids, then again once all those leases ran out. Claims lock rows in one order, so
/// none of them fails on a deadlock either.
async fn concurrent_claimers_never_share_a_customer(db: Arc<Database>) {
    const DAEMONS: usize = 6;
    const IDS: usize = 120;
    let all: Vec<String> = (0..IDS).map(|i| format!("c{i:03}")).collect();
    for now in [t(0), t(10)] {
        let until = now + Duration::minutes(5);
        let start = Arc::new(tokio::sync::Barrier::new(DAEMONS));
        let daemons: Vec<_> = (0..DAEMONS)
            .map(|d| {
                let (db, start) = (db.clone(), start.clone());
                // 60 ids from 15·d on, wrapping around: each id is wanted by 3 daemons.
                let mut want: Vec<String> =
                    (0..60).map(|i| all[(15 * d + i) % IDS].clone()).collect();
                if d % 2 == 1 {
                    want.reverse();
                }
                tokio::spawn(async move {
                    let owner = format!("daemon-{d}");
                    start.wait().await;
                    let held = db
                        .claim_customers(&want, &owner, now, until)
                        .await
                        .expect("claim");
                    (owner, want, held)
                })
            })
            .collect();
        let mut holder: HashMap<String, String> = HashMap::new();
        let mut by_owner: Vec<(String, Vec<String>)> = Vec::new();
        for daemon in daemons {
            let (owner, want, held) = daemon.await.expect("daemon");
            let asked: Vec<String> = want
                .iter()
                .filter(|id| held.contains(id))
                .cloned()
                .collect();
            assert_eq!(held, asked, "{owner}: ids it asked for, in its order");
            for id in &held {
                if let Some(other) = holder.insert(id.clone(), owner.clone()) {
                    panic!("{id} went to {other} and to {owner}");
                }
            }
            by_owner.push((owner, held));
        }
        assert_eq!(holder.len(), IDS, "every id went to a daemon");
        // The table agrees: nobody else gets one, each holder extends all of its own.
        assert_eq!(
            db.claim_customers(&all, "newcomer", now, until)
                .await
                .expect("claim"),
            NONE
        );
        for (owner, held) in by_owner {
            assert_eq!(
                db.claim_customers(&held, &owner, now, until)
                    .await
                    .expect("claim"),
                held
            );
        }
    }
}

/// A round's batch for `customers`: per customer its run, one history and one outbox row;
/// inbox items `done` applied.
fn round(customers: &[&str], done: &[i64], lease: Option<Lease>) -> Batch {
    let mut batch = Batch {
        at: t(1),
        inbox_done: done.to_vec(),
        lease,
        ..Batch::default()
    };
    for &id in customers {
        let r = run(id, "care", 1, Some(t(60)));
        batch.customers.push(customer(id));
        batch.history.push(history(&r, 1, "welcome"));
        batch.outbox.push(outbox(&r, "welcome"));
        batch.runs.push(r);
    }
    batch
}

fn fence(owner: &str, customers: &[&str], now: Time) -> Option<Lease> {
    Some(Lease {
        owner: owner.into(),
        customers: ids(customers),
        now,
    })
}

async fn lease_lost(db: &Database, batch: &Batch) -> (String, usize) {
    match db.commit(batch).await {
        Err(StoreError::LeaseLost { owner, missing }) => (owner, missing),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

async fn commit_is_fenced_by_the_lease(db: Arc<Database>) {
    db.enqueue(&[
        InboxItem::Event(event("e1", "c1", t(0))),
        InboxItem::Event(event("e2", "c2", t(0))),
    ])
    .await
    .expect("enqueue");
    let seqs: Vec<i64> = db
        .inbox_pending(None, 10)
        .await
        .expect("pending")
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d1", t(0), t(5))
            .await
            .len(),
        3
    );
    // Held: written.
    commit(
        &db,
        &round(&["c1"], &seqs[..1], fence("d1", &["c1", "c2"], t(1))),
    )
    .await;
    let written = Counts {
        customers: 1,
        runs: 1,
        waiting: 1,
        history: 1,
        outbox: 1,
        conversions: 0,
        inbox_pending: 1,
    };
    assert_eq!(counts(&db).await, written);
    let (history, outbox) = (
        db.history(None).await.expect("history"),
        db.outbox(None).await.expect("outbox"),
    );

    // d1 stalled past its lease: refused even before anyone took the customers over.
    let late = round(&["c1", "c2"], &seqs[1..], fence("d1", &["c1", "c2"], t(5)));
    assert_eq!(lease_lost(&db, &late).await, ("d1".into(), 2));
    // Taken over: d2 took c2 once it ran out; d1 extended c1 and c3, not c2.
    assert_eq!(lease(&db, &["c2"], "d2", t(6), t(10)).await, ids(&["c2"]));
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d1", t(6), t(10)).await,
        ids(&["c1", "c3"])
    );
    let stolen = round(
        &["c1", "c2"],
        &seqs[1..],
        fence("d1", &["c1", "c2", "c3", "c2"], t(7)),
    );
    let err = db.commit(&stolen).await.expect_err("lease lost");
    assert!(
        matches!(&err, StoreError::LeaseLost { owner, missing: 1 } if owner == "d1"),
        "{err:?}"
    );
    assert!(err.to_string().contains("redone"), "{err}");
    // Never claimed, or claimed by someone else.
    let unclaimed = round(&["c9"], &seqs[1..], fence("d1", &["c1", "c9"], t(7)));
    assert_eq!(lease_lost(&db, &unclaimed).await, ("d1".into(), 1));
    let other = round(&["c1"], &seqs[1..], fence("d3", &["c1"], t(7)));
    assert_eq!(lease_lost(&db, &other).await, ("d3".into(), 1));
    // None of it was written: no rows, and the inbox item is still pending.
    assert_eq!(counts(&db).await, written);
    assert_eq!(db.history(None).await.expect("history"), history);
    assert_eq!(db.outbox(None).await.expect("outbox"), outbox);
    assert_eq!(db.runs("c2").await.expect("runs"), vec![]);

    // The new holder commits.
    commit(&db, &round(&["c2"], &seqs[1..], fence("d2", &["c2"], t(7)))).await;
    assert_eq!(
        counts(&db).await,
        Counts {
            customers: 2,
            runs: 2,
            waiting: 2,
            history: 2,
            outbox: 2,
            inbox_pending: 0,
            ..written
        }
    );
    // A lease alone is no work: an empty batch commits as a no-op, lease lost or not.
    let empty = Batch {
        lease: fence("d1", &["c2"], t(7)),
        ..Batch::default()
    };
    assert!(empty.is_empty());
    db.commit(&empty).await.expect("nothing to write");
    // Without a lease nothing is checked (one daemon): written as before, over d2's lease.
    commit(&db, &round(&["c2", "c4"], &[], None)).await;
    assert_eq!(counts(&db).await.customers, 3);
    assert_eq!(db.runs("c4").await.expect("runs").len(), 1);
    // A released lease no longer covers a commit.
    release(&db, &["c2"], "d2").await;
    let released = round(&["c2"], &[], fence("d2", &["c2"], t(8)));
    assert_eq!(lease_lost(&db, &released).await, ("d2".into(), 1));
}

/// Commits under a lease that runs out right then race daemons taking the customers over (on
/// Postgres the commit share-locks the lease rows and the takeovers wait for it, or the
/// commit waits for them and finds the leases gone). Each commit is written whole or not at
/// all, as it reports; the takeovers share no customer; nothing fails on a deadlock.
async fn fenced_commits_race_takeovers(db: Arc<Database>) {
    const ROUNDS: i64 = 8;
    const CUSTOMERS: usize = 30;
    for r in 0..ROUNDS {
        let (now, until) = (t(10 * r), t(10 * r + 1));
        let mine: Vec<String> = (0..CUSTOMERS).map(|i| format!("r{r}-c{i:02}")).collect();
        let held = db
            .claim_customers(&mine, "d1", now, until)
            .await
            .expect("claim");
        assert_eq!(held, mine);
        let names: Vec<&str> = mine.iter().map(String::as_str).collect();
        let batch = round(&names, &[], fence("d1", &names, now));
        let start = Arc::new(tokio::sync::Barrier::new(4));
        let committer = {
            let (db, start) = (db.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                db.commit(&batch).await
            })
        };
        let takers: Vec<_> = (0..3)
            .map(|d| {
                let (db, start) = (db.clone(), start.clone());
                let mut want: Vec<String> = mine[d * 5..d * 5 + 20].to_vec();
                if d == 1 {
                    want.reverse();
                }
                tokio::spawn(async move {
                    start.wait().await;
                    db.claim_customers(
                        &want,
                        &format!("taker-{d}"),
                        until,
                        until + Duration::minutes(1),
                    )
                    .await
                    .expect("claim")
                })
            })
            .collect();
        let committed = match committer.await.expect("committer") {
            Ok(()) => true,
            Err(StoreError::LeaseLost { .. }) => false,
            Err(e) => panic!("round {r}: {e}"),
        };
        let mut taken = HashSet::new();
        for taker in takers {
            for id in taker.await.expect("taker") {
                assert!(taken.insert(id.clone()), "round {r}: {id} taken twice");
            }
        }
        let runs = db.runs(&mine[0]).await.expect("runs").len();
        assert_eq!(
            runs,
            usize::from(committed),
            "round {r}: written as reported"
        );
        let history = db
            .history(Some(&mine[CUSTOMERS - 1]))
            .await
            .expect("history")
            .len();
        assert_eq!(
            history,
            usize::from(committed),
            "round {r}: written as reported"
        );
        // Ids 0..30 wanted by the takers: 0..20, 5..25, 10..30 — all went to one of them.
        assert_eq!(taken.len(), CUSTOMERS, "round {r}");
    }
}

// ---- backends and URLs ------------------------------------------------------------------------

#[tokio::test]
async fn connect_urls() {
    let memory = Database::connect("sqlite::memory:").await.expect("memory");
    assert_eq!(memory.backend(), "sqlite");
    commit(
        &memory,
        &Batch {
            customers: vec![customer("c1")],
            ..Batch::default()
        },
    )
    .await;
    assert_eq!(counts(&memory).await.customers, 1);
    let other = SqliteStore::memory().await.expect("memory");
    assert_eq!(
        other.counts().await.expect("counts").customers,
        0,
        "each memory store is private"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub.db");
    let url = format!("sqlite://{}?durability=full", path.display());
    let db = Database::connect(&url)
        .await
        .expect("file, full durability");
    commit(
        &db,
        &Batch {
            customers: vec![customer("c1")],
            ..Batch::default()
        },
    )
    .await;
    drop(db);
    // Reopening runs the migrations again (a no-op) and finds the data.
    let again = SqliteStore::open(&path).await.expect("reopen");
    assert_eq!(again.counts().await.expect("counts").customers, 1);

    for bad in [
        "mysql://x",
        "sqlite://",
        "sqlite://x.db?durability=sometimes",
        "canvas.db",
    ] {
        assert!(
            matches!(Database::connect(bad).await, Err(StoreError::Url(_))),
            "{bad} is refused"
        );
    }
    // Refusals never echo a password.
    let err = Database::connect("mysql://canvas:s3cret@db:3306/x")
        .await
        .expect_err("refused");
    assert!(!err.to_string().contains("s3cret"), "{err}");
}

#[tokio::test]
async fn postgres_schema_names_are_checked() {
    let Ok(url) = std::env::var(PG_ENV) else {
        eprintln!(
            "\n!!!!! SKIPPED: {PG_ENV} is not set; postgres_schema_names_are_checked did not run !!!!!\n"
        );
        return;
    };
    for bad in ["Public", "a-b", "x; DROP TABLE runs", "", "1abc"] {
        assert!(
            matches!(
                PgStore::connect_with_schema(&url, bad).await,
                Err(StoreError::Schema(_))
            ),
            "{bad}"
        );
    }
}

/// On Postgres a commit under a lease share-locks the lease rows until it ends: a takeover
/// started while the commit is under way waits for it, then takes the customer. The commit
/// is held mid-transaction by a lock on the customer row it writes (after the check).
#[tokio::test]
async fn postgres_takeover_waits_for_a_fenced_commit() {
    with_postgres("takeover_waits", |db| async move {
        let Database::Postgres(pg) = &*db else {
            panic!("a Postgres store")
        };
        let schema = pg.schema().expect("a test schema").to_owned();
        let url = std::env::var(PG_ENV).expect("the Postgres URL");
        commit(&db, &round(&["c1"], &[], None)).await;
        assert_eq!(lease(&db, &["c1"], "d1", t(0), t(5)).await, ids(&["c1"]));

        let mut blocker = sqlx::PgConnection::connect(&url)
            .await
            .expect("connect to Postgres");
        sqlx::query(&format!("SET search_path = \"{schema}\""))
            .execute(&mut blocker)
            .await
            .expect("search path");
        let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut blocker)
            .await
            .expect("pid");
        sqlx::query("BEGIN")
            .execute(&mut blocker)
            .await
            .expect("begin");
        sqlx::query("SELECT 1 FROM customers WHERE id = 'c1' FOR UPDATE")
            .execute(&mut blocker)
            .await
            .expect("lock the customer row");

        let committer = {
            let db = db.clone();
            tokio::spawn(async move {
                db.commit(&round(&["c1"], &[], fence("d1", &["c1"], t(4))))
                    .await
            })
        };
        // Wait until the commit, past its lease check, is stuck on the customer row.
        let mut stuck = false;
        for _ in 0..200 {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(blocker_pid)
            .fetch_one(&mut blocker)
            .await
            .expect("pg_stat_activity");
            if waiting > 0 {
                stuck = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(stuck, "the commit waits on the customer row");

        // d1's lease has run out by d2's clock: d2 may take c1, but only after the commit.
        let mut taker = {
            let db = db.clone();
            tokio::spawn(async move {
                db.claim_customers(&ids(&["c1"]), "d2", t(5), t(9))
                    .await
                    .expect("claim")
            })
        };
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut taker).await;
        assert!(
            early.is_err(),
            "the takeover waits for the commit: {early:?}"
        );
        sqlx::query("ROLLBACK")
            .execute(&mut blocker)
            .await
            .expect("rollback");
        blocker.close().await.expect("close");
        committer
            .await
            .expect("committer")
            .expect("the commit held its lease");
        assert_eq!(taker.await.expect("taker"), ids(&["c1"]));
        assert_eq!(db.history(Some("c1")).await.expect("history").len(), 1);
    })
    .await;
}

// ---- throughput (ignored; run in release mode) -------------------------------------------------

/// Commit throughput for 1,000-run batches, shaped like `canvas bench engine`'s five-step
/// journey. "enter": per customer a new run, an enrolment, the customer (cap marks), 2
/// history rows and 1 outbox row; "finish": the run ends, enrolment and customer change, 3
/// history rows, 1 outbox row. Prints history rows/s (the engine's transitions) and the raw
/// ceiling.
async fn commit_rate(db: Arc<Database>) {
    const BATCHES: usize = 40;
    const RUNS: usize = 1_000;
    let mut enter = Vec::new();
    let mut finish = Vec::new();
    for b in 0..BATCHES {
        let mut e = Batch::default();
        let mut f = Batch::default();
        for i in 0..RUNS {
            let id = format!("c{b:03}-{i:04}");
            let mut c = Customer::new(&id, t(0));
            c.attributes =
                json!({ "phone": "+8613800000000", "first_name": "Mei", "tier": "gold" })
                    .as_object()
                    .expect("object")
                    .clone();
            c.sends = vec![SentMark {
                at: t(0),
                channel: "sms".into(),
            }];
            let mut r = run(&id, "bench-five", 1, Some(t(24 * 60)));
            r.vars = Map::new();
            r.event = Some(Event {
                id: format!("joined-{b}-{i}"),
                customer_id: id.clone(),
                name: "joined".into(),
                data: json!({}),
                occurred_at: t(0),
            });
            e.customers.push(c.clone());
            e.enrolments.push(enrolment(&id, "bench-five", Some(&r.id)));
            e.history.push(history(&r, 1, "hello"));
            e.history.push(history(&r, 2, "pause"));
            e.outbox.push(outbox(&r, "hello"));
            e.runs.push(r.clone());
            c.sends.push(SentMark {
                at: t(24 * 60),
                channel: "sms".into(),
            });
            f.customers.push(c);
            f.enrolments.push(enrolment(&id, "bench-five", None));
            for (seq, step) in [(3, "still-here"), (4, "follow-up"), (5, "done")] {
                f.history.push(history(&r, seq, step));
            }
            f.outbox.push(outbox(&r, "follow-up"));
            f.runs.push(ended(r, None, None));
        }
        enter.push(e);
        finish.push(f);
    }
    for (label, batches) in [("enter ", &enter), ("finish", &finish)] {
        let start = Instant::now();
        for b in batches {
            commit(&db, b).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let history: usize = batches.iter().map(|b| b.history.len()).sum();
        eprintln!(
            "{:8} commit {label}: {:>7.0} history rows/s, {:>6.0} runs/s, {:5.1} ms per 1,000 runs",
            db.backend(),
            history as f64 / secs,
            (BATCHES * RUNS) as f64 / secs,
            secs * 1_000.0 / BATCHES as f64
        );
    }
    let raw = raw_ceiling(&db, BATCHES * RUNS, RUNS)
        .await
        .expect("raw ceiling");
    eprintln!(
        "{:8} raw ceiling  : {:>7.0} transitions/s",
        db.backend(),
        raw.per_second()
    );
}

#[tokio::test]
#[ignore = "throughput measurement; run with --release -- --ignored --nocapture"]
async fn bench_commit_sqlite() {
    with_sqlite(commit_rate).await;
}

#[tokio::test]
#[ignore = "throughput measurement; run with --release -- --ignored --nocapture"]
async fn bench_commit_postgres() {
    with_postgres("bench_commit", commit_rate).await;
}
