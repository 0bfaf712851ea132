//! `canvas deadletters`: the messages the dispatcher gave up on, read from the database the
//! daemon uses, and sent again under the same idempotency key (the daemon's dispatcher picks
//! a retried row up on its next poll). The same as `GET /v1/deadletters` and
//! `POST /v1/deadletters/{key}/retry`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use canvas_engine::clock::{Clock, SystemClock};
use canvas_engine::state::{DeadLetterFilter, DeliveryStatus, OutboxKind};
use canvas_engine::store::{Database, Store as _, redact};
use serde_json::json;

use crate::Format;
use crate::serve::config::Store;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The daemon's database, which must exist: reading dead letters never creates one.
async fn open(store: &Store) -> anyhow::Result<Database> {
    let database = &store.database;
    Database::open_existing(database.expose(), store.database_timeout)
        .await
        .with_context(|| format!("opening {database}"))
}

pub fn list(store: Store, filter: DeadLetterFilter, format: Format) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let dead =
        rt.block_on(async { anyhow::Ok(open(&store).await?.dead_letters(&filter).await?) })?;
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

/// Why a key cannot be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unknown(String),
    /// A `call`: its run was told the call failed and went on, so an answer now would reach
    /// nobody.
    Call(String),
    NotDead(String, DeliveryStatus),
    /// The step's message went out (or is going out) on another channel of its list: sending
    /// this one again would reach the customer twice.
    FellBack {
        key: String,
        by: String,
    },
    /// Sent again by someone else meanwhile.
    Raced(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unknown(key) => write!(f, "no outbox row `{key}`"),
            Refusal::Call(key) => write!(
                f,
                "`{key}` is a `call`; its run has moved on, so it cannot be sent again"
            ),
            Refusal::NotDead(key, status) => write!(
                f,
                "`{key}` is {}, not a dead letter; only dead letters are sent again",
                status.as_str()
            ),
            Refusal::FellBack { key, by } => write!(
                f,
                "`{key}` fell back to `{by}`, which is not dead: sending it again would reach the customer twice"
            ),
            Refusal::Raced(key) => write!(f, "`{key}` is no longer a dead letter"),
        }
    }
}

/// Send the dead letter `key` again under its own idempotency key, unless that would answer
/// nobody (a call) or reach the customer twice (the step fell back to another channel).
pub async fn send_again<S: canvas_engine::store::Store>(
    db: &S,
    key: &str,
    now: canvas_engine::state::Time,
) -> canvas_engine::store::Result<Result<(), Refusal>> {
    let Some(found) = db.delivery(key).await? else {
        return Ok(Err(Refusal::Unknown(key.to_owned())));
    };
    if found.row.kind == OutboxKind::Call {
        return Ok(Err(Refusal::Call(key.to_owned())));
    }
    if found.status != DeliveryStatus::Dead {
        return Ok(Err(Refusal::NotDead(key.to_owned(), found.status)));
    }
    // The rows of the same step: the first channel (`RUN/STEP`) and its fallbacks
    // (`RUN/STEP/CHANNEL`).
    let siblings = db.deliveries(&found.row.customer_id).await?;
    if let Some(other) = siblings.iter().find(|d| {
        d.row.run_id == found.row.run_id
            && d.row.step == found.row.step
            && d.row.key != found.row.key
            && d.status != DeliveryStatus::Dead
    }) {
        return Ok(Err(Refusal::FellBack {
            key: key.to_owned(),
            by: other.row.key.clone(),
        }));
    }
    if !db.retry_dead_letter(key, now).await? {
        return Ok(Err(Refusal::Raced(key.to_owned())));
    }
    Ok(Ok(()))
}

pub fn retry(store: Store, key: &str) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let db = open(&store).await?;
        anyhow::Ok(send_again(&db, key, SystemClock.now()).await?)
    })?;
    match outcome {
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
