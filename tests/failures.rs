//! Journeys that never go wrong silently, end to end through `canvas serve`, on a SQLite
//! file and on Postgres, against real local gateways started by the test:
//!
//! - a coupon webhook that answers HTTP 500 until the retries run out: the history says
//!   `failed` with the last error (not `answered`), no SMS goes out with an empty code, the
//!   run ends with outcome `error`;
//! - a WeChat gateway that rejects (400) a `send: [wechat, sms]`: the SMS gateway gets the
//!   message, under its own idempotency key, the history shows the failed attempt and the
//!   fallback, and the customer's cap counts the step once;
//! - a call with `timeout: 1s` to a webhook that answers after 4 s: the run gives up at 1 s
//!   (`failed`, outcome `error`), and the late answer is recorded without moving the run.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Daemon, FreshDb, Peek, WRITE, call, pg_base, until, write_flows};
use serde_json::{Value, json};

/// (path, idempotency key, body) per request, in arrival order.
type Shared = Arc<Mutex<Vec<(String, String, Value)>>>;

async fn receive(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.lock().unwrap().push((path.clone(), key, json));
    match path.as_str() {
        "sms" => (StatusCode::OK, "{}").into_response(),
        "wechat" => (StatusCode::BAD_REQUEST, "invalid openid").into_response(),
        "coupons" => (StatusCode::INTERNAL_SERVER_ERROR, "coupon db down").into_response(),
        "slow" => {
            tokio::time::sleep(std::time::Duration::from_secs(4)).await;
            axum::Json(json!({ "code": "C-LATE" })).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "").into_response(),
    }
}

async fn gateways() -> (String, Shared) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/{path}", post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), state)
}

const COUPON: &str = "flow: coupon
name: Coupon
timezone: UTC
trigger:
  event: asked
steps:
  - id: issue
    call:
      webhook: coupons
      body:
        customer_id: \"{{ customer.id }}\"
      save_as: gift
  - id: tell
    send: sms
    template: w/gift
    priority: transactional
";

const SLOW: &str = "flow: slow
name: Slow coupon
timezone: UTC
trigger:
  event: asked-slow
steps:
  - id: issue
    call:
      webhook: slow-coupons
      save_as: gift
      timeout: 1s
  - id: tell
    send: sms
    template: w/gift
    priority: transactional
";

const NUDGE: &str = "flow: nudge
name: Nudge
timezone: UTC
trigger:
  event: browsed
steps:
  - id: hello
    send: [wechat, sms]
    template: w/nudge
";

fn config(gw: &str) -> String {
    format!(
        "channels:
  wechat:
    type: wechat
    url: {gw}/wechat
    timeout: 2s
  sms:
    type: sms
    url: {gw}/sms
    timeout: 2s
  coupons:
    type: webhook
    url: {gw}/coupons
    timeout: 2s
    retry: {{ max_attempts: 3, base: 50ms, max: 100ms }}
  slow-coupons:
    type: webhook
    url: {gw}/slow
    timeout: 10s
"
    )
}

/// The flows folder: the shared welcome flow plus the two of this file.
fn flows_dir(dir: &std::path::Path, gw: &str) -> std::path::PathBuf {
    let flows = dir.join("flows");
    write_flows(&flows, &config(gw));
    std::fs::write(flows.join("coupon.yaml"), COUPON).unwrap();
    std::fs::write(flows.join("nudge.yaml"), NUDGE).unwrap();
    std::fs::write(flows.join("slow.yaml"), SLOW).unwrap();
    std::fs::write(
        flows.join("templates/w/gift.txt"),
        "Your voucher: {{ vars.gift.code }}\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("templates/w/nudge.txt"),
        "Still thinking it over?\n",
    )
    .unwrap();
    flows
}

async fn enrol(d: &Daemon, customer: &str, attributes: Value, event: &str) {
    let b = &d.base;
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/{customer}"),
        Some(WRITE),
        Some(json!({ "attributes": attributes })),
    )
    .await;
    assert_eq!(s, 202);
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{b}/v1/events"),
        Some(WRITE),
        Some(json!({"events":[{"id": format!("{customer}-{event}"),"customer_id":customer,"name":event}]})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

fn actions(journey: &Value) -> Vec<String> {
    journey["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap().to_owned())
        .collect()
}

async fn failed_call_is_not_answered(d: &Daemon, state: &Shared) {
    enrol(d, "c1", json!({ "phone": "+8613800000001" }), "asked").await;
    let j = until(&format!("{}/v1/customers/c1/journeys", d.base), |j| {
        j["journeys"][0]["status"] == json!("ended")
    })
    .await;
    let journey = &j["journeys"][0];
    assert_eq!(journey["where"]["outcome"], json!("error"), "{journey}");
    let acts = actions(journey);
    assert_eq!(acts, ["called", "failed"], "{journey}");
    let failed = &journey["history"][1]["detail"];
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("HTTP 500"), "the last error: {failed}");
    let deliveries = journey["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "only the call: {deliveries:?}");
    assert_eq!(deliveries[0]["status"], json!("dead"));
    assert_eq!(deliveries[0]["attempts"], json!(3));
    // Nothing reached the SMS gateway: no voucher with an empty code.
    let r = state.lock().unwrap();
    assert!(
        r.iter().all(|(p, _, _)| p != "sms"),
        "no SMS may go out: {r:?}"
    );
    assert_eq!(r.iter().filter(|(p, _, _)| p == "coupons").count(), 3);
}

async fn call_timeout_bounds_the_wait(d: &Daemon, state: &Shared) {
    let started = std::time::Instant::now();
    enrol(d, "c3", json!({ "phone": "+8613800000003" }), "asked-slow").await;
    let url = format!("{}/v1/customers/c3/journeys", d.base);
    let j = until(&url, |j| j["journeys"][0]["status"] == json!("ended")).await;
    // The webhook answers after 4 s; the run gave up at its 1 s timeout.
    assert!(
        started.elapsed() < std::time::Duration::from_millis(3500),
        "the run waited {:?}",
        started.elapsed()
    );
    let journey = &j["journeys"][0];
    assert_eq!(journey["where"]["outcome"], json!("error"), "{journey}");
    assert_eq!(actions(journey), ["called", "failed"], "{journey}");
    let failed = &journey["history"][1]["detail"];
    assert_eq!(failed["timeout"], json!(true), "{failed}");
    assert_eq!(failed["error"], json!("no answer within 1s"));
    // The answer comes after all: recorded, and the run does not move.
    let j = until(&url, |j| {
        j["journeys"][0]["history"]
            .as_array()
            .is_some_and(|h| h.len() == 3)
    })
    .await;
    let journey = &j["journeys"][0];
    assert_eq!(actions(journey), ["called", "failed", "late"], "{journey}");
    assert_eq!(journey["where"]["outcome"], json!("error"));
    let r = state.lock().unwrap();
    assert!(
        r.iter()
            .all(|(p, _, b)| p != "sms" || b["customer_id"] != json!("c3")),
        "no SMS for c3: {r:?}"
    );
}

async fn dead_wechat_falls_back_to_sms(d: &Daemon, state: &Shared, peek: &Peek) {
    enrol(
        d,
        "c2",
        json!({ "wechat_id": "wx-2", "phone": "+8613800000002" }),
        "browsed",
    )
    .await;
    let j = until(&format!("{}/v1/customers/c2/journeys", d.base), |j| {
        j["journeys"][0]["deliveries"].as_array().is_some_and(|ds| {
            ds.iter()
                .any(|x| x["channel"] == json!("sms") && x["status"] == json!("sent"))
        })
    })
    .await;
    let journey = &j["journeys"][0];
    let acts = actions(journey);
    assert_eq!(acts, ["sent", "ended", "failed", "fallback"], "{journey}");
    let failed = &journey["history"][2]["detail"];
    assert_eq!(failed["channel"], json!("wechat"));
    assert!(
        failed["error"].as_str().unwrap().contains("HTTP 400"),
        "{failed}"
    );
    assert_eq!(failed["fallback"], json!("sms"));
    let deliveries = journey["deliveries"].as_array().unwrap();
    let status: Vec<(&str, &str, &str)> = deliveries
        .iter()
        .map(|x| {
            (
                x["key"].as_str().unwrap(),
                x["channel"].as_str().unwrap(),
                x["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        status,
        [
            ("nudge/c2/1/hello", "wechat", "dead"),
            ("nudge/c2/1/hello/sms", "sms", "sent")
        ]
    );
    {
        let r = state.lock().unwrap();
        let wechat: Vec<&(String, String, Value)> =
            r.iter().filter(|(p, _, _)| p == "wechat").collect();
        let sms: Vec<&(String, String, Value)> = r.iter().filter(|(p, _, _)| p == "sms").collect();
        assert_eq!(wechat.len(), 1, "a 400 is permanent: {wechat:?}");
        assert_eq!(sms.len(), 1, "the SMS arrives once: {sms:?}");
        assert_eq!(wechat[0].1, "nudge/c2/1/hello");
        assert_eq!(sms[0].1, "nudge/c2/1/hello/sms", "its own idempotency key");
        assert_eq!(sms[0].2["address"], json!("+8613800000002"));
        assert_eq!(
            sms[0].2["content"]["text"],
            json!("Still thinking it over?")
        );
    }
    // The WeChat message is a dead letter, but the step went out by SMS: sending it again
    // would reach the customer twice.
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{}/v1/deadletters/nudge/c2/1/hello/retry", d.base),
        Some(WRITE),
        None,
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fell back to `nudge/c2/1/hello/sms`"),
        "{body}"
    );
    // The step counts against the caps once, on the channel that carried it.
    let sends = peek
        .strings("SELECT CAST(sends AS TEXT) FROM customers WHERE id = 'c2'")
        .await;
    let sends: Value = serde_json::from_str(&sends[0]).unwrap();
    let channels: Vec<&str> = sends
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["sms"], "{sends}");
}

/// A daemon on a fresh database of one backend, with the test's gateways.
struct Env {
    d: Daemon,
    state: Shared,
    url: String,
    pg: Option<FreshDb>,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(postgres: Option<&str>) -> Env {
        let (gw, state) = gateways().await;
        let dir = tempfile::tempdir().unwrap();
        let flows = flows_dir(dir.path(), &gw);
        let (url, pg) = match postgres {
            Some(prefix) => {
                let db = FreshDb::create(&pg_base(), prefix).await;
                (db.url.clone(), Some(db))
            }
            None => (
                format!("sqlite://{}", dir.path().join("canvas.db").display()),
                None,
            ),
        };
        let d = Daemon::spawn(flows, &url, &[], None);
        Env {
            d,
            state,
            url,
            pg,
            _dir: dir,
        }
    }

    async fn stop(self) {
        assert!(self.d.terminate().success());
        if let Some(db) = self.pg {
            db.drop_it().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_call_is_not_answered_sqlite() {
    let e = Env::start(None).await;
    failed_call_is_not_answered(&e.d, &e.state).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_call_is_not_answered_postgres() {
    let e = Env::start(Some("canvas_failed_call")).await;
    failed_call_is_not_answered(&e.d, &e.state).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_bounds_the_wait_sqlite() {
    let e = Env::start(None).await;
    call_timeout_bounds_the_wait(&e.d, &e.state).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_bounds_the_wait_postgres() {
    let e = Env::start(Some("canvas_call_timeout")).await;
    call_timeout_bounds_the_wait(&e.d, &e.state).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_wechat_falls_back_to_sms_sqlite() {
    let e = Env::start(None).await;
    let peek = Peek::connect(&e.url).await;
    dead_wechat_falls_back_to_sms(&e.d, &e.state, &peek).await;
    peek.close().await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_wechat_falls_back_to_sms_postgres() {
    let e = Env::start(Some("canvas_fallback")).await;
    let peek = Peek::connect(&e.url).await;
    dead_wechat_falls_back_to_sms(&e.d, &e.state, &peek).await;
    peek.close().await;
    e.stop().await;
}
