//! The daemon runs out of the box: the repository's own `flows/` and root `canvas.yaml`
//! (every channel a `sandbox`) start `canvas serve`, an event enters a shipped flow, and the
//! message it sends is in `GET /v1/sandbox` and in the journeys API as `sent` — on SQLite
//! and on Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Daemon, FreshDb, READ, WRITE, afternoon_zone, call, pg_base, shipped, until};
use serde_json::{Value, json};

async fn welcome_lands_in_the_sandbox(daemon: &Daemon) {
    let base = &daemon.base;
    let (s, body) = call(
        reqwest::Method::PUT,
        &format!("{base}/v1/customers/m1"),
        Some(WRITE),
        Some(json!({
            "attributes": { "first_name": "Ada", "phone": "+8613800000001" },
            "timezone": afternoon_zone(),
        })),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": [
            { "id": "e1", "customer_id": "m1", "name": "member_registered", "data": {} }
        ] })),
    )
    .await;
    assert_eq!(s, 200, "{body}");

    // The coupon call is answered by the sandbox, the window is open: the welcome goes out
    // on sms (the customer has no wechat_id), kept in the database.
    let inbox = until(&format!("{base}/v1/sandbox?customer_id=m1"), |b| {
        b["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["step"] == "welcome"))
    })
    .await;
    let messages = inbox["messages"].as_array().unwrap();
    let welcome = messages.iter().find(|m| m["step"] == "welcome").unwrap();
    assert_eq!(welcome["flow"], "new-member-welcome");
    assert_eq!(welcome["customer_id"], "m1");
    assert_eq!(welcome["channel"], "sms", "{welcome}");
    assert_eq!(welcome["address"], "+8613800000001");
    assert_eq!(welcome["template"], "welcome/hello");
    assert_eq!(welcome["key"], "new-member-welcome/m1/1/welcome");
    assert!(welcome["sent_at"].is_string(), "{welcome}");
    let text = welcome["content"]["text"].as_str().unwrap();
    assert!(text.contains("Welcome!"), "{text}");
    // The voucher call went through the sandbox too, newest first: after the welcome.
    let call_at = messages
        .iter()
        .position(|m| m["step"] == "issue-vouchers")
        .expect("the coupon call is listed");
    let welcome_at = messages
        .iter()
        .position(|m| m["step"] == "welcome")
        .unwrap();
    assert!(welcome_at < call_at, "{inbox}");
    assert_eq!(messages[call_at]["channel"], "coupon-service");
    assert_eq!(messages[call_at]["kind"], "call");
    assert!(
        inbox["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "wechat")
    );

    // Filters narrow; an unknown customer or channel finds nothing.
    let (s, only_sms) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/sandbox?channel=sms&limit=10"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        only_sms["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["channel"] == "sms")
    );
    let (_, nobody) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/sandbox?customer_id=nobody"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(nobody["messages"], json!([]));
    // A bad query is a JSON 400; no token, 401.
    for bad in ["limit=0", "limit=1001", "limit=x", "flow=x"] {
        let (s, body) = call(
            reqwest::Method::GET,
            &format!("{base}/v1/sandbox?{bad}"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert_eq!(common::error_code(&body), "bad_request", "{bad}: {body}");
    }
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/sandbox"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 401);

    // The journeys API shows the same delivery as sent.
    let (s, journeys) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/customers/m1/journeys"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200, "{journeys}");
    let delivery = journeys["journeys"][0]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"] == "new-member-welcome/m1/1/welcome")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(delivery["status"], "sent", "{journeys}");
    assert_eq!(delivery["channel"], "sms");
}

#[tokio::test]
async fn shipped_flows_run_on_sandbox_channels_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let daemon = Daemon::spawn(flows, &database, &[], None);
    welcome_lands_in_the_sandbox(&daemon).await;
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn shipped_flows_run_on_sandbox_channels_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_sandbox").await;
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let daemon = Daemon::spawn(flows, &db.url, &[], None);
    welcome_lands_in_the_sandbox(&daemon).await;
    assert!(daemon.terminate().success());
    db.drop_it().await;
}
