//! Durable state: one trait, two backends (SQLite, the embedded default, and Postgres), both
//! through sqlx with embedded migrations. Writes are set-based: a whole batch of transitions
//! commits in one transaction with a handful of statements, never one statement per row.

use std::future::Future;
use std::time::Duration;

use crate::state::{
    Batch, Conversion, CustomerState, DeadLetterFilter, Delivery, DeliveryOutcome, DeliveryState,
    Failure, FailureCount, FlowCounts, FlowVersion, HistoryEntry, InboxItem, OutboxDepth,
    OutboxRow, Run, SandboxFilter, Time,
};
use crate::stats::{FlowStats, StatsQuery};

mod codec;
mod counters;
pub mod postgres;
pub mod raw;
pub mod sqlite;

pub use crate::redact::{DatabaseUrl, redact};
pub use postgres::PgStore;
pub use sqlite::{Durability, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A background commit could not finish (its task panicked or was cancelled).
    #[error("a commit task failed: {0}")]
    Task(String),
    /// [`Database::open_existing`] on a SQLite file that is not there: a read-only command
    /// never creates a database.
    #[error("no database at {0}")]
    Missing(String),
    #[error("unsupported database URL `{0}`: use sqlite://PATH, sqlite::memory: or postgres://…")]
    Url(String),
    /// The database did not answer within the timeout given to [`Database::connect_with`].
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    /// `PgStore::connect_with_schema` takes lower-case SQL identifiers only.
    #[error("invalid schema name `{0}`: use a lower-case SQL identifier ([a-z_][a-z0-9_]*)")]
    Schema(String),
    /// A row that does not decode: the database was written by something else.
    #[error("corrupt row in `{table}`: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    /// A batch's lease ([`crate::state::Lease`]) no longer holds: `missing` of its customers
    /// are no longer leased to `owner`. Nothing was written; the caller drops the round's
    /// results and redoes the round (after claiming again).
    #[error(
        "`{owner}` lost the lease on {missing} customer(s) of the batch (it expired or another \
         daemon took them over): nothing was written, the round will be redone"
    )]
    LeaseLost { owner: String, missing: usize },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long a store waits for the database by default: for a free connection of its pool, a
/// new connection, or (SQLite) another process's write lock. An outage is reported after this
/// long instead of holding every caller for sqlx's 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many runs wait at each step of a flow right now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeCount {
    pub flow: String,
    pub step: String,
    pub waiting: u64,
}

/// Row counts, for benchmarks, tests and the crash test.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub customers: u64,
    pub runs: u64,
    pub waiting: u64,
    pub history: u64,
    pub outbox: u64,
    pub conversions: u64,
    pub inbox_pending: u64,
}

/// The engine's storage. Every method is one round trip or one transaction.
/// Stores are cheap handles (a connection pool inside): clone one to commit in the background.
pub trait Store: Clone + Send + Sync + 'static {
    /// Record flow versions (idempotent).
    fn put_flow_versions(
        &self,
        versions: &[FlowVersion],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Recorded flow versions, by flow then age; one flow's or all. A run pinned to a version
    /// that is no longer in `flows/` finds its source here.
    fn flow_versions(
        &self,
        flow: Option<&str>,
    ) -> impl Future<Output = Result<Vec<FlowVersion>>> + Send;

    /// Append to the inbox. Events whose id is already in the inbox are dropped; returns how
    /// many items were accepted.
    fn enqueue(&self, items: &[InboxItem]) -> impl Future<Output = Result<usize>> + Send;

    /// Up to `limit` unapplied inbox items after sequence number `after` (all when `None`),
    /// oldest first, with their sequence numbers. `after` lets a caller read the next round
    /// while the previous one is still committing.
    fn inbox_pending(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(i64, InboxItem)>>> + Send;

    /// Which of these inbox items are still unapplied. With several processes, a round
    /// reads its items before it leases their customers; another process may have applied
    /// them in between, and this is how the round finds out (after the lease, nobody else
    /// can apply them any more).
    fn inbox_unapplied(&self, seqs: &[i64]) -> impl Future<Output = Result<Vec<i64>>> + Send;

    /// The state of these customers; customers unknown to the store are left out.
    fn load(
        &self,
        customer_ids: &[String],
        now: Time,
    ) -> impl Future<Output = Result<Vec<CustomerState>>> + Send;

    /// Customers with a waiting run whose `wake_at <= now`, earliest first, deduplicated.
    fn due(&self, now: Time, limit: usize) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// The earliest `wake_at` of any waiting run that is later than `after` (a run the
    /// runtime could not move must not hide the timers after it).
    fn next_wake(&self, after: Time) -> impl Future<Output = Result<Option<Time>>> + Send;

    /// Write a batch in ONE transaction. With `batch.lease`, the transaction first checks,
    /// before writing anything, that the lease's owner still holds an unexpired lease on every
    /// listed customer, and writes nothing ([`StoreError::LeaseLost`]) if not; on Postgres
    /// the lease rows stay share-locked until the commit ends, so a claim taking one over
    /// waits for it. An empty batch writes nothing and checks nothing.
    fn commit(&self, batch: &Batch) -> impl Future<Output = Result<()>> + Send;

    /// Customer ids in id order after `after`, for schedule and segment scans.
    fn customer_ids(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Outbox rows, oldest first; one customer's or all.
    fn outbox(
        &self,
        customer_id: Option<&str>,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// History rows, in order; one customer's or all.
    fn history(
        &self,
        customer_id: Option<&str>,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>>> + Send;

    /// All runs of a customer, oldest first.
    fn runs(&self, customer_id: &str) -> impl Future<Output = Result<Vec<Run>>> + Send;

    fn conversions(
        &self,
        flow: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Conversion>>> + Send;

    /// Runs waiting at each step.
    /// Run-time failures summed per flow step, each with its most recent error; all flows
    /// when `flow` is `None`.
    fn failure_counts(
        &self,
        flow: Option<&str>,
    ) -> impl Future<Output = Result<Vec<FailureCount>>> + Send;

    /// One customer's run-time failures, most recent first.
    fn failures(&self, customer_id: &str) -> impl Future<Output = Result<Vec<Failure>>> + Send;

    fn node_counts(
        &self,
        flow: Option<&str>,
    ) -> impl Future<Output = Result<Vec<NodeCount>>> + Send;

    /// Up to `limit` runs waiting at `step` of `flow`, longest waiting first (entered
    /// earliest, then by id): the customers a node of the canvas holds now. One index range
    /// (`runs_waiting_at`), however many runs the database keeps.
    fn waiting_at(
        &self,
        flow: &str,
        step: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Run>>> + Send;

    fn counts(&self) -> impl Future<Output = Result<Counts>> + Send;

    /// Per flow and arm: how many runs entered, and how many converted.
    fn goal_report(&self, flow: Option<&str>)
    -> impl Future<Output = Result<Vec<ArmCount>>> + Send;

    // ---- the daemon ----

    /// Lease up to `limit` outbox rows for delivery: pending, due (`next_attempt_at <= now`)
    /// and not leased (no lease, or one that ran out: `lease_until < now`), earliest due
    /// first, then in insertion order. They are marked leased to `owner` until
    /// `lease_until` in the same statement, so two dispatchers — tasks or daemons — never
    /// claim the same row while its lease runs. Returned in that order.
    ///
    /// Rows of the channels in `skip` are passed over (their channel has all the work the
    /// dispatcher can hold for it).
    fn claim_outbox(
        &self,
        now: Time,
        limit: usize,
        owner: &str,
        lease_until: Time,
        skip: &[String],
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// Extend to `lease_until` the leases `owner` holds on these pending rows (rows still
    /// waiting for a channel slot, or on the wire), so nobody else claims them meanwhile.
    /// How many were extended.
    fn renew_outbox(
        &self,
        keys: &[String],
        owner: &str,
        lease_until: Time,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Give back, untouched, the leases `owner` holds on these pending rows: claimable by
    /// anyone at once, attempts unchanged.
    fn release_outbox(
        &self,
        keys: &[String],
        owner: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    // ---- daemons: who is alive, and taking over the claims of those who are not ----

    /// Record that `owner` is alive at `now`.
    fn heartbeat(&self, owner: &str, now: Time) -> impl Future<Output = Result<()>> + Send;

    /// Take back the claims of daemons that stopped: every outbox lease and customer lease
    /// held by a daemon whose last heartbeat is before `dead_before` is freed at once
    /// (rather than left to run out), and the daemon is forgotten. With `dead_before`
    /// `None`, every claim not held by `owner` is freed — for a store only one daemon may
    /// use (SQLite), at that daemon's start.
    fn take_over(
        &self,
        owner: &str,
        dead_before: Option<Time>,
    ) -> impl Future<Output = Result<Takeover>> + Send;

    /// Record how deliveries went, all in one transaction, and release their leases. Only
    /// pending rows change: an outcome that arrives after another dispatcher settled the row
    /// (its lease had run out) is dropped rather than undo that. When `outcomes` names a key
    /// twice the last one counts.
    fn settle_outbox(
        &self,
        outcomes: &[DeliveryOutcome],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Every outbox row of a customer with its delivery state, in insertion order.
    fn deliveries(
        &self,
        customer_id: &str,
    ) -> impl Future<Output = Result<Vec<DeliveryState>>> + Send;

    /// The dead letters that match `filter`, most recently dead first.
    fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> impl Future<Output = Result<Vec<DeliveryState>>> + Send;

    /// The rows sent on the channels `filter` names (the sandbox channels), most recently
    /// sent first. Reads the sent rows (no index covers them): for a sandbox, not a hot loop.
    fn sandbox_messages(
        &self,
        filter: &SandboxFilter,
    ) -> impl Future<Output = Result<Vec<DeliveryState>>> + Send;

    /// One outbox row with its delivery state, by key.
    fn delivery(&self, key: &str) -> impl Future<Output = Result<Option<DeliveryState>>> + Send;

    /// Send a dead letter again, under the same key (the receiver's idempotency key): the
    /// row is pending again, due at `now`, with a fresh set of attempts; its last error is
    /// kept. `false` when `key` is not a dead letter (unknown, pending or sent).
    fn retry_dead_letter(&self, key: &str, now: Time) -> impl Future<Output = Result<bool>> + Send;

    /// The dispatcher's backlog at `now`. Counting sent rows reads the whole outbox: for a
    /// metrics scrape, not a hot loop.
    fn outbox_depth(&self, now: Time) -> impl Future<Output = Result<OutboxDepth>> + Send;

    /// Pause or resume a flow (idempotent).
    fn set_paused(
        &self,
        flow: &str,
        paused: bool,
        at: Time,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Flows paused now, by name.
    fn paused_flows(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Claim the schedule tick `fire_at` of `flow`: true for exactly one caller across all
    /// daemons sharing the database, false once it is claimed. `now` is recorded.
    fn claim_fire(
        &self,
        flow: &str,
        fire_at: Time,
        now: Time,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The latest tick of `flow` claimed, if any: a daemon starting up resumes the schedule
    /// after it.
    fn last_fire(&self, flow: &str) -> impl Future<Output = Result<Option<Time>>> + Send;

    /// Per flow, by name: runs entered and how they stand, and conversions. One flow's or
    /// all; a flow without runs is left out.
    fn flow_counts(
        &self,
        flow: Option<&str>,
    ) -> impl Future<Output = Result<Vec<FlowCounts>>> + Send;

    /// A flow's outcome counters over a range of days (one version's, or all), the
    /// flow-wide ones per day, the runs waiting now per step, and the versions that have
    /// any (see [`crate::stats`]). Reads the counter tables only, whatever the history holds.
    fn flow_stats(&self, q: &StatsQuery) -> impl Future<Output = Result<FlowStats>> + Send;

    // ---- customer leases: one daemon works on a customer at a time ----

    /// Lease customers to `owner` until `until`, for an engine round: each id is taken if
    /// nobody holds it, if its lease ran out (`until <= now`), or if `owner` holds it already
    /// (the lease is extended). Returns the ids `owner` now holds, in the order given (each
    /// once); the rest are another daemon's for now and must be left out of the round.
    /// Daemons claiming one id at the same moment: exactly one gets it. The round's commit
    /// carries the lease ([`crate::state::Lease`]) to be fenced against a takeover.
    fn claim_customers(
        &self,
        ids: &[String],
        owner: &str,
        now: Time,
        until: Time,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Give back the leases `owner` holds on these ids, for other daemons to claim at once;
    /// leases held by others stay.
    fn release_customers(
        &self,
        ids: &[String],
        owner: &str,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What [`Store::take_over`] freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Takeover {
    /// The daemons whose claims were taken over (empty when `dead_before` was `None`).
    pub daemons: Vec<String>,
    /// Outbox rows whose lease was freed.
    pub outbox: u64,
    /// Customer leases freed.
    pub customers: u64,
}

impl Takeover {
    pub fn is_empty(&self) -> bool {
        self.daemons.is_empty() && self.outbox == 0 && self.customers == 0
    }
}

/// Runs and conversions of one arm of one flow; the lift of a holdout is the treated
/// conversion rate minus the control one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArmCount {
    pub flow: String,
    pub arm: crate::state::Arm,
    pub runs: u64,
    pub converted: u64,
}

impl ArmCount {
    /// Converted runs as a share of runs, 0–1.
    pub fn rate(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.converted as f64 / self.runs as f64
        }
    }
}

/// A store chosen at run time from a URL.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Database {
    /// `sqlite://PATH` (created if missing; `?durability=full` syncs every commit, see
    /// [`Durability`]), `sqlite::memory:`, or `postgres://…` / `postgresql://…`, waiting for
    /// the database at most [`DEFAULT_TIMEOUT`] (see [`Database::connect_with`]).
    pub async fn connect(url: &str) -> Result<Database> {
        Database::connect_with(url, DEFAULT_TIMEOUT).await
    }

    /// [`Database::connect`] with the longest wait for the database: to connect (so an
    /// unreachable database fails this fast), and later for a free connection of the pool and,
    /// on SQLite, for another process's write lock. Errors never carry the URL's password.
    pub async fn connect_with(url: &str, timeout: Duration) -> Result<Database> {
        Database::open(url, timeout, false).await
    }

    async fn open(url: &str, timeout: Duration, must_exist: bool) -> Result<Database> {
        if url == "sqlite::memory:" || url == "sqlite://:memory:" {
            return Ok(Database::Sqlite(SqliteStore::memory().await?));
        }
        if let Some((path, query)) = Database::sqlite_parts(url) {
            let mut durability = Durability::Normal;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                durability = match pair {
                    "durability=normal" => Durability::Normal,
                    "durability=full" => Durability::Full,
                    _ => return Err(StoreError::Url(redact(url).into_owned())),
                };
            }
            if path.is_empty() {
                return Err(StoreError::Url(redact(url).into_owned()));
            }
            if must_exist && !std::path::Path::new(path).exists() {
                return Err(StoreError::Missing(path.to_owned()));
            }
            return Ok(Database::Sqlite(
                SqliteStore::open_with_timeout(path, durability, timeout).await?,
            ));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = if must_exist {
                PgStore::connect_existing(url, timeout).await?
            } else {
                PgStore::connect_with_timeout(url, timeout).await?
            };
            return Ok(Database::Postgres(store));
        }
        Err(StoreError::Url(redact(url).into_owned()))
    }

    /// [`Database::connect_with`] on a database that must exist already: a `sqlite://PATH`
    /// whose file is missing, or a Postgres database without Canvas's tables, is
    /// [`StoreError::Missing`], and nothing is created. (A Postgres database that does not
    /// exist at all fails to connect.)
    pub async fn open_existing(url: &str, timeout: Duration) -> Result<Database> {
        Database::open(url, timeout, true).await
    }

    /// The file a `sqlite://PATH` URL names (`None`: in memory, or not SQLite).
    pub fn sqlite_file(url: &str) -> Option<&str> {
        if url == "sqlite::memory:" || url == "sqlite://:memory:" {
            return None;
        }
        Database::sqlite_parts(url)
            .map(|(path, _)| path)
            .filter(|p| !p.is_empty())
    }

    /// `(path, query)` of a `sqlite://PATH?QUERY` or `sqlite:PATH` URL.
    fn sqlite_parts(url: &str) -> Option<(&str, &str)> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))?;
        Some(rest.split_once('?').unwrap_or((rest, "")))
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }
}

impl From<SqliteStore> for Database {
    fn from(s: SqliteStore) -> Database {
        Database::Sqlite(s)
    }
}

impl From<PgStore> for Database {
    fn from(s: PgStore) -> Database {
        Database::Postgres(s)
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Database::Sqlite($s) => $call.await,
            Database::Postgres($s) => $call.await,
        }
    };
}

impl Store for Database {
    async fn put_flow_versions(&self, versions: &[FlowVersion]) -> Result<()> {
        delegate!(self, s => s.put_flow_versions(versions))
    }

    async fn flow_versions(&self, flow: Option<&str>) -> Result<Vec<FlowVersion>> {
        delegate!(self, s => s.flow_versions(flow))
    }

    async fn enqueue(&self, items: &[InboxItem]) -> Result<usize> {
        delegate!(self, s => s.enqueue(items))
    }

    async fn inbox_pending(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, InboxItem)>> {
        delegate!(self, s => s.inbox_pending(after, limit))
    }

    async fn inbox_unapplied(&self, seqs: &[i64]) -> Result<Vec<i64>> {
        delegate!(self, s => s.inbox_unapplied(seqs))
    }

    async fn load(&self, customer_ids: &[String], now: Time) -> Result<Vec<CustomerState>> {
        delegate!(self, s => s.load(customer_ids, now))
    }

    async fn due(&self, now: Time, limit: usize) -> Result<Vec<String>> {
        delegate!(self, s => s.due(now, limit))
    }

    async fn next_wake(&self, after: Time) -> Result<Option<Time>> {
        delegate!(self, s => s.next_wake(after))
    }

    async fn commit(&self, batch: &Batch) -> Result<()> {
        delegate!(self, s => s.commit(batch))
    }

    async fn customer_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        delegate!(self, s => s.customer_ids(after, limit))
    }

    async fn outbox(&self, customer_id: Option<&str>) -> Result<Vec<OutboxRow>> {
        delegate!(self, s => s.outbox(customer_id))
    }

    async fn history(&self, customer_id: Option<&str>) -> Result<Vec<HistoryEntry>> {
        delegate!(self, s => s.history(customer_id))
    }

    async fn runs(&self, customer_id: &str) -> Result<Vec<Run>> {
        delegate!(self, s => s.runs(customer_id))
    }

    async fn conversions(&self, flow: Option<&str>) -> Result<Vec<Conversion>> {
        delegate!(self, s => s.conversions(flow))
    }

    async fn failure_counts(&self, flow: Option<&str>) -> Result<Vec<FailureCount>> {
        delegate!(self, s => s.failure_counts(flow))
    }

    async fn failures(&self, customer_id: &str) -> Result<Vec<Failure>> {
        delegate!(self, s => s.failures(customer_id))
    }

    async fn node_counts(&self, flow: Option<&str>) -> Result<Vec<NodeCount>> {
        delegate!(self, s => s.node_counts(flow))
    }

    async fn waiting_at(&self, flow: &str, step: &str, limit: usize) -> Result<Vec<Run>> {
        delegate!(self, s => s.waiting_at(flow, step, limit))
    }

    async fn counts(&self) -> Result<Counts> {
        delegate!(self, s => s.counts())
    }

    async fn goal_report(&self, flow: Option<&str>) -> Result<Vec<ArmCount>> {
        delegate!(self, s => s.goal_report(flow))
    }

    async fn claim_outbox(
        &self,
        now: Time,
        limit: usize,
        owner: &str,
        lease_until: Time,
        skip: &[String],
    ) -> Result<Vec<Delivery>> {
        delegate!(self, s => s.claim_outbox(now, limit, owner, lease_until, skip))
    }

    async fn renew_outbox(&self, keys: &[String], owner: &str, lease_until: Time) -> Result<u64> {
        delegate!(self, s => s.renew_outbox(keys, owner, lease_until))
    }

    async fn release_outbox(&self, keys: &[String], owner: &str) -> Result<()> {
        delegate!(self, s => s.release_outbox(keys, owner))
    }

    async fn heartbeat(&self, owner: &str, now: Time) -> Result<()> {
        delegate!(self, s => s.heartbeat(owner, now))
    }

    async fn take_over(&self, owner: &str, dead_before: Option<Time>) -> Result<Takeover> {
        delegate!(self, s => s.take_over(owner, dead_before))
    }

    async fn settle_outbox(&self, outcomes: &[DeliveryOutcome]) -> Result<()> {
        delegate!(self, s => s.settle_outbox(outcomes))
    }

    async fn deliveries(&self, customer_id: &str) -> Result<Vec<DeliveryState>> {
        delegate!(self, s => s.deliveries(customer_id))
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeliveryState>> {
        delegate!(self, s => s.dead_letters(filter))
    }

    async fn sandbox_messages(&self, filter: &SandboxFilter) -> Result<Vec<DeliveryState>> {
        delegate!(self, s => s.sandbox_messages(filter))
    }

    async fn delivery(&self, key: &str) -> Result<Option<DeliveryState>> {
        delegate!(self, s => s.delivery(key))
    }

    async fn retry_dead_letter(&self, key: &str, now: Time) -> Result<bool> {
        delegate!(self, s => s.retry_dead_letter(key, now))
    }

    async fn outbox_depth(&self, now: Time) -> Result<OutboxDepth> {
        delegate!(self, s => s.outbox_depth(now))
    }

    async fn set_paused(&self, flow: &str, paused: bool, at: Time) -> Result<()> {
        delegate!(self, s => s.set_paused(flow, paused, at))
    }

    async fn paused_flows(&self) -> Result<Vec<String>> {
        delegate!(self, s => s.paused_flows())
    }

    async fn claim_fire(&self, flow: &str, fire_at: Time, now: Time) -> Result<bool> {
        delegate!(self, s => s.claim_fire(flow, fire_at, now))
    }

    async fn last_fire(&self, flow: &str) -> Result<Option<Time>> {
        delegate!(self, s => s.last_fire(flow))
    }

    async fn flow_counts(&self, flow: Option<&str>) -> Result<Vec<FlowCounts>> {
        delegate!(self, s => s.flow_counts(flow))
    }

    async fn flow_stats(&self, q: &StatsQuery) -> Result<FlowStats> {
        delegate!(self, s => s.flow_stats(q))
    }

    async fn claim_customers(
        &self,
        ids: &[String],
        owner: &str,
        now: Time,
        until: Time,
    ) -> Result<Vec<String>> {
        delegate!(self, s => s.claim_customers(ids, owner, now, until))
    }

    async fn release_customers(&self, ids: &[String], owner: &str) -> Result<()> {
        delegate!(self, s => s.release_customers(ids, owner))
    }
}
