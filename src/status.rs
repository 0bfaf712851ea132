//! `canvas status`: where customers are right now, and what the journeys achieved — runs
//! waiting at each step, conversions per arm, the lift of a holdout — and what failed at
//! run time (expressions that could not be evaluated, steps that ended a run with an error),
//! and the outcome counters of the last 7 days per flow and step.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::clock::SystemClock;
use canvas_engine::state::{Arm, FailureCount};
use canvas_engine::store::{ArmCount, Database, NodeCount, Store};
use serde_json::json;

use crate::Format;
use crate::outcomes::{self, Outcomes, Range};

/// Per flow: runs waiting per step, the goal figures per arm, and the run-time failures.
#[derive(Debug, Default)]
pub struct Report {
    flows: BTreeMap<String, FlowReport>,
}

#[derive(Debug, Default)]
struct FlowReport {
    waiting: Vec<NodeCount>,
    arms: Vec<ArmCount>,
    failures: Vec<FailureCount>,
    outcomes: Option<Outcomes>,
}

impl Report {
    /// What the database says; the outcomes over `range` (days in `tz`).
    pub async fn read<S: Store>(
        store: &S,
        flow: Option<&str>,
        range: Range,
        tz: chrono_tz::Tz,
    ) -> canvas_engine::store::Result<Report> {
        let mut report = Report::default();
        for v in store.flow_versions(flow).await? {
            report.flows.entry(v.flow).or_default();
        }
        for n in store.node_counts(flow).await? {
            report
                .flows
                .entry(n.flow.clone())
                .or_default()
                .waiting
                .push(n);
        }
        for a in store.goal_report(flow).await? {
            report.flows.entry(a.flow.clone()).or_default().arms.push(a);
        }
        for f in store.failure_counts(flow).await? {
            report
                .flows
                .entry(f.flow.clone())
                .or_default()
                .failures
                .push(f);
        }
        for (id, r) in &mut report.flows {
            r.arms.sort_by_key(|a| a.arm == Arm::Control);
            let o = outcomes::read(store, id, None, range, None, tz).await?;
            r.outcomes =
                (!o.totals.is_empty() || o.steps.iter().any(|s| !s.counts.is_empty())).then_some(o);
        }
        // A flow the database knows only by its versions, with nothing to show, is left out.
        report.flows.retain(|_, r| {
            !(r.waiting.is_empty() && r.arms.is_empty() && r.failures.is_empty())
                || r.outcomes.is_some()
        });
        Ok(report)
    }

    /// Treated rate minus control rate, in percentage points, when the flow has both.
    fn lift(arms: &[ArmCount]) -> Option<f64> {
        let rate = |arm| {
            arms.iter()
                .find(|a| a.arm == arm)
                .filter(|a| a.runs > 0)
                .map(ArmCount::rate)
        };
        Some((rate(Arm::Treated)? - rate(Arm::Control)?) * 100.0)
    }

    pub fn write_human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.flows.is_empty() {
            return writeln!(out, "no runs yet");
        }
        for (
            flow,
            FlowReport {
                waiting,
                arms,
                failures,
                outcomes,
            },
        ) in &self.flows
        {
            writeln!(out, "{flow}")?;
            let waiting: Vec<String> = waiting
                .iter()
                .map(|n| format!("{} {}", n.step, n.waiting))
                .collect();
            writeln!(
                out,
                "  waiting  {}",
                if waiting.is_empty() {
                    "none".to_owned()
                } else {
                    waiting.join(", ")
                }
            )?;
            for a in arms {
                let arm = match a.arm {
                    Arm::Treated => "treated",
                    Arm::Control => "control",
                };
                writeln!(
                    out,
                    "  {arm:<8} {} runs, {} converted ({:.1}%)",
                    a.runs,
                    a.converted,
                    a.rate() * 100.0
                )?;
            }
            if let Some(lift) = Report::lift(arms) {
                writeln!(out, "  lift     {lift:+.1} points (treated − control)")?;
            }
            if let Some(o) = outcomes {
                write_outcomes(out, o)?;
            }
            for f in failures {
                writeln!(
                    out,
                    "  failed   {} {} for {}; last {} for {}: {}",
                    f.step,
                    plural(f.count, "time"),
                    plural(f.customers, "customer"),
                    f.last_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    f.last_customer,
                    f.last_error
                )?;
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let flows: Vec<_> = self
            .flows
            .iter()
            .map(|(flow, r)| {
                let waiting: serde_json::Map<String, serde_json::Value> = r
                    .waiting
                    .iter()
                    .map(|n| (n.step.clone(), json!(n.waiting)))
                    .collect();
                json!({
                    "flow": flow,
                    "waiting": waiting,
                    "arms": r.arms,
                    "lift_points": Report::lift(&r.arms),
                    "failures": r.failures,
                    "outcomes": r.outcomes,
                })
            })
            .collect();
        json!({ "flows": flows })
    }
}

/// `metric n, metric n, …` with qualified names read as words (`sent:sms` -> `sent sms`).
fn counters<'a>(counts: impl Iterator<Item = (&'a String, &'a u64)>) -> String {
    counts
        .filter(|(m, n)| **n > 0 && !m.starts_with("to:") && m.as_str() != "waiting")
        .map(|(m, n)| format!("{} {n}", m.replace(':', " ")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_outcomes(out: &mut dyn Write, o: &Outcomes) -> std::io::Result<()> {
    writeln!(
        out,
        "  {} – {} ({}): {}",
        o.from,
        o.to,
        o.timezone,
        match counters(o.totals.iter()) {
            s if s.is_empty() => "nothing counted".to_owned(),
            s => s,
        }
    )?;
    for s in &o.steps {
        let line = counters(s.counts.iter());
        if !line.is_empty() {
            writeln!(out, "    {:<16} {line}", s.step)?;
        }
    }
    Ok(())
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Read-only: a database that is not there is an error ("no database at …"), never created.
pub fn status(
    store: crate::serve::config::Store,
    flow: Option<&str>,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        let database = &store.database;
        let db = Database::open_existing(database.expose(), store.database_timeout)
            .await
            .with_context(|| format!("opening {database}"))?;
        let tz = store.policy.timezone;
        let today = outcomes::today(canvas_engine::clock::Clock::now(&SystemClock), tz);
        let range = Range::last(outcomes::DEFAULT_DAYS, today);
        anyhow::Ok(Report::read(&db, flow, range, tz).await?)
    })?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report.to_json())?)?,
        Format::Human | Format::Github => report.write_human(&mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}
