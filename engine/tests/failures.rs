//! Journeys that never go wrong silently: a `call` that fails is not an answer, and a
//! message that cannot be delivered on one channel of a `send: [a, b]` falls back to the
//! next one.
//!
//! First the pure executor, input by input; then the runtime on a SQLite file and on
//! Postgres (the store harness), where the inputs come through the inbox and every step
//! commits with the messages it produces.

mod common;

use std::sync::Arc;

use canvas_engine::CompiledFlow;
use canvas_engine::executor::{self, Ctx, Input};
use canvas_engine::policy::Policy;
use canvas_engine::registry::{ChannelSpec, Registry};
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::state::{
    CallResult, Customer, DeliveryFailure, Event, InboxItem, OutboxRow, ProfileUpdate, Run,
    RunStatus, Time,
};
use canvas_engine::store::{Database, Store};
use common::{with_postgres, with_sqlite};
use serde_json::{Value as Json, json};

const COUPON: &str = "flow: coupon
name: Coupon, with a way out
timezone: UTC
trigger:
  event: asked
steps:
  - id: issue
    call:
      webhook: coupons
      save_as: gift
      timeout: 1h
    on_error: sorry
    next: tell
  - id: sorry
    exit: no_coupon
  - id: tell
    send: sms
    template: gift
    priority: transactional
";

const STRICT: &str = "flow: strict
name: Coupon, no way out
timezone: UTC
trigger:
  event: asked-strict
steps:
  - id: issue
    call:
      webhook: coupons
      save_as: gift
  - id: tell
    send: sms
    template: gift
    priority: transactional
";

const NUDGE: &str = "flow: nudge
name: Nudge on WeChat, else SMS
timezone: UTC
trigger:
  event: browsed
steps:
  - id: hello
    send: [wechat, sms]
    template: hello
";

const NUDGE_ADDRESS: &str = "flow: nudge-address
name: Nudge, falling back on a missing address only
timezone: UTC
trigger:
  event: browsed-address
steps:
  - id: hello
    send: [wechat, sms]
    fallback: address
    template: hello
";

fn registry() -> Registry {
    let mut r = Registry::new();
    for (name, address) in [("sms", Some("phone")), ("wechat", Some("wechat_id"))] {
        r.add_channel(ChannelSpec {
            name: name.into(),
            address: address.map(Into::into),
            description: String::new(),
        });
    }
    r
}

/// The four flows, compiled from a folder of their own.
fn flows() -> Vec<CompiledFlow> {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("templates")).expect("templates");
    for (name, text) in [
        ("coupon", COUPON),
        ("strict", STRICT),
        ("nudge", NUDGE),
        ("nudge-address", NUDGE_ADDRESS),
    ] {
        std::fs::write(root.join(format!("{name}.yaml")), text).expect("flow");
    }
    std::fs::write(
        root.join("templates/gift.txt"),
        "Your code: {{ vars.gift.code }}",
    )
    .expect("template");
    std::fs::write(root.join("templates/hello.txt"), "Hello {{ customer.id }}").expect("t");
    let v = canvas_engine::validate_paths(&[root.to_path_buf()], &registry()).expect("read");
    assert!(v.is_valid(), "{:#?}", v.diagnostics);
    v.flows().cloned().collect()
}

fn flow<'a>(flows: &'a [CompiledFlow], id: &str) -> &'a CompiledFlow {
    flows.iter().find(|f| f.id == id).expect("flow")
}

/// 2026-01-01 10:00 UTC (outside the default quiet hours) plus `minutes`.
fn at(minutes: i64) -> Time {
    chrono::DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
        .expect("time")
        .to_utc()
        + chrono::Duration::minutes(minutes)
}

fn event(name: &str, customer: &str, t: Time) -> Event {
    Event {
        id: format!("{customer}-{name}"),
        customer_id: customer.into(),
        name: name.into(),
        data: Json::Null,
        occurred_at: t,
    }
}

fn customer(id: &str, attributes: Json) -> Customer {
    let mut c = Customer::new(id, at(0));
    c.attributes = attributes.as_object().cloned().unwrap_or_default();
    c
}

/// One input to one run through the pure executor.
fn apply(
    flow: &CompiledFlow,
    policy: &Policy,
    run: &mut Run,
    c: &mut Customer,
    input: Input<'_>,
    now: Time,
) -> executor::Transition {
    let registry = registry();
    let cx = Ctx {
        flow,
        policy,
        registry: &registry,
        now,
    };
    executor::step(&cx, run, c, input)
}

fn actions(tr: &executor::Transition) -> Vec<&str> {
    tr.history.iter().map(|h| h.action.as_str()).collect()
}

// ---- item 1, the executor: a failed call ---------------------------------------------------

#[test]
fn failed_call_is_not_recorded_as_answered_and_ends_the_run_with_error() {
    let flows = flows();
    let f = flow(&flows, "strict");
    let policy = Policy::default();
    let mut c = customer("c1", json!({ "phone": "+8613800000001" }));
    let ev = event("asked-strict", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    assert_eq!(actions(&tr), ["called"]);
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::CallResult {
            step: "issue",
            response: &Json::Null,
            error: Some("HTTP 500: Internal Server Error"),
        },
        at(1),
    );
    assert_eq!(actions(&tr), ["failed"], "{:#?}", tr.history);
    let failed = &tr.history[0].detail;
    assert_eq!(failed["error"], json!("HTTP 500: Internal Server Error"));
    assert_eq!(failed["outcome"], json!("error"));
    // No SMS with an empty code, no `vars.gift`, the run ended with outcome `error`.
    assert!(tr.outbox.is_empty(), "{:#?}", tr.outbox);
    assert!(!run.vars.contains_key("gift"), "{:?}", run.vars);
    assert_eq!(run.status, RunStatus::Ended);
    assert_eq!(run.outcome.as_deref(), Some("error"));
}

#[test]
fn failed_call_takes_on_error_and_leaves_save_as_unset() {
    let flows = flows();
    let f = flow(&flows, "coupon");
    let policy = Policy::default();
    let mut c = customer("c1", json!({ "phone": "+8613800000001" }));
    let ev = event("asked", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::CallResult {
            step: "issue",
            response: &Json::Null,
            error: Some("HTTP 422: no coupons left"),
        },
        at(1),
    );
    assert_eq!(actions(&tr), ["failed", "exit"], "{:#?}", tr.history);
    assert_eq!(tr.history[0].detail["next"], json!("sorry"));
    assert!(tr.outbox.is_empty());
    assert!(!run.vars.contains_key("gift"));
    assert_eq!(run.outcome.as_deref(), Some("no_coupon"));
}

#[test]
fn answered_call_still_saves_the_response_and_goes_on() {
    let flows = flows();
    let f = flow(&flows, "coupon");
    let policy = Policy::default();
    let mut c = customer("c1", json!({ "phone": "+8613800000001" }));
    let ev = event("asked", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::CallResult {
            step: "issue",
            response: &json!({ "code": "C-1" }),
            error: None,
        },
        at(1),
    );
    assert_eq!(actions(&tr), ["answered", "sent", "ended"]);
    assert_eq!(run.vars["gift"], json!({ "code": "C-1" }));
    assert_eq!(tr.outbox[0].payload["text"], json!("Your code: C-1"));
}

#[test]
fn call_timeout_bounds_the_wait_and_a_late_answer_never_advances_the_run() {
    let flows = flows();
    let f = flow(&flows, "coupon");
    let policy = Policy::default();
    let mut c = customer("c1", json!({ "phone": "+8613800000001" }));
    let ev = event("asked", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    // The call carries its deadline; the run has a timer at it.
    assert_eq!(run.wake_at, Some(at(60)));
    assert_eq!(tr.outbox[0].payload["deadline"], json!(at(60).to_rfc3339()));
    // Before the deadline, a timer does nothing.
    let tr = apply(f, &policy, &mut run, &mut c, Input::Timer, at(59));
    assert!(tr.history.is_empty());
    let tr = apply(f, &policy, &mut run, &mut c, Input::Timer, at(60));
    assert_eq!(actions(&tr), ["failed", "exit"], "{:#?}", tr.history);
    assert_eq!(tr.history[0].detail["timeout"], json!(true));
    assert_eq!(tr.history[0].detail["error"], json!("no answer within 1h"));
    assert_eq!(run.outcome.as_deref(), Some("no_coupon"));
    // The answer arrives after all: recorded as late, nothing else.
    let seq = run.seq;
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::CallResult {
            step: "issue",
            response: &json!({ "code": "C-LATE" }),
            error: None,
        },
        at(61),
    );
    assert_eq!(actions(&tr), ["late"]);
    assert!(tr.outbox.is_empty());
    assert!(!run.vars.contains_key("gift"));
    assert_eq!(run.outcome.as_deref(), Some("no_coupon"));
    assert_eq!(run.seq, seq + 1);
}

#[test]
fn call_result_rows_written_before_the_error_field_still_read() {
    // An inbox row from before failures were typed: read as an answer, as it was meant.
    let old = json!({
        "kind": "call_result", "run_id": "coupon/c1/1", "customer_id": "c1",
        "step": "issue", "response": { "code": "C-1" }, "at": at(0).to_rfc3339()
    });
    let item: InboxItem = serde_json::from_value(old).expect("old rows still read");
    let InboxItem::CallResult(c) = item else {
        panic!("a call result")
    };
    assert!(c.answered());
    assert_eq!(c.response, json!({ "code": "C-1" }));
}

// ---- item 4, the executor: fallback on a dead delivery -------------------------------------

fn dead(row: &OutboxRow, now: Time) -> DeliveryFailure {
    DeliveryFailure {
        run_id: row.run_id.clone(),
        customer_id: row.customer_id.clone(),
        step: row.step.clone(),
        channel: row.channel.clone(),
        key: row.key.clone(),
        error: "HTTP 400: unknown openid".into(),
        sent_at: row.created_at,
        at: now,
    }
}

#[test]
fn dead_delivery_on_a_channel_list_falls_back_to_the_next_channel_counted_once() {
    let flows = flows();
    let f = flow(&flows, "nudge");
    let policy = Policy::default();
    let mut c = customer(
        "c1",
        json!({ "wechat_id": "wx-1", "phone": "+8613800000001" }),
    );
    let ev = event("browsed", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    assert_eq!(actions(&tr), ["sent", "ended"]);
    let wechat = tr.outbox[0].clone();
    assert_eq!(wechat.channel, "wechat");
    assert_eq!(c.sends.len(), 1);
    // The run has ended; the WeChat delivery dies later.
    let failure = dead(&wechat, at(2));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::DeliveryFailed(&failure),
        at(2),
    );
    assert_eq!(actions(&tr), ["failed", "fallback"], "{:#?}", tr.history);
    assert_eq!(
        tr.history[0].detail["error"],
        json!("HTTP 400: unknown openid")
    );
    assert_eq!(tr.history[0].detail["fallback"], json!("sms"));
    assert_eq!(tr.outbox.len(), 1);
    let sms = &tr.outbox[0];
    assert_eq!(sms.channel, "sms");
    assert_eq!(sms.address.as_deref(), Some("+8613800000001"));
    assert_eq!(sms.payload["text"], json!("Hello c1"));
    assert_ne!(
        sms.key, wechat.key,
        "a fallback has its own idempotency key"
    );
    assert_eq!(sms.key, "nudge/c1/1/hello/sms");
    // Counted against caps once: the step's mark moved to the channel that carried it.
    assert_eq!(c.sends.len(), 1);
    assert_eq!(c.sends[0].channel, "sms");
    assert!(tr.customer_changed);
    // The SMS dies too: nothing further to try, and the history says so.
    let failure = dead(sms, at(3));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::DeliveryFailed(&failure),
        at(3),
    );
    assert_eq!(actions(&tr), ["failed"]);
    assert_eq!(
        tr.history[0].detail["no_fallback"],
        json!("no further channel to fall back to")
    );
    assert!(tr.outbox.is_empty());
}

#[test]
fn fallback_address_step_does_not_fall_back_on_a_dead_delivery() {
    let flows = flows();
    let f = flow(&flows, "nudge-address");
    let policy = Policy::default();
    let mut c = customer(
        "c1",
        json!({ "wechat_id": "wx-1", "phone": "+8613800000001" }),
    );
    let ev = event("browsed-address", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    let failure = dead(&tr.outbox[0], at(2));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::DeliveryFailed(&failure),
        at(2),
    );
    assert_eq!(actions(&tr), ["failed"]);
    assert!(tr.outbox.is_empty());
    // The old fallback still holds: no WeChat id, straight to SMS.
    let mut c2 = customer("c2", json!({ "phone": "+8613800000002" }));
    let ev = event("browsed-address", "c2", at(0));
    let mut run2 = executor::new_run(f, "c2", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run2, &mut c2, Input::Start, at(0));
    assert_eq!(tr.outbox[0].channel, "sms");
}

#[test]
fn fallback_without_an_address_on_the_next_channel_is_recorded_not_sent() {
    let flows = flows();
    let f = flow(&flows, "nudge");
    let policy = Policy::default();
    let mut c = customer("c1", json!({ "wechat_id": "wx-1" }));
    let ev = event("browsed", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    let failure = dead(&tr.outbox[0], at(2));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::DeliveryFailed(&failure),
        at(2),
    );
    assert_eq!(actions(&tr), ["failed"]);
    assert_eq!(
        tr.history[0].detail["no_fallback"],
        json!("no address for sms")
    );
    assert!(tr.outbox.is_empty());
}

#[test]
fn fallback_is_not_sent_after_the_customer_opted_out() {
    let flows = flows();
    let f = flow(&flows, "nudge");
    let policy = Policy::default();
    let mut c = customer(
        "c1",
        json!({ "wechat_id": "wx-1", "phone": "+8613800000001" }),
    );
    let ev = event("browsed", "c1", at(0));
    let mut run = executor::new_run(f, "c1", 0, Some(&ev), at(0));
    let tr = apply(f, &policy, &mut run, &mut c, Input::Start, at(0));
    c.unsubscribed_at = Some(at(1));
    let failure = dead(&tr.outbox[0], at(2));
    let tr = apply(
        f,
        &policy,
        &mut run,
        &mut c,
        Input::DeliveryFailed(&failure),
        at(2),
    );
    assert_eq!(actions(&tr), ["failed"]);
    assert_eq!(
        tr.history[0].detail["no_fallback"],
        json!("the customer left the journey")
    );
    assert!(tr.outbox.is_empty());
}

// ---- through the inbox, on SQLite and on Postgres -----------------------------------------

fn runtime(db: Arc<Database>) -> Runtime<Database> {
    Runtime::new(
        (*db).clone(),
        FlowSet::new(flows()),
        Policy::default(),
        registry(),
    )
}

async fn enrol(rt: &Runtime<Database>, id: &str, attributes: Json, ev: &str) {
    let profile = ProfileUpdate {
        id: None,
        customer_id: id.into(),
        set: attributes.as_object().cloned().unwrap_or_default(),
        timezone: None,
        at: at(0),
    };
    rt.store
        .enqueue(&[
            InboxItem::Profile(profile),
            InboxItem::Event(event(ev, id, at(0))),
        ])
        .await
        .expect("enqueue");
    rt.process_inbox(at(0)).await.expect("process");
}

async fn failed_call_ends_the_run_with_error_and_sends_no_empty_code(db: Arc<Database>) {
    let rt = runtime(db);
    enrol(
        &rt,
        "c1",
        json!({ "phone": "+8613800000001" }),
        "asked-strict",
    )
    .await;
    let answer = CallResult {
        run_id: "strict/c1/1".into(),
        customer_id: "c1".into(),
        step: "issue".into(),
        response: Json::Null,
        error: Some("HTTP 500: Internal Server Error".into()),
        at: at(1),
    };
    rt.store
        .enqueue(&[InboxItem::CallResult(answer)])
        .await
        .expect("enqueue");
    rt.process_inbox(at(1)).await.expect("process");
    let history = rt.store.history(Some("c1")).await.expect("history");
    let acts: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(acts, ["called", "failed"], "{history:#?}");
    assert_eq!(
        history[1].detail["error"],
        json!("HTTP 500: Internal Server Error")
    );
    let runs = rt.store.runs("c1").await.expect("runs");
    assert_eq!(runs[0].status, RunStatus::Ended);
    assert_eq!(runs[0].outcome.as_deref(), Some("error"));
    assert!(!runs[0].vars.contains_key("gift"));
    let outbox = rt.store.outbox(Some("c1")).await.expect("outbox");
    assert_eq!(outbox.len(), 1, "only the call, no SMS: {outbox:#?}");
    assert_eq!(outbox[0].channel, "coupons");
    // Nothing handled it: the run ended in error, counted at the call's step.
    let failures = rt.store.failures("c1").await.expect("failures");
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert_eq!(
        (failures[0].flow.as_str(), failures[0].count),
        ("strict", 1)
    );
    assert!(failures[0].error.contains("HTTP 500"), "{failures:#?}");
}

async fn call_timeout_fires_durably_and_a_late_answer_is_recorded_once(db: Arc<Database>) {
    let rt = runtime(db);
    enrol(&rt, "c1", json!({ "phone": "+8613800000001" }), "asked").await;
    // The run waits for the call with a timer at its deadline, kept in the store.
    assert_eq!(rt.store.next_wake(at(0)).await.expect("wake"), Some(at(60)));
    rt.fire_due(at(60)).await.expect("timers");
    let answer = InboxItem::CallResult(CallResult {
        run_id: "coupon/c1/1".into(),
        customer_id: "c1".into(),
        step: "issue".into(),
        response: json!({ "code": "C-LATE" }),
        error: None,
        at: at(61),
    });
    // Fed back twice (a dispatcher that crashed before settling): applied once.
    rt.store
        .enqueue(std::slice::from_ref(&answer))
        .await
        .expect("enqueue");
    rt.store.enqueue(&[answer]).await.expect("enqueue");
    rt.process_inbox(at(61)).await.expect("process");
    let history = rt.store.history(Some("c1")).await.expect("history");
    let acts: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(acts, ["called", "failed", "exit", "late"], "{history:#?}");
    let runs = rt.store.runs("c1").await.expect("runs");
    assert_eq!(runs[0].outcome.as_deref(), Some("no_coupon"));
    assert!(!runs[0].vars.contains_key("gift"));
    assert_eq!(rt.store.outbox(Some("c1")).await.expect("outbox").len(), 1);
}

async fn dead_delivery_falls_back_after_the_run_ended_once(db: Arc<Database>) {
    let rt = runtime(db);
    enrol(
        &rt,
        "c1",
        json!({ "wechat_id": "wx-1", "phone": "+8613800000001" }),
        "browsed",
    )
    .await;
    let outbox = rt.store.outbox(Some("c1")).await.expect("outbox");
    assert_eq!(outbox.len(), 1);
    let runs = rt.store.runs("c1").await.expect("runs");
    assert_eq!(runs[0].status, RunStatus::Ended, "the send did not block");
    let failure = InboxItem::DeliveryFailed(dead(&outbox[0], at(5)));
    // Fed back twice: falls back once.
    rt.store
        .enqueue(std::slice::from_ref(&failure))
        .await
        .expect("enqueue");
    rt.store.enqueue(&[failure]).await.expect("enqueue");
    rt.process_inbox(at(5)).await.expect("process");
    let outbox = rt.store.outbox(Some("c1")).await.expect("outbox");
    let keys: Vec<(&str, &str)> = outbox
        .iter()
        .map(|o| (o.key.as_str(), o.channel.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("nudge/c1/1/hello", "wechat"),
            ("nudge/c1/1/hello/sms", "sms")
        ]
    );
    let history = rt.store.history(Some("c1")).await.expect("history");
    let acts: Vec<&str> = history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(
        acts,
        ["sent", "ended", "failed", "fallback"],
        "{history:#?}"
    );
    // The cap mark: one, on the channel that carried the message.
    let state = rt
        .store
        .load(&["c1".to_owned()], at(5))
        .await
        .expect("load");
    let sends = &state[0].customer.sends;
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].channel, "sms");
}

store_tests!(
    failed_call_ends_the_run_with_error_and_sends_no_empty_code,
    call_timeout_fires_durably_and_a_late_answer_is_recorded_once,
    dead_delivery_falls_back_after_the_run_ended_once,
);
