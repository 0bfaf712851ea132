//! `canvas test` and `canvas simulate`: scripted customer timelines in virtual time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use canvas_engine::Registry;
use canvas_engine::scenario::{self, ScenarioError};
use canvas_engine::state::{HistoryEntry, OutboxRow};
use canvas_engine::store::Store;
use canvas_engine::testing::{self, Report};
use serde_json::json;

use crate::Format;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `canvas test [PATH…]`: exit 0 when every test passes, 1 on a failed expectation, 2 when a
/// test file or a flow cannot be used.
pub fn test(paths: Vec<PathBuf>, format: Format, registry: &Registry) -> anyhow::Result<ExitCode> {
    let paths = if paths.is_empty() {
        vec![PathBuf::from("flows")]
    } else {
        paths
    };
    let files = testing::discover(&paths)?;
    if files.is_empty() {
        bail!(
            "no *.test.yaml files under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let rt = runtime()?;
    let mut reports: Vec<Report> = Vec::new();
    let mut broken: Vec<(PathBuf, String)> = Vec::new();
    for file in &files {
        match rt.block_on(testing::run_file(file, registry)) {
            Ok(r) => reports.push(r),
            Err(ScenarioError::File(errors)) => {
                for e in errors {
                    broken.push((file.clone(), e.to_string()));
                }
            }
            Err(e) => broken.push((file.clone(), e.to_string())),
        }
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Human => {
            for r in &reports {
                if r.passed() {
                    writeln!(
                        out,
                        "PASS {} ({} customers, {} expectations)",
                        r.file.display(),
                        r.customers,
                        r.expectations
                    )?;
                } else {
                    writeln!(out, "FAIL {}", r.file.display())?;
                    for f in &r.failures {
                        writeln!(
                            out,
                            "  {}:{}:{}: {}",
                            r.file.display(),
                            f.line,
                            f.column,
                            f.message
                        )?;
                    }
                }
            }
            for (_, e) in &broken {
                writeln!(out, "ERROR {e}")?;
            }
            let passed = reports.len() - failed;
            writeln!(
                out,
                "{} {passed} passed, {failed} failed, {} unusable, of {} test file{}",
                if failed == 0 && broken.is_empty() {
                    "✓"
                } else {
                    "✗"
                },
                files.len() - reports.len(),
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            )?;
        }
        Format::Json => {
            let value = json!({
                "passed": reports.iter().filter(|r| r.passed()).count(),
                "failed": failed,
                "reports": reports,
                "errors": broken.iter().map(|(f, e)| json!({ "file": f, "message": e })).collect::<Vec<_>>(),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        Format::Github => {
            for r in &reports {
                for f in &r.failures {
                    writeln!(
                        out,
                        "::error file={},line={},col={}::{}",
                        r.file.display(),
                        f.line,
                        f.column,
                        escape(&f.message)
                    )?;
                }
            }
            for (file, e) in &broken {
                writeln!(out, "::error file={}::{}", file.display(), escape(e))?;
            }
        }
    }
    Ok(if !broken.is_empty() {
        ExitCode::from(2)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn escape(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// `canvas simulate FLOW --timeline FILE`: play a timeline and print each customer's trace.
pub fn simulate(
    flow: &str,
    timeline: &Path,
    flows_dir: &Path,
    format: Format,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let as_file = PathBuf::from(flow);
    let (dir, flow_id) = if as_file.is_file() {
        let v = canvas_engine::validate_paths(std::slice::from_ref(&as_file), registry)?;
        let Some(f) = v.flows().next() else {
            bail!(
                "{} does not validate: {}; run `canvas validate {}`",
                as_file.display(),
                crate::output::first_errors(&v),
                as_file.display()
            );
        };
        (canvas_engine::project::folder_of(&as_file), f.id.clone())
    } else {
        (flows_dir.to_path_buf(), flow.to_owned())
    };
    let scenario = match scenario::load(timeline, Some(&flow_id)) {
        Ok(s) => s,
        Err(e) => {
            writeln!(std::io::stderr(), "{e}")?;
            return Ok(ExitCode::from(2));
        }
    };
    let validation = canvas_engine::validate_paths(std::slice::from_ref(&dir), registry)
        .with_context(|| format!("reading flows in {}", dir.display()))?;
    let flows: Vec<_> = validation.flows().collect();
    let policy = testing::policy_for(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let default_zone = policy.timezone;
    let rt = runtime()?;
    let outcome = match rt.block_on(scenario::run(&scenario, &flows, policy, registry.clone())) {
        Ok(o) => o,
        Err(ScenarioError::File(errors)) => {
            for e in errors {
                writeln!(std::io::stderr(), "{e}")?;
            }
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    let store = &outcome.runtime.store;
    let mut traces = Vec::new();
    for id in &scenario.customer_ids {
        let history = rt.block_on(store.history(Some(id)))?;
        let outbox = rt.block_on(store.outbox(Some(id)))?;
        let failures = rt.block_on(store.failures(id))?;
        // Times in the customer's zone, never a local reading that did not exist.
        let zone = rt
            .block_on(store.load(std::slice::from_ref(id), scenario.until))?
            .first()
            .and_then(|c| c.customer.zone().and_then(|z| z.parse().ok()))
            .unwrap_or(default_zone);
        traces.push((id.clone(), history, outbox, failures, zone));
    }
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let value: Vec<_> = traces
                .iter()
                .map(|(id, h, o, f, _)| {
                    json!({ "customer": id, "history": h, "outbox": o, "failures": f })
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        Format::Human | Format::Github => {
            for (id, history, outbox, failures, zone) in &traces {
                let offset = testing::ShowIn::Near(
                    scenario
                        .offsets
                        .get(id)
                        .copied()
                        .unwrap_or(scenario.default_offset),
                    *zone,
                );
                writeln!(out, "{id}")?;
                let entered = history.iter().any(|h| h.flow == flow_id);
                let why: Vec<&str> = failures
                    .iter()
                    .filter(|f| f.flow == flow_id)
                    .map(|f| f.error.as_str())
                    .collect();
                if !entered && why.is_empty() {
                    writeln!(
                        out,
                        "  (never entered {flow_id}: its trigger never matched, or its `where` or audience was false)"
                    )?;
                } else if !entered {
                    writeln!(out, "  (never entered {flow_id}: {})", why.join("; "))?;
                }
                for h in history {
                    writeln!(
                        out,
                        "  {}  {:<24} {:<9} {}",
                        testing::show(h.at, offset),
                        h.step,
                        h.action,
                        describe(h, outbox, offset)
                    )?;
                }
                for f in failures.iter().filter(|f| entered || f.flow != flow_id) {
                    writeln!(
                        out,
                        "  {}  {:<24} {:<9} {} (in {}, {} times)",
                        testing::show(f.at, offset),
                        f.step,
                        "failed",
                        f.error,
                        f.flow,
                        f.count
                    )?;
                }
            }
            // The outcomes of the whole simulated span, in the engine's zone.
            let range = crate::outcomes::Range {
                from: crate::outcomes::today(scenario.start, default_zone),
                to: crate::outcomes::today(scenario.until, default_zone),
            };
            let report = rt.block_on(crate::status::Report::read(
                store,
                Some(&flow_id),
                range,
                default_zone,
            ))?;
            writeln!(out)?;
            report.write_human(&mut out)?;
            writeln!(
                out,
                "{} customers, {} steps, {} outbox rows, virtual time {} → {}",
                scenario.customer_ids.len(),
                outcome.stats.transitions,
                outcome.stats.outbox,
                testing::show(
                    scenario.start,
                    testing::ShowIn::Near(scenario.default_offset, default_zone)
                ),
                testing::show(
                    scenario.until,
                    testing::ShowIn::Near(scenario.default_offset, default_zone)
                )
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One history row in words; times in the customer's offset.
pub(crate) fn describe(h: &HistoryEntry, outbox: &[OutboxRow], offset: testing::ShowIn) -> String {
    let d = &h.detail;
    let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let time = |k: &str| {
        d.get(k)
            .and_then(|v| v.as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| testing::show(t.to_utc(), offset))
            .unwrap_or_default()
    };
    match h.action.as_str() {
        "sent" => {
            // The step's own message (a fallback has a key of its own, `RUN/STEP/CHANNEL`).
            let key = format!("{}/{}", h.run_id, h.step);
            let row = outbox.iter().find(|o| o.key == key);
            let to = row
                .and_then(|r| r.address.clone())
                .map(|a| format!(" to {a}"))
                .unwrap_or_default();
            format!("{} {}{to}", s("channel"), s("template"))
        }
        "skipped" => format!("{} {}: {}", s("channel"), s("template"), s("reason"))
            .trim_start()
            .to_owned(),
        "delayed" => format!(
            "{} {} until {}: {}",
            s("channel"),
            s("template"),
            time("until"),
            s("reason")
        ),
        "waiting" => match d.get("event").and_then(|v| v.as_str()) {
            Some(ev) => format!("for `{ev}` until {}", time("until")),
            None => format!("until {}", time("until")),
        },
        "waited" => "no wait needed".to_owned(),
        "resumed" => format!("`{}` arrived", s("event")),
        "timeout" => format!("no `{}` in time", s("event")),
        "branch" => format!(
            "→ {}",
            d.get("next")
                .map(|v| v.to_string().trim_matches('"').to_owned())
                .unwrap_or_default()
        ),
        "split" => format!(
            "arm {}",
            d.get("arm")
                .map(|v| v.to_string().trim_matches('"').to_owned())
                .unwrap_or_default()
        ),
        "called" => format!("{} (waiting for the response)", s("webhook")),
        "answered" => format!("response saved as vars.{}", s("save_as")),
        // A dead call, or a dead delivery of a send.
        "failed" => match d.get("webhook").and_then(|v| v.as_str()) {
            Some(webhook) => {
                let then = match d.get("next").and_then(|v| v.as_str()) {
                    Some(next) => format!("; → {next}"),
                    None => format!("; end: {}", s("outcome")),
                };
                format!("call {webhook} failed: {}{then}", s("error"))
            }
            None => {
                let then = match (
                    d.get("fallback").and_then(|v| v.as_str()),
                    d.get("no_fallback").and_then(|v| v.as_str()),
                ) {
                    (Some(channel), _) => format!("; falling back to {channel}"),
                    (None, Some(why)) => format!("; no fallback: {why}"),
                    (None, None) => String::new(),
                };
                format!(
                    "{} {} not delivered: {}{then}",
                    s("channel"),
                    s("template"),
                    s("error")
                )
            }
        },
        "fallback" => {
            let to = outbox
                .iter()
                .find(|o| o.key == s("key"))
                .and_then(|r| r.address.clone())
                .map(|a| format!(" to {a}"))
                .unwrap_or_default();
            format!(
                "{} {}{to} (instead of {})",
                s("channel"),
                s("template"),
                s("from")
            )
        }
        "late" => format!("answer came too late: {}", s("ignored")),
        "task" => format!("for {}, due {}", s("assign"), time("due_at")),
        "updated" => "profile updated".to_owned(),
        "exit" => d
            .get("event")
            .and_then(|v| v.as_str())
            .map(|e| format!("exit on `{e}`"))
            .or_else(|| {
                d.get("when")
                    .and_then(|v| v.as_str())
                    .map(|w| format!("exit: {w}"))
            })
            .unwrap_or_else(|| format!("end: {}", s("outcome"))),
        "goal" => {
            let ends = if d.get("exit").and_then(|v| v.as_bool()) == Some(true) {
                "; run ends"
            } else {
                ""
            };
            format!("goal `{}` reached{ends}", s("event"))
        }
        "ended" => s("outcome"),
        "error" => s("error"),
        _ => {
            if d.is_null() {
                String::new()
            } else {
                d.to_string()
            }
        }
    }
}
