//! The shared backend: Postgres, for several daemons on one database.
//!
//! Writes are set-based: a batch travels as one array per column, and a whole commit is ONE
//! statement — a data-modifying CTE per table, each `INSERT … SELECT … FROM UNNEST($1::text[],
//! $2::int8[], …) ON CONFLICT …` — so it is one round trip, atomic by itself (no BEGIN/COMMIT
//! round trips), and prepared once whatever the batch size. A batch fenced by customer leases
//! adds a transaction around that statement: the lease check, then the statement.
//!
//! Tables live in the connection's `search_path`: [`PgStore::connect_with_schema`] puts a
//! deployment (or a test) in its own schema.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};

use super::codec::{
    self, ClaimedRow, ConversionRow, CountsRow, CustomerRow, DeliveryStateRow, EnrolmentRow,
    FailureCountRow, FailureRow, FlowCountsRow, FlowVersionRow, HistoryRow, InboxRow, NodeCountRow,
    OutboxDbRow, OutboxDepthRow, RunRow, Settle, arm_str, ms, opt_ms, to_json,
};
use super::{Counts, DEFAULT_TIMEOUT, NodeCount, Result, Store, StoreError, Takeover};
use crate::state::{
    Batch, Conversion, Customer, CustomerState, DeadLetterFilter, Delivery, DeliveryOutcome,
    DeliveryState, Enrolment, Failure, FailureCount, FlowCounts, FlowVersion, HistoryEntry,
    InboxItem, OutboxDepth, OutboxRow, Run, SandboxFilter, Time,
};
use crate::stats::{Count, FlowStats, StatsQuery};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Settings of our own sessions. The working set is in memory and the queries are short
/// index lookups: with the default `random_page_cost = 4` the planner turns a 1,000-key
/// `= ANY($1)` into a sequential scan of the whole table; JIT compilation only adds latency
/// to statements like ours.
const SESSION: [(&str, &str); 2] = [("random_page_cost", "1.1"), ("jit", "off")];

/// The Postgres store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    schema: Option<String>,
}

impl PgStore {
    /// Connect with the URL's own `search_path` (normally `public`) and run the migrations.
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// [`PgStore::connect`], waiting at most `timeout` for a connection — now, and later
    /// whenever the pool has to hand one out or open one.
    pub async fn connect_with_timeout(url: &str, timeout: Duration) -> Result<PgStore> {
        let options = PgConnectOptions::from_str(url)?;
        // One plain connection first: the pool retries a refused connection until its timeout
        // and then says only that it timed out; this says why (refused, no such role, TLS…).
        connect_once(&options, timeout).await?.close().await?;
        PgStore::open(options.options(SESSION), None, timeout).await
    }

    /// [`PgStore::connect_with_timeout`] on a database Canvas has written before: one with
    /// no Canvas tables is [`StoreError::Missing`], and nothing is created in it (a
    /// read-only command must not set up a database).
    pub async fn connect_existing(url: &str, timeout: Duration) -> Result<PgStore> {
        let options = PgConnectOptions::from_str(url)?;
        let mut conn = connect_once(&options, timeout).await?;
        let present: bool = sqlx::query_scalar("SELECT to_regclass('runs') IS NOT NULL")
            .fetch_one(&mut conn)
            .await?;
        conn.close().await?;
        if !present {
            return Err(StoreError::Missing(format!(
                "{} (it has no Canvas tables)",
                crate::redact::redact(url)
            )));
        }
        PgStore::open(options.options(SESSION), None, timeout).await
    }

    /// Connect with every table in `schema` (created if missing): several deployments, or
    /// tests, share one database without seeing each other. `schema` is a lower-case SQL
    /// identifier (`[a-z_][a-z0-9_]*`).
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<PgStore> {
        let valid = schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(StoreError::Schema(schema.to_owned()));
        }
        let options = PgConnectOptions::from_str(url)?;
        let timeout = DEFAULT_TIMEOUT;
        let mut conn = connect_once(&options, timeout).await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let options = options.options(SESSION).options([("search_path", schema)]);
        PgStore::open(options, Some(schema.to_owned()), timeout).await
    }

    async fn open(
        options: PgConnectOptions,
        schema: Option<String>,
        timeout: Duration,
    ) -> Result<PgStore> {
        // `acquire_timeout` bounds connecting too: sqlx retries a refused connection until
        // it runs out, and gives up on one that does not answer.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::PoolTimedOut => StoreError::Timeout(timeout),
                e => e.into(),
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore { pool, schema })
    }

    /// The schema given to [`PgStore::connect_with_schema`].
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Drop the schema given to [`PgStore::connect_with_schema`] with everything in it, and
    /// close the pool (benchmarks and tests clean up after themselves). Without a schema of
    /// its own the store drops nothing.
    pub async fn drop_schema(&self) -> Result<()> {
        if let Some(schema) = &self.schema {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&self.pool)
                .await?;
        }
        self.pool.close().await;
        Ok(())
    }

    /// Close the pool (waits for connections in use to come back).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// One connection, or [`StoreError::Timeout`] when the server does not finish the handshake
/// within `timeout` (a host that accepts connections and never answers).
async fn connect_once(options: &PgConnectOptions, timeout: Duration) -> Result<sqlx::PgConnection> {
    Ok(tokio::time::timeout(timeout, options.connect())
        .await
        .map_err(|_| StoreError::Timeout(timeout))??)
}

const RUN_SELECT: &str = "id, flow, version, customer_id, status, step, wake_at, waiting_for, \
     vars::text AS vars, event::text AS event, arm, last_touch, goal_until, converted_at, \
     outcome, seq, entered_at, updated_at, splits::text AS splits";

const LOAD_RUNS: &str = "\
SELECT id, flow, version, customer_id, status, step, wake_at, waiting_for, vars::text AS vars,
       event::text AS event, arm, last_touch, goal_until, converted_at, outcome, seq, entered_at,
       updated_at, splits::text AS splits
FROM runs
WHERE customer_id = ANY($1::text[])
  AND (status = 'waiting' OR (status = 'ended' AND goal_until > $2 AND converted_at IS NULL))
ORDER BY customer_id, entered_at, id";

// ---- customer leases ----------------------------------------------------------------------

/// `commit`'s lease check, first in the commit's transaction: how many of the customers
/// `$1` the owner `$2` holds at `$3`. `FOR SHARE` keeps those rows share-locked until the
/// commit ends, so a claim that would take one over (it locks the row to update it) waits
/// for the commit, and a claim already under way is waited for and its result checked.
/// Locked in id order, like every lease statement.
const LEASES_HELD: &str = "\
SELECT count(*) FROM (SELECT 1 FROM customer_leases
                      WHERE customer_id = ANY($1::text[]) AND owner = $2 AND until > $3
                      ORDER BY customer_id FOR SHARE) AS held";

// ---- the dispatcher -----------------------------------------------------------------------

impl Store for PgStore {
    async fn put_flow_versions(&self, versions: &[FlowVersion]) -> Result<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let flow: Vec<&str> = versions.iter().map(|v| v.flow.as_str()).collect();
        let version: Vec<&str> = versions.iter().map(|v| v.version.as_str()).collect();
        let source: Vec<&str> = versions.iter().map(|v| v.source.as_str()).collect();
        let at: Vec<i64> = versions.iter().map(|v| ms(v.created_at)).collect();
        sqlx::query(
            "INSERT INTO flow_versions (flow, version, source, created_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[])
             ON CONFLICT (flow, version) DO NOTHING",
        )
        .bind(flow)
        .bind(version)
        .bind(source)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn flow_versions(&self, flow: Option<&str>) -> Result<Vec<FlowVersion>> {
        let rows: Vec<FlowVersionRow> = sqlx::query_as(
            "SELECT flow, version, source, created_at FROM flow_versions
             WHERE $1::text IS NULL OR flow = $1 ORDER BY flow, created_at, version",
        )
        .bind(flow)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(FlowVersionRow::into_version).collect()
    }

    async fn enqueue(&self, items: &[InboxItem]) -> Result<usize> {
        if items.is_empty() {
            return Ok(0);
        }
        let mut event_id = Vec::with_capacity(items.len());
        let mut customer_id = Vec::with_capacity(items.len());
        let mut item = Vec::with_capacity(items.len());
        let mut at = Vec::with_capacity(items.len());
        for i in items {
            event_id.push(codec::dedupe_key(i));
            customer_id.push(i.customer_id());
            item.push(to_json("inbox", i)?);
            at.push(ms(i.at()));
        }
        let done = sqlx::query(
            "INSERT INTO inbox (event_id, customer_id, item, at)
             SELECT e, c, i::json, a
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[])
                 WITH ORDINALITY AS t(e, c, i, a, n)
             ORDER BY n
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(customer_id)
        .bind(item)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    async fn inbox_pending(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, InboxItem)>> {
        let rows: Vec<InboxRow> = sqlx::query_as(
            "SELECT seq, item::text AS item FROM inbox WHERE applied_at IS NULL AND seq > $2
             ORDER BY seq LIMIT $1",
        )
        .bind(limit_i64(limit))
        .bind(after.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(InboxRow::into_item).collect()
    }

    async fn inbox_unapplied(&self, seqs: &[i64]) -> Result<Vec<i64>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "SELECT seq FROM inbox WHERE seq = ANY($1::int8[]) AND applied_at IS NULL",
        )
        .bind(seqs)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn load(&self, customer_ids: &[String], now: Time) -> Result<Vec<CustomerState>> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        // Three queries on three connections at once.
        let customers = sqlx::query_as::<_, CustomerRow>(
            "SELECT id, attributes::text AS attributes, timezone, sends::text AS sends,
                    cooldowns::text AS cooldowns, unsubscribed_at, updated_at
             FROM customers WHERE id = ANY($1::text[])",
        )
        .bind(customer_ids)
        .fetch_all(&self.pool);
        let runs = sqlx::query_as::<_, RunRow>(LOAD_RUNS)
            .bind(customer_ids)
            .bind(ms(now))
            .fetch_all(&self.pool);
        let enrolments = sqlx::query_as::<_, EnrolmentRow>(
            "SELECT flow, customer_id, entries, last_entered_at, active_run, in_segment
             FROM enrolments WHERE customer_id = ANY($1::text[])
             ORDER BY customer_id, flow",
        )
        .bind(customer_ids)
        .fetch_all(&self.pool);
        let (customers, runs, enrolments) = tokio::try_join!(customers, runs, enrolments)?;
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
        // Walk the due index in wake order, a page at a time, until `limit` distinct
        // customers are found (one page unless customers have several due runs).
        let page = limit.max(16);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut offset = 0usize;
        while out.len() < limit {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT customer_id FROM runs
                 WHERE status = 'waiting' AND wake_at <= $1
                 ORDER BY wake_at, id LIMIT $2 OFFSET $3",
            )
            .bind(ms(now))
            .bind(limit_i64(page))
            .bind(limit_i64(offset))
            .fetch_all(&self.pool)
            .await?;
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
            "SELECT wake_at FROM runs WHERE status = 'waiting' AND wake_at > $1
             ORDER BY wake_at LIMIT 1",
        )
        .bind(ms(after))
        .fetch_optional(&self.pool)
        .await?;
        wake.map(|ms| codec::time("runs", ms)).transpose()
    }

    async fn commit(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = codec::Rows::of(batch);
        let q = sqlx::query(commit_sql());
        let q = bind_customers(q, &rows.customers)?;
        let q = bind_enrolments(q, &rows.enrolments);
        let q = bind_history(q, &rows.history)?;
        let q = bind_outbox(q, &rows.outbox)?;
        let q = bind_conversions(q, &rows.conversions);
        let q = bind_runs(q, &rows.runs)?;
        let q = bind_failures(q, &rows.failures);
        let q = bind_counts(q, &rows.counts, rows.shard);
        let q = bind_waiting(q, &rows.waiting, rows.shard);
        let q = q.bind(batch.inbox_done.as_slice()).bind(ms(batch.at));
        let Some(lease) = &batch.lease else {
            q.execute(&self.pool).await?;
            return Ok(());
        };
        let ids = codec::lease_ids(&lease.customers);
        let mut tx = self.pool.begin().await?;
        let held: i64 = sqlx::query_scalar(LEASES_HELD)
            .bind(&ids)
            .bind(lease.owner.as_str())
            .bind(ms(lease.now))
            .fetch_one(&mut *tx)
            .await?;
        // On a lost lease the transaction is dropped: rolled back, nothing written.
        codec::check_lease(lease, ids.len(), held)?;
        q.execute(&mut *tx).await?;
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

fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// After the macros above, which the submodules use.
mod daemon;
mod reads;
mod stats;
mod write;

use write::*;
pub(crate) use write::{
    Q, bind_history, bind_outbox, bind_runs, insert_history, insert_outbox, upsert_runs,
};
