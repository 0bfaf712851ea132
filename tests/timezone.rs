//! A profile has one time zone: the `timezone` attribute (`set: { timezone: … }`) and the
//! separate `timezone` field are the same thing, in the API, Segment `identify`, `canvas
//! ingest` and test files; an invalid name is refused with a clear error.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Daemon, FreshDb, Peek, WRITE, call, error_code, pg_base};
use serde_json::json;

const WRITE_KEY: &str = "tz-write-key-1";

/// The welcome flow as a marketing flow (quiet hours apply), in a project whose default zone
/// is UTC with quiet hours 21:00-09:00.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    common::write_flows(&flows, common::SINK_SMS);
    let flow = flows.join("welcome.yaml");
    let text = std::fs::read_to_string(&flow)
        .unwrap()
        .replace("    priority: transactional\n", "");
    std::fs::write(&flow, text).unwrap();
    let config = flows.join("canvas.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "quiet_hours: off\n",
        "quiet_hours: { between: \"21:00-09:00\" }\n",
    );
    std::fs::write(&config, text).unwrap();
    dir
}

fn canvas(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("CANVAS_DATABASE_URL")
        .output()
        .unwrap()
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A sign-up at 06:00 UTC is 22:00 in Los Angeles: quiet for a Los Angeles customer (the
/// greeting waits for 09:00 PST, 17:00 UTC), not for one in the default zone.
const TEST: &str = "flow: welcome
start: 2026-03-02T00:00:00Z
run_until: 2026-03-03T00:00:00Z
customers:
  - id: attribute
    attributes: { phone: \"+1\", first_name: Ann, timezone: America/Los_Angeles }
  - id: field
    timezone: America/Los_Angeles
    attributes: { phone: \"+2\", first_name: Bo }
  - id: moved
    attributes: { phone: \"+3\", first_name: Cy }
profiles:
  - { at: 2026-03-02T01:00:00Z, customer: moved, set: { timezone: America/Los_Angeles } }
events:
  - { at: 2026-03-02T06:00:00Z, customer: attribute, name: signed_up }
  - { at: 2026-03-02T06:00:00Z, customer: field, name: signed_up }
  - { at: 2026-03-02T06:00:00Z, customer: moved, name: signed_up }
expect:
  - customer: attribute
    sent: [{ at: 2026-03-02T09:00-08:00, channel: sms, template: w/hello }]
  - customer: field
    sent: [{ at: 2026-03-02T09:00-08:00, channel: sms, template: w/hello }]
  - customer: moved
    sent: [{ at: 2026-03-02T09:00-08:00, channel: sms, template: w/hello }]
";

#[test]
fn set_timezone_in_a_test_file_was_ignored_and_quiet_hours_ran_in_the_default_zone() {
    let dir = project();
    let file = dir.path().join("flows/welcome.test.yaml");
    std::fs::write(&file, TEST).unwrap();
    let out = canvas(dir.path(), &["test", "flows"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));

    // A name that is no zone, in either spelling: the test file is refused, saying why.
    for (bad, needle) in [
        (
            TEST.replace(
                "timezone: America/Los_Angeles }\n  - id: field",
                "timezone: America/Los_Angles }\n  - id: field",
            ),
            "customer `attribute`: `timezone`: `America/Los_Angles` is not an IANA time zone",
        ),
        (
            TEST.replace(
                "set: { timezone: America/Los_Angeles }",
                "set: { timezone: Mars/Olympus }",
            ),
            "profile update of `moved`: `timezone`: `Mars/Olympus` is not an IANA time zone",
        ),
        (
            TEST.replace(
                "    timezone: America/Los_Angeles\n    attributes: { phone: \"+2\", first_name: Bo }",
                "    timezone: America/Los_Angeles\n    attributes: { phone: \"+2\", first_name: Bo, timezone: Europe/Paris }",
            ),
            "a customer has one time zone; give it once",
        ),
    ] {
        assert_ne!(bad, TEST, "the replacement applies");
        std::fs::write(&file, &bad).unwrap();
        let out = canvas(dir.path(), &["test", "flows"]);
        assert_eq!(out.status.code(), Some(2), "{}", said(&out));
        assert!(said(&out).contains(needle), "{}", said(&out));
    }
}

/// `canvas ingest` + `canvas run` on `url`: the zone from `set: { timezone }` holds the
/// greeting to 09:00 in Los Angeles; an invalid one is refused with its line.
fn ingest_sets_the_one_zone(url: &str) {
    let dir = project();
    let inbox = dir.path().join("inbox.jsonl");
    std::fs::write(
        &inbox,
        "{\"kind\":\"profile\",\"customer_id\":\"c1\",\"set\":{\"phone\":\"+1\",\"timezone\":\"America/Los_Angeles\"},\"at\":\"2026-03-02T05:00:00Z\"}\n\
         {\"kind\":\"event\",\"id\":\"e1\",\"customer_id\":\"c1\",\"name\":\"signed_up\",\"occurred_at\":\"2026-03-02T06:00:00Z\"}\n",
    )
    .unwrap();
    let db = ["--database", url];
    let ok = |args: &[&str]| {
        let out = canvas(dir.path(), &[args, &db].concat());
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", said(&out));
        said(&out)
    };
    ok(&["ingest", "inbox.jsonl"]);
    let early = ok(&["run", "--at", "2026-03-02T06:00:00Z"]);
    assert!(
        early.contains("0 outbox rows"),
        "greeted at 22:00 in Los Angeles: {early}"
    );
    let morning = ok(&["run", "--at", "2026-03-02T17:00:00Z"]);
    assert!(
        morning.contains("1 outbox rows"),
        "not greeted at 09:00 in Los Angeles: {morning}"
    );

    std::fs::write(
        &inbox,
        "{\"kind\":\"event\",\"id\":\"e2\",\"customer_id\":\"c2\",\"name\":\"signed_up\",\"occurred_at\":\"2026-03-02T06:00:00Z\"}\n\
         {\"kind\":\"profile\",\"customer_id\":\"c2\",\"set\":{\"timezone\":\"Mars/Olympus\"},\"at\":\"2026-03-02T05:00:00Z\"}\n",
    )
    .unwrap();
    let out = canvas(dir.path(), &[&["ingest", "inbox.jsonl"][..], &db].concat());
    assert_eq!(out.status.code(), Some(2), "{}", said(&out));
    assert!(
        said(&out).contains("inbox.jsonl:2: `timezone`: `Mars/Olympus` is not an IANA time zone"),
        "{}",
        said(&out)
    );
}

#[test]
fn set_timezone_in_ingest_was_ignored_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    ingest_sets_the_one_zone(&url);
}

#[tokio::test]
async fn set_timezone_in_ingest_was_ignored_postgres() {
    let fresh = FreshDb::create(&pg_base(), "canvas_tz_ingest_pg").await;
    let url = fresh.url.clone();
    tokio::task::spawn_blocking(move || ingest_sets_the_one_zone(&url))
        .await
        .unwrap();
    fresh.drop_it().await;
}

/// The zone stored for `customer`, once the daemon has applied its inbox.
async fn stored_zone(peek: &Peek, customer: &str, want: &str) {
    let sql = format!("SELECT COALESCE(timezone, '-') FROM customers WHERE id = '{customer}'");
    let start = Instant::now();
    loop {
        let got = peek.strings(&sql).await;
        if got.first().map(String::as_str) == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{customer}'s zone is {got:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The API and Segment `identify` on a daemon on `url`.
async fn api_and_segment_set_the_one_zone(url: &str, dir: tempfile::TempDir) {
    let flows = dir.path().join("flows");
    let d = Daemon::spawn(flows, url, &[("CANVAS_WRITE_KEY", WRITE_KEY)], Some(dir));
    let b = d.base.clone();
    let put = |id: &str, body: serde_json::Value| {
        let url = format!("{b}/v1/customers/{id}");
        async move { call(reqwest::Method::PUT, &url, Some(WRITE), Some(body)).await }
    };
    let (s, body) = put(
        "a1",
        json!({ "attributes": { "phone": "+1", "timezone": "America/Los_Angeles" } }),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let (s, body) = put("a2", json!({ "timezone": "Europe/Paris" })).await;
    assert_eq!(s, 202, "{body}");
    for body in [
        json!({ "attributes": { "timezone": "America/Los_Angles" } }),
        json!({ "timezone": "Mars/Olympus" }),
        json!({ "attributes": { "timezone": 5 } }),
        json!({ "timezone": "Europe/Paris", "attributes": { "timezone": "Asia/Tokyo" } }),
    ] {
        let (s, answer) = put("a3", body.clone()).await;
        assert_eq!(s, 400, "{body} -> {answer}");
        assert_eq!(
            error_code(&answer),
            "invalid_timezone",
            "{body} -> {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`timezone`"),
            "{answer}"
        );
    }

    let segment = |msg: serde_json::Value| {
        let url = format!("{b}/v1/identify");
        async move {
            let resp = common::client()
                .post(url)
                .basic_auth(WRITE_KEY, Some(""))
                .json(&msg)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (s, body) = segment(json!({
        "userId": "s1", "messageId": "m1",
        "traits": { "timezone": "America/Los_Angeles" },
        "context": { "timezone": "Asia/Shanghai" },
    }))
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = segment(json!({
        "userId": "s2", "messageId": "m2",
        "traits": { "timezone": "America/Los_Angles" },
    }))
    .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(error_code(&body), "invalid_timezone", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("batch[0]: `timezone`: `America/Los_Angles`"),
        "{body}"
    );

    let peek = Peek::connect(url).await;
    stored_zone(&peek, "a1", "America/Los_Angeles").await;
    stored_zone(&peek, "a2", "Europe/Paris").await;
    stored_zone(&peek, "s1", "America/Los_Angeles").await;
    assert_eq!(
        peek.number("SELECT COUNT(*) FROM customers WHERE id IN ('a3', 's2')")
            .await,
        0
    );
    peek.close().await;
    d.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_segment_timezone_attribute_was_ignored_sqlite() {
    let dir = project();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    api_and_segment_set_the_one_zone(&url, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_segment_timezone_attribute_was_ignored_postgres() {
    let fresh = FreshDb::create(&pg_base(), "canvas_tz_api_pg").await;
    api_and_segment_set_the_one_zone(&fresh.url, project()).await;
    fresh.drop_it().await;
}
