//! Waiting: `wait` steps (a duration, a date, an event, a send window), what a timer or an
//! awaited event does to a parked run, and the local-time arithmetic of send windows.

use super::*;

impl Exec<'_, '_> {
    pub(super) fn resume_on_event(&mut self, event: &Event) {
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

    pub(super) fn timer(&mut self) {
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

    pub(super) fn wait(&mut self, id: &str, wait: &Wait, next: Target) -> Flow {
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
