//! `canvas explain CUSTOMER --step S`: the customer's story from the database and a plain
//! answer — sent when, not sent why, never entered why — in the customer's time zone, on a
//! SQLite file and on Postgres. Issue 11's "why did this customer (not) get the message?".

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{FreshDb, pg_base};

const FLOW: &str = "flow: welcome
name: Welcome
timezone: UTC
trigger:
  event: signed_up
  where: customer.age > 17
steps:
  - id: hello
    send: sms
    template: w/hello
  - id: wait-order
    wait: { event: order_paid, timeout: 7d }
";

/// A second flow's SMS, two hours after the welcome: the daily SMS cap has no room.
const PROMO: &str = "flow: promo
name: Promo
timezone: UTC
trigger:
  event: promo_due
steps:
  - id: offer
    send: sms
    template: p/offer
";

const EVENTS: &str = r#"{"kind":"profile","customer_id":"c1","set":{"age":30,"phone":"+8613800000001"},"at":"2026-03-02T10:00:00Z"}
{"kind":"profile","customer_id":"c2","set":{"age":30},"at":"2026-03-02T10:00:00Z"}
{"kind":"profile","customer_id":"c3","set":{"first_name":"Zed"},"at":"2026-03-02T10:00:00Z"}
{"kind":"event","id":"e1","customer_id":"c1","name":"signed_up","occurred_at":"2026-03-02T10:01:00Z"}
{"kind":"event","id":"e2","customer_id":"c2","name":"signed_up","occurred_at":"2026-03-02T10:01:00Z"}
{"kind":"event","id":"e3","customer_id":"c3","name":"signed_up","occurred_at":"2026-03-02T10:01:00Z"}
"#;

const LATER: &str = r#"{"kind":"event","id":"e4","customer_id":"c1","name":"promo_due","occurred_at":"2026-03-02T12:04:00Z"}
"#;

fn canvas(dir: &Path, database: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .args(["--flows", "flows", "--database", database])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn explains_sent_not_sent_and_never_entered(database: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(flows.join("templates/w")).unwrap();
    std::fs::write(flows.join("welcome.yaml"), FLOW).unwrap();
    std::fs::write(flows.join("promo.yaml"), PROMO).unwrap();
    std::fs::create_dir_all(flows.join("templates/p")).unwrap();
    std::fs::write(flows.join("templates/p/offer.txt"), "20% off today\n").unwrap();
    std::fs::write(
        flows.join("templates/w/hello.txt"),
        "Hi {{ customer.first_name | default(\"there\") }}\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        "timezone: Asia/Shanghai\nquiet_hours: off\ncaps:\n  - { channel: sms, max: 1, per: 1d }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("events.jsonl"), EVENTS).unwrap();
    let out = canvas(dir.path(), database, &["ingest", "events.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = canvas(
        dir.path(),
        database,
        &["run", "--at", "2026-03-02T10:05:00Z"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // Sent, in the customer's (here canvas.yaml's) zone, with the delivery's state.
    let out = canvas(dir.path(), database, &["explain", "c1", "--step", "hello"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("2026-03-02 18:05 +08:00  hello                    sent      sms w/hello to +8613800000001"), "{t}");
    assert!(
        t.ends_with("step `hello`: sent 2026-03-02 18:05 +08:00 on sms; not delivered yet\n"),
        "{t}"
    );
    // Not sent, and why.
    let out = canvas(
        dir.path(),
        database,
        &["explain", "c2", "--template", "w/hello"],
    );
    let t = text(&out);
    assert!(
        t.contains("template `w/hello`: not sent (2026-03-02 18:05 +08:00): no address for sms"),
        "{t}"
    );
    // Never entered, and why.
    let out = canvas(
        dir.path(),
        database,
        &["explain", "c3", "--step", "hello", "--format", "json"],
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let answer = v["answer"].as_str().unwrap();
    assert!(
        answer.starts_with("step `hello`: never entered welcome: trigger `where` failed:")
            && answer.contains("there is no `age`"),
        "{v}"
    );
    assert_eq!(v["timezone"], serde_json::json!("Asia/Shanghai"));
    assert_eq!(v["runs"], serde_json::json!([]));
    // Capped: the answer names the message that filled the cap, from the other flow.
    std::fs::write(dir.path().join("later.jsonl"), LATER).unwrap();
    let out = canvas(dir.path(), database, &["ingest", "later.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = canvas(
        dir.path(),
        database,
        &["run", "--at", "2026-03-02T12:05:00Z"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = canvas(dir.path(), database, &["explain", "c1", "--step", "offer"]);
    let t = text(&out);
    assert!(
        t.ends_with(
            "step `offer`: not sent (2026-03-02 20:05 +08:00): frequency cap: at most 1 marketing message on sms per 1d (sent `welcome/c1/1/hello` 2 h earlier)\n"
        ),
        "{t}"
    );
    // A customer the database has never seen.
    let out = canvas(dir.path(), database, &["explain", "c9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no customer `c9`"));
}

#[test]
fn explain_answers_sent_not_sent_and_never_entered_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("canvas.db").display());
    explains_sent_not_sent_and_never_entered(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_answers_sent_not_sent_and_never_entered_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_explain").await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || explains_sent_not_sent_and_never_entered(&url))
        .await
        .unwrap();
    db.drop_it().await;
}
