//! The pure executor: `step(flow, run, input, now) -> Transition`.
//!
//! No IO and no clock reads: everything a step may read arrives in [`Ctx`] and the customer,
//! everything it does leaves as the returned [`Transition`] and as changes to the customer.
//! The daemon, `canvas simulate` and `canvas test` all drive this same code.

use chrono::{Datelike, Duration as Span, NaiveDate, TimeZone};
use chrono_tz::Tz;
use petgraph::graph::NodeIndex;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};

use crate::eval::{self, Scope};
use crate::flow::{CompiledFlow, Entry, ExitRule, SplitArm, Step, StepKind, Target, Wait};
use crate::model::{Priority, Weekday};
use crate::policy::{Decision, Policy, SentMark};
use crate::registry::{PluginCx, Registry};
use crate::state::{
    Arm, Conversion, Customer, DeliveryFailure, Enrolment, Event, Failure, HistoryEntry,
    OutboxKind, OutboxRow, Run, RunStatus, Time,
};
use crate::stats::{self, Tick, metric};

mod call;
mod counts;
mod fallback;
mod send;
mod steps;
mod wait;

pub use wait::{local_time, next_in_window};

/// The waiting marker of a run parked at a `call` step until the response comes back.
pub const WAITING_FOR_CALL: &str = "call";

/// The catalogue's SMS channel, whose history entries carry the segment count.
const SMS: &str = "sms";
/// The e-mail channel, whose text part keeps its text as rendered.
const EMAIL: &str = "email";

/// What the executor may read besides the run and the customer.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub flow: &'a CompiledFlow,
    pub policy: &'a Policy,
    pub registry: &'a Registry,
    pub now: Time,
}

/// What moves a run.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// The trigger fired: the run is new and starts at the first step.
    Start,
    /// The run's `wake_at` has passed.
    Timer,
    /// An event about the customer: it may reach the goal, trigger an exit or resume a
    /// `wait: { event }`.
    Event(&'a Event),
    /// The customer's profile changed: `exit: - when:` rules are checked.
    Profile,
    /// The answer to the `call` the run waits at: the response, or (`error` set) why the
    /// call failed for good.
    CallResult {
        step: &'a str,
        response: &'a Json,
        error: Option<&'a str>,
    },
    /// A message of the run's `step` could not be delivered on its channel: the step falls
    /// back to its next channel, wherever the run is now.
    DeliveryFailed(&'a DeliveryFailure),
}

/// The effect of one input on one run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transition {
    /// Steps executed, in order (empty when the input did not concern the run).
    pub history: Vec<HistoryEntry>,
    pub outbox: Vec<OutboxRow>,
    pub conversion: Option<Conversion>,
    /// Whether the customer record changed (profile update, cap mark, cooldown).
    pub customer_changed: bool,
    /// What failed (an `error` history row, a goal condition or exit rule that could not be
    /// evaluated): counted per flow and step, so nothing fails unseen.
    pub failures: Vec<Failure>,
    /// The outcome counters the transition moves (see [`crate::stats`]), for its run's flow
    /// and version.
    pub counts: Vec<Tick>,
}

impl Transition {
    /// Whether anything must be written.
    pub fn is_empty(&self) -> bool {
        self.history.is_empty() && self.outbox.is_empty() && self.conversion.is_none()
    }
}

/// Why a customer may not enter a flow now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Active,
    OnceOnly,
    TooSoon { until: Time },
}

/// The entry rule: may this customer start a run now?
pub fn may_enter(
    flow: &CompiledFlow,
    enrolment: Option<&Enrolment>,
    now: Time,
) -> Result<(), Refusal> {
    let Some(e) = enrolment else { return Ok(()) };
    if e.active_run.is_some() {
        return Err(Refusal::Active);
    }
    match flow.entry {
        Entry::OneActive => Ok(()),
        Entry::Once if e.entries > 0 => Err(Refusal::OnceOnly),
        Entry::Once => Ok(()),
        Entry::ReenterAfter(d) => match e.last_entered_at {
            Some(last) => {
                let until = last + secs(d.as_secs());
                if now < until {
                    Err(Refusal::TooSoon { until })
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        },
    }
}

/// A new run for a customer entering `flow`; `entries` counts earlier entries.
pub fn new_run(
    flow: &CompiledFlow,
    customer_id: &str,
    entries: u32,
    event: Option<&Event>,
    now: Time,
) -> Run {
    // A customer enters when the triggering event happened (it may be applied a little
    // later, or much later in a backfill): the goal window counts from there.
    let entered = event.map_or(now, |e| e.occurred_at.min(now));
    Run {
        id: format!("{}/{}/{}", flow.id, customer_id, entries + 1),
        flow: flow.id.clone(),
        version: flow.hash.0.clone(),
        customer_id: customer_id.to_owned(),
        status: RunStatus::Waiting,
        step: None,
        wake_at: None,
        waiting_for: None,
        vars: Map::new(),
        event: event.cloned(),
        arm: Arm::Treated,
        splits: Default::default(),
        last_touch: None,
        goal_until: flow
            .goal
            .as_ref()
            .map(|g| entered + secs(g.within.as_secs())),
        converted_at: None,
        outcome: None,
        seq: 0,
        entered_at: entered,
        updated_at: now,
    }
}

/// The customer's own time zone, else the engine's default from `canvas.yaml` — never the
/// flow's: a customer lives in one zone whichever flow speaks to them.
pub fn customer_tz(customer: &Customer, policy: &Policy) -> Tz {
    policy.customer_zone(customer.zone())
}

/// End a waiting run from outside the flow (the customer opted out of everything); the
/// history row names the event.
pub fn stop(cx: &Ctx<'_>, run: &mut Run, customer: &mut Customer, event: &Event) -> Transition {
    let mut ex = Exec::new(cx, run, customer);
    let before = ex.parked();
    if ex.run.status == RunStatus::Waiting {
        let step = ex.run.step.clone().unwrap_or_default();
        ex.record(
            "exit",
            step,
            json!({ "event": event.name, "outcome": "exited", "opt_out": true }),
        );
        ex.end("exited");
    }
    ex.count_waiting(before);
    ex.out
}

/// Apply one input to one run. The run and the customer are updated in place; what must be
/// written is returned.
pub fn step(cx: &Ctx<'_>, run: &mut Run, customer: &mut Customer, input: Input<'_>) -> Transition {
    let mut ex = Exec::new(cx, run, customer);
    ex.tz = customer_tz(ex.customer, cx.policy);
    let before = ex.parked();
    ex.apply(input);
    ex.count_waiting(before);
    ex.out
}

struct Exec<'c, 'a> {
    cx: &'c Ctx<'a>,
    run: &'c mut Run,
    customer: &'c mut Customer,
    out: Transition,
    tz: Tz,
    /// The day bucket of the outcome counters this transition moves.
    day: i32,
}

impl<'c, 'a> Exec<'c, 'a> {
    fn new(cx: &'c Ctx<'a>, run: &'c mut Run, customer: &'c mut Customer) -> Exec<'c, 'a> {
        Exec {
            cx,
            run,
            customer,
            out: Transition::default(),
            tz: chrono_tz::UTC,
            day: stats::day_of(cx.now, cx.policy.timezone),
        }
    }
}

impl Exec<'_, '_> {
    fn flow(&self) -> &CompiledFlow {
        self.cx.flow
    }

    fn apply(&mut self, input: Input<'_>) {
        let ended = self.run.status == RunStatus::Ended;
        match input {
            Input::Start => {
                self.count(stats::FLOW, metric::ENTERED);
                self.advance(Some(self.flow().start));
            }
            Input::Event(event) => {
                self.goal(event);
                if ended || self.run.status == RunStatus::Ended {
                    return;
                }
                if self.exit_on_event(event) {
                    return;
                }
                if self.exit_on_profile() {
                    return;
                }
                self.resume_on_event(event);
            }
            Input::Profile => {
                if !ended {
                    self.exit_on_profile();
                }
            }
            Input::Timer => {
                if ended || self.run.wake_at.is_none_or(|w| w > self.cx.now) {
                    return;
                }
                if self.exit_on_profile() {
                    return;
                }
                self.timer();
            }
            Input::CallResult {
                step,
                response,
                error,
            } => self.call_result(step, response, error),
            Input::DeliveryFailed(failure) => self.delivery_failed(failure),
        }
    }

    fn current(&self) -> Option<NodeIndex> {
        self.run.step.as_deref().and_then(|s| self.flow().step(s))
    }

    /// A goal event within the window converts once; control runs convert the same way so
    /// the lift can be measured.
    fn goal(&mut self, event: &Event) {
        let Some(goal) = &self.flow().goal else {
            return;
        };
        if goal.event != event.name || self.run.converted_at.is_some() {
            return;
        }
        if self
            .run
            .goal_until
            .is_none_or(|until| event.occurred_at > until)
            || event.occurred_at < self.run.entered_at
        {
            return;
        }
        if let Some(cond) = &goal.condition {
            match self.eval_bool(cond, Some(event)) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail("goal", format!("goal `when` failed: {e}"));
                    return;
                }
            }
        }
        let exit = goal.exit;
        self.run.converted_at = Some(self.cx.now);
        self.out.conversion = Some(Conversion {
            run_id: self.run.id.clone(),
            flow: self.run.flow.clone(),
            version: self.run.version.clone(),
            customer_id: self.run.customer_id.clone(),
            arm: self.run.arm,
            last_touch: self.run.last_touch.clone(),
            event_id: event.id.clone(),
            at: self.cx.now,
        });
        self.count(stats::FLOW, metric::CONVERTED);
        let arm = match self.run.arm {
            Arm::Treated => "treated",
            Arm::Control => "control",
        };
        self.count(stats::FLOW, stats::qualified(metric::CONVERTED, arm));
        if let Some(touch) = self.run.last_touch.clone() {
            self.count(&touch, metric::CONVERTED);
        }
        for (split, arm) in self.run.splits.clone() {
            self.count(&split, stats::qualified(metric::CONVERTED, &arm));
        }
        let step = self.run.step.clone().unwrap_or_else(|| "-".to_owned());
        let exits = exit && self.run.status == RunStatus::Waiting;
        self.record("goal", step, json!({ "event": event.name, "event_id": event.id, "last_touch": self.run.last_touch, "exit": exits }));
        if exits {
            self.end("goal");
        }
    }

    fn exit_on_event(&mut self, event: &Event) -> bool {
        let flow = self.cx.flow;
        for rule in &flow.exits {
            if let ExitRule::Event { name, condition } = rule {
                if *name != event.name {
                    continue;
                }
                let holds = match condition {
                    None => true,
                    Some(c) => self.eval_bool(c, Some(event)).unwrap_or_else(|e| {
                        self.fail("exit", format!("exit `when` failed: {e}"));
                        false
                    }),
                };
                if holds {
                    let step = self.run.step.clone().unwrap_or_default();
                    self.record(
                        "exit",
                        step,
                        json!({ "event": event.name, "outcome": "exited" }),
                    );
                    self.end("exited");
                    return true;
                }
            }
        }
        false
    }

    fn exit_on_profile(&mut self) -> bool {
        let flow = self.cx.flow;
        for rule in &flow.exits {
            if let ExitRule::When(cond) = rule
                && self.eval_bool(cond, None).unwrap_or_else(|e| {
                    self.fail("exit", format!("exit `when` failed: {e}"));
                    false
                })
            {
                let step = self.run.step.clone().unwrap_or_default();
                self.record(
                    "exit",
                    step,
                    json!({ "when": cond.source(), "outcome": "exited" }),
                );
                self.end("exited");
                return true;
            }
        }
        false
    }

    /// Run steps from `target` until the run waits or ends.
    fn advance(&mut self, mut target: Target) {
        let flow = self.cx.flow;
        // The graph is a DAG; a delayed send re-enters its own step once, so this bound is
        // never reached by a valid flow.
        let mut budget = flow.graph.node_count() + 2;
        while let Some(node) = target {
            let id = &flow.graph[node].id;
            // A delayed send tried again stays where it was: not a second arrival.
            if self.run.step.as_ref() != Some(id) {
                if let Some(from) = self.run.step.clone() {
                    self.count(&from, stats::qualified("to", id));
                }
                self.count(id, metric::ENTERED);
            }
            if budget == 0 {
                self.record(
                    "error",
                    flow.graph[node].id.clone(),
                    json!({ "error": "step budget exhausted", "outcome": "error" }),
                );
                self.end("error");
                return;
            }
            budget -= 1;
            self.run.step = Some(flow.graph[node].id.clone());
            match self.exec(node, &flow.graph[node]) {
                Flow::Go(t) => target = t,
                Flow::Park => return,
                Flow::End => return,
            }
        }
        let step = self.run.step.clone().unwrap_or_else(|| "-".to_owned());
        self.record("ended", step, json!({ "outcome": "completed" }));
        self.end("completed");
    }

    fn exec(&mut self, node: NodeIndex, step: &Step) -> Flow {
        let id = step.id.clone();
        match &step.kind {
            StepKind::Send { .. } => self.send(node),
            StepKind::Wait { wait, next } => self.wait(&id, wait, *next),
            StepKind::Branch { arms, otherwise } => {
                for (i, (cond, to)) in arms.iter().enumerate() {
                    match self.eval_bool(cond, None) {
                        Ok(true) => {
                            let to_id = self.flow().graph[*to].id.clone();
                            self.record(
                                "branch",
                                id,
                                json!({ "arm": i + 1, "when": cond.source(), "next": to_id }),
                            );
                            return Flow::Go(Some(*to));
                        }
                        Ok(false) => {}
                        Err(e) => {
                            // A condition that cannot be evaluated for this customer (a
                            // missing attribute, a bad date) is false: the run takes the
                            // next arm, and the history says why.
                            self.record(
                                "error",
                                id.clone(),
                                json!({ "when": cond.source(), "error": e.to_string() }),
                            );
                        }
                    }
                }
                let to_id = self.flow().graph[*otherwise].id.clone();
                self.record("branch", id, json!({ "arm": "else", "next": to_id }));
                Flow::Go(Some(*otherwise))
            }
            StepKind::Split { arms } => {
                let point = split_point(&self.run.flow, &id, &self.run.customer_id);
                let mut acc = 0.0;
                let mut chosen = arms.last().map(|a| a.0);
                for (arm, share) in arms {
                    acc += share;
                    if point < acc {
                        chosen = Some(*arm);
                        break;
                    }
                }
                match chosen {
                    Some(SplitArm::Step(to)) => {
                        let to_id = self.flow().graph[to].id.clone();
                        self.run.splits.insert(id.clone(), to_id.clone());
                        self.record("split", id, json!({ "arm": to_id }));
                        Flow::Go(Some(to))
                    }
                    Some(SplitArm::Control) | None => {
                        self.run.arm = Arm::Control;
                        self.run.splits.insert(id.clone(), "control".to_owned());
                        self.count(&id, stats::qualified("to", "control"));
                        self.record(
                            "split",
                            id,
                            json!({ "arm": "control", "outcome": "control" }),
                        );
                        self.end("control");
                        Flow::End
                    }
                }
            }
            k @ StepKind::Update { .. } => self.update(id, k),
            StepKind::Call {
                webhook,
                body,
                save_as,
                timeout,
                ..
            } => self.call(id, webhook, body.as_ref(), save_as, *timeout),
            k @ StepKind::Task { .. } => self.task(id, k),
            StepKind::Exit { outcome } => {
                self.record("exit", id, json!({ "outcome": outcome }));
                self.end(outcome);
                Flow::End
            }
            k @ StepKind::Plugin { .. } => self.plugin(id, k),
        }
    }

    /// End the run; the caller has recorded the step that ended it.
    fn end(&mut self, outcome: &str) {
        self.count(stats::FLOW, stats::qualified(metric::ENDED, outcome));
        self.run.status = RunStatus::Ended;
        self.run.step = None;
        self.run.wake_at = None;
        self.run.waiting_for = None;
        self.run.outcome = Some(outcome.to_owned());
        self.run.updated_at = self.cx.now;
    }

    /// Count a failure at `step` (a step id or a flow-level part) for this customer.
    fn fail(&mut self, step: &str, error: String) {
        self.out.failures.push(Failure {
            flow: self.run.flow.clone(),
            step: step.to_owned(),
            customer_id: self.run.customer_id.clone(),
            count: 1,
            error,
            at: self.cx.now,
        });
    }

    fn record(&mut self, action: &str, step: String, detail: Json) {
        if action == "error" {
            let error = detail
                .get("error")
                .and_then(Json::as_str)
                .unwrap_or("failed")
                .to_owned();
            self.fail(&step, error);
        }
        self.count_record(action, &step, &detail);
        self.run.seq += 1;
        self.run.updated_at = self.cx.now;
        self.out.history.push(HistoryEntry {
            run_id: self.run.id.clone(),
            seq: self.run.seq,
            flow: self.run.flow.clone(),
            customer_id: self.run.customer_id.clone(),
            step,
            at: self.cx.now,
            action: action.to_owned(),
            detail,
        });
    }

    fn with_scope<R>(&self, event: Option<&Event>, f: impl FnOnce(&Scope<'_>) -> R) -> R {
        let profile = self.customer.profile();
        let event = event.or(self.run.event.as_ref()).map(Event::to_json);
        let vars = Json::Object(self.run.vars.clone());
        let flow = json!({ "id": self.flow().id, "name": self.flow().name });
        let scope = Scope {
            customer: &profile,
            event: event.as_ref(),
            vars: Some(&vars),
            flow: Some(&flow),
            now: self.cx.now,
            tz: self.tz,
        };
        f(&scope)
    }

    fn eval_bool(
        &self,
        expr: &crate::expr::Expr,
        event: Option<&Event>,
    ) -> Result<bool, eval::EvalError> {
        self.with_scope(event, |s| eval::eval_bool(expr, s))
    }

    fn eval_time(&self, expr: &crate::expr::Expr) -> Result<Time, eval::EvalError> {
        self.with_scope(None, |s| eval::eval_time(expr, s))
    }

    fn eval_value(&self, expr: &crate::expr::Expr) -> Result<Json, eval::EvalError> {
        self.with_scope(None, |s| eval::eval(expr, s))
    }

    fn render_text(&self, name: &str, source: &str) -> Result<String, eval::EvalError> {
        self.with_scope(None, |s| eval::render(name, source, s))
    }

    fn render_json(&self, value: &Json) -> Result<Json, eval::EvalError> {
        self.with_scope(None, |s| eval::render_value(value, s))
    }
}

enum Flow {
    /// Continue with this target (`None` completes the run).
    Go(Target),
    /// The run waits.
    Park,
    /// The run ended.
    End,
}

fn secs(s: u64) -> Span {
    Span::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

/// Where a customer falls in a split, in [0, 100): a hash of flow, step and customer, so the
/// same customer always lands in the same arm, across re-runs, restarts and machines.
pub fn split_point(flow: &str, step: &str, customer: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(flow.as_bytes());
    h.update([0]);
    h.update(step.as_bytes());
    h.update([0]);
    h.update(customer.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::TimeOfDay;

    fn t(s: &str) -> Time {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn split_points_are_stable_and_spread() {
        assert_eq!(split_point("f", "s", "c1"), split_point("f", "s", "c1"));
        let n = 20_000;
        let below: usize = (0..n)
            .filter(|i| split_point("f", "s", &format!("c{i}")) < 10.0)
            .count();
        let share = below as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
    }

    #[test]
    fn windows_open_at_the_next_local_start() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let w = Some((TimeOfDay(10 * 60), TimeOfDay(20 * 60)));
        // 23:00 Shanghai → 10:00 next morning.
        assert_eq!(
            next_in_window(t("2026-03-01T15:00:00Z"), tz, &[], w),
            t("2026-03-02T02:00:00Z")
        );
        // Inside: now.
        assert_eq!(
            next_in_window(t("2026-03-01T04:00:00Z"), tz, &[], w),
            t("2026-03-01T04:00:00Z")
        );
        // 2026-03-01 is a Sunday: weekdays only → Monday 10:00.
        assert_eq!(
            next_in_window(t("2026-03-01T04:00:00Z"), tz, &[Weekday::Mon], w),
            t("2026-03-02T02:00:00Z")
        );
        // Wrapping window 20:00-02:00 at 01:00 Sunday local belongs to Saturday's window.
        let wrap = Some((TimeOfDay(20 * 60), TimeOfDay(2 * 60)));
        assert_eq!(
            next_in_window(t("2026-02-28T17:00:00Z"), tz, &[Weekday::Sat], wrap),
            t("2026-02-28T17:00:00Z")
        );
    }

    #[test]
    fn local_time_skips_the_dst_gap() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let d = NaiveDate::from_ymd_opt(2026, 3, 8).unwrap();
        assert_eq!(local_time(tz, d, 2 * 60 + 30), t("2026-03-08T07:00:00Z"));
    }
}
