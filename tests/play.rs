//! `canvas test` and `canvas simulate` end to end: exit codes, the three output formats, a
//! failure that reads like a diff, and a trace.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn canvas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run canvas")
}

fn journeys() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/journeys")
}

/// A copy of the journey fixtures with one test file replaced.
fn fixture_with(name: &str, text: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy(&journeys(), tmp.path());
    for f in std::fs::read_dir(tmp.path()).unwrap() {
        let p = f.unwrap().path();
        if p.to_string_lossy().ends_with(".test.yaml") {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::write(tmp.path().join(name), text).unwrap();
    tmp
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_shipped_flows_pass_their_tests() {
    let out = canvas(&["test", "flows"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    // Every flow has a test file beside it.
    for f in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("flows")).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && !name.ends_with(".test.yaml") {
            let test = name.replace(".yaml", ".test.yaml");
            assert!(
                text.contains(&format!("PASS flows/{test}")),
                "no passing {test}:\n{text}"
            );
        }
    }
}

#[test]
fn a_failed_expectation_reads_like_a_diff() {
    let tmp = fixture_with(
        "late.test.yaml",
        "flow: reenter\nstart: 2026-03-01T00:00:00Z\nrun_until: 2026-03-03T00:00:00Z\ncustomers:\n  - { id: c1, attributes: { phone: \"+1\" } }\nevents:\n  - { at: 2026-03-01T10:00Z, customer: c1, name: visited }\nexpect:\n  - customer: c1\n    sent:\n      - { at: 2026-03-01T10:00+08:00, channel: sms, template: j/comeback }\n",
    );
    let dir = tmp.path().to_string_lossy().into_owned();
    let out = canvas(&["test", &dir]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("late.test.yaml:11:9: c1: expected sms j/comeback at 2026-03-01 10:00 +08:00; sent sms j/comeback at 2026-03-02 18:00 +08:00 instead (step `comeback`)"), "{text}");

    let gh = stdout(&canvas(&["test", &dir, "--format", "github"]));
    assert!(gh.starts_with("::error file="), "{gh}");
    assert!(
        gh.contains("late.test.yaml,line=11,col=9::c1: expected sms"),
        "{gh}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&canvas(&["test", &dir, "--format", "json"]).stdout).unwrap();
    assert_eq!(json["failed"], 1);
    assert_eq!(json["reports"][0]["failures"][0]["line"], 11);
}

#[test]
fn nothing_sent_says_where_the_run_waits() {
    let tmp = fixture_with(
        "early.test.yaml",
        "flow: reenter\nstart: 2026-03-01T00:00:00Z\nrun_until: 2026-03-01T20:00:00Z\ncustomers:\n  - { id: c1, attributes: { phone: \"+1\" } }\nevents:\n  - { at: 2026-03-01T10:00Z, customer: c1, name: visited }\nexpect:\n  - customer: c1\n    sent:\n      - { at: 2026-03-01T12:00Z, channel: sms, template: j/comeback }\n",
    );
    let out = canvas(&["test", &tmp.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("c1: expected sms j/comeback at 2026-03-01 12:00 +00:00; nothing was sent; the run waits at `later` until 2026-03-02 10:00 +00:00"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_unusable_test_file_is_exit_2_with_a_position() {
    let tmp = fixture_with(
        "bad.test.yaml",
        "flow: reenter\nstart: 2026-03-01T00:00:00Z\nrun_until: 2026-03-03T00:00:00Z\ncustomers:\n  - { id: c1 }\nevents:\n  - { at: 2026-03-01T10:00, customer: c2, name: visited }\n",
    );
    let out = canvas(&["test", &tmp.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains("bad.test.yaml:7:39: customer `c2` is not under `customers`"),
        "{text}"
    );
    assert!(
        text.contains("bad.test.yaml:7:11: `2026-03-01T10:00` needs an offset, e.g. `2026-03-01T10:00+08:00` or `2026-03-01T10:00Z`"),
        "{text}"
    );
}

#[test]
fn simulate_prints_each_customers_trace() {
    let timeline = journeys().join("welcome.test.yaml");
    let flows = journeys();
    let out = canvas(&[
        "simulate",
        "welcome",
        "--flows",
        &flows.to_string_lossy(),
        "--timeline",
        &timeline.to_string_lossy(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("follower\n  2026-03-02 10:00 +00:00  hello                    sent      wechat j/hello to wx-ann"), "{text}");
    assert!(text.contains("unreachable\n  2026-03-02 10:00 +00:00  hello                    skipped   j/hello: no address for wechat, sms"), "{text}");
    assert!(
        text.contains("goal `order_paid` reached; run ends"),
        "{text}"
    );

    let json: serde_json::Value = serde_json::from_slice(
        &canvas(&[
            "simulate",
            "welcome",
            "--flows",
            &flows.to_string_lossy(),
            "--timeline",
            &timeline.to_string_lossy(),
            "--format",
            "json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(6));
    assert_eq!(json[0]["customer"], "follower");
    assert_eq!(json[0]["outbox"][0]["key"], "welcome/follower/1/hello");
}

#[test]
fn ingest_run_and_status_on_a_database_file() {
    let tmp = fixture_with("none.test.yaml", "");
    std::fs::remove_file(tmp.path().join("none.test.yaml")).unwrap();
    let inbox = tmp.path().join("inbox.jsonl");
    let mut lines = String::new();
    for c in ["a", "b", "c"] {
        lines.push_str(&format!(
            "{{\"kind\":\"profile\",\"customer_id\":\"{c}\",\"set\":{{\"phone\":\"+1\"}},\"at\":\"2026-03-02T10:00:00Z\"}}\n\
             {{\"kind\":\"event\",\"id\":\"s-{c}\",\"customer_id\":\"{c}\",\"name\":\"signed_up\",\"occurred_at\":\"2026-03-02T10:00:00Z\"}}\n"
        ));
    }
    lines.push_str("{\"kind\":\"event\",\"id\":\"o-a\",\"customer_id\":\"a\",\"name\":\"order_paid\",\"occurred_at\":\"2026-03-02T11:00:00Z\"}\n");
    std::fs::write(&inbox, lines).unwrap();
    let db = format!("sqlite://{}", tmp.path().join("c.db").display());
    let dir = tmp.path().to_string_lossy().into_owned();

    let out = canvas(&["ingest", &inbox.to_string_lossy(), "--database", &db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("ingested 7 of 7 items"),
        "{}",
        stdout(&out)
    );
    // Again: the events are duplicates now.
    let again = stdout(&canvas(&[
        "ingest",
        &inbox.to_string_lossy(),
        "--database",
        &db,
    ]));
    assert!(
        again.contains("ingested 3 of 7 items (4 duplicates dropped)"),
        "{again}"
    );

    let out = canvas(&[
        "run",
        "--database",
        &db,
        "--flows",
        &dir,
        "--at",
        "2026-03-02T12:00:00Z",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text = stdout(&canvas(&["status", "--database", &db]));
    assert!(
        text.contains("welcome\n  waiting  pause 2\n  treated  3 runs, 1 converted (33.3%)"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&canvas(&["status", "--database", &db, "--format", "json"]).stdout)
            .unwrap();
    assert_eq!(json["flows"][0]["waiting"]["pause"], 2);
    assert_eq!(json["flows"][0]["arms"][0]["converted"], 1);

    // A broken line is refused with its line number, and nothing is ingested.
    std::fs::write(&inbox, "{\"kind\":\"event\"}\n").unwrap();
    let bad = canvas(&["ingest", &inbox.to_string_lossy(), "--database", &db]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("inbox.jsonl:1: not an event or profile update")
    );
}

#[test]
fn validate_checks_canvas_yaml_too() {
    let tmp = fixture_with("none.test.yaml", "");
    std::fs::write(
        tmp.path().join("canvas.yaml"),
        "caps:\n  - { max: 2, per: 1x }\n",
    )
    .unwrap();
    let out = canvas(&[
        "validate",
        "--format",
        "github",
        &tmp.path().to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("canvas.yaml,line=2,"), "{text}");
    assert!(text.contains("CNV0301"), "{text}");
}

#[test]
fn validate_checks_the_daemon_sections_of_canvas_yaml() {
    let tmp = fixture_with("none.test.yaml", "");
    std::fs::write(
        tmp.path().join("canvas.yaml"),
        "server:\n  listen: 127.0.0.1:8080\n  limts: {}\nchannels:\n  sms:\n    type: webhook\n    url: http://gw.example/sms\n    timeout: 10 seconds\n",
    )
    .unwrap();
    let out = canvas(&[
        "validate",
        "--format",
        "github",
        &tmp.path().to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("canvas.yaml,line=3,"), "{text}");
    assert!(text.contains("unknown key `limts`"), "{text}");
    assert!(text.contains("10 seconds"), "{text}");

    // A correct file passes, secrets unset: they are the deploy's business. It configures
    // every channel the flows use (`validate` checks that too).
    let mut channels = "channels:\n  sms:\n    type: webhook\n    url: http://gw.example/sms\n    secret_env: NOT_SET_IN_CI\n".to_owned();
    for name in ["wechat", "coupons", "task"] {
        channels.push_str(&format!(
            "  {name}:\n    type: webhook\n    url: http://gw.example/{name}\n"
        ));
    }
    channels.push_str(
        "  email:\n    type: email\n    host: smtp.example\n    from: Shop <news@shop.example>\n",
    );
    std::fs::write(tmp.path().join("canvas.yaml"), channels).unwrap();
    let out = canvas(&["validate", &tmp.path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

/// Defect: a customer whose trigger `where` could not be evaluated showed only "(never
/// entered vip)". `canvas simulate` now says why.
#[test]
fn simulate_says_why_a_customer_never_entered() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("vip.yaml"),
        "flow: vip\nname: VIP\ntimezone: UTC\ntrigger:\n  event: order_paid\n  where: customer.orders_count > 3\nsteps:\n  - { id: done, exit: vip }\n",
    )
    .unwrap();
    let timeline = tmp.path().join("vip.test.yaml");
    std::fs::write(
        &timeline,
        "flow: vip\nstart: 2026-03-02T10:00:00Z\nrun_until: 2026-03-03T00:00:00Z\ncustomers:\n  - { id: c1, attributes: { first_name: Ann } }\n  - { id: c2, attributes: { orders_count: 1 } }\nevents:\n  - { at: 2026-03-02T11:00Z, customer: c1, name: order_paid }\n  - { at: 2026-03-02T11:00Z, customer: c2, name: order_paid }\nexpect: []\n",
    )
    .unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = canvas(&[
        "simulate",
        "vip",
        "--flows",
        dir,
        "--timeline",
        timeline.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("c1\n  (never entered vip: trigger `where` failed: cannot evaluate `customer.orders_count > 3`")
            && text.contains("orders_count"),
        "{text}"
    );
    assert!(
        text.contains("c2\n  (never entered vip: its trigger never matched, or its `where`"),
        "{text}"
    );
    assert!(
        text.contains("failed   trigger 1 time for 1 customer"),
        "{text}"
    );
}
