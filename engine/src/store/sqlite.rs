//! The embedded backend: one SQLite file in WAL mode.
//!
//! Writes are set-based. A batch of rows travels as ONE bound parameter — a JSON array of
//! row arrays — and one statement per table expands it inside SQLite:
//! `INSERT INTO t (…) SELECT value->>0, value->>1, … FROM json_each(?1) …`. The statement text
//! never changes with the batch size, so it is prepared once per connection, and a commit of
//! 1,000 runs is a constant handful of statements instead of thousands of round trips
//! through sqlx's worker thread. JSON column values travel as JSON *strings* inside the row
//! array (`->>` returns them unchanged), so they are stored byte for byte as serde_json
//! wrote them.
//!
//! All writes go through a pool of exactly one connection and `BEGIN IMMEDIATE`, so writers in
//! this process queue in the pool instead of failing with `SQLITE_BUSY`; reads use a separate
//! pool, which WAL lets run alongside the writer.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::codec::{
    self, ConversionRow, CountsRow, CustomerRow, EnrolmentRow, FlowVersionRow, HistoryRow,
    InboxRow, NodeCountRow, OutboxDbRow, RUN_COLUMNS, RunRow, arm_str, ms, opt_ms, to_json,
};
use super::{Counts, NodeCount, Result, Store};
use crate::state::{
    Batch, Conversion, Customer, CustomerState, Enrolment, FlowVersion, HistoryEntry, InboxItem,
    OutboxRow, Run, Time,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How hard a commit holds on to its data.
///
/// The engine's guarantee is that a commit survives the *process* dying at any instant
/// (crash, OOM kill, `kill -9`). In WAL mode with `synchronous=NORMAL`, a commit has been
/// written to the WAL file with `write()` before `commit` returns, so it is in the operating
/// system's page cache and survives the process; the WAL is synced at checkpoints only. An
/// operating-system crash or power loss may lose the last commits (never corrupt the file).
/// That is the default: it is what we guarantee, and it saves an `fsync` per batch.
/// `Full` syncs the WAL at every commit, for power-loss durability, at the cost of one
/// `fsync` per batch (cheap per row at 1,000-run batches; it dominates small batches).
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
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(30))
            // 32 MiB of page cache per connection; temporary b-trees (sorts) in memory.
            .pragma("cache_size", "-32768")
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
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
        let options =
            SqliteConnectOptions::from_str("sqlite::memory:")?.pragma("temp_store", "memory");
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

/// Rows encoded as one JSON array of arrays, for `json_each(?)`.
pub(crate) struct JsonRows {
    buf: String,
    rows: usize,
    cols: usize,
}

impl JsonRows {
    pub(crate) fn new(capacity: usize) -> JsonRows {
        let mut buf = String::with_capacity(capacity);
        buf.push('[');
        JsonRows {
            buf,
            rows: 0,
            cols: 0,
        }
    }

    pub(crate) fn row(&mut self) -> &mut JsonRows {
        if self.rows > 0 {
            self.buf.push_str("],[");
        } else {
            self.buf.push('[');
        }
        self.rows += 1;
        self.cols = 0;
        self
    }

    fn sep(&mut self) {
        if self.cols > 0 {
            self.buf.push(',');
        }
        self.cols += 1;
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut JsonRows {
        self.sep();
        escape_into(&mut self.buf, s);
        self
    }

    pub(crate) fn opt_str(&mut self, s: Option<&str>) -> &mut JsonRows {
        match s {
            Some(s) => self.str(s),
            None => self.null(),
        }
    }

    fn null(&mut self) -> &mut JsonRows {
        self.sep();
        self.buf.push_str("null");
        self
    }

    pub(crate) fn int(&mut self, v: i64) -> &mut JsonRows {
        self.sep();
        let _ = write!(self.buf, "{v}");
        self
    }

    pub(crate) fn opt_int(&mut self, v: Option<i64>) -> &mut JsonRows {
        match v {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    pub(crate) fn bool(&mut self, v: bool) -> &mut JsonRows {
        self.int(i64::from(v))
    }

    /// A JSON column: the value's JSON text, as a JSON string.
    pub(crate) fn json<T: Serialize + ?Sized>(
        &mut self,
        table: &'static str,
        v: &T,
    ) -> Result<&mut JsonRows> {
        let text = to_json(table, v)?;
        Ok(self.str(&text))
    }

    pub(crate) fn finish(mut self) -> String {
        if self.rows > 0 {
            self.buf.push(']');
        }
        self.buf.push(']');
        self.buf
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

// ---- statements -------------------------------------------------------------------------

pub(crate) const UPSERT_CUSTOMERS: &str = "\
INSERT INTO customers (id, attributes, timezone, sends, cooldowns, updated_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5
FROM json_each(?1) WHERE true
ON CONFLICT (id) DO UPDATE SET attributes = excluded.attributes, timezone = excluded.timezone,
    sends = excluded.sends, cooldowns = excluded.cooldowns, updated_at = excluded.updated_at";

pub(crate) const UPSERT_ENROLMENTS: &str = "\
INSERT INTO enrolments (customer_id, flow, entries, last_entered_at, active_run, in_segment)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5
FROM json_each(?1) WHERE true
ON CONFLICT (customer_id, flow) DO UPDATE SET entries = excluded.entries,
    last_entered_at = excluded.last_entered_at, active_run = excluded.active_run,
    in_segment = excluded.in_segment";

pub(crate) const INSERT_HISTORY: &str = "\
INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7
FROM json_each(?1) WHERE true
ON CONFLICT DO NOTHING";

pub(crate) const INSERT_OUTBOX: &str = "\
INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel, address, template,
    payload, transactional, created_at, next_attempt_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8, value->>9, value->>10, value->>11, value->>11
FROM json_each(?1) WHERE true
ON CONFLICT DO NOTHING";

const INSERT_CONVERSIONS: &str = "\
INSERT INTO conversions (run_id, flow, version, customer_id, arm, last_touch, event_id, at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7
FROM json_each(?1) WHERE true
ON CONFLICT DO NOTHING";

pub(crate) const UPSERT_RUNS: &str = "\
INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at, waiting_for, vars,
    event, arm, last_touch, goal_until, converted_at, outcome, seq, entered_at,
    updated_at)
SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7,
    value->>8, value->>9, value->>10, value->>11, value->>12, value->>13, value->>14,
    value->>15, value->>16, value->>17
FROM json_each(?1) WHERE true
ON CONFLICT (id) DO UPDATE SET flow = excluded.flow, version = excluded.version,
    customer_id = excluded.customer_id, status = excluded.status, step = excluded.step,
    wake_at = excluded.wake_at, waiting_for = excluded.waiting_for, vars = excluded.vars,
    event = excluded.event, arm = excluded.arm,
    last_touch = excluded.last_touch, goal_until = excluded.goal_until,
    converted_at = excluded.converted_at, outcome = excluded.outcome, seq = excluded.seq,
    entered_at = excluded.entered_at, updated_at = excluded.updated_at";

const INBOX_DONE: &str = "\
UPDATE inbox SET applied_at = ?2
WHERE seq IN (SELECT value FROM json_each(?1)) AND applied_at IS NULL";

// ---- encoders ----------------------------------------------------------------------------

fn encode_customers(items: &[&Customer]) -> Result<String> {
    const T: &str = "customers";
    let mut rows = JsonRows::new(items.len() * 160);
    for c in items {
        rows.row().str(&c.id);
        rows.json(T, &c.attributes)?.opt_str(c.timezone.as_deref());
        rows.json(T, &c.sends)?
            .json(T, &c.cooldowns)?
            .int(ms(c.updated_at));
    }
    Ok(rows.finish())
}

fn encode_enrolments(items: &[&Enrolment]) -> String {
    let mut rows = JsonRows::new(items.len() * 80);
    for e in items {
        rows.row()
            .str(&e.customer_id)
            .str(&e.flow)
            .int(i64::from(e.entries))
            .opt_int(opt_ms(e.last_entered_at))
            .opt_str(e.active_run.as_deref())
            .bool(e.in_segment);
    }
    rows.finish()
}

pub(crate) fn encode_history(items: &[HistoryEntry]) -> Result<String> {
    let mut rows = JsonRows::new(items.len() * 140);
    for h in items {
        rows.row()
            .str(&h.run_id)
            .int(i64::from(h.seq))
            .str(&h.flow)
            .str(&h.customer_id)
            .str(&h.step)
            .int(ms(h.at))
            .str(&h.action)
            .json("history", &h.detail)?;
    }
    Ok(rows.finish())
}

pub(crate) fn encode_outbox(items: &[OutboxRow]) -> Result<String> {
    let mut rows = JsonRows::new(items.len() * 240);
    for o in items {
        rows.row()
            .str(&o.key)
            .str(o.kind.as_str())
            .str(&o.run_id)
            .str(&o.flow)
            .str(&o.customer_id)
            .str(&o.step)
            .str(&o.channel)
            .opt_str(o.address.as_deref())
            .opt_str(o.template.as_deref())
            .json("outbox", &o.payload)?
            .bool(o.transactional)
            .int(ms(o.created_at));
    }
    Ok(rows.finish())
}

fn encode_conversions(items: &[Conversion]) -> String {
    let mut rows = JsonRows::new(items.len() * 120);
    for c in items {
        rows.row()
            .str(&c.run_id)
            .str(&c.flow)
            .str(&c.version)
            .str(&c.customer_id)
            .str(arm_str(c.arm))
            .opt_str(c.last_touch.as_deref())
            .str(&c.event_id)
            .int(ms(c.at));
    }
    rows.finish()
}

pub(crate) fn encode_runs<'a>(items: impl IntoIterator<Item = &'a Run>) -> Result<String> {
    const T: &str = "runs";
    let mut rows = JsonRows::new(4096);
    for r in items {
        rows.row()
            .str(&r.id)
            .str(&r.flow)
            .str(&r.version)
            .str(&r.customer_id)
            .str(r.status.as_str())
            .opt_str(r.step.as_deref())
            .opt_int(opt_ms(r.wake_at))
            .opt_str(r.waiting_for.as_deref())
            .json(T, &r.vars)?;
        match &r.event {
            Some(e) => rows.json(T, e)?,
            None => rows.null(),
        };
        rows.str(arm_str(r.arm))
            .opt_str(r.last_touch.as_deref())
            .opt_int(opt_ms(r.goal_until))
            .opt_int(opt_ms(r.converted_at))
            .opt_str(r.outcome.as_deref())
            .int(i64::from(r.seq))
            .int(ms(r.entered_at))
            .int(ms(r.updated_at));
    }
    Ok(rows.finish())
}

async fn exec(
    tx: &mut Transaction<'static, Sqlite>,
    sql: &'static str,
    rows: String,
) -> Result<()> {
    sqlx::query(sql).bind(rows).execute(&mut **tx).await?;
    Ok(())
}

impl Store for SqliteStore {
    async fn put_flow_versions(&self, versions: &[FlowVersion]) -> Result<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let mut rows = JsonRows::new(versions.iter().map(|v| v.source.len() + 100).sum());
        for v in versions {
            rows.row()
                .str(&v.flow)
                .str(&v.version)
                .str(&v.source)
                .int(ms(v.created_at));
        }
        sqlx::query(
            "INSERT INTO flow_versions (flow, version, source, created_at)
             SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1) WHERE true
             ON CONFLICT (flow, version) DO NOTHING",
        )
        .bind(rows.finish())
        .execute(&self.write)
        .await?;
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
        let mut rows = JsonRows::new(items.len() * 200);
        for item in items {
            let key = codec::dedupe_key(item);
            rows.row().opt_str(key.as_deref()).str(item.customer_id());
            rows.json("inbox", item)?.int(ms(item.at()));
        }
        let done = sqlx::query(
            "INSERT INTO inbox (event_id, customer_id, item, at)
             SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1) WHERE true
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(rows.finish())
        .execute(&self.write)
        .await?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    async fn inbox_pending(&self, limit: usize) -> Result<Vec<(i64, InboxItem)>> {
        let rows: Vec<InboxRow> = sqlx::query_as(
            "SELECT seq, item FROM inbox WHERE applied_at IS NULL ORDER BY seq LIMIT ?1",
        )
        .bind(limit_i64(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(InboxRow::into_item).collect()
    }

    async fn load(&self, customer_ids: &[String], now: Time) -> Result<Vec<CustomerState>> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = string_array(customer_ids.iter().map(String::as_str));
        let customers: Vec<CustomerRow> = sqlx::query_as(
            "SELECT id, attributes, timezone, sends, cooldowns, updated_at FROM customers
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&ids)
        .fetch_all(&self.read)
        .await?;
        let runs: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE customer_id IN (SELECT value FROM json_each(?1))
               AND (status = 'waiting'
                    OR (status = 'ended' AND goal_until > ?2 AND converted_at IS NULL))
             ORDER BY customer_id, entered_at, id"
        ))
        .bind(&ids)
        .bind(ms(now))
        .fetch_all(&self.read)
        .await?;
        let enrolments: Vec<EnrolmentRow> = sqlx::query_as(
            "SELECT flow, customer_id, entries, last_entered_at, active_run, in_segment
             FROM enrolments WHERE customer_id IN (SELECT value FROM json_each(?1))
             ORDER BY customer_id, flow",
        )
        .bind(&ids)
        .fetch_all(&self.read)
        .await?;
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
                 WHERE status = 'waiting' AND wake_at <= ?1
                 ORDER BY wake_at, id LIMIT ?2 OFFSET ?3",
            )
            .bind(ms(now))
            .bind(limit_i64(page))
            .bind(limit_i64(offset))
            .fetch_all(&self.read)
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
        // Encode everything before taking the write lock.
        let customers = codec::last_wins(&batch.customers, |c| c.id.as_str());
        let customers = (!customers.is_empty())
            .then(|| encode_customers(&customers))
            .transpose()?;
        let enrolments = codec::last_wins(&batch.enrolments, |e| {
            (e.customer_id.as_str(), e.flow.as_str())
        });
        let enrolments = (!enrolments.is_empty()).then(|| encode_enrolments(&enrolments));
        let history = (!batch.history.is_empty())
            .then(|| encode_history(&batch.history))
            .transpose()?;
        let outbox = (!batch.outbox.is_empty())
            .then(|| encode_outbox(&batch.outbox))
            .transpose()?;
        let conversions =
            (!batch.conversions.is_empty()).then(|| encode_conversions(&batch.conversions));
        let runs = codec::last_wins(&batch.runs, |r| r.id.as_str());
        let runs = (!runs.is_empty()).then(|| encode_runs(runs)).transpose()?;
        let inbox_done = (!batch.inbox_done.is_empty()).then(|| {
            let mut rows = String::from("[");
            for (i, seq) in batch.inbox_done.iter().enumerate() {
                if i > 0 {
                    rows.push(',');
                }
                let _ = write!(rows, "{seq}");
            }
            rows.push(']');
            rows
        });

        let mut tx = self.begin().await?;
        if let Some(rows) = customers {
            exec(&mut tx, UPSERT_CUSTOMERS, rows).await?;
        }
        if let Some(rows) = enrolments {
            exec(&mut tx, UPSERT_ENROLMENTS, rows).await?;
        }
        if let Some(rows) = history {
            exec(&mut tx, INSERT_HISTORY, rows).await?;
        }
        if let Some(rows) = outbox {
            exec(&mut tx, INSERT_OUTBOX, rows).await?;
        }
        if let Some(rows) = conversions {
            exec(&mut tx, INSERT_CONVERSIONS, rows).await?;
        }
        if let Some(rows) = runs {
            exec(&mut tx, UPSERT_RUNS, rows).await?;
        }
        if let Some(rows) = inbox_done {
            sqlx::query(INBOX_DONE)
                .bind(rows)
                .bind(codec::now_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn customer_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let ids = match after {
            Some(after) => {
                sqlx::query_scalar("SELECT id FROM customers WHERE id > ?1 ORDER BY id LIMIT ?2")
                    .bind(after)
                    .bind(limit_i64(limit))
                    .fetch_all(&self.read)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT id FROM customers ORDER BY id LIMIT ?1")
                    .bind(limit_i64(limit))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        Ok(ids)
    }

    async fn outbox(&self, customer_id: Option<&str>) -> Result<Vec<OutboxRow>> {
        const COLUMNS: &str = "key, kind, run_id, flow, customer_id, step, channel, address, \
                               template, payload, transactional, created_at";
        let rows: Vec<OutboxDbRow> = match customer_id {
            Some(c) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM outbox WHERE customer_id = ?1 ORDER BY rowid"
                ))
                .bind(c)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(&format!("SELECT {COLUMNS} FROM outbox ORDER BY rowid"))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.into_iter().map(OutboxDbRow::into_row).collect()
    }

    async fn history(&self, customer_id: Option<&str>) -> Result<Vec<HistoryEntry>> {
        const COLUMNS: &str = "run_id, seq, flow, customer_id, step, at, action, detail";
        let rows: Vec<HistoryRow> = match customer_id {
            // Through the customer's runs: the history primary key starts with run_id.
            Some(c) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM history
                     WHERE run_id IN (SELECT id FROM runs WHERE customer_id = ?1)
                     ORDER BY rowid"
                ))
                .bind(c)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(&format!("SELECT {COLUMNS} FROM history ORDER BY rowid"))
                    .fetch_all(&self.read)
                    .await?
            }
        };
        rows.into_iter().map(HistoryRow::into_entry).collect()
    }

    async fn runs(&self, customer_id: &str) -> Result<Vec<Run>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE customer_id = ?1 ORDER BY entered_at, id"
        ))
        .bind(customer_id)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(RunRow::into_run).collect()
    }

    async fn conversions(&self, flow: Option<&str>) -> Result<Vec<Conversion>> {
        const COLUMNS: &str = "run_id, flow, version, customer_id, arm, last_touch, event_id, at";
        let rows: Vec<ConversionRow> = match flow {
            Some(flow) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM conversions WHERE flow = ?1 ORDER BY at, run_id"
                ))
                .bind(flow)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM conversions ORDER BY at, run_id"
                ))
                .fetch_all(&self.read)
                .await?
            }
        };
        rows.into_iter()
            .map(ConversionRow::into_conversion)
            .collect()
    }

    async fn node_counts(&self, flow: Option<&str>) -> Result<Vec<NodeCount>> {
        let rows: Vec<NodeCountRow> = match flow {
            Some(flow) => {
                sqlx::query_as(
                    "SELECT flow, step, COUNT(*) AS waiting FROM runs
                     WHERE status = 'waiting' AND flow = ?1
                     GROUP BY flow, step ORDER BY flow, step",
                )
                .bind(flow)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query_as(
                    "SELECT flow, step, COUNT(*) AS waiting FROM runs WHERE status = 'waiting'
                     GROUP BY flow, step ORDER BY flow, step",
                )
                .fetch_all(&self.read)
                .await?
            }
        };
        Ok(rows.into_iter().map(NodeCountRow::into_count).collect())
    }

    async fn counts(&self) -> Result<Counts> {
        let row: CountsRow = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM customers) AS customers,
                    (SELECT COUNT(*) FROM runs) AS runs,
                    (SELECT COUNT(*) FROM runs WHERE status = 'waiting') AS waiting,
                    (SELECT COUNT(*) FROM history) AS history,
                    (SELECT COUNT(*) FROM outbox) AS outbox,
                    (SELECT COUNT(*) FROM conversions) AS conversions,
                    (SELECT COUNT(*) FROM inbox WHERE applied_at IS NULL) AS inbox_pending",
        )
        .fetch_one(&self.read)
        .await?;
        Ok(row.into_counts())
    }
}

pub(crate) fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
