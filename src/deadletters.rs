//! `canvas deadletters`: the messages the dispatcher gave up on, read from the database the
//! daemon uses, and sent again under the same idempotency key (the daemon's dispatcher picks
//! a retried row up on its next poll). The same as `GET /v1/deadletters` and
//! `POST /v1/deadletters/{key}/retry`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::clock::{Clock, SystemClock};
use canvas_engine::state::{DeadLetterFilter, DeliveryStatus, OutboxKind};
use canvas_engine::store::{Database, DatabaseUrl, Store, redact};
use serde_json::json;

use crate::Format;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn open(database: &DatabaseUrl) -> anyhow::Result<Database> {
    Database::connect(database.expose())
        .await
        .with_context(|| format!("opening {database}"))
}

pub fn list(
    database: &DatabaseUrl,
    filter: DeadLetterFilter,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let dead =
        rt.block_on(async { anyhow::Ok(open(database).await?.dead_letters(&filter).await?) })?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let rows: Vec<_> = dead
                .iter()
                .map(|d| {
                    json!({
                        "key": d.row.key, "kind": d.row.kind, "flow": d.row.flow,
                        "customer_id": d.row.customer_id, "step": d.row.step,
                        "channel": d.row.channel, "address": d.row.address,
                        "template": d.row.template, "content": d.row.payload,
                        "attempts": d.attempts,
                        "last_error": d.last_error.as_deref().map(redact),
                        "dead_at": d.dead_at,
                    })
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&json!({ "deadletters": rows }))?
            )?;
        }
        Format::Human | Format::Github => {
            if dead.is_empty() {
                writeln!(out, "no dead letters")?;
            }
            for d in &dead {
                let when = d
                    .dead_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{}  {}  {} to {} after {} attempt{}: {}",
                    when,
                    d.row.key,
                    d.row.channel,
                    d.row.address.as_deref().unwrap_or("-"),
                    d.attempts,
                    if d.attempts == 1 { "" } else { "s" },
                    d.last_error.as_deref().map(redact).unwrap_or_default()
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn retry(database: &DatabaseUrl, key: &str) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let outcome: anyhow::Result<Result<(), String>> = rt.block_on(async {
        let db = open(database).await?;
        let Some(found) = db.delivery(key).await? else {
            return Ok(Err(format!("no outbox row `{key}` in {database}")));
        };
        if found.row.kind == OutboxKind::Call {
            return Ok(Err(format!(
                "`{key}` is a `call`; its run has moved on, so it cannot be sent again"
            )));
        }
        if found.status != DeliveryStatus::Dead {
            return Ok(Err(format!(
                "`{key}` is {}, not a dead letter; only dead letters are sent again",
                found.status.as_str()
            )));
        }
        if !db.retry_dead_letter(key, SystemClock.now()).await? {
            return Ok(Err(format!("`{key}` is no longer a dead letter")));
        }
        Ok(Ok(()))
    });
    match outcome? {
        Ok(()) => {
            writeln!(
                std::io::stdout(),
                "{key}: pending again, under the same idempotency key"
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            writeln!(std::io::stderr(), "canvas deadletters retry: {why}")?;
            Ok(ExitCode::from(1))
        }
    }
}
