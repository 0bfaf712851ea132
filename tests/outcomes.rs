//! Outcome counters through the daemon, on SQLite and Postgres: a scripted load through a
//! flow with a trigger condition, a split with a holdout, a fallback send, a wait, a cap and
//! a goal; then `GET /v1/flows/{id}/stats` must agree with the load's arithmetic, with the
//! runs the journeys API counts, with the counters recomputed from the database
//! (`stats::audit`) and with `/metrics`; bad ranges and versions get clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use canvas_engine::store::Database;
use common::{Daemon, FreshDb, READ, WRITE, call, error_code, pg_base, until};
use serde_json::{Value, json};

const FLOW: &str = "flow: outcomes-demo
name: 成效演示 Outcomes demo
timezone: UTC
trigger:
  event: joined
  where: event.data.ok == true
goal:
  event: purchased
  within: 7d
steps:
  - id: ab
    split: { hello: 40%, hello-b: 40%, control: 20% }
  - id: hello
    send: [wechat, sms]
    template: o/hello
    next: linger
  - id: hello-b
    send: sms
    template: o/hello
    next: linger
  - id: linger
    wait: { event: purchased, timeout: 1d }
  - id: thanks
    send: sms
    template: o/thanks
";

/// Customers joining; `ok: false` for the last ten (the trigger's `where` refuses them).
const CUSTOMERS: usize = 60;
const REFUSED: usize = 10;

fn write_flows(dir: &Path) -> PathBuf {
    let flows = dir.join("flows");
    std::fs::create_dir_all(flows.join("templates/o")).unwrap();
    std::fs::write(flows.join("outcomes-demo.yaml"), FLOW).unwrap();
    std::fs::write(
        flows.join("templates/o/hello.txt"),
        "你好 {{ customer.first_name }}\n",
    )
    .unwrap();
    std::fs::write(flows.join("templates/o/thanks.txt"), "Thanks!\n").unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        "timezone: UTC
quiet_hours: off
caps:
  - { channel: sms, max: 1, per: 1d }
channels:
  sms: { type: sandbox }
  wechat: { type: sandbox }
",
    )
    .unwrap();
    flows
}

fn has_phone(i: usize) -> bool {
    i % 5 != 4
}

fn has_wechat(i: usize) -> bool {
    i.is_multiple_of(2)
}

fn buys(i: usize) -> bool {
    i.is_multiple_of(3)
}

async fn get(url: &str) -> Value {
    let (s, body) = call(reqwest::Method::GET, url, Some(READ), None).await;
    assert_eq!(s, 200, "{url}: {body}");
    body
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn step<'a>(stats: &'a Value, id: &str) -> &'a Value {
    stats["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == id)
        .map_or(&Value::Null, |s| &s["counts"])
}

async fn load_and_check(daemon: &Daemon, database: &str) {
    let base = &daemon.base;
    for i in 0..CUSTOMERS {
        let mut attributes = json!({ "first_name": format!("客{i}") });
        if has_phone(i) {
            attributes["phone"] = json!(format!("+86138{i:08}"));
        }
        if has_wechat(i) {
            attributes["wechat_id"] = json!(format!("wx-{i}"));
        }
        let (s, body) = call(
            reqwest::Method::PUT,
            &format!("{base}/v1/customers/c{i}"),
            Some(WRITE),
            Some(json!({ "attributes": attributes })),
        )
        .await;
        assert_eq!(s, 202, "{body}");
    }
    let joined: Vec<Value> = (0..CUSTOMERS)
        .map(|i| {
            json!({ "id": format!("j{i}"), "customer_id": format!("c{i}"), "name": "joined",
                    "data": { "ok": i < CUSTOMERS - REFUSED } })
        })
        .collect();
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": joined })),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let stats_url = format!("{base}/v1/flows/outcomes-demo/stats");
    let entered = (CUSTOMERS - REFUSED) as u64;
    until(&stats_url, |b| n(&b["totals"]["entered"]) == entered).await;

    let buyers: Vec<usize> = (0..CUSTOMERS - REFUSED).filter(|i| buys(*i)).collect();
    let purchases: Vec<Value> = buyers
        .iter()
        .map(|i| json!({ "id": format!("p{i}"), "customer_id": format!("c{i}"), "name": "purchased" }))
        .collect();
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": purchases })),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let stats = until(&stats_url, |b| {
        n(&b["totals"]["converted"]) == buyers.len() as u64
    })
    .await;

    // The load's arithmetic.
    let totals = &stats["totals"];
    assert_eq!(n(&totals["refused:where"]), REFUSED as u64, "{stats}");
    let ab = step(&stats, "ab");
    let arms = ["hello", "hello-b", "control"].map(|a| n(&ab[format!("to:{a}")]));
    assert_eq!(
        arms.iter().sum::<u64>(),
        entered,
        "every entry took one arm: {ab}"
    );
    assert!(
        arms.iter().all(|a| *a > 0),
        "40/40/20 of 50 leaves no arm empty: {ab}"
    );
    assert_eq!(n(&totals["ended:control"]), arms[2]);
    assert_eq!(n(&step(&stats, "hello")["entered"]), arms[0]);
    assert_eq!(n(&step(&stats, "hello-b")["entered"]), arms[1]);
    let hello = step(&stats, "hello");
    assert_eq!(
        n(&hello["sent:wechat"]) + n(&hello["sent:sms"]) + n(&hello["skipped:no_address"]),
        arms[0],
        "{hello}"
    );
    let hello_b = step(&stats, "hello-b");
    assert_eq!(
        n(&hello_b["sent:sms"]) + n(&hello_b["skipped:no_address"]),
        arms[1]
    );
    // The holdout converts too (that is what it is for): every buyer converted once.
    let converted_by_arm: u64 = ["hello", "hello-b", "control"]
        .iter()
        .map(|a| n(&ab[format!("converted:{a}")]))
        .sum();
    assert_eq!(converted_by_arm, buyers.len() as u64, "{ab}");
    assert_eq!(
        n(&totals["converted:treated"]) + n(&totals["converted:control"]),
        buyers.len() as u64
    );
    // Treated buyers left `linger` for `thanks`; the others still wait there.
    let linger = step(&stats, "linger");
    let treated = arms[0] + arms[1];
    let treated_buyers = n(&totals["converted:treated"]);
    assert_eq!(n(&step(&stats, "thanks")["entered"]), treated_buyers);
    assert_eq!(n(&linger["to:thanks"]), treated_buyers);
    assert_eq!(n(&linger["waiting"]), treated - treated_buyers, "{linger}");
    // `thanks` is an SMS: capped for whoever had one today already, sent to the others.
    let thanks = step(&stats, "thanks");
    assert_eq!(
        n(&thanks["sent:sms"]) + n(&thanks["skipped:cap"]) + n(&thanks["skipped:no_address"]),
        treated_buyers,
        "{thanks}"
    );
    assert!(
        n(&thanks["skipped:cap"]) > 0,
        "some buyers had their SMS today: {thanks}"
    );
    // Edges: shares of the runs that arrived.
    let edge = stats["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["from"] == "linger" && e["to"] == "thanks")
        .unwrap();
    assert_eq!(n(&edge["n"]), treated_buyers);
    let share = edge["share"].as_f64().unwrap();
    assert!(
        (share - treated_buyers as f64 / treated as f64).abs() < 1e-9,
        "{edge}"
    );
    // The split with its lift against the holdout.
    let split = &stats["splits"][0];
    assert_eq!(split["step"], "ab");
    let hello_arm = split["arms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["arm"] == "hello")
        .unwrap();
    assert_eq!(n(&hello_arm["entered"]), arms[0]);
    let lift = &hello_arm["lift"];
    assert!(lift["low"].as_f64().unwrap() <= lift["difference"].as_f64().unwrap());
    assert!(lift["difference"].as_f64().unwrap() <= lift["high"].as_f64().unwrap());

    // The same as what the runs say (`GET /v1/flows/{id}` counts them from the runs table).
    let flow = get(&format!("{base}/v1/flows/outcomes-demo")).await;
    let waiting_runs = flow["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "linger")
        .unwrap()["waiting"]
        .clone();
    assert_eq!(n(&waiting_runs), n(&linger["waiting"]));
    assert_eq!(stats["versions"][0]["version"], flow["version"]);
    assert_eq!(n(&stats["versions"][0]["waiting"]), n(&linger["waiting"]));

    // Every counter equals what the database's runs, history and conversions say.
    let db = Database::open_existing(database, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let wrong = canvas_engine::stats::audit(&db, "outcomes-demo")
        .await
        .unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");

    // One version asked for: the same (it is the only one); a day without traffic: nothing
    // counted, the gauge as it is.
    let version = flow["version"].as_str().unwrap();
    let one = get(&format!("{stats_url}?version={version}")).await;
    assert_eq!(one["totals"], stats["totals"]);
    let empty = get(&format!("{stats_url}?from=2020-01-01&to=2020-01-31")).await;
    assert_eq!(empty["totals"], json!({}));
    assert_eq!(n(&step(&empty, "linger")["waiting"]), n(&linger["waiting"]));
    assert_eq!(empty["from"], "2020-01-01");

    // `/metrics`: this daemon's counters and the database's gauge.
    let (s, metrics) = call(
        reqwest::Method::GET,
        &format!("{base}/metrics"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let text = metrics.as_str().unwrap();
    let line = format!(
        "canvas_step_outcomes_total{{flow=\"outcomes-demo\",step=\"\",outcome=\"entered\"}} {entered}"
    );
    assert!(text.contains(&line), "{line} not in:\n{text}");
    let line = format!(
        "canvas_step_waiting{{flow=\"outcomes-demo\",step=\"linger\"}} {}",
        n(&linger["waiting"])
    );
    assert!(text.contains(&line), "{line} not in:\n{text}");
    assert!(
        !text.contains("outcome=\"to:"),
        "edges stay out of /metrics"
    );

    // Bad requests say what is wrong.
    for (query, status) in [
        ("from=yesterday", 400),
        ("from=2026-02-01&to=2026-01-01", 400),
        ("from=2020-01-01&to=2026-01-01", 400),
        ("colour=red", 400),
        ("version=nope", 404),
    ] {
        let (s, body) = call(
            reqwest::Method::GET,
            &format!("{stats_url}?{query}"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(s, status, "{query}: {body}");
        assert!(body["error"]["message"].is_string(), "{query}: {body}");
    }
    let (s, body) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/nope/stats"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!((s, error_code(&body)), (404, "not_found"), "{body}");
    let (s, _) = call(reqwest::Method::GET, &stats_url, None, None).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn outcome_counters_match_the_load_and_the_database_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let flows = write_flows(dir.path());
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let daemon = Daemon::spawn(flows, &database, &[], None);
    load_and_check(&daemon, &database).await;
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn outcome_counters_match_the_load_and_the_database_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_outcomes").await;
    let dir = tempfile::tempdir().unwrap();
    let flows = write_flows(dir.path());
    let daemon = Daemon::spawn(flows, &db.url, &[], None);
    load_and_check(&daemon, &db.url).await;
    assert!(daemon.terminate().success());
    db.drop_it().await;
}
