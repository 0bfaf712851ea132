//! The embedded backend: one SQLite file in WAL mode.
//!
//! Writes are set-based: a table's rows go in as multi-row statements,
//! `INSERT INTO t (…) VALUES (?,…),(?,…),… ON CONFLICT …`, in a fixed set of sizes (1 to
//! 1,024 rows), so a commit of 1,000 runs is a few statements per table that stay prepared,
//! never one statement per row. Measured alternatives: one JSON parameter expanded with
//! `json_each(?)` and `value->>N` per column is 2–3× slower for wide rows (SQLite re-renders
//! and re-parses `value` for every `->>`), still ~1.5× slower with a MATERIALIZED CTE; one
//! statement per row through sqlx caps near 17,000 rows/s. The statements of a commit are
//! pipelined: SQLite (on sqlx's worker thread) executes one while the next is encoded.
//!
//! Hot reads (`load`, `due`, `inbox_pending`, `customer_ids`) fold their rows into one JSON
//! value in SQLite (`json_group_array`), parsed with serde: sqlx hands rows over from its
//! worker thread one at a time (~5 µs each), which costs more than building and parsing the
//! JSON. JSON columns travel as JSON strings, so they come back byte for byte.
//!
//! All writes go through a pool of exactly one connection and `BEGIN IMMEDIATE`, so writers in
//! this process queue in the pool instead of failing with `SQLITE_BUSY`; reads use a separate
//! pool, which WAL lets run alongside the writer.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{
    ConnectOptions as _, Connection as _, Sqlite, SqliteConnection, SqlitePool, Transaction,
};

use super::codec::{
    self, ClaimedRow, ConversionRow, CountsRow, CustomerRow, DeliveryStateRow, EnrolmentRow,
    FailureCountRow, FailureRow, FlowCountsRow, FlowVersionRow, HistoryRow, InboxRow, NodeCountRow,
    OutboxDbRow, OutboxDepthRow, RUN_COLUMNS, RunRow, Settle, arm_str, ms, opt_ms, to_json,
};
use super::{Counts, DEFAULT_TIMEOUT, NodeCount, Result, Store, StoreError, Takeover};
use crate::state::{
    Batch, Conversion, Customer, CustomerState, DeadLetterFilter, Delivery, DeliveryOutcome,
    DeliveryState, Enrolment, Failure, FailureCount, FlowCounts, FlowVersion, HistoryEntry,
    InboxItem, OutboxDepth, OutboxRow, Run, SandboxFilter, Time,
};
use crate::stats::{Count, FlowStats, StatsQuery};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

// First: its `add!` macro is used by everything after it.
#[macro_use]
mod write;
use write::*;
pub(crate) use write::{
    Args, INSERT_HISTORY, INSERT_OUTBOX, Pipeline, Shape, UPSERT_RUNS, bind_history, bind_outbox,
    bind_run,
};

/// How hard a commit holds on to its data.
///
/// The engine's guarantee is that a commit survives the *process* dying at any instant
/// (crash, OOM kill, `kill -9`). In WAL mode with `synchronous=NORMAL`, a commit has been
/// written to the WAL file with `write()` before `commit` returns, so it is in the operating
/// system's page cache and survives the process; the WAL is synced at checkpoints only. An
/// operating-system crash or power loss may lose the last commits (never corrupt the file).
/// That is the default: it is what we guarantee, and it saves an `fsync` per commit.
/// `Full` syncs the WAL at every commit, for power-loss durability, at the cost of one
/// `fsync` per commit: within noise at 1,000-run batches on the development machine, +25%
/// on single-row commits there (0.31 → 0.39 ms), and far more on disks with slow `fsync`.
/// Choose it with `sqlite://PATH?durability=full`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=NORMAL`: survives process crashes; may lose the last commits on power loss.
    #[default]
    Normal,
    /// `synchronous=FULL`: survives power loss too.
    Full,
}

/// The SQLite store. Cheap to clone (two pool handles).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: every write transaction.
    write: SqlitePool,
    /// Readers (the same pool as `write` for an in-memory database).
    read: SqlitePool,
}

impl SqliteStore {
    /// Open (creating it if missing) a database file with [`Durability::Normal`] and run the
    /// migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        SqliteStore::open_with(path, Durability::Normal).await
    }

    pub async fn open_with(path: impl AsRef<Path>, durability: Durability) -> Result<SqliteStore> {
        SqliteStore::open_with_timeout(path, durability, DEFAULT_TIMEOUT).await
    }

    /// [`SqliteStore::open_with`], waiting `timeout` for another process's lock on the file
    /// (SQLite's busy timeout) and a quarter more for a free connection of a pool. A writer
    /// that holds the file longer makes callers fail after that long, not hang.
    pub async fn open_with_timeout(
        path: impl AsRef<Path>,
        durability: Durability,
        timeout: Duration,
    ) -> Result<SqliteStore> {
        // The pools wait a little longer than SQLite's busy timeout, so a lock held by another
        // process ends in SQLite's own "database is locked" rather than a bare pool timeout.
        let acquire = timeout + timeout / 4;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(timeout)
            // Room for every statement size of every table (10 × 11) and the reads.
            .statement_cache_capacity(256)
            // 32 MiB of page cache per connection; temporary b-trees (sorts) in memory.
            .pragma("cache_size", "-32768")
            .pragma("temp_store", "memory");
        // One plain connection first. It sets the journal mode, so a file another process
        // holds locked fails here with SQLite's own "database is locked"; the pool would retry
        // and report a bare timeout.
        tokio::time::timeout(acquire, options.connect())
            .await
            .map_err(|_| StoreError::Timeout(timeout))??
            .close()
            .await?;
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(acquire)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(acquire)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { write, read })
    }

    /// A private in-memory database (tests, `canvas test`). It lives as long as the store.
    pub async fn memory() -> Result<SqliteStore> {
        // sqlx gives `:memory:` a unique shared-cache name; one connection that never
        // expires keeps the database alive and avoids shared-cache table locks.
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?
            .statement_cache_capacity(256)
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            write: pool.clone(),
            read: pool,
        })
    }

    /// The write pool (one connection), for the raw-SQL benchmark.
    pub(crate) fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Append `s` as a JSON string literal.
fn escape_into(buf: &mut String, s: &str) {
    buf.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        // Only ASCII bytes are escaped, so these are char boundaries.
        buf.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(buf, "\\u{b:04x}");
        } else {
            buf.push_str(escaped);
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

/// One JSON array of strings, for `IN (SELECT value FROM json_each(?))`.
fn string_array<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let mut buf = String::from("[");
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        escape_into(&mut buf, s);
    }
    buf.push(']');
    buf
}

// ---- hot reads: one row of JSON instead of one sqlx row per record ----------------------------

/// `load` in one statement. Each sub-select folds its rows into one JSON array of row arrays
/// (`json_group_array`): sqlx hands rows over from its SQLite worker thread one at a time,
/// which costs more than building and parsing the JSON. JSON columns travel as JSON strings,
/// so they come back byte for byte.
const LOAD: &str = "\
SELECT
  (SELECT json_group_array(json_array(id, attributes, timezone, sends, cooldowns,
          unsubscribed_at, updated_at))
   FROM customers WHERE id IN (SELECT value FROM json_each(?1))),
  (SELECT json_group_array(json_array(id, flow, version, customer_id, status, step, wake_at,
          waiting_for, vars, event, arm, last_touch, goal_until, converted_at, outcome, seq,
          entered_at, updated_at, splits) ORDER BY customer_id, entered_at, id)
   FROM runs
   WHERE customer_id IN (SELECT value FROM json_each(?1))
     AND (status = 'waiting'
          OR (status = 'ended' AND goal_until > ?2 AND converted_at IS NULL))),
  (SELECT json_group_array(json_array(flow, customer_id, entries, last_entered_at, active_run,
          json(iif(in_segment, 'true', 'false'))) ORDER BY customer_id, flow)
   FROM enrolments WHERE customer_id IN (SELECT value FROM json_each(?1)))";

fn parse_rows<T: serde::de::DeserializeOwned>(table: &'static str, text: &str) -> Result<Vec<T>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table,
        message: format!("bad row: {e}"),
    })
}

impl Store for SqliteStore {
    async fn put_flow_versions(&self, versions: &[FlowVersion]) -> Result<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let rows: Vec<&FlowVersion> = versions.iter().collect();
        let mut tx = self.begin().await?;
        let mut pipe = Pipeline::new(&mut tx);
        PUT_FLOW_VERSIONS
            .write(&mut pipe, &rows, |a, v| {
                add!(a; v.flow.as_str(), v.version.as_str(), v.source.as_str(), ms(v.created_at));
                Ok(())
            })
            .await?;
        pipe.finish().await?;
        tx.commit().await?;
        Ok(())
    }

    async fn flow_versions(&self, flow: Option<&str>) -> Result<Vec<FlowVersion>> {
        let rows: Vec<FlowVersionRow> = match flow {
            Some(flow) => {
                sqlx::query_as(
                    "SELECT flow, version, source, created_at FROM flow_versions
                     WHERE flow = ?1 ORDER BY flow, created_at, version",
                )
                .bind(flow)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT flow, version, source, created_at FROM flow_versions
                     ORDER BY flow, created_at, version",
                )
                .fetch_all(&self.read)
                .await?
            }
        };
        rows.into_iter().map(FlowVersionRow::into_version).collect()
    }

    async fn enqueue(&self, items: &[InboxItem]) -> Result<usize> {
        if items.is_empty() {
            return Ok(0);
        }
        let mut encoded = Vec::with_capacity(items.len());
        for item in items {
            encoded.push((
                codec::dedupe_key(item),
                item.customer_id(),
                to_json("inbox", item)?,
                ms(item.at()),
            ));
        }
        let rows: Vec<_> = encoded.iter().collect();
        let mut tx = self.begin().await?;
        let mut pipe = Pipeline::new(&mut tx);
        ENQUEUE
            .write(&mut pipe, &rows, |a, (key, customer, item, at)| {
                add!(a; key.as_deref(), *customer, item.as_str(), *at);
                Ok(())
            })
            .await?;
        let accepted = pipe.finish().await?;
        tx.commit().await?;
        Ok(usize::try_from(accepted).unwrap_or(usize::MAX))
    }

    async fn inbox_pending(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, InboxItem)>> {
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(seq, item) ORDER BY seq) FROM
               (SELECT seq, item FROM inbox WHERE applied_at IS NULL AND seq > ?2
                ORDER BY seq LIMIT ?1)",
        )
        .bind(limit_i64(limit))
        .bind(after.unwrap_or(i64::MIN))
        .fetch_one(&self.read)
        .await?;
        parse_rows::<InboxRow>("inbox", &text)?
            .into_iter()
            .map(InboxRow::into_item)
            .collect()
    }

    async fn inbox_unapplied(&self, seqs: &[i64]) -> Result<Vec<i64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let list = serde_json::to_string(seqs).map_err(|e| StoreError::Corrupt {
            table: "inbox",
            message: e.to_string(),
        })?;
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(seq) FROM inbox
             WHERE seq IN (SELECT value FROM json_each(?1)) AND applied_at IS NULL",
        )
        .bind(list)
        .fetch_one(&self.write)
        .await?;
        parse_rows("inbox", &text)
    }

    async fn load(&self, customer_ids: &[String], now: Time) -> Result<Vec<CustomerState>> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = string_array(customer_ids.iter().map(String::as_str));
        let (customers, runs, enrolments): (String, String, String) = sqlx::query_as(LOAD)
            .bind(&ids)
            .bind(ms(now))
            .fetch_one(&self.read)
            .await?;
        let customers = parse_rows::<CustomerRow>("customers", &customers)?;
        let runs = parse_rows::<RunRow>("runs", &runs)?;
        let enrolments = parse_rows::<EnrolmentRow>("enrolments", &enrolments)?;
        Ok(codec::assemble(
            customer_ids,
            customers
                .into_iter()
                .map(CustomerRow::into_customer)
                .collect::<Result<_>>()?,
            runs.into_iter()
                .map(RunRow::into_run)
                .collect::<Result<_>>()?,
            enrolments
                .into_iter()
                .map(EnrolmentRow::into_enrolment)
                .collect::<Result<_>>()?,
        ))
    }

    async fn due(&self, now: Time, limit: usize) -> Result<Vec<String>> {
        // Walk the due index in (wake_at, id) order, a page at a time, until `limit` distinct
        // customers are found (one page unless customers have several due runs).
        let page = limit.max(16);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut offset = 0usize;
        while out.len() < limit {
            let text: String = sqlx::query_scalar(
                "SELECT json_group_array(customer_id ORDER BY wake_at, id) FROM
                   (SELECT customer_id, wake_at, id FROM runs
                    WHERE status = 'waiting' AND wake_at <= ?1
                    ORDER BY wake_at, id LIMIT ?2 OFFSET ?3)",
            )
            .bind(ms(now))
            .bind(limit_i64(page))
            .bind(limit_i64(offset))
            .fetch_one(&self.read)
            .await?;
            let ids: Vec<String> = parse_rows("runs", &text)?;
            let fetched = ids.len();
            for id in ids {
                if out.len() < limit && seen.insert(id.clone()) {
                    out.push(id);
                }
            }
            if fetched < page {
                break;
            }
            offset += fetched;
        }
        Ok(out)
    }

    async fn next_wake(&self, after: Time) -> Result<Option<Time>> {
        let wake: Option<i64> = sqlx::query_scalar(
            "SELECT wake_at FROM runs WHERE status = 'waiting' AND wake_at > ?1
             ORDER BY wake_at LIMIT 1",
        )
        .bind(ms(after))
        .fetch_optional(&self.read)
        .await?;
        wake.map(|ms| codec::time("runs", ms)).transpose()
    }

    async fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = codec::Rows::of(batch);
        let mut tx = self.begin().await?;
        if let Some(lease) = &batch.lease {
            let ids = codec::lease_ids(&lease.customers);
            let held: i64 = sqlx::query_scalar(LEASES_HELD)
                .bind(string_array(ids.iter().copied()))
                .bind(lease.owner.as_str())
                .bind(ms(lease.now))
                .fetch_one(&mut *tx)
                .await?;
            // On a lost lease the transaction is dropped: rolled back, nothing written.
            codec::check_lease(lease, ids.len(), held)?;
        }
        let mut pipe = Pipeline::new(&mut tx);
        UPSERT_CUSTOMERS
            .write(&mut pipe, &rows.customers, bind_customer)
            .await?;
        UPSERT_ENROLMENTS
            .write(&mut pipe, &rows.enrolments, bind_enrolment)
            .await?;
        INSERT_HISTORY
            .write(&mut pipe, &rows.history, bind_history)
            .await?;
        INSERT_OUTBOX
            .write(&mut pipe, &rows.outbox, bind_outbox)
            .await?;
        INSERT_CONVERSIONS
            .write(&mut pipe, &rows.conversions, bind_conversion)
            .await?;
        UPSERT_RUNS.write(&mut pipe, &rows.runs, bind_run).await?;
        UPSERT_FAILURES
            .write(&mut pipe, &rows.failures, bind_failure)
            .await?;
        let shard = rows.shard;
        let counts: Vec<&Count> = rows.counts.iter().collect();
        UPSERT_COUNTS
            .write(&mut pipe, &counts, |a, c| {
                add!(a; c.flow.as_str(), i64::from(c.day.unwrap_or_default()), c.version.as_str(),
                    c.step.as_str(), c.metric.as_str(), shard, c.n);
                Ok(())
            })
            .await?;
        let waiting: Vec<&Count> = rows.waiting.iter().collect();
        UPSERT_WAITING
            .write(&mut pipe, &waiting, |a, c| {
                add!(a; c.flow.as_str(), c.version.as_str(), c.step.as_str(), shard, c.n);
                Ok(())
            })
            .await?;
        if !batch.inbox_done.is_empty() {
            let mut seqs = String::from("[");
            for (i, seq) in batch.inbox_done.iter().enumerate() {
                if i > 0 {
                    seqs.push(',');
                }
                let _ = write!(seqs, "{seq}");
            }
            seqs.push(']');
            let mut args = Args::default();
            add!(&mut args; seqs, ms(batch.at));
            pipe.submit(INBOX_DONE, args).await?;
        }
        pipe.finish().await?;
        tx.commit().await?;
        Ok(())
    }

    async fn customer_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        reads::customer_ids(self, after, limit).await
    }

    async fn outbox(&self, customer_id: Option<&str>) -> Result<Vec<OutboxRow>> {
        reads::outbox(self, customer_id).await
    }

    async fn history(&self, customer_id: Option<&str>) -> Result<Vec<HistoryEntry>> {
        reads::history(self, customer_id).await
    }

    async fn runs(&self, customer_id: &str) -> Result<Vec<Run>> {
        reads::runs(self, customer_id).await
    }

    async fn failure_counts(&self, flow: Option<&str>) -> Result<Vec<FailureCount>> {
        reads::failure_counts(self, flow).await
    }

    async fn failures(&self, customer_id: &str) -> Result<Vec<Failure>> {
        reads::failures(self, customer_id).await
    }

    async fn conversions(&self, flow: Option<&str>) -> Result<Vec<Conversion>> {
        reads::conversions(self, flow).await
    }

    async fn node_counts(&self, flow: Option<&str>) -> Result<Vec<NodeCount>> {
        reads::node_counts(self, flow).await
    }

    async fn waiting_at(&self, flow: &str, step: &str, limit: usize) -> Result<Vec<Run>> {
        reads::waiting_at(self, flow, step, limit).await
    }

    async fn goal_report(&self, flow: Option<&str>) -> Result<Vec<super::ArmCount>> {
        reads::goal_report(self, flow).await
    }

    async fn counts(&self) -> Result<Counts> {
        reads::counts(self).await
    }

    async fn claim_outbox(
        &self,
        now: Time,
        limit: usize,
        owner: &str,
        lease_until: Time,
        skip: &[String],
    ) -> Result<Vec<Delivery>> {
        daemon::claim_outbox(self, now, limit, owner, lease_until, skip).await
    }

    async fn renew_outbox(&self, keys: &[String], owner: &str, lease_until: Time) -> Result<u64> {
        daemon::renew_outbox(self, keys, owner, lease_until).await
    }

    async fn release_outbox(&self, keys: &[String], owner: &str) -> Result<()> {
        daemon::release_outbox(self, keys, owner).await
    }

    async fn heartbeat(&self, owner: &str, now: Time) -> Result<()> {
        daemon::heartbeat(self, owner, now).await
    }

    async fn take_over(&self, owner: &str, dead_before: Option<Time>) -> Result<Takeover> {
        daemon::take_over(self, owner, dead_before).await
    }

    async fn settle_outbox(&self, outcomes: &[DeliveryOutcome]) -> Result<()> {
        daemon::settle_outbox(self, outcomes).await
    }

    async fn deliveries(&self, customer_id: &str) -> Result<Vec<DeliveryState>> {
        daemon::deliveries(self, customer_id).await
    }

    async fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeliveryState>> {
        daemon::dead_letters(self, filter).await
    }

    async fn sandbox_messages(&self, filter: &SandboxFilter) -> Result<Vec<DeliveryState>> {
        daemon::sandbox_messages(self, filter).await
    }

    async fn delivery(&self, key: &str) -> Result<Option<DeliveryState>> {
        daemon::delivery(self, key).await
    }

    async fn retry_dead_letter(&self, key: &str, now: Time) -> Result<bool> {
        daemon::retry_dead_letter(self, key, now).await
    }

    async fn outbox_depth(&self, now: Time) -> Result<OutboxDepth> {
        daemon::outbox_depth(self, now).await
    }

    async fn set_paused(&self, flow: &str, paused: bool, at: Time) -> Result<()> {
        daemon::set_paused(self, flow, paused, at).await
    }

    async fn paused_flows(&self) -> Result<Vec<String>> {
        daemon::paused_flows(self).await
    }

    async fn claim_fire(&self, flow: &str, fire_at: Time, now: Time) -> Result<bool> {
        daemon::claim_fire(self, flow, fire_at, now).await
    }

    async fn last_fire(&self, flow: &str) -> Result<Option<Time>> {
        daemon::last_fire(self, flow).await
    }

    async fn flow_counts(&self, flow: Option<&str>) -> Result<Vec<FlowCounts>> {
        daemon::flow_counts(self, flow).await
    }

    async fn flow_stats(&self, q: &StatsQuery) -> Result<FlowStats> {
        stats::flow_stats(self, q).await
    }

    async fn claim_customers(
        &self,
        ids: &[String],
        owner: &str,
        now: Time,
        until: Time,
    ) -> Result<Vec<String>> {
        daemon::claim_customers(self, ids, owner, now, until).await
    }

    async fn release_customers(&self, ids: &[String], owner: &str) -> Result<()> {
        daemon::release_customers(self, ids, owner).await
    }
}

pub(crate) fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// After the macros above, which the submodules use.
mod daemon;
mod reads;
mod stats;
