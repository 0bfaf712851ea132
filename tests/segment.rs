//! Segment-spec ingestion proven with the real Segment SDK (`segment-analytics-python`,
//! installed by `.ci/run`): its host is pointed at `canvas serve`, unchanged. `identify`
//! becomes a profile update, `track` an event, `messageId` deduplicates.
//!
//! The test needs the SDK's Python: `CANVAS_TEST_SEGMENT_PYTHON` names the interpreter
//! (`.ci/run` sets it); without it the test installs the SDK in a venv of its own.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Daemon, READ, until};
use serde_json::json;

const WRITE_KEY: &str = "seg-write-key-1";

const SCRIPT: &str = r#"
import sys
import segment.analytics as analytics

host, key = sys.argv[1], sys.argv[2]
errors = []
client = analytics.Client(key, host=host, sync_mode=True, max_retries=0,
                          on_error=lambda e, batch: errors.append(repr(e)))
client.identify("s1", {"first_name": "Sam", "phone": "+8613800000042"},
                context={"timezone": "Asia/Shanghai"}, message_id="id-1")
client.identify("s1", {"first_name": "Sam", "phone": "+8613800000042"},
                context={"timezone": "Asia/Shanghai"}, message_id="id-1")  # a retry: same id
client.track("s1", "signed_up", {"plan": "gold"}, message_id="msg-1")
client.track("s1", "signed_up", {"plan": "gold"}, message_id="msg-1")  # a retry: same id
client.page("s1", "Home", message_id="page-1")  # acknowledged, ignored
client.flush()
if errors:
    print("\n".join(errors))
    sys.exit(1)
"#;

/// A Python that imports the Segment SDK: `CANVAS_TEST_SEGMENT_PYTHON` when set (`.ci/run`
/// sets it), else a venv the test makes once under the target folder with `python3 -m venv`
/// and pip. It never passes unrun: without Python or PyPI the test fails, saying how to leave
/// it out visibly (`-- --skip segment_python_sdk`).
fn python() -> String {
    if let Ok(p) = std::env::var("CANVAS_TEST_SEGMENT_PYTHON")
        && !p.is_empty()
    {
        assert!(
            imports_sdk(&p),
            "CANVAS_TEST_SEGMENT_PYTHON={p} cannot import segment.analytics"
        );
        return p;
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("segment-sdk-venv");
    let python = venv.join("bin/python").display().to_string();
    if imports_sdk(&python) {
        return python;
    }
    let fail = |what: &str, out: std::io::Result<std::process::Output>| -> ! {
        let why = match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e.to_string(),
        };
        panic!(
            "the Segment SDK test needs a Python with segment-analytics-python: {what} failed: {why}\n\
             Set CANVAS_TEST_SEGMENT_PYTHON to one, or leave the test out so the summary counts \
             it as filtered out: cargo test --workspace -- --skip segment_python_sdk"
        )
    };
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        fail("python3 -m venv", out);
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "segment-analytics-python==2.*"])
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) || !imports_sdk(&python) {
        fail("pip install segment-analytics-python==2.*", out);
    }
    python
}

fn imports_sdk(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import segment.analytics"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_sdk(python: &str, host: &str, key: &str) -> std::process::Output {
    Command::new(python)
        .args(["-c", SCRIPT, host, key])
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_python_sdk_feeds_canvas_unchanged() {
    let python = python();
    let d = Daemon::start_with(common::SINK_SMS, &[("CANVAS_WRITE_KEY", WRITE_KEY)]);
    let b = d.base.clone();

    let out = tokio::task::spawn_blocking({
        let (python, b) = (python.clone(), b.clone());
        move || run_sdk(&python, &b, WRITE_KEY)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the SDK reported errors:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // identify set the profile (the welcome template reads first_name, the send the phone);
    // track started the journey once.
    let body = until(&format!("{b}/v1/customers/s1/journeys"), |j| {
        j["journeys"][0]["where"]["for_event"] == json!("order_paid")
    })
    .await;
    let journeys = body["journeys"].as_array().unwrap();
    assert_eq!(journeys.len(), 1, "{body}");
    assert_eq!(
        journeys[0]["deliveries"][0]["address"],
        json!("+8613800000042")
    );

    let resp = common::client()
        .get(format!("{b}/metrics"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    for line in [
        "canvas_events_received_total{source=\"segment\"} 2",
        "canvas_profile_updates_received_total{source=\"segment\"} 2",
        "canvas_inbox_accepted_total{source=\"segment\"} 2",
        "canvas_inbox_duplicates_total{source=\"segment\"} 2",
    ] {
        assert!(text.contains(line), "metrics lack `{line}`:\n{text}");
    }

    // A wrong write key: the SDK sees the failure.
    let out = tokio::task::spawn_blocking({
        let (python, b) = (python.clone(), b.clone());
        move || run_sdk(&python, &b, "wrong-key")
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "a wrong write key was accepted");

    // The single-message endpoints, as RudderStack's HTTP API uses them.
    let resp = common::client()
        .post(format!("{b}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId":"s2","event":"signed_up","messageId":"msg-2","timestamp":"2026-11-22T08:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = common::client()
        .post(format!("{b}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId":"s2","event":"signed_up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "a track without messageId");
    // Accepted into the inbox; the customer exists once the engine applied it.
    until(&format!("{b}/v1/customers/s2/journeys"), |_| true).await;
}
