//! Daylight saving time and leap days, one policy for cron, `at()` and `wait: { until }`: a
//! local time in a gap moves to the first minute after it; a local time in an overlap fires
//! once, at the earlier instant; a Feb 29 birthday is Feb 28 in common years. Failure
//! messages print only local times that existed. (America/New_York in 2027: the clocks jump
//! 02:00 → 03:00 on March 14 and fall back 02:00 → 01:00 on November 7.)

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

/// A project in New York time with no caps and no quiet hours, holding `flow` (as
/// `f.yaml`), its template `t/hi`, and `test` (as `f.test.yaml`).
fn project(flow: &str, test: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir_all(flows.join("templates/t")).unwrap();
    std::fs::write(flows.join("templates/t/hi.txt"), "Hi\n").unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        "timezone: America/New_York\ncaps: []\nquiet_hours: off\n",
    )
    .unwrap();
    std::fs::write(flows.join("f.yaml"), flow).unwrap();
    std::fs::write(flows.join("f.test.yaml"), test).unwrap();
    dir
}

fn canvas_test(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(["test", "flows"])
        .current_dir(dir)
        .env("NO_COLOR", "1")
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

fn passes(flow: &str, test: &str) {
    let dir = project(flow, test);
    let out = canvas_test(dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
}

fn scheduled(cron: &str) -> String {
    format!(
        "flow: f
name: F
timezone: America/New_York
trigger:
  schedule: \"{cron}\"
  audience: has(customer.phone)
steps:
  - id: hi
    send: sms
    template: t/hi
"
    )
}

fn schedule_test(start: &str, until: &str, sent: &[&str]) -> String {
    let sent: Vec<String> = sent
        .iter()
        .map(|at| format!("      - {{ at: {at}, channel: sms, template: t/hi }}\n"))
        .collect();
    format!(
        "flow: f
start: {start}
run_until: {until}
customers:
  - id: c1
    attributes: {{ phone: \"+1\" }}
expect:
  - customer: c1
    sent:
{}",
        sent.concat()
    )
}

#[test]
fn a_cron_with_a_list_of_hours_lost_the_tick_in_a_dst_gap() {
    passes(
        &scheduled("30 1,2 * * *"),
        &schedule_test(
            "2027-03-14T00:00:00-05:00",
            "2027-03-14T12:00:00-04:00",
            &["2027-03-14T01:30-05:00", "2027-03-14T03:00-04:00"],
        ),
    );
    // A single time moves the same way.
    passes(
        &scheduled("30 2 * * *"),
        &schedule_test(
            "2027-03-14T00:00:00-05:00",
            "2027-03-15T12:00:00-04:00",
            &["2027-03-14T03:00-04:00", "2027-03-15T02:30-04:00"],
        ),
    );
}

#[test]
fn a_cron_in_a_dst_overlap_fires_once_at_the_earlier_instant() {
    for cron in ["30 1 * * *", "30 1,3 * * *"] {
        let mut sent = vec!["2027-11-07T01:30-04:00"];
        if cron.contains(',') {
            sent.push("2027-11-07T03:30-05:00");
        }
        passes(
            &scheduled(cron),
            &schedule_test(
                "2027-11-07T00:00:00-04:00",
                "2027-11-07T12:00:00-05:00",
                &sent,
            ),
        );
    }
}

/// An event-triggered flow that waits `until`, then sends.
fn waiting(until: &str) -> String {
    format!(
        "flow: f
name: F
timezone: America/New_York
trigger:
  event: go
steps:
  - id: wait
    wait: {{ until: '{until}' }}
  - id: hi
    send: sms
    template: t/hi
"
    )
}

fn event_test(event_at: &str, attributes: &str, sent_at: &str) -> String {
    format!(
        "flow: f
start: 2027-01-01T00:00:00-05:00
run_until: 2027-12-31T00:00:00-05:00
customers:
  - id: c1
    attributes: {{ phone: \"+1\"{attributes} }}
events:
  - {{ at: {event_at}, customer: c1, name: go }}
expect:
  - customer: c1
    sent:
      - {{ at: {sent_at}, channel: sms, template: t/hi }}
"
    )
}

#[test]
fn at_and_wait_until_follow_the_dst_policy() {
    // In the gap: 02:30 never happens that night; the wait ends at 03:00.
    passes(
        &waiting("at(now, \"02:30\")"),
        &event_test("2027-03-14T00:10-05:00", "", "2027-03-14T03:00-04:00"),
    );
    // In the overlap: 01:30 happens twice; the wait ends at the first.
    passes(
        &waiting("at(now, \"01:30\")"),
        &event_test("2027-11-07T00:10-04:00", "", "2027-11-07T01:30-04:00"),
    );
}

#[test]
fn a_feb_29_birthday_is_feb_28_in_a_common_year() {
    passes(
        &waiting("at(birthday_this_year(customer.birthday), \"09:00\")"),
        &event_test(
            "2027-02-01T12:00-05:00",
            ", birthday: \"1992-02-29\"",
            "2027-02-28T09:00-05:00",
        ),
    );
}

#[test]
fn failure_messages_printed_local_times_that_did_not_exist() {
    // The test expects 02:30 at New York's winter offset: an instant (07:30 UTC, 03:30 EDT)
    // whose local reading at -05:00 never happened that night.
    let dir = project(
        &scheduled("30 2 * * *"),
        &schedule_test(
            "2027-03-14T00:00:00-05:00",
            "2027-03-14T12:00:00-04:00",
            &["2027-03-14T02:30-05:00"],
        ),
    );
    let out = canvas_test(dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let text = said(&out);
    assert!(
        text.contains("expected sms t/hi at 2027-03-14 03:30 -04:00")
            && text.contains("2027-03-14 03:00 -04:00"),
        "{text}"
    );
    for never in ["02:30 -05:00", "02:00 -05:00", "02:30 -04:00"] {
        assert!(!text.contains(never), "prints `{never}`: {text}");
    }
}

#[test]
fn simulate_printed_local_times_that_did_not_exist() {
    // The timeline is written at New York's winter offset; the tick moved out of the gap
    // went out at 03:00 EDT, which the fixed offset would print as 02:00 -05:00.
    let dir = project(
        &scheduled("30 2 * * *"),
        &schedule_test(
            "2027-03-14T00:00:00-05:00",
            "2027-03-14T12:00:00-04:00",
            &["2027-03-14T03:00-04:00"],
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args([
            "simulate",
            "f",
            "--timeline",
            "flows/f.test.yaml",
            "--flows",
            "flows",
        ])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let text = said(&out);
    assert!(text.contains("2027-03-14 03:00 -04:00"), "{text}");
    for never in ["02:00 -05:00", "02:30 -05:00"] {
        assert!(!text.contains(never), "prints `{never}`: {text}");
    }
}
