//! The outcome counters a transition moves (see [`crate::stats`]): arrivals and edges are
//! counted by `advance`, delay and skip reasons by `send`, conversions by `goal`, outcomes
//! by `end`; what a history row did, here, and the waiting gauge around each input.

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
    pub(super) fn count(&mut self, step: &str, metric: String) {
        self.out.counts.push(Count {
            flow: self.run.flow.clone(),
            version: self.run.version.clone(),
            step: step.to_owned(),
            metric,
            day: Some(self.day),
            n: 1,
        });
    }

    /// The counters a history row moves: what it did at its step, and on which channel.
    /// (Arrivals and edges are counted by `advance`, the reasons of delays and skips by
    /// `send`, conversions by `goal`, outcomes by `end`.)
    pub(super) fn count_record(&mut self, action: &str, step: &str, detail: &Json) {
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
}
