//! The dispatcher: claims due outbox rows (leased, so several daemons never take the same
//! row), delivers each through its channel under the channel's concurrency and rate limits,
//! and settles the results in batches: sent; retried later with exponential backoff and
//! jitter; or dead-lettered with the reason, visible in the API. Every request carries the
//! row's idempotency key, so a delivery repeated after a crash (the lease ran out before the
//! result was recorded) is recognisable by the provider.
//!
//! A `call` row's response is fed back into the inbox as the run's call result before the
//! row is marked sent; a call that fails for good answers the run with `{"error": …}`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canvas_channels::{Channels, Delivered, DeliveryError, Message, MessageKind};
use canvas_engine::flow::StepKind;
use canvas_engine::runtime::FlowSet;
use canvas_engine::state::{
    CallResult, Delivery, DeliveryOutcome, InboxItem, OutboxKind, OutboxRow, Time,
};
use canvas_engine::store::Store;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::App;
use super::metrics::SendLabels;

/// Rows delivered at once at most (across channels; each channel has its own limit too).
pub const MAX_IN_FLIGHT: usize = 1024;
/// Results are recorded at least this often, and at the latest after this many.
const SETTLE_EVERY: Duration = Duration::from_millis(20);
const SETTLE_AT: usize = 512;
/// A row of a paused flow is looked at again after this long.
const PAUSED_RETRY: Duration = Duration::from_secs(30);

/// The channels the flows use: every `send` channel, every `call` webhook, and `task` when a
/// flow creates tasks.
pub fn channels_used(flows: &FlowSet) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for flow in flows.current() {
        for (_, step) in flow.steps() {
            match &step.kind {
                StepKind::Send { channels, .. } => used.extend(channels.iter().cloned()),
                StepKind::Call { webhook, .. } => {
                    used.insert(webhook.clone());
                }
                StepKind::Task { .. } => {
                    used.insert("task".to_owned());
                }
                _ => {}
            }
        }
    }
    used
}

/// The channels flows use that `canvas.yaml` does not configure.
pub fn missing_channels(flows: &FlowSet, channels: &Channels) -> Vec<String> {
    channels_used(flows)
        .into_iter()
        .filter(|c| !channels.contains(c))
        .collect()
}

fn message(row: &OutboxRow, now: Time) -> Message {
    Message {
        key: row.key.clone(),
        kind: match row.kind {
            OutboxKind::Call => MessageKind::Call,
            // A task goes to the `task` channel like a message; its payload says what to do.
            OutboxKind::Message | OutboxKind::Task => MessageKind::Message,
        },
        flow: row.flow.clone(),
        step: row.step.clone(),
        customer_id: row.customer_id.clone(),
        address: row.address.clone(),
        template: row.template.clone(),
        payload: row.payload.clone(),
        now,
    }
}

/// A fraction in [0, 1) from the row's key and attempt: the jitter of its next retry.
/// Derived rather than drawn, so retries spread across rows yet a test can predict them.
fn jitter(key: &str, attempts: u32) -> f64 {
    let digest = Sha256::new()
        .chain_update(key.as_bytes())
        .chain_update(attempts.to_le_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

type Attempt = (Delivery, Result<Delivered, DeliveryError>);

pub async fn run(
    app: Arc<App>,
    channels: Arc<Channels>,
    owner: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut in_flight: JoinSet<Attempt> = JoinSet::new();
    let mut outcomes: Vec<DeliveryOutcome> = Vec::new();
    let mut answers: Vec<InboxItem> = Vec::new();
    let mut last_settle = Instant::now();
    let mut stopping = false;
    let mut failures = 0u32;
    loop {
        if *stop.borrow() && !stopping {
            stopping = true;
            // Waiting permits give up; requests already sent finish.
            channels.close();
        }
        let mut claimed_any = false;
        if !stopping && in_flight.len() < MAX_IN_FLIGHT / 2 {
            let now = app.clock.now();
            // How long a claimed row belongs to this daemon before another may take it.
            let lease = chrono::Duration::from_std(app.settings.outbox_lease)
                .unwrap_or(chrono::Duration::MAX);
            match app
                .db
                .claim_outbox(now, MAX_IN_FLIGHT - in_flight.len(), &owner, now + lease)
                .await
            {
                Ok(rows) => {
                    failures = 0;
                    claimed_any = !rows.is_empty();
                    let paused = app.engine().paused.clone();
                    for d in rows {
                        if paused.contains(&d.row.flow) {
                            outcomes.push(DeliveryOutcome::Retry {
                                key: d.row.key.clone(),
                                attempts: d.attempts,
                                next_attempt_at: now
                                    + chrono::Duration::from_std(PAUSED_RETRY)
                                        .unwrap_or(chrono::Duration::MAX),
                                error: "the flow is paused".into(),
                            });
                            continue;
                        }
                        let channels = channels.clone();
                        in_flight.spawn(async move {
                            let msg = message(&d.row, now);
                            let result = match channels.acquire(&d.row.channel).await {
                                Ok(_permit) => channels.deliver(&d.row.channel, &msg).await,
                                Err(e) => Err(e),
                            };
                            (d, result)
                        });
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::error!("claiming outbox rows failed (attempt {failures}): {e}");
                }
            }
        }
        let can_claim = !stopping && in_flight.len() < MAX_IN_FLIGHT / 2;
        if !(claimed_any && can_claim) {
            // Wait for a result, new work, a settle deadline or shutdown.
            let sleep_for = if !outcomes.is_empty() {
                SETTLE_EVERY.saturating_sub(last_settle.elapsed())
            } else if failures > 0 {
                Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)))
            } else {
                Duration::from_millis(250)
            };
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match done {
                        Ok(attempt) => record(&app, &channels, attempt, &mut outcomes, &mut answers),
                        Err(e) => tracing::error!("a delivery task failed: {e}"),
                    }
                }
                () = app.outbox_wake.notified(), if can_claim => {}
                () = tokio::time::sleep(sleep_for) => {}
                _ = stop.changed(), if !stopping => {}
            }
        }
        // Take whatever else finished meanwhile.
        while let Some(done) = in_flight.try_join_next() {
            match done {
                Ok(attempt) => record(&app, &channels, attempt, &mut outcomes, &mut answers),
                Err(e) => tracing::error!("a delivery task failed: {e}"),
            }
        }
        let due = outcomes.len() >= SETTLE_AT
            || (!outcomes.is_empty()
                && (last_settle.elapsed() >= SETTLE_EVERY || in_flight.is_empty()));
        if due || (stopping && in_flight.is_empty()) {
            settle(&app, &mut outcomes, &mut answers).await;
            last_settle = Instant::now();
        }
        if stopping && in_flight.is_empty() && outcomes.is_empty() {
            break;
        }
    }
}

/// Turn one attempt into an outcome (and, for a call, the run's answer).
fn record(
    app: &App,
    channels: &Channels,
    (d, result): Attempt,
    outcomes: &mut Vec<DeliveryOutcome>,
    answers: &mut Vec<InboxItem>,
) {
    let now = app.clock.now();
    let key = d.row.key.clone();
    let attempts = d.attempts.saturating_add(1);
    let answer = |response: serde_json::Value| {
        InboxItem::CallResult(CallResult {
            run_id: d.row.run_id.clone(),
            customer_id: d.row.customer_id.clone(),
            step: d.row.step.clone(),
            response,
            at: now,
        })
    };
    let status = match result {
        Ok(delivered) => {
            if d.row.kind == OutboxKind::Call {
                answers.push(answer(delivered.response.unwrap_or_default()));
            }
            outcomes.push(DeliveryOutcome::Sent { key, at: now });
            "sent"
        }
        Err(DeliveryError::Closed) => {
            // Shutting down before the request went out: hand the row back untouched.
            outcomes.push(DeliveryOutcome::Retry {
                key,
                attempts: d.attempts,
                next_attempt_at: now,
                error: "handed back at shutdown".into(),
            });
            "handed_back"
        }
        Err(e) => {
            // Stored, logged and fed back to a waiting call: never with a URL's secrets.
            let reason = canvas_engine::store::redact(&e.reason()).into_owned();
            let wait = if e.is_retryable() {
                let retry = channels
                    .retry_config(&d.row.channel)
                    .copied()
                    .unwrap_or_default();
                canvas_channels::next_attempt(attempts, &retry, jitter(&key, attempts))
                    .map(|w| w.max(e.retry_after().unwrap_or_default()))
            } else {
                None
            };
            match wait {
                Some(wait) => {
                    outcomes.push(DeliveryOutcome::Retry {
                        key,
                        attempts,
                        next_attempt_at: now
                            + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX),
                        error: reason,
                    });
                    "retry"
                }
                None => {
                    tracing::warn!(key = %d.row.key, channel = %d.row.channel, attempts, "dead-lettered: {reason}");
                    if d.row.kind == OutboxKind::Call {
                        answers.push(answer(serde_json::json!({ "error": reason })));
                    }
                    outcomes.push(DeliveryOutcome::Dead {
                        key,
                        attempts,
                        at: now,
                        error: reason,
                    });
                    "dead"
                }
            }
        }
    };
    app.metrics
        .sends
        .get_or_create(&SendLabels {
            channel: d.row.channel.clone(),
            status: status.to_owned(),
        })
        .inc();
}

/// Record results: call answers into the inbox first (deduplicated by call key, so a repeat
/// after a crash is harmless), then the rows' new states. A failure keeps them for the next
/// try; the leases keep other daemons off the rows meanwhile.
async fn settle(app: &App, outcomes: &mut Vec<DeliveryOutcome>, answers: &mut Vec<InboxItem>) {
    if !answers.is_empty() {
        match app.db.enqueue(answers).await {
            Ok(_) => {
                answers.clear();
                app.wake.notify_one();
            }
            Err(e) => {
                tracing::error!("recording call results failed; will retry: {e}");
                return;
            }
        }
    }
    if outcomes.is_empty() {
        return;
    }
    match app.db.settle_outbox(outcomes).await {
        Ok(()) => outcomes.clear(),
        Err(e) => tracing::error!("recording delivery results failed; will retry: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_a_fraction_and_varies() {
        let values: Vec<f64> = (0..200)
            .map(|i| jitter(&format!("run/c{i}/step"), 1))
            .collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.35..0.65).contains(&mean), "mean {mean}");
        assert_eq!(jitter("k", 3), jitter("k", 3));
        assert_ne!(jitter("k", 3), jitter("k", 4));
    }
}
