//! `canvas serve` under sustained ingest, on a SQLite file and on Postgres: clients post
//! event batches back to back while a timer flow runs beside them and one flow is paused
//! midway. An engine pass works in the present, so:
//! - no event received after a pause answered enters the paused flow;
//! - no inbox item is applied (`applied_at`) before it was received;
//! - timers fire while the inbox has a backlog, not after it drains.
//!
//! The timer bound here is loose (a debug build on a shared machine); the figures that
//! count are `canvas bench serve`'s, in BENCHMARKS.md.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, FreshDb, Peek, WRITE, client, pg_base};
use serde_json::json;

const LOAD: &str = "flow: load
name: Load
timezone: UTC
trigger:
  event: load
steps:
  - id: done
    exit: entered
";

const TIMER: &str = "flow: timer
name: Timer
timezone: UTC
trigger:
  event: tick
steps:
  - id: hold
    wait:
      for: 1s
  - id: done
    exit: fired
";

/// How long the clients post, and when the pause comes.
const LOAD_FOR: Duration = Duration::from_secs(6);
const PAUSE_AT: Duration = Duration::from_secs(2);

fn flows() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("load.yaml"), LOAD).unwrap();
    std::fs::write(flows.join("timer.yaml"), TIMER).unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        "timezone: UTC\nquiet_hours: off\n",
    )
    .unwrap();
    (dir, flows)
}

async fn post(base: &str, events: serde_json::Value) {
    let resp = client()
        .post(format!("{base}/v1/events"))
        .bearer_auth(WRITE)
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
}

async fn sustained_load(database: &str, flows: std::path::PathBuf) {
    let daemon = Daemon::spawn(flows, database, &[], None);
    let base = Arc::new(daemon.base.clone());
    let paused = Arc::new(AtomicBool::new(false));
    let batch = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    // Two clients, batches of 500 `load` events back to back. A batch posted after the
    // pause answered is marked in its customer ids.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (base, paused, batch) = (base.clone(), paused.clone(), batch.clone());
        clients.push(tokio::spawn(async move {
            while start.elapsed() < LOAD_FOR {
                let n = batch.fetch_add(1, Ordering::SeqCst);
                let tag = if paused.load(Ordering::SeqCst) { "after" } else { "before" };
                let events: Vec<_> = (0..500)
                    .map(|i| json!({ "id": format!("l{n}-{i}"), "customer_id": format!("{tag}-{n}-{i}"), "name": "load" }))
                    .collect();
                post(&base, json!(events)).await;
            }
        }));
    }
    // One timer every 200 ms.
    let ticker = {
        let base = base.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < LOAD_FOR {
                post(&base, json!([{ "id": format!("t{n}"), "customer_id": format!("tick-{n}"), "name": "tick" }])).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            n
        })
    };
    tokio::time::sleep(PAUSE_AT).await;
    let resp = client()
        .post(format!("{base}/v1/flows/load/pause"))
        .bearer_auth(WRITE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    paused.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let ticks = ticker.await.unwrap();

    let peek = Peek::connect(database).await;
    // Let the backlog drain (bounded).
    let drained = Instant::now();
    while peek
        .number("SELECT COUNT(*) FROM inbox WHERE applied_at IS NULL")
        .await
        > 0
    {
        assert!(
            drained.elapsed() < Duration::from_secs(120),
            "the inbox never drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let backlog_end = chrono::Utc::now().timestamp_millis();
    let after_pause = peek
        .number("SELECT COUNT(*) FROM runs WHERE flow = 'load' AND customer_id LIKE 'after-%'")
        .await;
    let received_after = peek
        .number("SELECT COUNT(*) FROM inbox WHERE customer_id LIKE 'after-%'")
        .await;
    assert!(received_after > 0, "no batch was posted after the pause");
    assert_eq!(
        after_pause, 0,
        "{after_pause} of {received_after} events received after the pause answered entered the paused flow"
    );
    let early = peek
        .number("SELECT COUNT(*) FROM inbox WHERE applied_at < at")
        .await;
    assert_eq!(
        early, 0,
        "{early} inbox items applied before they were received"
    );
    // Timers due while the inbox had a backlog (due: when the wait began + 1 s): each
    // fired within a few seconds; before, they waited until the backlog drained.
    let lags = peek
        .pairs(&format!(
            "SELECT h.at + 1000, f.at FROM history h
             JOIN history f ON f.run_id = h.run_id AND f.step = 'done'
             WHERE h.flow = 'timer' AND h.step = 'hold' AND h.action = 'waiting'
               AND h.at + 1000 < {backlog_end}"
        ))
        .await;
    assert!(
        lags.len() >= 5,
        "only {} of {ticks} timers came due during the backlog",
        lags.len()
    );
    let worst = lags
        .iter()
        .map(|(due, fired)| fired - due)
        .max()
        .unwrap_or(0);
    assert!(
        worst < 3000,
        "a timer fired {worst} ms late under load (lags: {:?})",
        lags.iter().map(|(d, f)| f - d).collect::<Vec<_>>()
    );
    peek.close().await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_ingest_on_sqlite_pauses_hold_timers_fire_applied_after_receipt() {
    let (dir, flows) = flows();
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    sustained_load(&database, flows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_ingest_on_postgres_pauses_hold_timers_fire_applied_after_receipt() {
    let (_dir, flows) = flows();
    let db = FreshDb::create(&pg_base(), "canvas_sustained").await;
    let url = db.url.clone();
    let outcome = tokio::spawn(async move { sustained_load(&url, flows).await }).await;
    db.drop_it().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
