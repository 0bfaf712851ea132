//! The shared backend: Postgres, for several daemons on one database.
//!
//! Writes are set-based: a batch travels as one array per column and one statement per table
//! expands them, `INSERT INTO t (…) SELECT … FROM UNNEST($1::text[], $2::int8[], …) …`. The
//! statement text never changes with the batch size, so it is prepared once per connection,
//! and a commit of 1,000 runs is a constant handful of round trips.
//!
//! Tables live in the connection's `search_path`: [`PgStore::connect_with_schema`] puts a
//! deployment (or a test) in its own schema.

use std::collections::HashSet;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres, Transaction};

use super::codec::{
    self, ConversionRow, CountsRow, CustomerRow, EnrolmentRow, FlowVersionRow, HistoryRow,
    InboxRow, NodeCountRow, OutboxDbRow, RunRow, arm_str, ms, opt_ms, to_json,
};
use super::{Counts, NodeCount, Result, Store, StoreError};
use crate::state::{
    Batch, Conversion, Customer, CustomerState, Enrolment, FlowVersion, HistoryEntry, InboxItem,
    OutboxRow, Run, Time,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The Postgres store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    schema: Option<String>,
}

impl PgStore {
    /// Connect with the URL's own `search_path` (normally `public`) and run the migrations.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let options = PgConnectOptions::from_str(url)?;
        PgStore::open(options, None).await
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
            return Err(StoreError::Url(format!(
                "{url} (schema `{schema}` is not a lower-case identifier)"
            )));
        }
        let options = PgConnectOptions::from_str(url)?;
        let mut conn = options.connect().await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let options = options.options([("search_path", schema)]);
        PgStore::open(options, Some(schema.to_owned())).await
    }

    async fn open(options: PgConnectOptions, schema: Option<String>) -> Result<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
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

    /// Close the pool (waits for connections in use to come back).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

// ---- statements -------------------------------------------------------------------------

const UPSERT_CUSTOMERS: &str = "\
INSERT INTO customers (id, attributes, timezone, sends, cooldowns, updated_at)
SELECT id, a::json, tz, s::json, c::json, u
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[])
    AS t(id, a, tz, s, c, u)
ON CONFLICT (id) DO UPDATE SET attributes = EXCLUDED.attributes, timezone = EXCLUDED.timezone,
    sends = EXCLUDED.sends, cooldowns = EXCLUDED.cooldowns, updated_at = EXCLUDED.updated_at";

const UPSERT_ENROLMENTS: &str = "\
INSERT INTO enrolments (customer_id, flow, entries, last_entered_at, active_run, in_segment)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::bool[])
ON CONFLICT (customer_id, flow) DO UPDATE SET entries = EXCLUDED.entries,
    last_entered_at = EXCLUDED.last_entered_at, active_run = EXCLUDED.active_run,
    in_segment = EXCLUDED.in_segment";

pub(crate) const INSERT_HISTORY: &str = "\
INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail)
SELECT r, s, f, c, st, a, ac, d::json
FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::int8[],
    $7::text[], $8::text[]) AS t(r, s, f, c, st, a, ac, d)
ON CONFLICT DO NOTHING";

pub(crate) const INSERT_OUTBOX: &str = "\
INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel, address, template,
    payload, transactional, created_at, next_attempt_at)
SELECT k, ki, r, f, c, st, ch, ad, te, p::json, tr, ca, ca
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::bool[], $12::int8[])
    AS t(k, ki, r, f, c, st, ch, ad, te, p, tr, ca)
ON CONFLICT DO NOTHING";

const INSERT_CONVERSIONS: &str = "\
INSERT INTO conversions (run_id, flow, version, customer_id, arm, last_touch, event_id, at)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::int8[])
ON CONFLICT DO NOTHING";

pub(crate) const UPSERT_RUNS: &str = "\
INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at, waiting_for, vars,
    event, arm, last_touch, goal_until, converted_at, outcome, seq, entered_at,
    updated_at)
SELECT id, f, v, c, st, sp, w, wf, va::json, te::json, a, lt, gu, ca, o, s, ea, ua
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::int8[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::int8[],
    $14::int8[], $15::text[], $16::int8[], $17::int8[], $18::int8[])
    AS t(id, f, v, c, st, sp, w, wf, va, te, a, lt, gu, ca, o, s, ea, ua)
ON CONFLICT (id) DO UPDATE SET flow = EXCLUDED.flow, version = EXCLUDED.version,
    customer_id = EXCLUDED.customer_id, status = EXCLUDED.status, step = EXCLUDED.step,
    wake_at = EXCLUDED.wake_at, waiting_for = EXCLUDED.waiting_for, vars = EXCLUDED.vars,
    event = EXCLUDED.event, arm = EXCLUDED.arm,
    last_touch = EXCLUDED.last_touch, goal_until = EXCLUDED.goal_until,
    converted_at = EXCLUDED.converted_at, outcome = EXCLUDED.outcome, seq = EXCLUDED.seq,
    entered_at = EXCLUDED.entered_at, updated_at = EXCLUDED.updated_at";

const INBOX_DONE: &str = "\
UPDATE inbox SET applied_at = $2 WHERE seq = ANY($1::int8[]) AND applied_at IS NULL";

const RUN_SELECT: &str = "id, flow, version, customer_id, status, step, wake_at, waiting_for, \
     vars::text AS vars, event::text AS event, arm, last_touch, goal_until, \
     converted_at, outcome, seq, entered_at, updated_at";

// ---- column vectors -------------------------------------------------------------------------

type Q<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind_customers<'q>(q: Q<'q>, items: &[&Customer]) -> Result<Q<'q>> {
    const T: &str = "customers";
    let n = items.len();
    let (mut id, mut a, mut tz, mut s, mut c, mut u) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for x in items {
        id.push(x.id.clone());
        a.push(to_json(T, &x.attributes)?);
        tz.push(x.timezone.clone());
        s.push(to_json(T, &x.sends)?);
        c.push(to_json(T, &x.cooldowns)?);
        u.push(ms(x.updated_at));
    }
    Ok(q.bind(id).bind(a).bind(tz).bind(s).bind(c).bind(u))
}

fn bind_enrolments<'q>(q: Q<'q>, items: &[&Enrolment]) -> Q<'q> {
    let n = items.len();
    let (mut c, mut f, mut e, mut l, mut a, mut s) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for x in items {
        c.push(x.customer_id.clone());
        f.push(x.flow.clone());
        e.push(i64::from(x.entries));
        l.push(opt_ms(x.last_entered_at));
        a.push(x.active_run.clone());
        s.push(x.in_segment);
    }
    q.bind(c).bind(f).bind(e).bind(l).bind(a).bind(s)
}

/// Column vectors of history rows.
pub(crate) struct HistoryCols {
    run_id: Vec<String>,
    seq: Vec<i64>,
    flow: Vec<String>,
    customer_id: Vec<String>,
    step: Vec<String>,
    at: Vec<i64>,
    action: Vec<String>,
    detail: Vec<String>,
}

impl HistoryCols {
    pub(crate) fn new(items: &[HistoryEntry]) -> Result<HistoryCols> {
        let n = items.len();
        let mut cols = HistoryCols {
            run_id: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            flow: Vec::with_capacity(n),
            customer_id: Vec::with_capacity(n),
            step: Vec::with_capacity(n),
            at: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            detail: Vec::with_capacity(n),
        };
        for h in items {
            cols.run_id.push(h.run_id.clone());
            cols.seq.push(i64::from(h.seq));
            cols.flow.push(h.flow.clone());
            cols.customer_id.push(h.customer_id.clone());
            cols.step.push(h.step.clone());
            cols.at.push(ms(h.at));
            cols.action.push(h.action.clone());
            cols.detail.push(to_json("history", &h.detail)?);
        }
        Ok(cols)
    }

    pub(crate) fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.run_id)
            .bind(self.seq)
            .bind(self.flow)
            .bind(self.customer_id)
            .bind(self.step)
            .bind(self.at)
            .bind(self.action)
            .bind(self.detail)
    }
}

/// Column vectors of outbox rows.
pub(crate) struct OutboxCols {
    key: Vec<String>,
    kind: Vec<&'static str>,
    run_id: Vec<String>,
    flow: Vec<String>,
    customer_id: Vec<String>,
    step: Vec<String>,
    channel: Vec<String>,
    address: Vec<Option<String>>,
    template: Vec<Option<String>>,
    payload: Vec<String>,
    transactional: Vec<bool>,
    created_at: Vec<i64>,
}

impl OutboxCols {
    pub(crate) fn new(items: &[OutboxRow]) -> Result<OutboxCols> {
        let n = items.len();
        let mut cols = OutboxCols {
            key: Vec::with_capacity(n),
            kind: Vec::with_capacity(n),
            run_id: Vec::with_capacity(n),
            flow: Vec::with_capacity(n),
            customer_id: Vec::with_capacity(n),
            step: Vec::with_capacity(n),
            channel: Vec::with_capacity(n),
            address: Vec::with_capacity(n),
            template: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            transactional: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
        };
        for o in items {
            cols.key.push(o.key.clone());
            cols.kind.push(o.kind.as_str());
            cols.run_id.push(o.run_id.clone());
            cols.flow.push(o.flow.clone());
            cols.customer_id.push(o.customer_id.clone());
            cols.step.push(o.step.clone());
            cols.channel.push(o.channel.clone());
            cols.address.push(o.address.clone());
            cols.template.push(o.template.clone());
            cols.payload.push(to_json("outbox", &o.payload)?);
            cols.transactional.push(o.transactional);
            cols.created_at.push(ms(o.created_at));
        }
        Ok(cols)
    }

    pub(crate) fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.key)
            .bind(self.kind)
            .bind(self.run_id)
            .bind(self.flow)
            .bind(self.customer_id)
            .bind(self.step)
            .bind(self.channel)
            .bind(self.address)
            .bind(self.template)
            .bind(self.payload)
            .bind(self.transactional)
            .bind(self.created_at)
    }
}

fn bind_conversions<'q>(q: Q<'q>, items: &[Conversion]) -> Q<'q> {
    let n = items.len();
    let mut r = Vec::with_capacity(n);
    let mut f = Vec::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    let mut c = Vec::with_capacity(n);
    let mut a = Vec::with_capacity(n);
    let mut l = Vec::with_capacity(n);
    let mut e = Vec::with_capacity(n);
    let mut t = Vec::with_capacity(n);
    for x in items {
        r.push(x.run_id.clone());
        f.push(x.flow.clone());
        v.push(x.version.clone());
        c.push(x.customer_id.clone());
        a.push(arm_str(x.arm));
        l.push(x.last_touch.clone());
        e.push(x.event_id.clone());
        t.push(ms(x.at));
    }
    q.bind(r)
        .bind(f)
        .bind(v)
        .bind(c)
        .bind(a)
        .bind(l)
        .bind(e)
        .bind(t)
}

/// Column vectors of runs.
pub(crate) struct RunCols {
    id: Vec<String>,
    flow: Vec<String>,
    version: Vec<String>,
    customer_id: Vec<String>,
    status: Vec<&'static str>,
    step: Vec<Option<String>>,
    wake_at: Vec<Option<i64>>,
    waiting_for: Vec<Option<String>>,
    vars: Vec<String>,
    event: Vec<Option<String>>,
    arm: Vec<&'static str>,
    last_touch: Vec<Option<String>>,
    goal_until: Vec<Option<i64>>,
    converted_at: Vec<Option<i64>>,
    outcome: Vec<Option<String>>,
    seq: Vec<i64>,
    entered_at: Vec<i64>,
    updated_at: Vec<i64>,
}

impl RunCols {
    pub(crate) fn new<'a>(items: impl ExactSizeIterator<Item = &'a Run>) -> Result<RunCols> {
        const T: &str = "runs";
        let n = items.len();
        let mut c = RunCols {
            id: Vec::with_capacity(n),
            flow: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            customer_id: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            step: Vec::with_capacity(n),
            wake_at: Vec::with_capacity(n),
            waiting_for: Vec::with_capacity(n),
            vars: Vec::with_capacity(n),
            event: Vec::with_capacity(n),
            arm: Vec::with_capacity(n),
            last_touch: Vec::with_capacity(n),
            goal_until: Vec::with_capacity(n),
            converted_at: Vec::with_capacity(n),
            outcome: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            entered_at: Vec::with_capacity(n),
            updated_at: Vec::with_capacity(n),
        };
        for r in items {
            c.id.push(r.id.clone());
            c.flow.push(r.flow.clone());
            c.version.push(r.version.clone());
            c.customer_id.push(r.customer_id.clone());
            c.status.push(r.status.as_str());
            c.step.push(r.step.clone());
            c.wake_at.push(opt_ms(r.wake_at));
            c.waiting_for.push(r.waiting_for.clone());
            c.vars.push(to_json(T, &r.vars)?);
            c.event
                .push(r.event.as_ref().map(|e| to_json(T, e)).transpose()?);
            c.arm.push(arm_str(r.arm));
            c.last_touch.push(r.last_touch.clone());
            c.goal_until.push(opt_ms(r.goal_until));
            c.converted_at.push(opt_ms(r.converted_at));
            c.outcome.push(r.outcome.clone());
            c.seq.push(i64::from(r.seq));
            c.entered_at.push(ms(r.entered_at));
            c.updated_at.push(ms(r.updated_at));
        }
        Ok(c)
    }

    pub(crate) fn bind(self, q: Q<'_>) -> Q<'_> {
        q.bind(self.id)
            .bind(self.flow)
            .bind(self.version)
            .bind(self.customer_id)
            .bind(self.status)
            .bind(self.step)
            .bind(self.wake_at)
            .bind(self.waiting_for)
            .bind(self.vars)
            .bind(self.event)
            .bind(self.arm)
            .bind(self.last_touch)
            .bind(self.goal_until)
            .bind(self.converted_at)
            .bind(self.outcome)
            .bind(self.seq)
            .bind(self.entered_at)
            .bind(self.updated_at)
    }
}

impl PgStore {
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

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

    async fn inbox_pending(&self, limit: usize) -> Result<Vec<(i64, InboxItem)>> {
        let rows: Vec<InboxRow> = sqlx::query_as(
            "SELECT seq, item::text AS item FROM inbox WHERE applied_at IS NULL
             ORDER BY seq LIMIT $1",
        )
        .bind(limit_i64(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(InboxRow::into_item).collect()
    }

    async fn load(&self, customer_ids: &[String], now: Time) -> Result<Vec<CustomerState>> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        let customers: Vec<CustomerRow> = sqlx::query_as(
            "SELECT id, attributes::text AS attributes, timezone, sends::text AS sends,
                    cooldowns::text AS cooldowns, updated_at
             FROM customers WHERE id = ANY($1::text[])",
        )
        .bind(customer_ids)
        .fetch_all(&self.pool)
        .await?;
        let runs: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_SELECT} FROM runs
             WHERE customer_id = ANY($1::text[])
               AND (status = 'waiting'
                    OR (status = 'ended' AND goal_until > $2 AND converted_at IS NULL))
             ORDER BY customer_id, entered_at, id"
        ))
        .bind(customer_ids)
        .bind(ms(now))
        .fetch_all(&self.pool)
        .await?;
        let enrolments: Vec<EnrolmentRow> = sqlx::query_as(
            "SELECT flow, customer_id, entries, last_entered_at, active_run, in_segment
             FROM enrolments WHERE customer_id = ANY($1::text[])
             ORDER BY customer_id, flow",
        )
        .bind(customer_ids)
        .fetch_all(&self.pool)
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
        // Encode everything before taking a connection.
        let customers = codec::last_wins(&batch.customers, |c| c.id.as_str());
        let customers = (!customers.is_empty())
            .then(|| bind_customers(sqlx::query(UPSERT_CUSTOMERS), &customers))
            .transpose()?;
        let enrolments = codec::last_wins(&batch.enrolments, |e| {
            (e.customer_id.as_str(), e.flow.as_str())
        });
        let enrolments = (!enrolments.is_empty())
            .then(|| bind_enrolments(sqlx::query(UPSERT_ENROLMENTS), &enrolments));
        let history = (!batch.history.is_empty())
            .then(|| HistoryCols::new(&batch.history))
            .transpose()?
            .map(|c| c.bind(sqlx::query(INSERT_HISTORY)));
        let outbox = (!batch.outbox.is_empty())
            .then(|| OutboxCols::new(&batch.outbox))
            .transpose()?
            .map(|c| c.bind(sqlx::query(INSERT_OUTBOX)));
        let conversions = (!batch.conversions.is_empty())
            .then(|| bind_conversions(sqlx::query(INSERT_CONVERSIONS), &batch.conversions));
        let runs = codec::last_wins(&batch.runs, |r| r.id.as_str());
        let runs = (!runs.is_empty())
            .then(|| RunCols::new(runs.into_iter()))
            .transpose()?
            .map(|c| c.bind(sqlx::query(UPSERT_RUNS)));
        let inbox_done = (!batch.inbox_done.is_empty()).then(|| {
            sqlx::query(INBOX_DONE)
                .bind(batch.inbox_done.clone())
                .bind(codec::now_ms())
        });

        let mut tx = self.begin().await?;
        for q in [
            customers,
            enrolments,
            history,
            outbox,
            conversions,
            runs,
            inbox_done,
        ]
        .into_iter()
        .flatten()
        {
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn customer_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let ids = match after {
            Some(after) => {
                sqlx::query_scalar("SELECT id FROM customers WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(after)
                    .bind(limit_i64(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT id FROM customers ORDER BY id LIMIT $1")
                    .bind(limit_i64(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(ids)
    }

    async fn outbox(&self, customer_id: Option<&str>) -> Result<Vec<OutboxRow>> {
        const COLUMNS: &str = "key, kind, run_id, flow, customer_id, step, channel, address, \
                               template, payload::text AS payload, transactional, created_at";
        let rows: Vec<OutboxDbRow> = match customer_id {
            Some(c) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM outbox WHERE customer_id = $1 ORDER BY ord"
                ))
                .bind(c)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(&format!("SELECT {COLUMNS} FROM outbox ORDER BY ord"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.into_iter().map(OutboxDbRow::into_row).collect()
    }

    async fn history(&self, customer_id: Option<&str>) -> Result<Vec<HistoryEntry>> {
        const COLUMNS: &str =
            "run_id, seq, flow, customer_id, step, at, action, detail::text AS detail";
        let rows: Vec<HistoryRow> = match customer_id {
            // Through the customer's runs: the history primary key starts with run_id.
            Some(c) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM history
                     WHERE run_id IN (SELECT id FROM runs WHERE customer_id = $1)
                     ORDER BY ord"
                ))
                .bind(c)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(&format!("SELECT {COLUMNS} FROM history ORDER BY ord"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.into_iter().map(HistoryRow::into_entry).collect()
    }

    async fn runs(&self, customer_id: &str) -> Result<Vec<Run>> {
        let rows: Vec<RunRow> = sqlx::query_as(&format!(
            "SELECT {RUN_SELECT} FROM runs WHERE customer_id = $1 ORDER BY entered_at, id"
        ))
        .bind(customer_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_run).collect()
    }

    async fn conversions(&self, flow: Option<&str>) -> Result<Vec<Conversion>> {
        let rows: Vec<ConversionRow> = sqlx::query_as(
            "SELECT run_id, flow, version, customer_id, arm, last_touch, event_id, at
             FROM conversions WHERE $1::text IS NULL OR flow = $1 ORDER BY at, run_id",
        )
        .bind(flow)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(ConversionRow::into_conversion)
            .collect()
    }

    async fn node_counts(&self, flow: Option<&str>) -> Result<Vec<NodeCount>> {
        let rows: Vec<NodeCountRow> = sqlx::query_as(
            "SELECT flow, step, COUNT(*) AS waiting FROM runs
             WHERE status = 'waiting' AND ($1::text IS NULL OR flow = $1)
             GROUP BY flow, step ORDER BY flow, step",
        )
        .bind(flow)
        .fetch_all(&self.pool)
        .await?;
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
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into_counts())
    }
}

fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
