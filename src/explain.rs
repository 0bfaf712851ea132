//! `canvas explain CUSTOMER`: a customer's story from the daemon's database — every run with
//! its version and outcome, each step and why, in the customer's own time zone, the
//! deliveries with their attempts and errors, what failed — and, when a step or a template
//! is named, a plain answer: sent when, not sent why, or never entered why.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::state::{DeliveryState, DeliveryStatus, Failure, HistoryEntry, OutboxRow, Run};
use canvas_engine::store::{Database, Store as _};
use canvas_engine::testing::{self, ShowIn};
use serde_json::json;

use crate::Format;
use crate::serve::config::Store;

/// What the question is about.
pub struct Question {
    pub customer: String,
    pub flow: Option<String>,
    pub step: Option<String>,
    pub template: Option<String>,
}

pub fn explain(store: Store, q: Question, format: Format) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let story = rt.block_on(async {
        let database = &store.database;
        let db = Database::open_existing(database.expose(), store.database_timeout)
            .await
            .with_context(|| format!("opening {database}"))?;
        let story = Story::read(&db, &q.customer, q.flow.as_deref()).await?;
        // Every flow's messages: a cap counts them all, whichever flow asked.
        let sends = db.deliveries(&q.customer).await?;
        anyhow::Ok(story.map(|s| (s, sends)))
    })?;
    let Some((story, sends)) = story else {
        writeln!(
            std::io::stderr(),
            "canvas explain: no customer `{}` in {}",
            q.customer,
            store.database
        )?;
        return Ok(ExitCode::from(1));
    };
    let zone = store.policy.customer_zone(story.zone.as_deref());
    let answer = (q.step.is_some() || q.template.is_some()).then(|| story.answer(&q, zone, &sends));
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let runs: Vec<_> = story
                .runs
                .iter()
                .map(|r| {
                    json!({
                        "run_id": r.id, "flow": r.flow, "version": r.version,
                        "status": r.status, "outcome": r.outcome, "step": r.step,
                        "wake_at": r.wake_at, "waiting_for": r.waiting_for,
                        "entered_at": r.entered_at, "vars": r.vars,
                        "history": story.history.iter().filter(|h| h.run_id == r.id).collect::<Vec<_>>(),
                        "deliveries": story.deliveries.iter().filter(|d| d.row.run_id == r.id).map(|d| json!({
                            "key": d.row.key, "channel": d.row.channel, "status": d.status.as_str(),
                            "attempts": d.attempts, "last_error": d.last_error, "content": d.row.payload,
                            "sent_at": d.sent_at, "dead_at": d.dead_at,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let value = json!({
                "customer_id": q.customer,
                "timezone": zone.name(),
                "runs": runs,
                "failures": story.failures,
                "answer": answer,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        Format::Human | Format::Github => {
            story.write_human(&mut out, zone)?;
            if let Some(answer) = answer {
                writeln!(out, "\n{answer}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A customer's story as the database has it: read by `canvas explain`, the journeys API
/// and the web UI's customer page alike.
pub(crate) struct Story {
    /// The customer's own time zone, when their profile names one.
    pub zone: Option<String>,
    /// Oldest first.
    pub runs: Vec<Run>,
    /// In order.
    pub history: Vec<HistoryEntry>,
    pub deliveries: Vec<DeliveryState>,
    pub failures: Vec<Failure>,
}

impl Story {
    /// The story of customer `id`, in flow `flow` only when named; `None` when the database
    /// has never heard of the customer. Every read is of this one customer's rows.
    pub(crate) async fn read(
        db: &Database,
        id: &String,
        flow: Option<&str>,
    ) -> canvas_engine::store::Result<Option<Story>> {
        let of_flow = |f: &str| flow.is_none_or(|wanted| wanted == f);
        let loaded = db
            .load(std::slice::from_ref(id), chrono::DateTime::UNIX_EPOCH)
            .await?;
        let runs: Vec<Run> = db
            .runs(id)
            .await?
            .into_iter()
            .filter(|r| of_flow(&r.flow))
            .collect();
        let failures: Vec<Failure> = db
            .failures(id)
            .await?
            .into_iter()
            .filter(|f| of_flow(&f.flow))
            .collect();
        if loaded.is_empty() && runs.is_empty() && failures.is_empty() {
            return Ok(None);
        }
        let history = db
            .history(Some(id))
            .await?
            .into_iter()
            .filter(|h| of_flow(&h.flow))
            .collect();
        let deliveries = db
            .deliveries(id)
            .await?
            .into_iter()
            .filter(|d| of_flow(&d.row.flow))
            .collect();
        Ok(Some(Story {
            zone: loaded
                .first()
                .and_then(|c| c.customer.zone().map(str::to_owned)),
            runs,
            history,
            deliveries,
            failures,
        }))
    }

    fn write_human(&self, out: &mut dyn Write, zone: chrono_tz::Tz) -> std::io::Result<()> {
        let outbox: Vec<OutboxRow> = self.deliveries.iter().map(|d| d.row.clone()).collect();
        let at = |t| testing::show(t, ShowIn::Zone(zone));
        if self.runs.is_empty() {
            writeln!(out, "no runs")?;
        }
        for r in &self.runs {
            let state = match &r.outcome {
                Some(o) => format!("ended: {o}"),
                None => match (&r.step, r.wake_at) {
                    (Some(s), Some(w)) => format!("waiting at {s} until {}", at(w)),
                    (Some(s), None) => format!("waiting at {s}"),
                    _ => "waiting".to_owned(),
                },
            };
            writeln!(
                out,
                "{} (version {}), entered {} — {state}",
                r.id,
                r.version.get(..12).unwrap_or(&r.version),
                at(r.entered_at)
            )?;
            for h in self.history.iter().filter(|h| h.run_id == r.id) {
                writeln!(
                    out,
                    "  {}  {:<24} {:<9} {}",
                    at(h.at),
                    h.step,
                    h.action,
                    crate::play::describe(h, &outbox, ShowIn::Zone(zone))
                )?;
            }
            for d in self.deliveries.iter().filter(|d| d.row.run_id == r.id) {
                let error = d
                    .last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "  delivery {} on {}: {} after {} attempt{}{error}",
                    d.row.key,
                    d.row.channel,
                    d.status.as_str(),
                    d.attempts,
                    if d.attempts == 1 { "" } else { "s" }
                )?;
            }
            if !r.vars.is_empty() {
                writeln!(out, "  vars {}", serde_json::Value::Object(r.vars.clone()))?;
            }
        }
        for f in &self.failures {
            writeln!(
                out,
                "failed {}/{} {} time{}, last {}: {}",
                f.flow,
                f.step,
                f.count,
                if f.count == 1 { "" } else { "s" },
                at(f.at),
                f.error
            )?;
        }
        Ok(())
    }

    /// The plain answer about a step or a template: the latest run that got there decides.
    fn answer(&self, q: &Question, zone: chrono_tz::Tz, sends: &[DeliveryState]) -> String {
        let at = |t| testing::show(t, ShowIn::Zone(zone));
        let what = match (&q.step, &q.template) {
            (Some(s), _) => format!("step `{s}`"),
            (None, Some(t)) => format!("template `{t}`"),
            (None, None) => String::new(),
        };
        let concerns = |h: &HistoryEntry| match (&q.step, &q.template) {
            (Some(s), _) => h.step == *s,
            (None, Some(t)) => h.detail.get("template").and_then(|v| v.as_str()) == Some(t),
            (None, None) => false,
        };
        let decisive = [
            "sent", "skipped", "delayed", "fallback", "failed", "error", "answered", "called",
        ];
        let Some(h) = self
            .history
            .iter()
            .rev()
            .find(|h| concerns(h) && decisive.contains(&h.action.as_str()))
        else {
            if self.runs.is_empty() {
                let flow = q.flow.as_deref().unwrap_or("any flow");
                return match self.failures.first() {
                    Some(f) => format!("{what}: never entered {}: {}", f.flow, f.error),
                    None => format!(
                        "{what}: never entered {flow}: its trigger never matched, or its `where` or audience was false"
                    ),
                };
            }
            let last = &self.runs[self.runs.len() - 1];
            return match (&last.outcome, &last.step) {
                (Some(o), _) => format!(
                    "{what}: not reached: run {} ended with outcome `{o}`",
                    last.id
                ),
                (None, Some(s)) => format!(
                    "{what}: not reached yet: run {} is waiting at `{s}`",
                    last.id
                ),
                (None, None) => format!("{what}: not reached by run {}", last.id),
            };
        };
        let s = |k: &str| {
            h.detail
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        match h.action.as_str() {
            "sent" | "fallback" => {
                let delivery = self.deliveries.iter().rev().find(|d| {
                    d.row.run_id == h.run_id
                        && d.row.step == h.step
                        && d.row.channel == s("channel")
                });
                let state = match delivery {
                    Some(d) if d.status == DeliveryStatus::Dead => format!(
                        "; the delivery died: {}",
                        d.last_error.as_deref().unwrap_or("no reason recorded")
                    ),
                    Some(d) if d.status == DeliveryStatus::Pending => {
                        "; not delivered yet".to_owned()
                    }
                    Some(d) => d
                        .sent_at
                        .map(|t| format!("; delivered {}", at(t)))
                        .unwrap_or_default(),
                    None => String::new(),
                };
                format!("{what}: sent {} on {}{state}", at(h.at), s("channel"))
            }
            "skipped" => format!(
                "{what}: not sent ({}): {}{}",
                at(h.at),
                s("reason"),
                capped_by(h, sends)
            ),
            "delayed" => format!(
                "{what}: delayed until {}: {}{}",
                s("until"),
                s("reason"),
                capped_by(h, sends)
            ),
            "failed" => format!("{what}: failed {}: {}", at(h.at), s("error")),
            "error" => format!("{what}: error {}: {}", at(h.at), s("error")),
            other => format!("{what}: {other} {}", at(h.at)),
        }
    }
}

/// For a skip or delay by a frequency cap: the marketing message that filled it, the latest
/// the customer was sent before — on the capped channel when the cap names one — as
/// ` (sent `KEY` 2 h earlier)`; empty otherwise.
fn capped_by(h: &HistoryEntry, sends: &[DeliveryState]) -> String {
    let reason = h
        .detail
        .get("reason")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if !reason.starts_with("frequency cap") {
        return String::new();
    }
    let channel = h.detail.get("channel").and_then(|v| v.as_str());
    // "… marketing messages on sms per 1d": the cap counts that channel only.
    let on = channel.filter(|c| reason.contains(&format!(" on {c} per ")));
    let earlier = sends
        .iter()
        .filter(|d| {
            d.row.kind == canvas_engine::state::OutboxKind::Message
                && !d.row.transactional
                && d.row.created_at <= h.at
                && !(d.row.run_id == h.run_id && d.row.step == h.step)
                && on.is_none_or(|c| d.row.channel == c)
        })
        .max_by_key(|d| d.row.created_at);
    match earlier {
        Some(d) => format!(
            " (sent `{}` {} earlier)",
            d.row.key,
            ago(h.at - d.row.created_at)
        ),
        None => String::new(),
    }
}

/// A span as an operator says it: `40 s`, `25 min`, `2 h`, `3 d`.
fn ago(span: chrono::Duration) -> String {
    let s = span.num_seconds().max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}
