//! The dispatcher of `canvas serve` against a local webhook receiver that records every
//! key, when it arrived and how old its signature was:
//! - a rate-limited channel never sends a key twice, however long its queue, and each
//!   attempt is signed at its own time (not when its row was claimed);
//! - a daemon killed with rows on the wire leaves nothing to wait out: on SQLite the next
//!   daemon takes every claim over at start (and a second daemon on the same file is
//!   refused), on Postgres a live daemon takes over the claims of one whose heartbeat
//!   stopped, within seconds rather than the outbox lease.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Daemon, FreshDb, WRITE, call, pg_base};
use serde_json::json;

const SECRET: &str = "recovery-secret";

#[derive(Default)]
struct Seen {
    /// Arrivals per key.
    keys: HashMap<String, usize>,
    /// The oldest signature timestamp at receipt, in seconds.
    oldest_signature: i64,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Seen>>,
    /// While set, requests are held unanswered (the daemon's rows stay on the wire).
    hold: Arc<AtomicBool>,
    /// Requests held so far.
    held: Arc<AtomicUsize>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = chrono::Utc::now().timestamp();
    let signature = headers
        .get(canvas_channels::signature::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let t: i64 = signature
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let valid = canvas_channels::signature::verify(
        signature,
        SECRET.as_bytes(),
        &body,
        now,
        Duration::from_secs(300),
    )
    .is_ok();
    if r.hold.load(Ordering::SeqCst) {
        r.held.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut seen = r.seen.lock().unwrap();
    *seen.keys.entry(key).or_default() += 1;
    seen.oldest_signature = seen.oldest_signature.max(now - t);
    if valid {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

async fn receiver() -> (String, Receiver) {
    let r = Receiver::default();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), r)
}

const FLOW: &str = "flow: notify
name: Notify
timezone: UTC
trigger:
  event: go
steps:
  - id: tell
    send: webhook
    template: n/tell
    priority: transactional
";

fn flows(dir: &std::path::Path, channel: &str, leases: &str) -> std::path::PathBuf {
    let flows = dir.join("flows");
    std::fs::create_dir_all(flows.join("templates/n")).unwrap();
    std::fs::write(flows.join("notify.yaml"), FLOW).unwrap();
    std::fs::write(
        flows.join("templates/n/tell.txt"),
        "Hello {{ customer.id }}\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        format!("timezone: UTC\nquiet_hours: off\nserver:\n  leases: {leases}\n{channel}"),
    )
    .unwrap();
    flows
}

fn channel(url: &str, extra: &str) -> String {
    format!(
        "channels:\n  webhook:\n    type: webhook\n    url: {url}\n    secret_env: HOOK_SECRET\n    timeout: 30s\n{extra}"
    )
}

async fn post_events(base: &str, n: usize) {
    let events: Vec<_> = (0..n)
        .map(|i| json!({ "id": format!("e{i}"), "customer_id": format!("c{i}"), "name": "go" }))
        .collect();
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": events })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Wait until `n` distinct keys arrived; the seconds it took.
async fn all_arrive(r: &Receiver, n: usize, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if r.seen.lock().unwrap().keys.len() >= n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{} of {n} keys arrived within {within:?}",
            r.seen.lock().unwrap().keys.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 40 messages at 5/s take 8 s; the lease is 2 s.
async fn rate_limited(database: &str, dir: &std::path::Path) {
    let (url, r) = receiver().await;
    let flows = flows(dir, &channel(&url, "    rate_limit: 5\n"), "{ outbox: 2s }");
    let daemon = Daemon::spawn(flows, database, &[("HOOK_SECRET", SECRET)], None);
    post_events(&daemon.base, 40).await;
    all_arrive(&r, 40, Duration::from_secs(60)).await;
    // Anything claimed twice would arrive within a lease of the last one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = r.seen.lock().unwrap();
    let twice: Vec<_> = seen.keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys sent twice: {twice:?}");
    assert!(
        seen.oldest_signature <= 2,
        "a signature was {} s old at receipt",
        seen.oldest_signature
    );
}

/// Defect: with `rate_limit: 5` and 150 messages, 95 keys arrived twice — rows waiting for
/// a slot outlived their lease and were claimed again — and signatures carried the claim's
/// time, tens of seconds old at receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_channel_never_sends_a_key_twice_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    rate_limited(&database, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_channel_never_sends_a_key_twice_on_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_rate_limit").await;
    let url = db.url.clone();
    let outcome = tokio::spawn(async move {
        let dir = tempfile::tempdir().unwrap();
        rate_limited(&url, dir.path()).await;
    })
    .await;
    db.drop_it().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Rows on the wire when the daemon is killed; the receiver then answers again.
async fn kill_with_rows_on_the_wire(database: &str, flows: &std::path::Path, r: &Receiver) {
    r.hold.store(true, Ordering::SeqCst);
    let daemon = Daemon::spawn(
        flows.to_path_buf(),
        database,
        &[("HOOK_SECRET", SECRET)],
        None,
    );
    post_events(&daemon.base, 20).await;
    // Wait until requests are on the wire, held by the receiver.
    let start = Instant::now();
    while r.held.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no delivery began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.kill();
    r.hold.store(false, Ordering::SeqCst);
}

/// Defect: the restarted daemon waited out the dead one's claims (the 2-minute outbox
/// lease) before delivering them. On SQLite it takes them over at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sqlite_daemon_takes_over_the_killed_ones_claims() {
    let (url, r) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let flows = flows(dir.path(), &channel(&url, ""), "{ outbox: 2m }");
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    kill_with_rows_on_the_wire(&database, &flows, &r).await;
    let restarted = Daemon::spawn(flows.clone(), &database, &[("HOOK_SECRET", SECRET)], None);
    let took = all_arrive(&r, 20, Duration::from_secs(30)).await;
    assert!(took < Duration::from_secs(10), "recovery took {took:?}");
    // One daemon per SQLite file: a second one is refused, saying why.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(&flows)
        .arg("--database")
        .arg(&database)
        .env("HOOK_SECRET", SECRET)
        .env("CANVAS_API_TOKEN", WRITE)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another daemon"), "{stderr}");
    drop(restarted);
}

/// On Postgres a daemon whose heartbeat stopped loses its claims to a live one within
/// seconds (`dead_after: 2s` here), not after the 2-minute outbox lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_postgres_daemon_takes_over_a_dead_ones_claims() {
    let db = FreshDb::create(&pg_base(), "canvas_recovery").await;
    let url = db.url.clone();
    let outcome = tokio::spawn(async move {
        let (hook, r) = receiver().await;
        let dir = tempfile::tempdir().unwrap();
        let flows = flows(
            dir.path(),
            &channel(&hook, ""),
            "{ outbox: 2m, dead_after: 2s }",
        );
        kill_with_rows_on_the_wire(&url, &flows, &r).await;
        let survivor = Daemon::spawn(flows, &url, &[("HOOK_SECRET", SECRET)], None);
        let took = all_arrive(&r, 20, Duration::from_secs(60)).await;
        assert!(took < Duration::from_secs(15), "recovery took {took:?}");
        survivor.wait_log("took over the claims of daemons that stopped");
    })
    .await;
    db.drop_it().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
