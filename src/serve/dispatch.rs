//! The dispatcher: claims due outbox rows (leased, so several daemons never take the same
//! row), delivers each through its channel under the channel's concurrency and rate limits,
//! and settles the results in batches: sent; retried later with exponential backoff and
//! jitter; or dead-lettered with the reason, visible in the API. Every request carries the
//! row's idempotency key, so a delivery repeated after a crash (the lease ran out before the
//! result was recorded) is recognisable by the provider.
//!
//! A `call` row's response is fed back into the inbox as the run's call result before the
//! row is marked sent; a call that fails for good (or would be retried past its step's
//! `timeout`) is fed back as a failed call result carrying the last error. A message that
//! is dead-lettered is fed back as a failed delivery, so its `send` step can fall back to
//! the next channel of its list.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use canvas_channels::{Channels, Delivered, DeliveryError, Message, MessageKind};
use canvas_engine::runtime::FlowSet;
use canvas_engine::state::{
    CallResult, Delivery, DeliveryFailure, DeliveryOutcome, InboxItem, OutboxKind, OutboxRow, Time,
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
    flows
        .current()
        .flat_map(|flow| flow.steps().flat_map(|(_, step)| step.channels()))
        .map(str::to_owned)
        .collect()
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

/// The rows this dispatcher holds (claimed, not yet settled), by channel, and how many each
/// channel may hold: no more than it can send within half its lease, so a rate-limited
/// channel's rows never wait out their lease in the queue (and get claimed again, and sent
/// twice), and a slow channel cannot fill every slot while the others wait.
struct Held {
    keys: HashMap<String, String>,
    per_channel: HashMap<String, usize>,
    caps: HashMap<String, usize>,
}

impl Held {
    fn new(channels: &Channels, lease: Duration) -> Held {
        let caps = channels
            .names()
            .map(|(name, _)| {
                let cap = channels.rate_limit(name).map_or(MAX_IN_FLIGHT, |rate| {
                    ((rate * lease.as_secs_f64() / 2.0).floor() as usize).clamp(1, MAX_IN_FLIGHT)
                });
                (name.to_owned(), cap)
            })
            .collect();
        Held {
            keys: HashMap::new(),
            per_channel: HashMap::new(),
            caps,
        }
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn has_room(&self, channel: &str) -> bool {
        let cap = self.caps.get(channel).copied().unwrap_or(MAX_IN_FLIGHT);
        self.per_channel.get(channel).copied().unwrap_or(0) < cap
    }

    /// The channels for the claim to pass over: those with less than a quarter of their
    /// share free, so a channel sending a row at a time is not claimed for (and most of the
    /// claim handed back) at every row.
    fn full(&self) -> Vec<String> {
        self.per_channel
            .iter()
            .filter(|(c, held)| {
                let cap = self.caps.get(*c).copied().unwrap_or(MAX_IN_FLIGHT);
                cap.saturating_sub(**held) < (cap / 4).max(1)
            })
            .map(|(c, _)| c.clone())
            .collect()
    }

    fn insert(&mut self, key: &str, channel: &str) {
        self.keys.insert(key.to_owned(), channel.to_owned());
        *self.per_channel.entry(channel.to_owned()).or_default() += 1;
    }

    fn remove(&mut self, key: &str) {
        if let Some(channel) = self.keys.remove(key)
            && let Some(n) = self.per_channel.get_mut(&channel)
        {
            *n = n.saturating_sub(1);
        }
    }
}

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
    // How long a claimed row belongs to this daemon before another may take it; held rows
    // are renewed every third of it.
    let lease_std = app.settings.outbox_lease;
    let lease = chrono::Duration::from_std(lease_std).unwrap_or(chrono::Duration::MAX);
    let renew_every = lease_std / 3;
    let mut last_renew = Instant::now();
    let mut held = Held::new(&channels, lease_std);
    loop {
        if *stop.borrow() && !stopping {
            stopping = true;
            // Waiting permits give up; requests already sent finish.
            channels.close();
        }
        let mut claimed_any = false;
        if !stopping && held.len() < MAX_IN_FLIGHT / 2 {
            let now = app.clock.now();
            match app
                .db
                .claim_outbox(
                    now,
                    MAX_IN_FLIGHT - held.len(),
                    &owner,
                    now + lease,
                    &held.full(),
                )
                .await
            {
                Ok(rows) => {
                    failures = 0;
                    claimed_any = !rows.is_empty();
                    let mut give_back = Vec::new();
                    for d in rows {
                        if held.keys.contains_key(&d.row.key) {
                            // Already on its way here: never a second attempt at once.
                            continue;
                        }
                        if app.engine().paused.contains(&d.row.flow) {
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
                        if !held.has_room(&d.row.channel) {
                            // The claim took more of this channel than it can send within
                            // the lease: hand the rest back for later (or another daemon).
                            give_back.push(d.row.key.clone());
                            continue;
                        }
                        held.insert(&d.row.key, &d.row.channel);
                        let channels = channels.clone();
                        let clock = app.clock.clone();
                        in_flight.spawn(async move {
                            let result = match channels.acquire(&d.row.channel).await {
                                Ok(_permit) => {
                                    // Signed with the attempt's time, not the claim's: a
                                    // row may have waited for its slot.
                                    let msg = message(&d.row, clock.now());
                                    channels.deliver(&d.row.channel, &msg).await
                                }
                                Err(e) => Err(e),
                            };
                            (d, result)
                        });
                    }
                    if !give_back.is_empty()
                        && let Err(e) = app.db.release_outbox(&give_back, &owner).await
                    {
                        tracing::warn!(
                            rows = give_back.len(),
                            "handing back rows failed; their lease runs out instead: {e}"
                        );
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::error!("claiming outbox rows failed (attempt {failures}): {e}");
                }
            }
        }
        if !held.keys.is_empty() && last_renew.elapsed() >= renew_every {
            let keys: Vec<String> = held.keys.keys().cloned().collect();
            match app
                .db
                .renew_outbox(&keys, &owner, app.clock.now() + lease)
                .await
            {
                Ok(_) => last_renew = Instant::now(),
                Err(e) => tracing::warn!("renewing outbox leases failed; will retry: {e}"),
            }
        }
        let can_claim = !stopping && held.len() < MAX_IN_FLIGHT / 2;
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
                        Ok(attempt) => {
                            held.remove(&attempt.0.row.key);
                            record(&app, &channels, attempt, &mut outcomes, &mut answers);
                        }
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
                Ok(attempt) => {
                    held.remove(&attempt.0.row.key);
                    record(&app, &channels, attempt, &mut outcomes, &mut answers);
                }
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
    let answer = |response: serde_json::Value, error: Option<String>| {
        InboxItem::CallResult(CallResult {
            run_id: d.row.run_id.clone(),
            customer_id: d.row.customer_id.clone(),
            step: d.row.step.clone(),
            response,
            error,
            at: now,
        })
    };
    let status = match result {
        Ok(delivered) => {
            if d.row.kind == OutboxKind::Call {
                answers.push(answer(delivered.response.unwrap_or_default(), None));
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
            let mut reason = canvas_engine::store::redact(&e.reason()).into_owned();
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
            let next_attempt_at =
                wait.map(|w| now + chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX));
            let next_attempt_at = within_deadline(next_attempt_at, &d.row, &mut reason);
            match next_attempt_at {
                Some(next_attempt_at) => {
                    outcomes.push(DeliveryOutcome::Retry {
                        key,
                        attempts,
                        next_attempt_at,
                        error: reason,
                    });
                    "retry"
                }
                None => {
                    tracing::warn!(key = %d.row.key, channel = %d.row.channel, attempts, "dead-lettered: {reason}");
                    match d.row.kind {
                        OutboxKind::Call => {
                            answers.push(answer(serde_json::Value::Null, Some(reason.clone())));
                        }
                        // The step that sent it falls back to its next channel, if any.
                        OutboxKind::Message => {
                            answers.push(InboxItem::DeliveryFailed(DeliveryFailure {
                                run_id: d.row.run_id.clone(),
                                customer_id: d.row.customer_id.clone(),
                                step: d.row.step.clone(),
                                channel: d.row.channel.clone(),
                                key: d.row.key.clone(),
                                error: reason.clone(),
                                sent_at: d.row.created_at,
                                at: now,
                            }));
                        }
                        OutboxKind::Task => {}
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

/// A call's own `timeout`: nobody waits for an answer past it, so no retry is scheduled
/// after it (the run's timer has given up on the call by then): the row is dead instead,
/// and the reason says so.
fn within_deadline(next: Option<Time>, row: &OutboxRow, reason: &mut String) -> Option<Time> {
    match (next, call_deadline(row)) {
        (Some(next), Some(deadline)) if next > deadline => {
            reason.push_str(" (no retry: past the call's timeout)");
            None
        }
        (next, _) => next,
    }
}

/// A call row's `deadline` (its step's `timeout`, from when the call was made).
fn call_deadline(row: &OutboxRow) -> Option<Time> {
    if row.kind != OutboxKind::Call {
        return None;
    }
    let text = row.payload.get("deadline")?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Record results: call answers and failed deliveries into the inbox first (deduplicated by call key, so a repeat
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

    fn call_row(payload: serde_json::Value) -> OutboxRow {
        OutboxRow {
            key: "coupon/c1/1/issue".into(),
            kind: OutboxKind::Call,
            run_id: "coupon/c1/1".into(),
            flow: "coupon".into(),
            customer_id: "c1".into(),
            step: "issue".into(),
            channel: "coupons".into(),
            address: None,
            template: None,
            payload,
            transactional: true,
            created_at: chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap(),
        }
    }

    #[test]
    fn call_retries_never_go_past_the_call_timeout() {
        let t0 = chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let row = call_row(
            serde_json::json!({ "deadline": (t0 + chrono::Duration::seconds(60)).to_rfc3339() }),
        );
        let mut reason = "HTTP 500".to_owned();
        let early = Some(t0 + chrono::Duration::seconds(30));
        assert_eq!(within_deadline(early, &row, &mut reason), early);
        assert_eq!(reason, "HTTP 500");
        let late = Some(t0 + chrono::Duration::seconds(61));
        assert_eq!(within_deadline(late, &row, &mut reason), None);
        assert_eq!(reason, "HTTP 500 (no retry: past the call's timeout)");
        // Without a timeout, the channel's retry policy decides alone.
        let row = call_row(serde_json::json!({ "webhook": "coupons" }));
        let mut reason = "HTTP 500".to_owned();
        assert_eq!(within_deadline(late, &row, &mut reason), late);
    }

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
