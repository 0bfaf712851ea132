//! A pass works in the present: each round of a live pass reads the clock afresh and sees
//! the paused flows as they are when it runs, and a pass stops at its budget. On a SQLite
//! file and on Postgres (`CANVAS_TEST_POSTGRES_URL`, or the local server at its standard
//! address; a test that cannot reach it fails rather than passing unrun).

mod common;

use std::collections::HashSet;
use std::sync::Mutex;

use canvas_engine::clock::Clock;
use canvas_engine::policy::Policy;
use canvas_engine::registry::Registry;
use canvas_engine::runtime::{FlowSet, Pace, Runtime, process_inbox_from};
use canvas_engine::state::{Event, InboxItem, Time};
use canvas_engine::store::{Database, PgStore, Store};
use chrono::{DateTime, Duration};

/// A clock that moves on by `step` each time it is read: time passes while a pass works.
struct SteppingClock {
    now: Mutex<Time>,
    step: Duration,
}

impl Clock for SteppingClock {
    fn now(&self) -> Time {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += self.step;
        *now
    }
}

fn t0() -> Time {
    DateTime::parse_from_rfc3339("2026-03-02T10:00:00Z")
        .expect("time")
        .to_utc()
}

fn runtime(store: Database) -> Runtime<Database> {
    runtime_ending(store, "entered")
}

/// A runtime whose one flow, `enter`, ends its runs with `outcome` (a version per outcome).
fn runtime_ending(store: Database, outcome: &str) -> Runtime<Database> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("enter.yaml"),
        format!("flow: enter\nname: Enter\ntimezone: UTC\ntrigger: {{ event: go }}\nsteps:\n  - {{ id: done, exit: {outcome} }}\n"),
    )
    .expect("write flow");
    let v = canvas_engine::validate_paths(&[dir.path().to_path_buf()], &Registry::new())
        .expect("read flow");
    assert!(v.is_valid(), "{:#?}", v.diagnostics);
    let mut rt = Runtime::new(
        store,
        FlowSet::new(v.flows().cloned()),
        Policy::default(),
        Registry::new(),
    );
    rt.batch_size = 100;
    rt
}

fn events(n: usize, at: Time) -> Vec<InboxItem> {
    (0..n)
        .map(|i| {
            InboxItem::Event(Event {
                id: format!("e{i:04}"),
                customer_id: format!("c{i:04}"),
                name: "go".into(),
                data: serde_json::json!({}),
                occurred_at: at,
            })
        })
        .collect()
}

/// Each listed `async fn NAME(db: Database)` becomes `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
                    super::$name(super::Database::connect(&url).await.expect("open SQLite")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::on_postgres(stringify!($name), super::$name).await;
                }
            )*
        }
    };
}

on_both!(
    a_live_pass_stops_at_its_budget_and_stamps_each_round_with_its_own_time,
    a_pause_holds_from_the_next_round_of_a_running_pass,
    a_reload_applies_from_the_next_round_of_a_running_pass,
);

/// Runs `test` on a fresh schema of the test server (`common::pg_url`); a server that
/// cannot be reached fails the test.
async fn on_postgres(name: &str, test: impl AsyncFn(Database)) {
    let url = common::pg_url();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let short: String = name.chars().take(20).collect();
    let schema = format!("canvas_pace_{short}_{}_{nanos}", std::process::id());
    let store = PgStore::connect_with_schema(&url, &schema)
        .await
        .unwrap_or_else(|e| panic!("{}", common::pg_unreachable(&url, &e)));
    test(Database::Postgres(store.clone())).await;
    store.close().await;
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&admin)
        .await
        .expect("drop schema");
}

/// Defect: a pass drained the whole inbox at the instant it began, so under a backlog
/// nothing else ran for seconds and every item was stamped with that stale instant.
async fn a_live_pass_stops_at_its_budget_and_stamps_each_round_with_its_own_time(db: Database) {
    let rt = runtime(db);
    rt.store
        .enqueue(&events(1000, t0()))
        .await
        .expect("enqueue");
    // 100 ms a clock read, a budget of 1 s: a few rounds, not ten.
    let clock = SteppingClock {
        now: Mutex::new(t0()),
        step: Duration::milliseconds(100),
    };
    let first = rt
        .process_inbox_with(Pace::live(&clock, Duration::seconds(1)), |_| {})
        .await
        .expect("pass");
    assert!(first.more, "the pass must stop at its budget");
    assert!(
        first.items > 0 && first.items < 1000,
        "applied {} of 1000 in one pass",
        first.items
    );
    let mut applied = first.items;
    for _ in 0..20 {
        let pass = rt
            .process_inbox_with(Pace::live(&clock, Duration::seconds(1)), |_| {})
            .await
            .expect("pass");
        applied += pass.items;
        if !pass.more {
            break;
        }
    }
    assert_eq!(applied, 1000, "later passes apply the rest");
    let mut entered: Vec<(String, Time)> = Vec::new();
    for i in 0..1000 {
        let id = format!("c{i:04}");
        let runs = rt.store.runs(&id).await.expect("runs");
        assert_eq!(runs.len(), 1, "{id}");
        entered.push((id, runs[0].updated_at));
    }
    let distinct: HashSet<Time> = entered.iter().map(|(_, t)| *t).collect();
    assert!(
        distinct.len() >= 10,
        "each round has its own time: {} distinct",
        distinct.len()
    );
    assert!(
        entered.windows(2).all(|w| w[0].1 <= w[1].1),
        "rounds in inbox order, time moving forward"
    );
    assert!(entered.iter().all(|(_, t)| *t > t0()), "after receipt");
}

/// Defect: a paused flow kept taking entries until the pass that began before the pause
/// ended (11,620 entries under load). A pause holds from the next round on.
async fn a_pause_holds_from_the_next_round_of_a_running_pass(db: Database) {
    let rt = runtime(db);
    rt.store
        .enqueue(&events(1000, t0()))
        .await
        .expect("enqueue");
    let paused = rt.paused.clone();
    let mut rounds = 0;
    // Round k+1 is executed before round k's commit is reported (pipelining): pausing
    // when round 3 is reported lets rounds 1–4 in, and no later one.
    let stats = rt
        .process_inbox_with(Pace::at(t0()), |_| {
            rounds += 1;
            if rounds == 3 {
                paused.replace(HashSet::from(["enter".to_owned()]));
            }
        })
        .await
        .expect("pass");
    assert_eq!(stats.items, 1000);
    let mut entered = Vec::new();
    for i in 0..1000 {
        if !rt
            .store
            .runs(&format!("c{i:04}"))
            .await
            .expect("runs")
            .is_empty()
        {
            entered.push(i);
        }
    }
    assert_eq!(entered, (0..400).collect::<Vec<_>>());
}

/// A hot reload swaps the daemon's runtime; a pass already running takes the new flow
/// versions from its next round on, not from its next pass.
async fn a_reload_applies_from_the_next_round_of_a_running_pass(db: Database) {
    let before = runtime_ending(db.clone(), "first");
    let after = runtime_ending(db, "second");
    let v1 = before.flows.get("enter").expect("v1").hash.0.clone();
    let v2 = after.flows.get("enter").expect("v2").hash.0.clone();
    assert_ne!(v1, v2);
    before.register_versions(t0()).await.expect("versions");
    after.register_versions(t0()).await.expect("versions");
    before
        .store
        .enqueue(&events(1000, t0()))
        .await
        .expect("enqueue");
    // Rounds 1–3 see the runtime before the reload, rounds 4 on the one after.
    let rounds = std::cell::Cell::new(0);
    let current = || {
        rounds.set(rounds.get() + 1);
        if rounds.get() <= 3 { &before } else { &after }
    };
    let stats = process_inbox_from(current, Pace::at(t0()), |_| {})
        .await
        .expect("pass");
    assert_eq!(stats.items, 1000);
    for i in 0..1000 {
        let runs = before.store.runs(&format!("c{i:04}")).await.expect("runs");
        let (version, outcome) = if i < 300 {
            (&v1, "first")
        } else {
            (&v2, "second")
        };
        assert_eq!(&runs[0].version, version, "c{i:04}");
        assert_eq!(runs[0].outcome.as_deref(), Some(outcome), "c{i:04}");
    }
}
