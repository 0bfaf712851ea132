//! `canvas status`: where customers are right now, and what the journeys achieved — runs
//! waiting at each step, conversions per arm, the lift of a holdout — and what failed at
//! run time (expressions that could not be evaluated, steps that ended a run with an error).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::state::{Arm, FailureCount};
use canvas_engine::store::{ArmCount, Database, NodeCount, Store};
use serde_json::json;

use crate::Format;

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
}

impl Report {
    pub async fn read<S: Store>(
        store: &S,
        flow: Option<&str>,
    ) -> canvas_engine::store::Result<Report> {
        let mut report = Report::default();
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
        for r in report.flows.values_mut() {
            r.arms.sort_by_key(|a| a.arm == Arm::Control);
        }
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
                })
            })
            .collect();
        json!({ "flows": flows })
    }
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
        anyhow::Ok(Report::read(&db, flow).await?)
    })?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report.to_json())?)?,
        Format::Human | Format::Github => report.write_human(&mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}
