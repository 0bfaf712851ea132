//! What both backends share: the row shapes they read (one `FromRow` struct per table, the
//! same column names on both), the conversions between those rows and the records of
//! [`crate::state`], times as milliseconds, batch de-duplication, and the order lease
//! statements take customer ids in.

use std::collections::HashSet;
use std::hash::Hash;

use chrono::DateTime;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{NodeCount, Result, StoreError};
use crate::state::{
    Arm, Conversion, Customer, Delivery, DeliveryState, DeliveryStatus, Enrolment, Event, Failure,
    FailureCount, FlowCounts, FlowVersion, HistoryEntry, InboxItem, Lease, OutboxDepth, OutboxKind,
    OutboxRow, Run, RunStatus, Time,
};

/// Milliseconds since the Unix epoch: how every time is stored. Sub-millisecond precision is
/// dropped.
pub(crate) fn ms(t: Time) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn opt_ms(t: Option<Time>) -> Option<i64> {
    t.map(ms)
}

pub(crate) fn time(table: &'static str, ms: i64) -> Result<Time> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt {
        table,
        message: format!("time {ms} ms is out of range"),
    })
}

fn opt_time(table: &'static str, ms: Option<i64>) -> Result<Option<Time>> {
    ms.map(|ms| time(table, ms)).transpose()
}

pub(crate) fn arm_str(arm: Arm) -> &'static str {
    match arm {
        Arm::Treated => "treated",
        Arm::Control => "control",
    }
}

fn arm(table: &'static str, s: &str) -> Result<Arm> {
    match s {
        "treated" => Ok(Arm::Treated),
        "control" => Ok(Arm::Control),
        _ => Err(corrupt(table, format!("unknown arm `{s}`"))),
    }
}

fn corrupt(table: &'static str, message: String) -> StoreError {
    StoreError::Corrupt { table, message }
}

/// Serialize a value to JSON text for a JSON column.
pub(crate) fn to_json<T: Serialize + ?Sized>(table: &'static str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| corrupt(table, format!("cannot encode JSON: {e}")))
}

/// A run's `splits` column: NULL when it passed no split (most runs: nothing written).
pub(crate) fn splits_json(r: &Run) -> Result<Option<String>> {
    if r.splits.is_empty() {
        return Ok(None);
    }
    to_json("runs", &r.splits).map(Some)
}

fn from_json<T: DeserializeOwned>(table: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| corrupt(table, format!("bad JSON: {e}")))
}

fn u32_of(table: &'static str, column: &str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(table, format!("{column} {v} is out of range")))
}

/// The items to write for upserts keyed by `key`: when a batch names the same row twice, the
/// last one wins (Postgres rejects an upsert that touches a row twice). Order is kept.
pub(crate) fn last_wins<'a, T, K: Hash + Eq + 'a>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut out: Vec<&T> = items
        .iter()
        .rev()
        .filter(|&t| seen.insert(key(t)))
        .collect();
    out.reverse();
    out
}

/// A batch as both backends write it. Upserted rows are de-duplicated (last wins) and put in
/// key order: b-tree inserts then walk the pages in order. Appended rows (history, outbox,
/// conversions) keep the caller's order within a customer — it is the order steps executed,
/// and reads return them in insertion order — and are grouped by customer (a stable sort),
/// so what a commit writes does not depend on the caller's iteration order (`HashMap`s).
pub(crate) struct Rows<'a> {
    pub customers: Vec<&'a Customer>,
    pub enrolments: Vec<&'a Enrolment>,
    pub history: Vec<&'a HistoryEntry>,
    pub outbox: Vec<&'a OutboxRow>,
    pub conversions: Vec<&'a Conversion>,
    pub runs: Vec<&'a Run>,
    /// Run-time failures, upserted (counts added); one per flow, step and customer.
    pub failures: Vec<&'a Failure>,
    /// Daily outcome counters and moves of the waiting gauge, summed per counter, in key
    /// order (added to the stored ones), written to `shard`.
    pub counts: Vec<crate::stats::Count>,
    pub waiting: Vec<crate::stats::Count>,
    pub shard: i64,
}

impl<'a> Rows<'a> {
    pub fn of(batch: &'a crate::state::Batch) -> Rows<'a> {
        let mut customers = last_wins(&batch.customers, |c| c.id.as_str());
        customers.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut enrolments = last_wins(&batch.enrolments, |e| {
            (e.customer_id.as_str(), e.flow.as_str())
        });
        enrolments
            .sort_unstable_by(|a, b| (&a.customer_id, &a.flow).cmp(&(&b.customer_id, &b.flow)));
        let mut history: Vec<&HistoryEntry> = batch.history.iter().collect();
        history.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        let mut outbox: Vec<&OutboxRow> = batch.outbox.iter().collect();
        outbox.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        let mut conversions: Vec<&Conversion> = batch.conversions.iter().collect();
        conversions.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
        let mut runs = last_wins(&batch.runs, |r| r.id.as_str());
        runs.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut failures = last_wins(&batch.failures, |f| {
            (f.flow.as_str(), f.step.as_str(), f.customer_id.as_str())
        });
        failures.sort_unstable_by(|a, b| {
            (&a.flow, &a.step, &a.customer_id).cmp(&(&b.flow, &b.step, &b.customer_id))
        });
        // Summed again: an upsert may touch a row once, whoever built the batch.
        let (counts, waiting) = batch
            .counts
            .counts()
            .into_iter()
            .partition(|c| c.day.is_some());
        Rows {
            customers,
            enrolments,
            history,
            outbox,
            conversions,
            runs,
            failures,
            counts,
            waiting,
            shard: super::counters::shard(batch),
        }
    }
}

/// Customer ids as the lease statements take them: each once, in byte order. It is the order
/// every lease statement locks rows in (Rust's `str` order; SQLite's BINARY and the Postgres
/// column's `COLLATE "C"` agree), so daemons locking overlapping sets queue behind each other
/// instead of deadlocking; and an upsert must not touch a row twice.
pub(crate) fn lease_ids(ids: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = ids.iter().map(String::as_str).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The ids of `ids` a claim returned (`held`, in no particular order), in the order of
/// `ids`, each once.
pub(crate) fn in_given_order(ids: &[String], held: Vec<String>) -> Vec<String> {
    let mut held: HashSet<String> = held.into_iter().collect();
    ids.iter()
        .filter(|id| held.remove(id.as_str()))
        .cloned()
        .collect()
}

/// `commit`'s lease check: `held` of the lease's `wanted` distinct customers are still
/// leased to its owner.
pub(crate) fn check_lease(lease: &Lease, wanted: usize, held: i64) -> Result<()> {
    let held = usize::try_from(held).unwrap_or(0);
    if held >= wanted {
        return Ok(());
    }
    Err(StoreError::LeaseLost {
        owner: lease.owner.clone(),
        missing: wanted - held,
    })
}

/// The inbox's dedupe key of an item: an event's id; `call:RUN_ID/STEP` for a call result
/// (the outbox key of the call, so a result fed back twice is applied once);
/// `profile:ID` for a profile update that carries an id; `dead:KEY` for a failed delivery
/// (the dead outbox row's key, so a failure fed back twice falls back once); else none.
pub(crate) fn dedupe_key(item: &InboxItem) -> Option<String> {
    match item {
        InboxItem::Event(e) => Some(e.id.clone()),
        // Prefixed: profile-update ids and event ids come from different senders.
        InboxItem::Profile(p) => p.id.as_ref().map(|id| format!("profile:{id}")),
        InboxItem::CallResult(c) => Some(format!("call:{}/{}", c.run_id, c.step)),
        InboxItem::DeliveryFailed(d) => Some(format!("dead:{}", d.key)),
    }
}

/// Read by Postgres as a row, by SQLite as a JSON array (`json_group_array`).
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct CustomerRow {
    pub id: String,
    pub attributes: String,
    pub timezone: Option<String>,
    pub sends: String,
    pub cooldowns: String,
    pub unsubscribed_at: Option<i64>,
    pub updated_at: i64,
}

impl CustomerRow {
    pub fn into_customer(self) -> Result<Customer> {
        const T: &str = "customers";
        Ok(Customer {
            id: self.id,
            attributes: from_json(T, &self.attributes)?,
            timezone: self.timezone,
            sends: from_json(T, &self.sends)?,
            cooldowns: from_json(T, &self.cooldowns)?,
            unsubscribed_at: self.unsubscribed_at.map(|t| time(T, t)).transpose()?,
            updated_at: time(T, self.updated_at)?,
        })
    }
}

/// Read by Postgres as a row, by SQLite as a JSON array (`json_group_array`).
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct InboxRow {
    pub seq: i64,
    pub item: String,
}

impl InboxRow {
    pub fn into_item(self) -> Result<(i64, InboxItem)> {
        Ok((self.seq, from_json("inbox", &self.item)?))
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct FlowVersionRow {
    pub flow: String,
    pub version: String,
    pub source: String,
    pub created_at: i64,
}

impl FlowVersionRow {
    pub fn into_version(self) -> Result<FlowVersion> {
        Ok(FlowVersion {
            flow: self.flow,
            version: self.version,
            source: self.source,
            created_at: time("flow_versions", self.created_at)?,
        })
    }
}

/// The columns of `runs`, in the order the write statements bind them.
pub(crate) const RUN_COLUMNS: &str = "id, flow, version, customer_id, status, step, wake_at, \
     waiting_for, vars, event, arm, last_touch, goal_until, converted_at, outcome, seq, \
     entered_at, updated_at, splits";

/// Read by Postgres as a row, by SQLite as a JSON array (`json_group_array`).
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct RunRow {
    pub id: String,
    pub flow: String,
    pub version: String,
    pub customer_id: String,
    pub status: String,
    pub step: Option<String>,
    pub wake_at: Option<i64>,
    pub waiting_for: Option<String>,
    pub vars: String,
    pub event: Option<String>,
    pub arm: String,
    pub last_touch: Option<String>,
    pub goal_until: Option<i64>,
    pub converted_at: Option<i64>,
    pub outcome: Option<String>,
    pub seq: i64,
    pub entered_at: i64,
    pub updated_at: i64,
    /// JSON object, or NULL for a run that passed no split.
    pub splits: Option<String>,
}

impl RunRow {
    pub fn into_run(self) -> Result<Run> {
        const T: &str = "runs";
        let status = RunStatus::parse(&self.status)
            .ok_or_else(|| corrupt(T, format!("unknown status `{}`", self.status)))?;
        let event: Option<Event> = match &self.event {
            Some(text) => Some(from_json(T, text)?),
            None => None,
        };
        Ok(Run {
            id: self.id,
            flow: self.flow,
            version: self.version,
            customer_id: self.customer_id,
            status,
            step: self.step,
            wake_at: opt_time(T, self.wake_at)?,
            waiting_for: self.waiting_for,
            vars: from_json(T, &self.vars)?,
            event,
            arm: arm(T, &self.arm)?,
            last_touch: self.last_touch,
            goal_until: opt_time(T, self.goal_until)?,
            converted_at: opt_time(T, self.converted_at)?,
            outcome: self.outcome,
            seq: u32_of(T, "seq", self.seq)?,
            entered_at: time(T, self.entered_at)?,
            updated_at: time(T, self.updated_at)?,
            splits: match &self.splits {
                Some(text) => from_json(T, text)?,
                None => Default::default(),
            },
        })
    }
}

/// Read by Postgres as a row, by SQLite as a JSON array (`json_group_array`).
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct EnrolmentRow {
    pub flow: String,
    pub customer_id: String,
    pub entries: i64,
    pub last_entered_at: Option<i64>,
    pub active_run: Option<String>,
    pub in_segment: bool,
}

impl EnrolmentRow {
    pub fn into_enrolment(self) -> Result<Enrolment> {
        const T: &str = "enrolments";
        Ok(Enrolment {
            flow: self.flow,
            customer_id: self.customer_id,
            entries: u32_of(T, "entries", self.entries)?,
            last_entered_at: opt_time(T, self.last_entered_at)?,
            active_run: self.active_run,
            in_segment: self.in_segment,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct HistoryRow {
    pub run_id: String,
    pub seq: i64,
    pub flow: String,
    pub customer_id: String,
    pub step: String,
    pub at: i64,
    pub action: String,
    pub detail: String,
}

impl HistoryRow {
    pub fn into_entry(self) -> Result<HistoryEntry> {
        const T: &str = "history";
        Ok(HistoryEntry {
            run_id: self.run_id,
            seq: u32_of(T, "seq", self.seq)?,
            flow: self.flow,
            customer_id: self.customer_id,
            step: self.step,
            at: time(T, self.at)?,
            action: self.action,
            detail: from_json(T, &self.detail)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct OutboxDbRow {
    pub key: String,
    pub kind: String,
    pub run_id: String,
    pub flow: String,
    pub customer_id: String,
    pub step: String,
    pub channel: String,
    pub address: Option<String>,
    pub template: Option<String>,
    pub payload: String,
    pub transactional: bool,
    pub created_at: i64,
}

impl OutboxDbRow {
    pub fn into_row(self) -> Result<OutboxRow> {
        const T: &str = "outbox";
        let kind = OutboxKind::parse(&self.kind)
            .ok_or_else(|| corrupt(T, format!("unknown kind `{}`", self.kind)))?;
        Ok(OutboxRow {
            key: self.key,
            kind,
            run_id: self.run_id,
            flow: self.flow,
            customer_id: self.customer_id,
            step: self.step,
            channel: self.channel,
            address: self.address,
            template: self.template,
            payload: from_json(T, &self.payload)?,
            transactional: self.transactional,
            created_at: time(T, self.created_at)?,
        })
    }
}

/// A row `claim_outbox` leased, with what orders the claim: the statement's `RETURNING`
/// comes back in no particular order, so both backends sort on (`next_attempt_at`, `ord`),
/// `ord` being the insertion order (SQLite's rowid, Postgres's identity column).
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimedRow {
    #[sqlx(flatten)]
    pub row: OutboxDbRow,
    pub attempts: i64,
    pub lease_until: i64,
    pub next_attempt_at: i64,
    pub ord: i64,
}

impl ClaimedRow {
    /// Sort claimed rows into claim order and decode them.
    pub fn into_deliveries(mut rows: Vec<ClaimedRow>) -> Result<Vec<Delivery>> {
        rows.sort_unstable_by_key(|r| (r.next_attempt_at, r.ord));
        rows.into_iter()
            .map(|r| {
                const T: &str = "outbox";
                Ok(Delivery {
                    attempts: u32_of(T, "attempts", r.attempts)?,
                    lease_until: time(T, r.lease_until)?,
                    row: r.row.into_row()?,
                })
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryStateRow {
    #[sqlx(flatten)]
    pub row: OutboxDbRow,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
    pub dead_at: Option<i64>,
}

impl DeliveryStateRow {
    pub fn into_state(self) -> Result<DeliveryState> {
        const T: &str = "outbox";
        let status = DeliveryStatus::parse(&self.status)
            .ok_or_else(|| corrupt(T, format!("unknown status `{}`", self.status)))?;
        Ok(DeliveryState {
            status,
            attempts: u32_of(T, "attempts", self.attempts)?,
            next_attempt_at: opt_time(T, self.next_attempt_at)?,
            last_error: self.last_error,
            sent_at: opt_time(T, self.sent_at)?,
            dead_at: opt_time(T, self.dead_at)?,
            row: self.row.into_row()?,
        })
    }
}

/// A [`crate::state::DeliveryOutcome`] as the settle statements bind it: one row of
/// `(key, status, attempts, next_attempt_at, last_error, sent_at, dead_at)`, `NULL` where
/// the column keeps its value (`attempts` `NULL` = one more).
pub(crate) struct Settle<'a> {
    pub key: &'a str,
    pub status: &'static str,
    pub attempts: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<&'a str>,
    pub sent_at: Option<i64>,
    pub dead_at: Option<i64>,
}

impl<'a> Settle<'a> {
    /// The rows for `outcomes`: one per key, the last outcome of a key winning (an `UPDATE`
    /// must not touch a row twice).
    pub fn of(outcomes: &'a [crate::state::DeliveryOutcome]) -> Vec<Settle<'a>> {
        use crate::state::DeliveryOutcome as O;
        last_wins(outcomes, O::key)
            .into_iter()
            .map(|o| match o {
                O::Sent { key, at } => Settle {
                    key,
                    status: DeliveryStatus::Sent.as_str(),
                    attempts: None,
                    next_attempt_at: None,
                    last_error: None,
                    sent_at: Some(ms(*at)),
                    dead_at: None,
                },
                O::Retry {
                    key,
                    attempts,
                    next_attempt_at,
                    error,
                } => Settle {
                    key,
                    status: DeliveryStatus::Pending.as_str(),
                    attempts: Some(i64::from(*attempts)),
                    next_attempt_at: Some(ms(*next_attempt_at)),
                    last_error: Some(error),
                    sent_at: None,
                    dead_at: None,
                },
                O::Dead {
                    key,
                    attempts,
                    at,
                    error,
                } => Settle {
                    key,
                    status: DeliveryStatus::Dead.as_str(),
                    attempts: Some(i64::from(*attempts)),
                    next_attempt_at: None,
                    last_error: Some(error),
                    sent_at: None,
                    dead_at: Some(ms(*at)),
                },
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct OutboxDepthRow {
    pub pending: i64,
    pub due: i64,
    pub dead: i64,
    pub oldest_due: Option<i64>,
}

impl OutboxDepthRow {
    pub fn into_depth(self) -> Result<OutboxDepth> {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(OutboxDepth {
            pending: n(self.pending),
            due: n(self.due),
            dead: n(self.dead),
            oldest_due: opt_time("outbox", self.oldest_due)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct FlowCountsRow {
    pub flow: String,
    pub entered: i64,
    pub waiting: i64,
    pub completed: i64,
    pub exited: i64,
    pub errored: i64,
    pub converted: i64,
}

impl FlowCountsRow {
    pub fn into_counts(self) -> FlowCounts {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        FlowCounts {
            flow: self.flow,
            entered: n(self.entered),
            waiting: n(self.waiting),
            completed: n(self.completed),
            exited: n(self.exited),
            errored: n(self.errored),
            converted: n(self.converted),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ConversionRow {
    pub run_id: String,
    pub flow: String,
    pub version: String,
    pub customer_id: String,
    pub arm: String,
    pub last_touch: Option<String>,
    pub event_id: String,
    pub at: i64,
}

impl ConversionRow {
    pub fn into_conversion(self) -> Result<Conversion> {
        const T: &str = "conversions";
        Ok(Conversion {
            run_id: self.run_id,
            flow: self.flow,
            version: self.version,
            customer_id: self.customer_id,
            arm: arm(T, &self.arm)?,
            last_touch: self.last_touch,
            event_id: self.event_id,
            at: time(T, self.at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct NodeCountRow {
    pub flow: String,
    pub step: String,
    pub waiting: i64,
}

impl NodeCountRow {
    pub fn into_count(self) -> NodeCount {
        NodeCount {
            flow: self.flow,
            step: self.step,
            waiting: u64::try_from(self.waiting).unwrap_or(0),
        }
    }
}

/// `failures` as stored (`Store::failures`).
#[derive(sqlx::FromRow)]
pub(crate) struct FailureRow {
    pub flow: String,
    pub step: String,
    pub customer_id: String,
    pub count: i64,
    pub error: String,
    pub at: i64,
}

impl FailureRow {
    pub fn into_failure(self) -> Result<Failure> {
        Ok(Failure {
            flow: self.flow,
            step: self.step,
            customer_id: self.customer_id,
            count: u64::try_from(self.count).unwrap_or(0),
            error: self.error,
            at: time("failures", self.at)?,
        })
    }
}

/// `failures` summed per flow step, with the most recent row (`Store::failure_counts`).
#[derive(sqlx::FromRow)]
pub(crate) struct FailureCountRow {
    pub flow: String,
    pub step: String,
    pub total: i64,
    pub customers: i64,
    pub customer_id: String,
    pub error: String,
    pub at: i64,
}

impl FailureCountRow {
    pub fn into_count(self) -> Result<FailureCount> {
        Ok(FailureCount {
            flow: self.flow,
            step: self.step,
            count: u64::try_from(self.total).unwrap_or(0),
            customers: u64::try_from(self.customers).unwrap_or(0),
            last_error: self.error,
            last_customer: self.customer_id,
            last_at: time("failures", self.at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct ArmCountRow {
    pub flow: String,
    pub arm: String,
    pub runs: i64,
    pub converted: i64,
}

impl ArmCountRow {
    pub fn into_count(self) -> Result<super::ArmCount> {
        let arm = match self.arm.as_str() {
            "treated" => crate::state::Arm::Treated,
            "control" => crate::state::Arm::Control,
            other => {
                return Err(StoreError::Corrupt {
                    table: "runs",
                    message: format!("unknown arm `{other}`"),
                });
            }
        };
        Ok(super::ArmCount {
            flow: self.flow,
            arm,
            runs: u64::try_from(self.runs).unwrap_or(0),
            converted: u64::try_from(self.converted).unwrap_or(0),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct CountsRow {
    pub customers: i64,
    pub runs: i64,
    pub waiting: i64,
    pub history: i64,
    pub outbox: i64,
    pub conversions: i64,
    pub inbox_pending: i64,
}

impl CountsRow {
    pub fn into_counts(self) -> super::Counts {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        super::Counts {
            customers: n(self.customers),
            runs: n(self.runs),
            waiting: n(self.waiting),
            history: n(self.history),
            outbox: n(self.outbox),
            conversions: n(self.conversions),
            inbox_pending: n(self.inbox_pending),
        }
    }
}

/// Assemble `CustomerState`s in the order of `ids` from rows fetched per table. `customers`
/// holds the known customers; runs and enrolments are grouped by customer id.
pub(crate) fn assemble(
    ids: &[String],
    customers: Vec<Customer>,
    runs: Vec<Run>,
    enrolments: Vec<Enrolment>,
) -> Vec<crate::state::CustomerState> {
    use std::collections::HashMap;

    use crate::state::CustomerState;

    let mut states: HashMap<String, CustomerState> = customers
        .into_iter()
        .map(|c| {
            (
                c.id.clone(),
                CustomerState {
                    customer: c,
                    runs: Vec::new(),
                    enrolments: Vec::new(),
                    converting: Vec::new(),
                },
            )
        })
        .collect();
    for run in runs {
        if let Some(s) = states.get_mut(&run.customer_id) {
            match run.status {
                RunStatus::Waiting => s.runs.push(run),
                RunStatus::Ended => s.converting.push(run),
            }
        }
    }
    for e in enrolments {
        if let Some(s) = states.get_mut(&e.customer_id) {
            s.enrolments.push(e);
        }
    }
    let mut out = Vec::with_capacity(states.len());
    for id in ids {
        if let Some(s) = states.remove(id) {
            out.push(s);
        }
    }
    out
}
