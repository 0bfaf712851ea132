//! The outcome counters a transition moves (see [`crate::stats`]): arrivals and edges are
//! counted by `advance`, delay and skip reasons by `send`, conversions by `goal`, outcomes
//! by `end`; what a history row did, here, and the waiting gauge around each input.

use std::borrow::Cow;

use super::*;

impl Exec<'_, '_> {
    /// The step the run is parked at, if it waits.
    pub(super) fn parked(&self) -> Option<String> {
        match self.run.status {
            RunStatus::Waiting => self.run.step.clone(),
            RunStatus::Ended => None,
        }
    }

    /// Move the waiting gauge from where the run was parked (`before`) to where it is now.
    /// A new run (no step yet) was parked nowhere.
    pub(super) fn count_waiting(&mut self, before: Option<String>) {
        let after = self.parked();
        if before == after {
            return;
        }
        for (step, n) in [(before, -1), (after, 1)] {
            if let Some(step) = step {
                self.out.counts.push(Tick {
                    step,
                    metric: Cow::Borrowed(metric::WAITING),
                    day: None,
                    n,
                });
            }
        }
    }

    /// Count one at `step` (a step id, or [`stats::FLOW`]) today.
    pub(super) fn count(&mut self, step: &str, metric: impl Into<Cow<'static, str>>) {
        self.out.counts.push(Tick {
            step: step.to_owned(),
            metric: metric.into(),
            day: Some(self.day),
            n: 1,
        });
    }

    /// The counters a history row moves: what it did at its step, and on which channel.
    /// (Arrivals and edges are counted by `advance`, the reasons of delays and skips by
    /// `send`, conversions by `goal`, outcomes by `end`.)
    pub(super) fn count_record(&mut self, action: &str, step: &str, detail: &Json) {
        let counted: &'static str = match action {
            "sent" => "sent",
            "failed" => "failed",
            "delayed" => "delayed",
            "skipped" => "skipped",
            "error" => metric::ERROR,
            "timeout" => "timeout",
            "task" => "task",
            "called" => "called",
            "late" => "late",
            "fallback" => metric::FELL_BACK,
            "exit" => "exited",
            _ => return,
        };
        self.count(step, counted);
        let channel = match action {
            "fallback" => detail.get("from"),
            "sent" | "failed" => detail.get("channel"),
            _ => None,
        };
        if let Some(channel) = channel.and_then(Json::as_str) {
            self.count(step, stats::qualified(counted, channel));
        }
    }
}
