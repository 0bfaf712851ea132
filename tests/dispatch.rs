//! The dispatcher of `canvas serve` against a real local webhook receiver started by the
//! test: deliveries carry the idempotency key and a valid signature; a 5xx is retried until
//! it succeeds; a permanent 4xx is dead-lettered with its reason visible in the API; a
//! `call` webhook's JSON response lands in the run's vars and a later send uses it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Daemon, READ, WRITE, call, until};
use serde_json::{Value, json};

const SECRET: &str = "webhook-secret-1";

#[derive(Default)]
struct Received {
    /// (path, idempotency key, body) per request, in arrival order.
    requests: Vec<(String, String, Value)>,
    /// Requests seen per path.
    per_path: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Received>>;

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
    let signature = headers
        .get(canvas_channels::signature::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let valid = canvas_channels::signature::verify(
        &signature,
        SECRET.as_bytes(),
        &body,
        chrono::Utc::now().timestamp(),
        std::time::Duration::from_secs(300),
    )
    .is_ok();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = {
        let mut r = state.lock().unwrap();
        r.requests.push((path.clone(), key, json));
        let n = r.per_path.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    if !valid {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    match path.as_str() {
        "ok" => (StatusCode::OK, "{}").into_response(),
        // Fails twice, then works.
        "flaky" if n <= 2 => (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response(),
        "flaky" => (StatusCode::OK, "{}").into_response(),
        "bad" => (StatusCode::UNPROCESSABLE_ENTITY, "no such phone number").into_response(),
        "coupons" => axum::Json(json!({"code": "C-2026", "left": 3})).into_response(),
        _ => (StatusCode::NOT_FOUND, "").into_response(),
    }
}

async fn receiver() -> (String, Shared) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/{path}", post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), state)
}

const COUPON_FLOW: &str = "flow: coupon
name: Coupon
timezone: UTC
trigger:
  event: asked
steps:
  - id: fetch
    call:
      webhook: coupons
      body:
        customer_id: \"{{ customer.id }}\"
      save_as: coupon
  - id: tell
    send: sms
    template: w/coupon
    priority: transactional
";

fn config(recv: &str, sms_path: &str) -> String {
    format!(
        "channels:
  sms:
    type: webhook
    url: {recv}/{sms_path}
    secret_env: HOOK_SECRET
    timeout: 2s
    retry: {{ max_attempts: 4, base: 50ms, max: 200ms }}
  coupons:
    type: webhook
    url: {recv}/coupons
    secret_env: HOOK_SECRET
"
    )
}

fn start(recv: &str, sms_path: &str) -> Daemon {
    let d = Daemon::start_with(&config(recv, sms_path), &[("HOOK_SECRET", SECRET)]);
    std::fs::write(d.flows.join("coupon.yaml"), COUPON_FLOW).unwrap();
    std::fs::write(
        d.flows.join("templates/w/coupon.txt"),
        "Your coupon: {{ vars.coupon.code }}\n",
    )
    .unwrap();
    d
}

async fn enrol(d: &Daemon, customer: &str, event: &str) {
    let b = &d.base;
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/{customer}"),
        Some(WRITE),
        Some(json!({"attributes":{"first_name":"Ada","phone":"+8613800000001"}})),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_signed_with_idempotency_keys_and_stores_call_responses() {
    let (recv, state) = receiver().await;
    let d = start(&recv, "ok");
    // The coupon flow was added after start: hot reload publishes it.
    until(&format!("{}/v1/flows", d.base), |f| {
        f["flows"].as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    enrol(&d, "c1", "signed_up").await;
    let j = until(&format!("{}/v1/customers/c1/journeys", d.base), |j| {
        j["journeys"][0]["deliveries"][0]["status"] == json!("sent")
    })
    .await;
    let delivery = &j["journeys"][0]["deliveries"][0];
    assert_eq!(delivery["attempts"], json!(1));
    let key = delivery["key"].as_str().unwrap().to_owned();
    {
        let r = state.lock().unwrap();
        let (path, got_key, body) = &r.requests[0];
        assert_eq!(path, "ok");
        assert_eq!(got_key, &key);
        assert_eq!(body["key"], json!(key));
        assert_eq!(body["address"], json!("+8613800000001"));
        assert_eq!(body["content"]["text"], json!("Welcome, Ada!"));
    }

    // The call: its JSON response is stored and used by the next send.
    enrol(&d, "c2", "asked").await;
    let j = until(&format!("{}/v1/customers/c2/journeys", d.base), |j| {
        j["journeys"][0]["status"] == json!("ended")
            && j["journeys"][0]["deliveries"][1]["status"] == json!("sent")
    })
    .await;
    let deliveries = j["journeys"][0]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries[0]["kind"], json!("call"));
    let r = state.lock().unwrap();
    let coupon_call = r.requests.iter().find(|(p, _, _)| p == "coupons").unwrap();
    assert_eq!(coupon_call.2, json!({"customer_id": "c2"}));
    let told = r
        .requests
        .iter()
        .find(|(p, k, _)| p == "ok" && k.ends_with("/tell"))
        .unwrap();
    assert_eq!(told.2["content"]["text"], json!("Your coupon: C-2026"));
    drop(r);
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_then_sends_and_dead_letters_4xx() {
    let (recv, state) = receiver().await;
    let d = start(&recv, "flaky");
    enrol(&d, "c1", "signed_up").await;
    let j = until(&format!("{}/v1/customers/c1/journeys", d.base), |j| {
        j["journeys"][0]["deliveries"][0]["status"] == json!("sent")
    })
    .await;
    assert_eq!(
        j["journeys"][0]["deliveries"][0]["attempts"],
        json!(3),
        "{j}"
    );
    {
        let r = state.lock().unwrap();
        let keys: Vec<&String> = r.requests.iter().map(|(_, k, _)| k).collect();
        assert_eq!(keys.len(), 3);
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "the same key on every attempt: {keys:?}"
        );
    }
    assert!(d.terminate().success());

    let (recv, _state) = receiver().await;
    let d = start(&recv, "bad");
    enrol(&d, "c1", "signed_up").await;
    let j = until(&format!("{}/v1/customers/c1/journeys", d.base), |j| {
        j["journeys"][0]["deliveries"][0]["status"] == json!("dead")
    })
    .await;
    let delivery = &j["journeys"][0]["deliveries"][0];
    assert_eq!(
        delivery["attempts"],
        json!(1),
        "a 4xx is not retried: {delivery}"
    );
    let reason = delivery["last_error"].as_str().unwrap();
    assert!(
        reason.contains("422") && reason.contains("no such phone number"),
        "{reason}"
    );
    let text = common::client()
        .get(format!("{}/metrics", d.base))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("canvas_sends_total{channel=\"sms\",status=\"dead\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("canvas_outbox_depth{status=\"dead\"} 1"),
        "{text}"
    );
    assert!(d.terminate().success());
}

#[test]
fn refuses_to_start_without_the_channels_flows_use() {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(flows.join("templates/w")).unwrap();
    std::fs::write(flows.join("welcome.yaml"), common::FLOW).unwrap();
    std::fs::write(flows.join("templates/w/hello.txt"), "Hi\n").unwrap();
    std::fs::write(flows.join("templates/w/thanks.txt"), "Thanks\n").unwrap();
    std::fs::write(flows.join("canvas.yaml"), "timezone: UTC\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(&flows)
        .arg("--database")
        .arg(format!("sqlite://{}", dir.path().join("x.db").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the flows send on `sms`"), "{err}");
    assert!(err.contains("docs/channels.md"), "{err}");
}
