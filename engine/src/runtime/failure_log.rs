//! Run-time failures reach the operator's log at `warn`, rate-limited per flow and step: the
//! first at once, then at most one line a minute saying how many more there were. The
//! counts themselves are stored with the round (`Batch::failures`), so `canvas status`, the
//! API and `/metrics` see every one; the log only has to make them noticed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::state::{Failure, Time};

/// How long a flow step's failures stay quiet in the log after a line about them.
const QUIET: chrono::Duration = chrono::Duration::seconds(60);

/// Shared by the runtimes a daemon swaps on hot reload, so a reload does not restart the
/// rate limit.
#[derive(Debug, Clone, Default)]
pub struct FailureLog(Arc<Mutex<HashMap<(String, String), Quiet>>>);

#[derive(Debug)]
struct Quiet {
    until: Time,
    /// Failures since the last line.
    held: u64,
}

impl FailureLog {
    /// Log a round's failures (times are the round's, from the injected clock).
    pub fn note(&self, failures: &[Failure], now: Time) {
        if failures.is_empty() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for f in failures {
            let key = (f.flow.clone(), f.step.clone());
            let quiet = map.entry(key).or_insert(Quiet {
                until: Time::MIN_UTC,
                held: 0,
            });
            quiet.held += f.count;
            if now < quiet.until {
                continue;
            }
            tracing::warn!(
                flow = %f.flow,
                step = %f.step,
                customer = %f.customer_id,
                failures = quiet.held,
                "{}",
                f.error
            );
            quiet.held = 0;
            quiet.until = now + QUIET;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(step: &str, at: Time) -> Failure {
        Failure {
            flow: "f".into(),
            step: step.into(),
            customer_id: "c1".into(),
            count: 1,
            error: "no such key".into(),
            at,
        }
    }

    #[test]
    fn a_step_logs_once_a_minute_and_counts_what_it_held_back() {
        let log = FailureLog::default();
        let t0 = Time::UNIX_EPOCH;
        log.note(&[failure("trigger", t0)], t0);
        let held = |step: &str| {
            let map = log.0.lock().expect("lock");
            map.get(&("f".to_owned(), step.to_owned()))
                .map(|q| (q.held, q.until))
        };
        assert_eq!(
            held("trigger"),
            Some((0, t0 + QUIET)),
            "the first is logged"
        );
        let t1 = t0 + chrono::Duration::seconds(10);
        log.note(&[failure("trigger", t1), failure("trigger", t1)], t1);
        assert_eq!(
            held("trigger"),
            Some((2, t0 + QUIET)),
            "held back within the minute"
        );
        log.note(&[failure("goal", t1)], t1);
        assert_eq!(
            held("goal"),
            Some((0, t1 + QUIET)),
            "each step has its own limit"
        );
        let t2 = t0 + chrono::Duration::seconds(61);
        log.note(&[failure("trigger", t2)], t2);
        assert_eq!(
            held("trigger"),
            Some((0, t2 + QUIET)),
            "logged again, with the count"
        );
    }
}
