//! Dead letters can be seen and sent again: `GET /v1/deadletters` (filtered by flow,
//! channel, reason), `POST /v1/deadletters/{key}/retry` under the same idempotency key, and
//! `canvas deadletters list|retry` on the daemon's database — on SQLite and on Postgres.
//! The journeys API shows a run's `vars` and the rendered text of each message.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Daemon, FreshDb, READ, WRITE, call, pg_base, until};
use serde_json::{Value, json};

#[derive(Default)]
struct Gateway {
    /// Answer 422 (a permanent failure) while set.
    reject: AtomicBool,
    /// (idempotency key, body) of every request, in arrival order.
    seen: Mutex<Vec<(String, Value)>>,
}

async fn sms(State(g): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    g.seen.lock().unwrap().push((key, body));
    if g.reject.load(Ordering::SeqCst) {
        (StatusCode::UNPROCESSABLE_ENTITY, "no such phone number")
    } else {
        (StatusCode::OK, "{}")
    }
}

async fn gateway() -> (String, Arc<Gateway>) {
    let g = Arc::new(Gateway::default());
    g.reject.store(true, Ordering::SeqCst);
    let app = Router::new().route("/sms", post(sms)).with_state(g.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/sms"), g)
}

/// A message's text, without the template file's trailing newline.
fn text_of(content: &Value) -> &str {
    content["text"].as_str().unwrap_or_default().trim_end()
}

fn canvas(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .output()
        .unwrap()
}

async fn dead_letters_are_listed_and_sent_again(database: &str, dir: &std::path::Path) {
    let (url, gw) = gateway().await;
    let flows = dir.join("flows");
    common::write_flows(
        &flows,
        &format!(
            "channels:\n  sms:\n    type: webhook\n    url: {url}\n    timeout: 2s\n    retry: {{ max_attempts: 2, base: 50ms, max: 100ms }}\n"
        ),
    );
    let d = Daemon::spawn(flows, database, &[], None);
    let b = d.base.clone();
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/c1"),
        Some(WRITE),
        Some(json!({"attributes":{"first_name":"Ada","phone":"+8613800000001"}})),
    )
    .await;
    assert_eq!(s, 202);
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{b}/v1/events"),
        Some(WRITE),
        Some(json!({"events":[{"id":"e1","customer_id":"c1","name":"signed_up"}]})),
    )
    .await;
    assert_eq!(s, 200, "{body}");

    // The 422 makes a dead letter, with what it said and why it died.
    let list = until(&format!("{b}/v1/deadletters"), |l| {
        l["deadletters"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let letter = &list["deadletters"][0];
    let key = letter["key"].as_str().unwrap().to_owned();
    assert!(
        key.starts_with("welcome/c1/") && key.ends_with("/hello"),
        "{list}"
    );
    assert_eq!(letter["channel"], json!("sms"));
    assert_eq!(letter["content"]["text"], json!("Welcome, Ada!"), "{list}");
    assert!(
        letter["last_error"].as_str().unwrap().contains("422"),
        "{list}"
    );
    assert!(letter["dead_at"].is_string(), "{list}");
    for (query, n) in [
        ("flow=welcome", 1),
        ("flow=other", 0),
        ("channel=sms", 1),
        ("channel=email", 0),
        ("reason=NO%20SUCH%20PHONE", 1),
        ("reason=timeout", 0),
        ("flow=welcome&channel=sms&reason=422&limit=1", 1),
    ] {
        let (s, body) = call(
            reqwest::Method::GET,
            &format!("{b}/v1/deadletters?{query}"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(s, 200, "{query}: {body}");
        assert_eq!(
            body["deadletters"].as_array().unwrap().len(),
            n,
            "{query}: {body}"
        );
    }
    for bad in ["limit=0", "limit=x", "colour=red"] {
        let (s, body) = call(
            reqwest::Method::GET,
            &format!("{b}/v1/deadletters?{bad}"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(
            (s, common::error_code(&body)),
            (400, "bad_request"),
            "{bad}: {body}"
        );
    }

    // The journey shows what the customer was sent and the run's vars.
    let (_, j) = call(
        reqwest::Method::GET,
        &format!("{b}/v1/customers/c1/journeys"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(j["journeys"][0]["vars"], json!({}), "{j}");
    assert_eq!(
        text_of(&j["journeys"][0]["deliveries"][0]["content"]),
        "Welcome, Ada!",
        "{j}"
    );

    // Sent again, under the same key; the read token may not.
    let retry = format!("{b}/v1/deadletters/{key}/retry");
    let (s, _) = call(reqwest::Method::POST, &retry, Some(READ), None).await;
    assert_eq!(s, 403);
    gw.reject.store(false, Ordering::SeqCst);
    let (s, body) = call(reqwest::Method::POST, &retry, Some(WRITE), None).await;
    assert_eq!((s, &body["status"]), (200, &json!("pending")), "{body}");
    until(&format!("{b}/v1/customers/c1/journeys"), |j| {
        j["journeys"][0]["deliveries"][0]["status"] == json!("sent")
    })
    .await;
    let keys: Vec<String> = gw
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        keys.len(),
        2,
        "a 422 is not retried; then the operator's retry: {keys:?}"
    );
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one idempotency key: {keys:?}"
    );
    let (s, body) = call(reqwest::Method::POST, &retry, Some(WRITE), None).await;
    assert_eq!(
        (s, common::error_code(&body)),
        (409, "conflict"),
        "a sent row: {body}"
    );
    let encoded = format!("{b}/v1/deadletters/{}/retry", key.replace('/', "%2F"));
    let (s, _) = call(reqwest::Method::POST, &encoded, Some(WRITE), None).await;
    assert_eq!(s, 409, "an encoded key names the same row");
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{b}/v1/deadletters/nope/c9/0/x/retry"),
        Some(WRITE),
        None,
    )
    .await;
    assert_eq!((s, common::error_code(&body)), (404, "not_found"), "{body}");
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{b}/v1/deadletters"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200);

    // The CLI, on the same database: a second customer's message dies, and is sent again.
    gw.reject.store(true, Ordering::SeqCst);
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/c2"),
        Some(WRITE),
        Some(json!({"attributes":{"phone":"+8613800000002"}})),
    )
    .await;
    assert_eq!(s, 202);
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{b}/v1/events"),
        Some(WRITE),
        Some(json!({"events":[{"id":"e2","customer_id":"c2","name":"signed_up"}]})),
    )
    .await;
    assert_eq!(s, 200);
    let list = until(&format!("{b}/v1/deadletters?flow=welcome"), |l| {
        l["deadletters"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let second = list["deadletters"][0]["key"].as_str().unwrap().to_owned();
    let out = canvas(&[
        "deadletters",
        "list",
        "--database",
        database,
        "--channel",
        "sms",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{second}  sms to")) && text.contains("422"),
        "{text}"
    );
    let out = canvas(&["deadletters", "retry", &key, "--database", database]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a sent row is not a dead letter"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is sent, not a dead letter"));
    gw.reject.store(false, Ordering::SeqCst);
    let out = canvas(&["deadletters", "retry", &second, "--database", database]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until(&format!("{b}/v1/customers/c2/journeys"), |j| {
        j["journeys"][0]["deliveries"][0]["status"] == json!("sent")
    })
    .await;
    assert!(d.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_sent_again_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("canvas.db").display());
    dead_letters_are_listed_and_sent_again(&db, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_sent_again_on_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_deadletters").await;
    let dir = tempfile::tempdir().unwrap();
    dead_letters_are_listed_and_sent_again(&db.url, dir.path()).await;
    db.drop_it().await;
}
