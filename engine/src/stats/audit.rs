//! The counters recomputed from what they count: every run, history row and conversion of
//! a flow. It reads everything, so it is for tests and checks, never for pages: the crash
//! and scale-out tests call it after their kills to prove that no counter ran ahead of or
//! behind the transitions it sums.

use std::collections::BTreeMap;

use super::{FLOW, StatsQuery, metric, qualified};
use crate::state::RunStatus;
use crate::store::{Result, Store};

/// Where the stored counters of `flow` (all days, all versions) disagree with the runs,
/// history and conversions: one line per counter, empty when they all agree. Checked:
/// entries, each outcome, conversions, the waiting gauge per step, and per step the
/// messages sent per channel, delays, skips, failures and errors.
pub async fn audit<S: Store>(store: &S, flow: &str) -> Result<Vec<String>> {
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut bump = |step: &str, metric: String| {
        *expected.entry((step.to_owned(), metric)).or_default() += 1;
    };
    let mut after: Option<String> = None;
    loop {
        let ids = store.customer_ids(after.as_deref(), 500).await?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        for id in &ids {
            for run in store.runs(id).await? {
                if run.flow != flow {
                    continue;
                }
                bump(FLOW, metric::ENTERED.to_owned());
                match run.status {
                    RunStatus::Waiting => {
                        if let Some(step) = &run.step {
                            bump(step, metric::WAITING.to_owned());
                        }
                    }
                    RunStatus::Ended => {
                        let outcome = run.outcome.as_deref().unwrap_or("completed");
                        bump(FLOW, qualified(metric::ENDED, outcome));
                    }
                }
            }
        }
        after = Some(last);
    }
    for h in store.history(None).await? {
        if h.flow != flow {
            continue;
        }
        match h.action.as_str() {
            "sent" | "failed" => {
                bump(&h.step, h.action.clone());
                if let Some(c) = h.detail.get("channel").and_then(|c| c.as_str()) {
                    bump(&h.step, qualified(&h.action, c));
                }
            }
            "delayed" | "skipped" | "error" => bump(&h.step, h.action.clone()),
            _ => {}
        }
    }
    for c in store.conversions(Some(flow)).await? {
        bump(FLOW, metric::CONVERTED.to_owned());
        if let Some(touch) = &c.last_touch {
            bump(touch, metric::CONVERTED.to_owned());
        }
    }
    let stats = store.flow_stats(&StatsQuery::all(flow)).await?;
    let table = stats.table(None);
    let stored = |step: &str, metric: &str| {
        if step == FLOW {
            table.flow.get(metric).copied().unwrap_or(0)
        } else {
            table.get(step, metric)
        }
    };
    let mut wrong = Vec::new();
    for ((step, metric), n) in &expected {
        let got = stored(step, metric);
        if got != *n {
            wrong.push(format!(
                "{flow} {step:?} {metric}: counted {got}, recomputed {n}"
            ));
        }
    }
    // A counter of a checked kind that the records do not have at all.
    let checked = |m: &str| {
        m == metric::ENTERED
            || m == metric::WAITING
            || m == metric::CONVERTED
            || m.starts_with("ended:")
            || ["sent", "failed", "delayed", "skipped", "error"]
                .iter()
                .any(|k| m == *k || m.starts_with(&format!("{k}:")))
    };
    let rows = table
        .flow
        .iter()
        .map(|(m, n)| (FLOW.to_owned(), m, n))
        .chain(
            table
                .steps
                .iter()
                .flat_map(|(s, ms)| ms.iter().map(move |(m, n)| (s.clone(), m, n))),
        );
    for (step, m, n) in rows {
        // Step arrivals are not recomputed (a delayed send stays where it was); reasons
        // of delays and skips are kinds, not channels.
        let step_entered = step != FLOW && m == metric::ENTERED;
        let reason = m.starts_with("delayed:") || m.starts_with("skipped:");
        if *n > 0
            && checked(m)
            && !step_entered
            && !reason
            && !expected.contains_key(&(step.clone(), m.clone()))
        {
            wrong.push(format!("{flow} {step:?} {m}: counted {n}, recomputed 0"));
        }
    }
    Ok(wrong)
}
