//! Scale-out on Postgres: three `canvas serve` daemons share one database and are fed load
//! through all three APIs; one is SIGKILLed midway. Every customer must end with exactly
//! one run per flow (no daemon applied an event twice), a complete history, all three
//! messages in the outbox once, and every expected message delivered — each idempotency key received at
//! the local webhook receiver, none missing, none twice before the kill. After the kill a
//! key may arrive twice only if the killed daemon had sent it without living to record it
//! (its lease then hands the row to another daemon, which sends it again under the same
//! key, for the provider to drop); the test prints how many.
//!
//! Needs Postgres (`CANVAS_TEST_POSTGRES_URL`, else the local server at its standard
//! address); without one it fails, never passes unrun.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use canvas_engine::store::{Database, Store};
use common::{Daemon, WRITE, call};
use serde_json::json;

const CUSTOMERS: usize = 600;

const FLOW: &str = "flow: two-touch
name: Two touches
timezone: UTC
trigger:
  event: joined
steps:
  - id: hello
    send: sms
    template: s/hello
    priority: transactional
  - id: pause
    wait: { for: 2s }
  - id: again
    send: sms
    template: s/again
    priority: transactional
  - id: done
    exit: finished
";

/// Per idempotency key: how many times it arrived, and when first.
/// Ends at once: an event applied twice would start a second run of it (the entry rule only
/// blocks a second run while the first is active).
const GREET: &str = "flow: greet
name: Greet
timezone: UTC
trigger:
  event: joined
steps:
  - id: hi
    send: sms
    template: s/hello
    priority: transactional
  - id: bye
    exit: greeted
";

type Keys = Arc<Mutex<BTreeMap<String, (usize, Instant)>>>;

async fn receive(State(keys): State<Keys>, headers: HeaderMap) -> &'static str {
    if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        keys.lock()
            .unwrap()
            .entry(k.to_owned())
            .or_insert((0, Instant::now()))
            .0 += 1;
    }
    // A little provider latency, so deliveries are in flight when the kill comes.
    tokio::time::sleep(Duration::from_millis(5)).await;
    "{}"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_on_postgres_one_killed_every_message_once() {
    let db = common::FreshDb::create(&common::pg_base(), "canvas_scale").await;

    let keys: Keys = Arc::default();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(keys.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let recv = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(flows.join("templates/s")).unwrap();
    std::fs::write(flows.join("two-touch.yaml"), FLOW).unwrap();
    std::fs::write(flows.join("greet.yaml"), GREET).unwrap();
    std::fs::write(
        flows.join("templates/s/hello.txt"),
        "Hello {{ customer.first_name }}\n",
    )
    .unwrap();
    std::fs::write(flows.join("templates/s/again.txt"), "Still there?\n").unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        format!(
            "timezone: UTC
quiet_hours: off
server:
  leases: {{ customers: 3s, outbox: 6s }}
channels:
  sms:
    type: webhook
    url: http://{recv}/hook
    timeout: 2s
    concurrency: 16
    retry: {{ max_attempts: 8, base: 100ms, max: 1s }}
"
        ),
    )
    .unwrap();

    // The first daemon migrates the fresh database; then the other two join.
    let mut daemons: Vec<Option<Daemon>> =
        vec![Some(Daemon::spawn(flows.clone(), &db.url, &[], None))];
    for _ in 0..2 {
        daemons.push(Some(Daemon::spawn(flows.clone(), &db.url, &[], None)));
    }
    let bases: Vec<String> = daemons
        .iter()
        .map(|d| d.as_ref().unwrap().base.clone())
        .collect();

    // Load through all three APIs: profiles, then sign-ups in batches of 50.
    for i in 0..CUSTOMERS {
        let b = &bases[i % 3];
        let (s, _) = call(
            reqwest::Method::PUT,
            &format!("{b}/v1/customers/c{i:04}"),
            Some(WRITE),
            Some(json!({"attributes":{"first_name":"Ada","phone":format!("+86138{i:08}")}})),
        )
        .await;
        assert_eq!(s, 202);
    }
    let expected = 3 * CUSTOMERS;
    let mut killed = false;
    let mut killed_at = None;
    for chunk in 0..CUSTOMERS / 50 {
        let events: Vec<_> = (chunk * 50..chunk * 50 + 50)
            .map(|i| json!({"id": format!("j{i:04}"), "customer_id": format!("c{i:04}"), "name": "joined"}))
            .collect();
        // Daemon 1 is killed after a third of the load; send to the live ones.
        let b = if killed {
            &bases[2 * (chunk % 2)]
        } else {
            &bases[chunk % 3]
        };
        let (s, body) = call(
            reqwest::Method::POST,
            &format!("{b}/v1/events"),
            Some(WRITE),
            Some(json!({ "events": events })),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        if !killed && chunk == CUSTOMERS / 150 {
            // Midway: wait until deliveries are flowing, then SIGKILL the second daemon.
            let start = Instant::now();
            while keys.lock().unwrap().len() < expected / 6
                && start.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let repeats: usize = keys.lock().unwrap().values().map(|(n, _)| n - 1).sum();
            assert_eq!(
                repeats, 0,
                "a message was delivered twice before any daemon died"
            );
            daemons[1].take().unwrap().kill();
            killed_at = Some(Instant::now());
            killed = true;
        }
    }

    // Every expected message arrives: leases of the dead daemon run out and the others
    // take its customers and outbox rows over.
    let start = Instant::now();
    loop {
        let n = keys.lock().unwrap().len();
        if n >= expected {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {n} of {expected} messages arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let anything still in flight land before counting repeats.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let store = Database::connect(&db.url).await.unwrap();
    let outbox = store.outbox(None).await.unwrap();
    let history = store.history(None).await.unwrap();
    let mut runs_per_customer: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..CUSTOMERS {
        let c = format!("c{i:04}");
        let runs = store.runs(&c).await.unwrap();
        runs_per_customer.insert(c, runs.len());
    }
    let expected_keys: BTreeSet<String> = outbox.iter().map(|r| r.key.clone()).collect();
    let received = keys.lock().unwrap().clone();
    let received_keys: BTreeSet<String> = received.keys().cloned().collect();
    let repeats: usize = received.values().map(|(n, _)| n - 1).sum();
    eprintln!(
        "scale-out: {} customers, {} outbox rows, {} keys received, {} repeated deliveries (same key) after the kill",
        CUSTOMERS,
        outbox.len(),
        received_keys.len(),
        repeats
    );

    assert!(
        runs_per_customer.values().all(|n| *n == 2),
        "an event was applied twice (or a customer missed): {:?}",
        runs_per_customer
            .iter()
            .filter(|(_, n)| **n != 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        outbox.len(),
        expected,
        "three outbox rows per customer, once each"
    );
    assert_eq!(
        received_keys, expected_keys,
        "every message delivered, under its own key"
    );
    // A complete history: every customer the same steps, ending with the exit.
    let mut steps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for h in &history {
        steps
            .entry(h.customer_id.as_str())
            .or_default()
            .push(h.step.as_str());
    }
    assert_eq!(steps.len(), CUSTOMERS);
    for s in steps.values_mut() {
        s.sort_unstable();
    }
    let first = steps.values().next().unwrap().clone();
    for step in ["hello", "again", "done", "hi", "bye"] {
        assert!(first.contains(&step), "{first:?}");
    }
    assert!(steps.values().all(|s| *s == first), "histories differ");
    // The outcome counters three daemons wrote (each to its own shard), one of them killed,
    // equal what the runs and history say.
    for flow in ["two-touch", "greet"] {
        let wrong = canvas_engine::stats::audit(&store, flow).await.unwrap();
        assert!(wrong.is_empty(), "{flow}: counters disagree: {wrong:#?}");
        let stats = store
            .flow_stats(&canvas_engine::stats::StatsQuery::all(flow))
            .await
            .unwrap()
            .table(None);
        assert_eq!(stats.flow["entered"], CUSTOMERS as u64, "{flow}");
    }
    // Repeats can only be rows the killed daemon sent but had not recorded: every repeated
    // key first arrived before the kill.
    let killed_at = killed_at.unwrap();
    let late: Vec<&String> = received
        .iter()
        .filter(|(_, (n, first))| *n > 1 && *first > killed_at)
        .map(|(k, _)| k)
        .collect();
    assert!(
        late.is_empty(),
        "keys first sent after the kill arrived twice: {late:?}"
    );

    for d in daemons.into_iter().flatten() {
        assert!(d.terminate().success());
    }
    drop(store);
    db.drop_it().await;
}
