//! The runtime records: customers, events, runs and what a transition writes. These are the
//! rows the store keeps and the values the pure executor reads and returns.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// Every instant in the runtime is UTC; customer-local time is computed from a time zone.
pub type Time = DateTime<Utc>;

/// A past marketing send, kept on the customer for frequency caps across flows.
pub use crate::policy::SentMark;

/// A customer profile and the little cross-flow state the engine keeps on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    /// Profile attributes as the CRM sent them (`birthday`, `phone`, `member`, …).
    pub attributes: Map<String, Json>,
    /// IANA time zone; `None` uses the engine's default.
    pub timezone: Option<String>,
    /// Recent marketing sends, newest last, pruned to the longest cap window.
    #[serde(default)]
    pub sends: Vec<SentMark>,
    /// Cooldown keys → when the customer last passed them (`use: cooldown`).
    #[serde(default)]
    pub cooldowns: Map<String, Json>,
    /// Set by the opt-out event (`canvas.yaml` `unsubscribe`): no flow may enter while set.
    #[serde(default)]
    pub unsubscribed_at: Option<Time>,
    pub updated_at: Time,
}

impl Customer {
    /// The profile as expressions and templates see it (`customer.*`): the attributes,
    /// plus `id`.
    pub fn profile(&self) -> Map<String, Json> {
        let mut profile = self.attributes.clone();
        profile.insert("id".into(), Json::String(self.id.clone()));
        profile
    }

    /// The customer's one time zone: the `timezone` field, which a profile update sets from
    /// either spelling (`timezone` or `set: { timezone }`), else a `timezone` attribute
    /// written before both spellings meant the same.
    pub fn zone(&self) -> Option<&str> {
        self.timezone
            .as_deref()
            .or_else(|| self.attributes.get(ZONE_KEY).and_then(Json::as_str))
    }

    pub fn new(id: impl Into<String>, now: Time) -> Customer {
        Customer {
            id: id.into(),
            attributes: Map::new(),
            timezone: None,
            sends: Vec::new(),
            cooldowns: Map::new(),
            unsubscribed_at: None,
            updated_at: now,
        }
    }
}

/// An event about one customer, as ingested. `id` is unique: a second event with the same id
/// is a duplicate and is dropped at the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub customer_id: String,
    pub name: String,
    #[serde(default)]
    pub data: Json,
    pub occurred_at: Time,
}

impl Event {
    /// The event as expressions and templates see it.
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "data": self.data,
            "occurred_at": self.occurred_at.to_rfc3339(),
            "customer_id": self.customer_id,
        })
    }
}

/// The attribute that is the customer's time zone (`set: { timezone: … }`).
pub const ZONE_KEY: &str = "timezone";

/// Why a profile update's time zone is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZoneError {
    /// Not a zone of the IANA database.
    #[error(
        "`timezone`: `{0}` is not an IANA time zone such as Asia/Shanghai or America/Los_Angeles"
    )]
    Unknown(String),
    /// `set.timezone` is a number, a list, …
    #[error(
        "`timezone`: a time zone is a name such as Asia/Shanghai (or null to clear it), not {0}"
    )]
    NotAName(String),
    /// Both spellings, naming different zones.
    #[error(
        "`timezone` is `{field}` but `set.timezone` is `{attribute}`: a customer has one time zone; give it once"
    )]
    Conflict { field: String, attribute: String },
}

/// `name` as a time zone of the IANA database.
pub fn parse_zone(name: &str) -> Result<chrono_tz::Tz, ZoneError> {
    name.trim()
        .parse::<chrono_tz::Tz>()
        .map_err(|_| ZoneError::Unknown(name.to_owned()))
}

/// A change to a customer's profile, as ingested: `set` replaces attributes (a JSON `null`
/// removes one), `timezone` replaces the customer's zone. The zone has two spellings, the
/// field and the attribute (`set: { timezone: America/Los_Angeles }`): they are the same
/// thing, see [`ProfileUpdate::zone`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUpdate {
    /// The sender's id for this update (a Segment `messageId`): an update whose id is
    /// already in the inbox is dropped, like a repeated event. `None`: never deduplicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub customer_id: String,
    #[serde(default)]
    pub set: Map<String, Json>,
    #[serde(default)]
    pub timezone: Option<String>,
    pub at: Time,
}

impl ProfileUpdate {
    /// What the update does to the customer's zone: `None` leaves it, `Some(None)` clears it
    /// (`set: { timezone: null }`), `Some(Some(name))` sets it — from either spelling, checked
    /// against the IANA database. Ingestion calls this to refuse a bad zone with a clear error.
    pub fn zone(&self) -> Result<Option<Option<String>>, ZoneError> {
        let attribute = match self.set.get(ZONE_KEY) {
            None => None,
            Some(Json::Null) => Some(None),
            Some(Json::String(name)) => Some(Some(name.trim().to_owned())),
            Some(other) => return Err(ZoneError::NotAName(other.to_string())),
        };
        let field = self.timezone.as_deref().map(|t| t.trim().to_owned());
        let zone = match (field, attribute) {
            (Some(f), Some(Some(a))) if f != a => {
                return Err(ZoneError::Conflict {
                    field: f,
                    attribute: a,
                });
            }
            (Some(f), _) => Some(Some(f)),
            (None, a) => a,
        };
        if let Some(Some(name)) = &zone {
            parse_zone(name)?;
        }
        Ok(zone)
    }
}

/// Work for one customer, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InboxItem {
    Event(Event),
    Profile(ProfileUpdate),
    /// The response to a `call` step, fed back by whoever performed the call.
    CallResult(CallResult),
    /// A message that could not be delivered for good (a permanent error, or out of
    /// attempts), fed back by the dispatcher so the step that sent it can fall back to its
    /// next channel.
    DeliveryFailed(DeliveryFailure),
}

/// What an internal system answered to a `call`; the run waiting at `step` stores it, or,
/// when `error` is set, takes the step's `on_error` path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallResult {
    pub run_id: String,
    pub customer_id: String,
    pub step: String,
    /// The response body; `null` when the call failed.
    #[serde(default)]
    pub response: Json,
    /// Why the call failed for good (a permanent error, or out of attempts); `None` when it
    /// answered. Rows written before this field existed read as answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub at: Time,
}

impl CallResult {
    /// Whether the call answered (rather than failed).
    pub fn answered(&self) -> bool {
        self.error.is_none()
    }
}

/// A message delivery given up on (`DeliveryOutcome::Dead`), for the run that sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryFailure {
    pub run_id: String,
    pub customer_id: String,
    /// The `send` step that produced the message.
    pub step: String,
    /// The channel the message was on.
    pub channel: String,
    /// The dead outbox row's key (its idempotency key).
    pub key: String,
    /// The last error, redacted.
    pub error: String,
    /// When the step sent it (the outbox row's `created_at`): the moment its cap mark holds.
    pub sent_at: Time,
    pub at: Time,
}

impl InboxItem {
    pub fn customer_id(&self) -> &str {
        match self {
            InboxItem::Event(e) => &e.customer_id,
            InboxItem::Profile(p) => &p.customer_id,
            InboxItem::CallResult(c) => &c.customer_id,
            InboxItem::DeliveryFailed(d) => &d.customer_id,
        }
    }

    pub fn at(&self) -> Time {
        match self {
            InboxItem::Event(e) => e.occurred_at,
            InboxItem::Profile(p) => p.at,
            InboxItem::CallResult(c) => c.at,
            InboxItem::DeliveryFailed(d) => d.at,
        }
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Parked at `step` until `wake_at` or until an event arrives.
    Waiting,
    /// Finished with an outcome; kept for audit, entry rules and goal attribution.
    Ended,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Waiting => "waiting",
            RunStatus::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        match s {
            "waiting" => Some(RunStatus::Waiting),
            "ended" => Some(RunStatus::Ended),
            _ => None,
        }
    }
}

/// Whether a run was held out by a `control` split arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    #[default]
    Treated,
    Control,
}

/// One customer's journey through one version of one flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// `FLOW/CUSTOMER/N`: the customer's N-th entry into the flow. Deterministic, so a
    /// replayed input after a crash produces the same run, never a second one.
    pub id: String,
    pub flow: String,
    /// The flow version (content hash) the run entered on; it stays on it.
    pub version: String,
    pub customer_id: String,
    pub status: RunStatus,
    /// The step the run waits at; `None` once ended.
    pub step: Option<String>,
    /// When a timer wakes the run (a `wait`, an event timeout, a delayed send).
    pub wake_at: Option<Time>,
    /// The event a `wait: { event }` listens for.
    pub waiting_for: Option<String>,
    /// Values the run stored (`call` responses, `save_as`).
    pub vars: Map<String, Json>,
    /// The latest event the run saw: the one that started it, then each event that resumed
    /// a `wait: { event }`. It is `event` in step expressions and templates.
    pub event: Option<Event>,
    pub arm: Arm,
    /// The arm each `split` step sent the run down (split step id -> next step id, or
    /// `control`): conversions are counted per arm.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub splits: BTreeMap<String, String>,
    /// The last step that touched the customer (a send or a task), for attribution.
    pub last_touch: Option<String>,
    /// Goal conversions count until this moment.
    pub goal_until: Option<Time>,
    pub converted_at: Option<Time>,
    pub outcome: Option<String>,
    /// Transitions so far; numbers history rows.
    pub seq: u32,
    pub entered_at: Time,
    pub updated_at: Time,
}

/// A customer's entries into a flow, for entry rules and segment edges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolment {
    pub flow: String,
    pub customer_id: String,
    pub entries: u32,
    pub last_entered_at: Option<Time>,
    /// The run that is still going, if any.
    pub active_run: Option<String>,
    /// Whether the customer was inside the segment when last checked (segment triggers enter
    /// on the edge from outside to inside).
    pub in_segment: bool,
}

/// One step executed by a run: the audit trail and the per-node counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub run_id: String,
    pub seq: u32,
    pub flow: String,
    pub customer_id: String,
    pub step: String,
    pub at: Time,
    /// What happened, in a word: `sent`, `skipped`, `delayed`, `waiting`, `branch`, `ended`…
    pub action: String,
    /// The particulars: channel and template, the arm taken, the reason for a skip.
    pub detail: Json,
}

/// What an outbox row asks the dispatcher to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    Message,
    Call,
    Task,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Message => "message",
            OutboxKind::Call => "call",
            OutboxKind::Task => "task",
        }
    }

    pub fn parse(s: &str) -> Option<OutboxKind> {
        match s {
            "message" => Some(OutboxKind::Message),
            "call" => Some(OutboxKind::Call),
            "task" => Some(OutboxKind::Task),
            _ => None,
        }
    }
}

/// A delivery, written in the same transaction as the transition that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// `RUN_ID/STEP_ID`: unique; the delivery's idempotency key.
    pub key: String,
    pub kind: OutboxKind,
    pub run_id: String,
    pub flow: String,
    pub customer_id: String,
    pub step: String,
    /// The channel (`sms`, `email`…), the webhook name for a call, `task` for a task.
    pub channel: String,
    /// The address on the channel (phone, e-mail…), when the channel has one.
    pub address: Option<String>,
    pub template: Option<String>,
    /// Rendered content: `{ "subject"?, "text"?, "html"? }` for a message, the request body
    /// for a call, `{ assign, text, due_at }` for a task.
    pub payload: Json,
    pub transactional: bool,
    pub created_at: Time,
}

/// A goal reached within its window, attributed to the flow and to the last step that
/// touched the customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    pub run_id: String,
    pub flow: String,
    pub version: String,
    pub customer_id: String,
    pub arm: Arm,
    pub last_touch: Option<String>,
    pub event_id: String,
    pub at: Time,
}

/// Something that failed at run time where the flow could not say so in a run's history
/// alone: an expression that could not be evaluated (a missing attribute read without
/// `has()`, a type error) in a trigger's `where`, an audience, a segment, a goal condition
/// or an exit rule, or a step that ended a run with an error. Kept per flow, step and
/// customer, with how many times it happened; `step` is the step id, or `trigger`,
/// `audience`, `segment`, `goal`, `exit` for the flow-level parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub flow: String,
    pub step: String,
    pub customer_id: String,
    pub count: u64,
    /// The last error, in words.
    pub error: String,
    /// When it last happened.
    pub at: Time,
}

/// The failures of one flow step, over every customer (`Store::failure_counts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCount {
    pub flow: String,
    pub step: String,
    /// Times it failed.
    pub count: u64,
    /// Customers it failed for.
    pub customers: u64,
    /// The most recent failure: its error, customer and time.
    pub last_error: String,
    pub last_customer: String,
    pub last_at: Time,
}

/// A compiled flow version, recorded when first seen so runs can name the version they
/// are pinned to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowVersion {
    pub flow: String,
    pub version: String,
    pub source: String,
    pub created_at: Time,
}

/// Everything a batch of transitions writes, committed in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// When the round ran (the caller's clock): recorded as the inbox items' `applied_at`.
    pub at: Time,
    /// Customers changed by updates, sends (cap marks) or cooldowns; whole rows, upserted.
    pub customers: Vec<Customer>,
    /// Runs created or advanced; whole rows, upserted by id.
    pub runs: Vec<Run>,
    pub enrolments: Vec<Enrolment>,
    pub history: Vec<HistoryEntry>,
    /// Inserted; a row whose key exists already is ignored (idempotent replay).
    pub outbox: Vec<OutboxRow>,
    pub conversions: Vec<Conversion>,
    /// Run-time failures of this round, one per flow, step and customer (counts added).
    pub failures: Vec<Failure>,
    /// Outcome counters of this round, summed per counter.
    pub counts: crate::stats::Tally,
    /// Inbox items now applied (by sequence number from `Store::inbox_pending`).
    pub inbox_done: Vec<i64>,
    /// The customer leases the round ran under, when several daemons share the database:
    /// `Store::commit` then writes the batch only if the lease still holds. `None` (a single
    /// daemon, tests, `canvas test`): written unchecked.
    pub lease: Option<Lease>,
}

/// The leases an engine round holds on its customers (`Store::claim_customers`). A batch
/// carrying one commits only if, inside the commit's transaction, `owner` still holds an
/// unexpired lease (`until > now`) on every one of `customers`; otherwise nothing is written
/// (`StoreError::LeaseLost`): a daemon that stalled past its lease never writes over the
/// work of the daemon that took its customers over, it redoes the round instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Who claimed the customers (the daemon's `owner` id given to `claim_customers`).
    pub owner: String,
    /// The customers the round loaded; each must still be leased to `owner`.
    pub customers: Vec<String>,
    /// The committer's clock: a lease whose `until <= now` has run out.
    pub now: Time,
}

impl Batch {
    /// Nothing to write. A lease alone is not work: an empty batch commits as a no-op,
    /// checked or not.
    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.runs.is_empty()
            && self.enrolments.is_empty()
            && self.history.is_empty()
            && self.outbox.is_empty()
            && self.conversions.is_empty()
            && self.failures.is_empty()
            && self.counts.is_empty()
            && self.inbox_done.is_empty()
    }
}

/// What the executor needs to know about a customer: the profile, every run that is still
/// waiting (in all flows) and the enrolments (for entry rules).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerState {
    pub customer: Customer,
    pub runs: Vec<Run>,
    pub enrolments: Vec<Enrolment>,
    /// Ended runs whose goal window is still open (control arms and runs that ended early
    /// still convert).
    pub converting: Vec<Run>,
}

// ---- the daemon: deliveries, flow counts ------------------------------------------------------

/// An outbox row claimed by a dispatcher (`Store::claim_outbox`): no other dispatcher takes
/// it until `lease_until`. A dispatcher that dies lets the lease run out and the row is
/// claimed again, so delivery is at least once and `row.key` is the idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub row: OutboxRow,
    /// Attempts made before this one.
    pub attempts: u32,
    pub lease_until: Time,
}

/// How an attempt at a claimed delivery ended (`Store::settle_outbox`). Each one releases the
/// lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// Delivered at `at`; counts one more attempt.
    Sent { key: String, at: Time },
    /// Failed; try again at `next_attempt_at`. `attempts` is the new total, counting this one.
    Retry {
        key: String,
        attempts: u32,
        next_attempt_at: Time,
        error: String,
    },
    /// Failed for good at `at` (a permanent error, or out of attempts); never tried again.
    /// `at` is kept in the row's `dead_at` column.
    Dead {
        key: String,
        attempts: u32,
        at: Time,
        error: String,
    },
}

impl DeliveryOutcome {
    /// The outbox key the outcome settles.
    pub fn key(&self) -> &str {
        match self {
            DeliveryOutcome::Sent { key, .. }
            | DeliveryOutcome::Retry { key, .. }
            | DeliveryOutcome::Dead { key, .. } => key,
        }
    }
}

/// Where an outbox row is in delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not delivered yet: due at `next_attempt_at` (possibly claimed right now).
    Pending,
    Sent,
    /// Given up on; kept for the journey view and for operators.
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "sent" => Some(DeliveryStatus::Sent),
            "dead" => Some(DeliveryStatus::Dead),
            _ => None,
        }
    }
}

/// An outbox row with its delivery state, for a customer's journey view
/// (`Store::deliveries`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryState {
    pub row: OutboxRow,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the row is (or was last) due: its creation, then each retry's time.
    pub next_attempt_at: Option<Time>,
    /// The error of the latest failed attempt; kept when a later attempt succeeds.
    pub last_error: Option<String>,
    pub sent_at: Option<Time>,
    /// When the row was given up on (a dead letter); cleared when an operator retries it.
    pub dead_at: Option<Time>,
}

/// Which dead letters to list (`Store::dead_letters`): every field narrows the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub flow: Option<String>,
    pub channel: Option<String>,
    /// Text the last error contains (case-insensitive).
    pub reason: Option<String>,
    /// At most this many, most recently dead first.
    pub limit: usize,
}

/// Which sandbox deliveries to list (`Store::sandbox_messages`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    /// The channels configured as `type: sandbox`: only rows sent on these are listed (the
    /// outbox does not record a channel's type; the daemon's configuration does).
    pub channels: Vec<String>,
    /// Narrow to one of them.
    pub channel: Option<String>,
    /// Narrow to one customer.
    pub customer_id: Option<String>,
    /// At most this many, most recently sent first.
    pub limit: usize,
}

impl SandboxFilter {
    /// The sandbox channels to list: all of them, or the one asked for if it is one.
    pub fn narrowed_channels(&self) -> Vec<String> {
        match &self.channel {
            Some(c) => self.channels.iter().filter(|x| *x == c).cloned().collect(),
            None => self.channels.clone(),
        }
    }
}

/// The dispatcher's backlog (`Store::outbox_depth`), for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxDepth {
    /// Rows not delivered yet, due or not.
    pub pending: u64,
    /// Pending rows whose `next_attempt_at` has come (including rows being delivered now).
    pub due: u64,
    /// Rows given up on. (Sent rows are not counted: that would read the whole table on
    /// every scrape; `canvas_sends_total` counts them as they happen.)
    pub dead: u64,
    /// The earliest `next_attempt_at` among due rows: `now` minus it is the dispatcher's lag.
    pub oldest_due: Option<Time>,
}

/// How many runs of a flow entered and how they stand (`Store::flow_counts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowCounts {
    pub flow: String,
    /// Every run, whatever its state.
    pub entered: u64,
    /// Runs waiting at a step.
    pub waiting: u64,
    /// Ended runs whose outcome is neither `exited` nor `error`.
    pub completed: u64,
    /// Ended with outcome `exited` (an exit condition or an opt-out).
    pub exited: u64,
    /// Ended with outcome `error`.
    pub errored: u64,
    /// Runs with a conversion.
    pub converted: u64,
}
