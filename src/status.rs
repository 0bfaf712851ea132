//! `canvas status`: where customers are right now, and what the journeys achieved — runs
//! waiting at each step, conversions per arm, and the lift of a holdout.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::state::Arm;
use canvas_engine::store::{ArmCount, Database, NodeCount, Store};
use serde_json::json;

use crate::Format;

/// Per flow: runs waiting per step, and the goal figures per arm.
#[derive(Debug, Default)]
pub struct Report {
    flows: BTreeMap<String, (Vec<NodeCount>, Vec<ArmCount>)>,
}

impl Report {
    pub async fn read<S: Store>(
        store: &S,
        flow: Option<&str>,
    ) -> canvas_engine::store::Result<Report> {
        let mut report = Report::default();
        for n in store.node_counts(flow).await? {
            report.flows.entry(n.flow.clone()).or_default().0.push(n);
        }
        for a in store.goal_report(flow).await? {
            report.flows.entry(a.flow.clone()).or_default().1.push(a);
        }
        for (_, arms) in report.flows.values_mut() {
            arms.sort_by_key(|a| a.arm == Arm::Control);
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
        for (flow, (nodes, arms)) in &self.flows {
            writeln!(out, "{flow}")?;
            let waiting: Vec<String> = nodes
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
        }
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let flows: Vec<_> = self
            .flows
            .iter()
            .map(|(flow, (nodes, arms))| {
                let waiting: serde_json::Map<String, serde_json::Value> =
                    nodes.iter().map(|n| (n.step.clone(), json!(n.waiting))).collect();
                json!({ "flow": flow, "waiting": waiting, "arms": arms, "lift_points": Report::lift(arms) })
            })
            .collect();
        json!({ "flows": flows })
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
