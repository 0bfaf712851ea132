//! The daemon runs out of the box: the repository's own `flows/` and root `canvas.yaml`
//! (every channel a `sandbox`) start `canvas serve`, an event enters a shipped flow, and the
//! message it sends is in `GET /v1/sandbox` and in the journeys API as `sent` — on SQLite
//! and on Postgres.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Daemon, FreshDb, READ, WRITE, call, pg_base, until};
use serde_json::{Value, json};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The shipped `flows/` and root `canvas.yaml`, as a checkout has them, in a temp dir.
fn shipped(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let flows = dir.join("flows");
    copy_dir(&root.join("flows"), &flows);
    std::fs::copy(root.join("canvas.yaml"), dir.join("canvas.yaml")).unwrap();
    flows
}

/// A fixed-offset zone where it is now about 15:00: inside `new-member-welcome`'s
/// 10:00–20:00 window and outside the shipped 21:00–09:00 quiet hours, whenever the test
/// runs. (`Etc/GMT+4` is UTC−4: the sign is POSIX's.)
fn afternoon_zone() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = i64::try_from((secs / 3600) % 24).unwrap();
    let offset = (15 - hour + 12).rem_euclid(24) - 12;
    match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

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
