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
use crate::stats::{self, Count, metric};

mod call;
mod fallback;
mod send;

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
    /// The outcome counters the transition moves (see [`crate::stats`]).
    pub counts: Vec<Count>,
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
    /// The step the run is parked at, if it waits.
    fn parked(&self) -> Option<String> {
        match self.run.status {
            RunStatus::Waiting => self.run.step.clone(),
            RunStatus::Ended => None,
        }
    }

    /// Move the waiting gauge from where the run was parked (`before`) to where it is now.
    /// A new run (no step yet) was parked nowhere.
    fn count_waiting(&mut self, before: Option<String>) {
        let after = self.parked();
        if before == after {
            return;
        }
        let (flow, version) = (&self.run.flow, &self.run.version);
        if let Some(step) = &before {
            self.out
                .counts
                .push(Count::waiting(flow, version, step, -1));
        }
        if let Some(step) = &after {
            self.out.counts.push(Count::waiting(flow, version, step, 1));
        }
    }

    /// Count one at `step` (a step id, or [`stats::FLOW`]) today.
    fn count(&mut self, step: &str, metric: String) {
        self.out.counts.push(Count {
            flow: self.run.flow.clone(),
            version: self.run.version.clone(),
            step: step.to_owned(),
            metric,
            day: Some(self.day),
            n: 1,
        });
    }

    fn flow(&self) -> &CompiledFlow {
        self.cx.flow
    }

    fn apply(&mut self, input: Input<'_>) {
        let ended = self.run.status == RunStatus::Ended;
        match input {
            Input::Start => {
                self.count(stats::FLOW, metric::ENTERED.to_owned());
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
        self.count(stats::FLOW, metric::CONVERTED.to_owned());
        let arm = match self.run.arm {
            Arm::Treated => "treated",
            Arm::Control => "control",
        };
        self.count(stats::FLOW, stats::qualified(metric::CONVERTED, arm));
        if let Some(touch) = self.run.last_touch.clone() {
            self.count(&touch, metric::CONVERTED.to_owned());
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

    fn resume_on_event(&mut self, event: &Event) {
        let Some(node) = self.current() else { return };
        let flow = self.cx.flow;
        if let StepKind::Wait {
            wait: Wait::Event {
                name, condition, ..
            },
            next,
        } = &flow.graph[node].kind
        {
            if self.run.waiting_for.as_deref() != Some(name.as_str()) || *name != event.name {
                return;
            }
            if let Some(c) = condition {
                match self.eval_bool(c, Some(event)) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        self.record(
                            "error",
                            flow.graph[node].id.clone(),
                            json!({ "where": c.source(), "error": e.to_string() }),
                        );
                        return;
                    }
                }
            }
            self.run.event = Some(event.clone());
            self.run.waiting_for = None;
            self.run.wake_at = None;
            self.record(
                "resumed",
                flow.graph[node].id.clone(),
                json!({ "event": event.name, "event_id": event.id }),
            );
            self.advance(*next);
        }
    }

    fn timer(&mut self) {
        let Some(node) = self.current() else { return };
        let flow = self.cx.flow;
        let step = &flow.graph[node];
        self.run.wake_at = None;
        match &step.kind {
            StepKind::Wait {
                wait: Wait::Event {
                    name, on_timeout, ..
                },
                ..
            } => {
                self.run.waiting_for = None;
                match on_timeout {
                    Some(t) => {
                        self.record("timeout", step.id.clone(), json!({ "event": name }));
                        self.advance(Some(*t));
                    }
                    None => {
                        self.record(
                            "timeout",
                            step.id.clone(),
                            json!({ "event": name, "outcome": "timeout" }),
                        );
                        self.end("timeout");
                    }
                }
            }
            // The wait is over; the next step's history row records the moment.
            StepKind::Wait { next, .. } => self.advance(*next),
            // A send delayed by quiet hours or a cap: try again now.
            StepKind::Send { .. } => self.advance(Some(node)),
            // The call's `timeout` passed without an answer.
            StepKind::Call { .. } if self.run.waiting_for.as_deref() == Some(WAITING_FOR_CALL) => {
                self.call_timed_out(node)
            }
            _ => {
                tracing::warn!(run = %self.run.id, step = %step.id, "timer at a step that does not wait");
            }
        }
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
                self.count(id, metric::ENTERED.to_owned());
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
            StepKind::Update {
                set,
                add,
                tag,
                untag,
                next,
            } => {
                let mut detail = Map::new();
                for (k, v) in set {
                    let v = self.render_json(v).unwrap_or_else(|_| v.clone());
                    self.customer.attributes.insert(k.clone(), v);
                }
                for (k, n) in add {
                    let cur = self
                        .customer
                        .attributes
                        .get(k)
                        .and_then(Json::as_f64)
                        .unwrap_or(0.0);
                    let sum = cur + n;
                    let v = if sum.fract() == 0.0 && sum.abs() < 9e15 {
                        json!(sum as i64)
                    } else {
                        json!(sum)
                    };
                    self.customer.attributes.insert(k.clone(), v);
                }
                if !tag.is_empty() || !untag.is_empty() {
                    let mut tags: Vec<Json> = match self.customer.attributes.get("tags") {
                        Some(Json::Array(a)) => a.clone(),
                        _ => Vec::new(),
                    };
                    for t in tag {
                        if !tags.iter().any(|x| x.as_str() == Some(t)) {
                            tags.push(json!(t));
                        }
                    }
                    tags.retain(|x| !untag.iter().any(|u| x.as_str() == Some(u)));
                    self.customer
                        .attributes
                        .insert("tags".to_owned(), Json::Array(tags));
                }
                detail.insert(
                    "set".into(),
                    json!(set.iter().map(|(k, _)| k).collect::<Vec<_>>()),
                );
                detail.insert(
                    "add".into(),
                    json!(add.iter().map(|(k, _)| k).collect::<Vec<_>>()),
                );
                detail.insert("tag".into(), json!(tag));
                detail.insert("untag".into(), json!(untag));
                self.customer.updated_at = self.cx.now;
                self.out.customer_changed = true;
                self.record("updated", id, Json::Object(detail));
                Flow::Go(*next)
            }
            StepKind::Call {
                webhook,
                body,
                save_as,
                timeout,
                ..
            } => self.call(id, webhook, body.as_ref(), save_as, *timeout),
            StepKind::Task {
                assign,
                text,
                due,
                next,
            } => {
                let assignee = match self.eval_value(assign) {
                    Ok(Json::String(s)) => Some(s),
                    Ok(Json::Null) | Err(_) => None,
                    Ok(other) => Some(other.to_string()),
                };
                let rendered = self.render_text(&format!("{}/{}", self.run.flow, id), text);
                match (assignee, rendered) {
                    (Some(assignee), Ok(text)) => {
                        let due_at = self.cx.now + secs(due.as_secs());
                        self.out.outbox.push(OutboxRow {
                            key: format!("{}/{}", self.run.id, id),
                            kind: OutboxKind::Task,
                            run_id: self.run.id.clone(),
                            flow: self.run.flow.clone(),
                            customer_id: self.run.customer_id.clone(),
                            step: id.clone(),
                            channel: "task".to_owned(),
                            address: Some(assignee.clone()),
                            template: None,
                            payload: json!({ "assign": assignee, "text": text, "due_at": due_at.to_rfc3339() }),
                            transactional: true,
                            created_at: self.cx.now,
                        });
                        self.run.last_touch = Some(id.clone());
                        self.record(
                            "task",
                            id,
                            json!({ "assign": assignee, "due_at": due_at.to_rfc3339() }),
                        );
                    }
                    (None, _) => {
                        self.count(&id, stats::qualified("skipped", "no_address"));
                        self.record("skipped", id, json!({ "reason": format!("`{}` names nobody for this customer", assign.source()) }));
                    }
                    (_, Err(e)) => {
                        self.count(&id, stats::qualified("skipped", "error"));
                        self.record("skipped", id, json!({ "reason": e.to_string() }));
                    }
                }
                Flow::Go(*next)
            }
            StepKind::Exit { outcome } => {
                self.record("exit", id, json!({ "outcome": outcome }));
                self.end(outcome);
                Flow::End
            }
            StepKind::Plugin {
                kind,
                with,
                outputs,
                next,
            } => {
                let Some(plugin) = self.cx.registry.kind(kind) else {
                    self.record(
                        "error",
                        id,
                        json!({ "error": format!("node kind `{kind}` is not registered") }),
                    );
                    return Flow::Go(*next);
                };
                let plugin = plugin.clone();
                let (flow_id, run_id, now) =
                    (self.run.flow.clone(), self.run.id.clone(), self.cx.now);
                let before = self.customer.cooldowns.clone();
                let result = {
                    let mut pcx = PluginCx {
                        flow: &flow_id,
                        step: &id,
                        run_id: &run_id,
                        customer: self.customer,
                        now,
                    };
                    plugin.run(with, &mut pcx)
                };
                if self.customer.cooldowns != before {
                    self.customer.updated_at = now;
                    self.out.customer_changed = true;
                }
                match result {
                    Ok(None) => {
                        self.record(kind, id, json!({ "output": "next" }));
                        Flow::Go(*next)
                    }
                    Ok(Some(output)) => {
                        self.record(kind, id, json!({ "output": output }));
                        match outputs.iter().find(|(o, _)| *o == output) {
                            Some((_, t)) => Flow::Go(*t),
                            None => Flow::Go(None),
                        }
                    }
                    Err(e) => {
                        self.record("error", id, json!({ "error": e }));
                        Flow::Go(*next)
                    }
                }
            }
        }
    }

    fn wait(&mut self, id: &str, wait: &Wait, next: Target) -> Flow {
        let now = self.cx.now;
        let until = match wait {
            Wait::For(d) => now + secs(d.as_secs()),
            Wait::Until(expr) => match self.eval_time(expr) {
                Ok(t) => t,
                Err(e) => {
                    // A date the customer does not have cannot be waited for: move on and
                    // say why, rather than park the run forever.
                    self.record(
                        "error",
                        id.to_owned(),
                        json!({ "until": expr.source(), "error": e.to_string() }),
                    );
                    return Flow::Go(next);
                }
            },
            Wait::Event { name, timeout, .. } => {
                let until = now + secs(timeout.as_secs());
                self.run.waiting_for = Some(name.clone());
                self.run.wake_at = Some(until);
                self.record(
                    "waiting",
                    id.to_owned(),
                    json!({ "event": name, "until": until.to_rfc3339() }),
                );
                return Flow::Park;
            }
            Wait::Window { days, between } => next_in_window(now, self.tz, days, *between),
        };
        if until <= now {
            self.record(
                "waited",
                id.to_owned(),
                json!({ "until": until.to_rfc3339(), "passed": true }),
            );
            return Flow::Go(next);
        }
        self.run.wake_at = Some(until);
        self.run.waiting_for = None;
        self.record(
            "waiting",
            id.to_owned(),
            json!({ "until": until.to_rfc3339() }),
        );
        Flow::Park
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

    /// The counters a history row moves: what it did at its step, and on which channel.
    /// (Arrivals and edges are counted by `advance`, the reasons of delays and skips by
    /// `send`, conversions by `goal`, outcomes by `end`.)
    fn count_record(&mut self, action: &str, step: &str, detail: &Json) {
        let counted = match action {
            "sent" | "failed" | "delayed" | "skipped" | "error" | "timeout" | "task" | "called"
            | "late" => action,
            "fallback" => metric::FELL_BACK,
            "exit" => "exited",
            _ => return,
        };
        self.count(step, counted.to_owned());
        let channel = match action {
            "fallback" => detail.get("from"),
            "sent" | "failed" => detail.get("channel"),
            _ => None,
        };
        if let Some(channel) = channel.and_then(Json::as_str) {
            self.count(step, stats::qualified(counted, channel));
        }
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

/// A local date at a clock time (minutes after midnight) in `tz`; a time skipped by a DST
/// change moves forward to the first valid minute.
pub fn local_time(tz: Tz, date: NaiveDate, minutes: u32) -> Time {
    let mut m = minutes;
    loop {
        let naive = date
            .and_hms_opt(0, 0, 0)
            .map(|d| d + Span::minutes(i64::from(m)));
        let Some(naive) = naive else { break };
        match tz.from_local_datetime(&naive) {
            chrono::LocalResult::Single(t) => return t.with_timezone(&chrono::Utc),
            chrono::LocalResult::Ambiguous(t, _) => return t.with_timezone(&chrono::Utc),
            chrono::LocalResult::None if m < minutes + 24 * 60 => m += 1,
            chrono::LocalResult::None => break,
        }
    }
    chrono::Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
}

fn weekday_matches(days: &[Weekday], date: NaiveDate) -> bool {
    if days.is_empty() {
        return true;
    }
    let w = match date.weekday() {
        chrono::Weekday::Mon => Weekday::Mon,
        chrono::Weekday::Tue => Weekday::Tue,
        chrono::Weekday::Wed => Weekday::Wed,
        chrono::Weekday::Thu => Weekday::Thu,
        chrono::Weekday::Fri => Weekday::Fri,
        chrono::Weekday::Sat => Weekday::Sat,
        chrono::Weekday::Sun => Weekday::Sun,
    };
    days.contains(&w)
}

/// The first moment at or after `now` inside a customer-local send window. A window that
/// wraps midnight (`20:00-02:00`) belongs to the day it opens on.
pub fn next_in_window(
    now: Time,
    tz: Tz,
    days: &[Weekday],
    between: Option<(crate::duration::TimeOfDay, crate::duration::TimeOfDay)>,
) -> Time {
    let today = now.with_timezone(&tz).date_naive();
    for offset in -1..=8i64 {
        let date = today + Span::days(offset);
        if !weekday_matches(days, date) {
            continue;
        }
        let (start, end) = match between {
            None => (
                local_time(tz, date, 0),
                local_time(tz, date + Span::days(1), 0),
            ),
            Some((a, z)) if a < z => (
                local_time(tz, date, u32::from(a.0)),
                local_time(tz, date, u32::from(z.0)),
            ),
            Some((a, z)) => (
                local_time(tz, date, u32::from(a.0)),
                local_time(tz, date + Span::days(1), u32::from(z.0)),
            ),
        };
        if end > now {
            return start.max(now);
        }
    }
    now
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
