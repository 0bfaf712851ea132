//! The raw-SQL ceiling: how many checkpointed transitions per second the database itself can
//! take, with no engine in the way. `canvas bench` reports the engine's rate as a share of it.
//!
//! A "transition" here is the least a checkpoint must write: the run row moves on (one
//! `UPDATE` of the batch's runs), one history row and one outbox row are inserted — per batch
//! exactly those three writes, in one transaction, into the engine's own tables with the
//! statement shapes `commit` uses: on SQLite multi-row `VALUES` statements in the same fixed
//! sizes, pipelined (the history and outbox inserts are the very statements of `commit`; the
//! update is `WITH v(…) AS (VALUES …) UPDATE runs … FROM v`); on Postgres ONE statement whose
//! data-modifying CTEs expand `UNNEST($n::…[])` arrays (`UPDATE runs … FROM UNNEST(…)` and
//! `commit`'s history and outbox inserts). Only the transactions are timed: the rows are
//! encoded beforehand.
//!
//! The benchmark's rows use their own flow id ([`RAW_FLOW`]) and customer ids, so they never
//! collide with engine data; they are deleted before and after the measurement (the deletes
//! scan by flow, so prefer a bench database to a large production one).

use std::sync::OnceLock;
use std::time::Instant;

use serde_json::{Map, json};

use super::codec::{ms, opt_ms, to_json};
use super::{Database, Result, postgres, sqlite};
use crate::state::{Arm, Event, HistoryEntry, OutboxKind, OutboxRow, Run, RunStatus, Time};

/// The flow id of the benchmark's rows.
pub const RAW_FLOW: &str = "__raw_ceiling__";

/// What the ceiling run measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RawReport {
    pub transitions: u64,
    pub seconds: f64,
}

impl RawReport {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.transitions as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Insert `n` runs (not timed), then advance them `batch` at a time — one run `UPDATE`, one
/// history `INSERT`, one outbox `INSERT`, one transaction per batch — and time that.
pub async fn raw_ceiling(db: &Database, n: usize, batch: usize) -> Result<RawReport> {
    let batch = batch.max(1);
    let t0 = Time::from_timestamp_millis(1_767_225_600_000).unwrap_or_default();
    cleanup(db).await?;
    let runs: Vec<Run> = (0..n).map(|i| entered(i, t0)).collect();
    let advanced: Vec<Run> = runs.iter().map(|r| advance(r, t0)).collect();
    let history: Vec<HistoryEntry> = advanced.iter().map(|r| history_row(r, t0)).collect();
    let outbox: Vec<OutboxRow> = advanced.iter().map(|r| outbox_row(r, t0)).collect();
    let runs: Vec<&Run> = runs.iter().collect();
    let advanced: Vec<&Run> = advanced.iter().collect();
    let history: Vec<&HistoryEntry> = history.iter().collect();
    let outbox: Vec<&OutboxRow> = outbox.iter().collect();
    let batches = advanced
        .chunks(batch)
        .zip(history.chunks(batch))
        .zip(outbox.chunks(batch))
        .map(|((r, h), o)| (r, h, o));

    let seconds = match db {
        Database::Sqlite(s) => {
            for chunk in runs.chunks(batch) {
                let mut tx = s.begin().await?;
                let mut pipe = sqlite::Pipeline::new(&mut tx);
                sqlite::UPSERT_RUNS
                    .write(&mut pipe, chunk, sqlite::bind_run)
                    .await?;
                pipe.finish().await?;
                tx.commit().await?;
            }
            let mut work = Vec::new();
            for (r, h, o) in batches {
                let mut statements = SQLITE_UPDATE.encode(r, sqlite_update)?;
                statements.extend(sqlite::INSERT_HISTORY.encode(h, sqlite::bind_history)?);
                statements.extend(sqlite::INSERT_OUTBOX.encode(o, sqlite::bind_outbox)?);
                work.push(statements);
            }
            let start = Instant::now();
            for statements in work {
                let mut tx = s.begin().await?;
                let mut pipe = sqlite::Pipeline::new(&mut tx);
                for (sql, args) in statements {
                    pipe.submit(sql, args).await?;
                }
                pipe.finish().await?;
                tx.commit().await?;
            }
            start.elapsed().as_secs_f64()
        }
        Database::Postgres(p) => {
            let insert = postgres::upsert_runs(&mut 1);
            for chunk in runs.chunks(batch) {
                postgres::bind_runs(sqlx::query(&insert), chunk)?
                    .execute(p.pool())
                    .await?;
            }
            let sql = pg_ceiling_sql();
            let mut work = Vec::new();
            for (r, h, o) in batches {
                let q = bind_pg_update(sqlx::query(sql), r)?;
                let q = postgres::bind_history(q, h)?;
                work.push(postgres::bind_outbox(q, o)?);
            }
            let start = Instant::now();
            for q in work {
                q.execute(p.pool()).await?;
            }
            start.elapsed().as_secs_f64()
        }
    };
    cleanup(db).await?;
    Ok(RawReport {
        transitions: n as u64,
        seconds,
    })
}

/// The issue's reference shape on SQLite: the same three writes per batch (one run `UPDATE`,
/// one history `INSERT`, one outbox `INSERT`, one transaction), through the same pipelined
/// multi-row statements, into *narrow* tables with no secondary index — run (id, step, wake
/// time, seq), history (run, seq, step, time), outbox (key, payload). Next to
/// [`raw_ceiling`] it shows how much of the SQLite cost is the width of the engine's rows
/// (bound parameters and bytes) rather than the engine. The tables are created in the
/// store's file and dropped afterwards.
pub async fn narrow_ceiling(
    store: &sqlite::SqliteStore,
    n: usize,
    batch: usize,
) -> Result<RawReport> {
    let batch = batch.max(1);
    let pool = store.write_pool();
    sqlx::raw_sql(NARROW_DROP).execute(pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE raw_narrow_runs (id TEXT PRIMARY KEY, step TEXT, wake_at INTEGER, seq INTEGER);
         CREATE TABLE raw_narrow_history (run_id TEXT, seq INTEGER, step TEXT, at INTEGER,
             PRIMARY KEY (run_id, seq));
         CREATE TABLE raw_narrow_outbox (key TEXT PRIMARY KEY, payload TEXT);",
    )
    .execute(pool)
    .await?;
    let ids: Vec<String> = (0..n)
        .map(|i| format!("{RAW_FLOW}/__raw__{i:08}/1"))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    for chunk in ids.chunks(batch) {
        let mut tx = store.begin().await?;
        let mut pipe = sqlite::Pipeline::new(&mut tx);
        NARROW_INSERT_RUNS
            .write(&mut pipe, chunk, |a, id| {
                put(a, id)?;
                put(a, "wait-1d")?;
                put(a, 1_i64)?;
                put(a, 1_i64)
            })
            .await?;
        pipe.finish().await?;
        tx.commit().await?;
    }
    let at = 1_767_312_000_000_i64;
    let payload = r#"{"text":"Thank you for your order!"}"#;
    let keys: Vec<String> = ids.iter().map(|id| format!("{id}/thanks")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut work = Vec::new();
    for (r, k) in ids.chunks(batch).zip(keys.chunks(batch)) {
        let mut statements = NARROW_UPDATE_RUNS.encode(r, |a, id| {
            put(a, id)?;
            put(a, "wait-3d")?;
            put(a, at + 86_400_000)?;
            put(a, 2_i64)
        })?;
        statements.extend(NARROW_INSERT_HISTORY.encode(r, |a, id| {
            put(a, id)?;
            put(a, 1_i64)?;
            put(a, "thanks")?;
            put(a, at)
        })?);
        statements.extend(NARROW_INSERT_OUTBOX.encode(k, |a, key| {
            put(a, key)?;
            put(a, payload)
        })?);
        work.push(statements);
    }
    let start = Instant::now();
    for statements in work {
        let mut tx = store.begin().await?;
        let mut pipe = sqlite::Pipeline::new(&mut tx);
        for (sql, args) in statements {
            pipe.submit(sql, args).await?;
        }
        pipe.finish().await?;
        tx.commit().await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    sqlx::raw_sql(NARROW_DROP).execute(pool).await?;
    Ok(RawReport {
        transitions: n as u64,
        seconds,
    })
}

const NARROW_DROP: &str = "DROP TABLE IF EXISTS raw_narrow_runs; \
     DROP TABLE IF EXISTS raw_narrow_history; DROP TABLE IF EXISTS raw_narrow_outbox;";

static NARROW_INSERT_RUNS: sqlite::Shape =
    sqlite::Shape::new("INSERT INTO raw_narrow_runs VALUES ", 4, "");
static NARROW_UPDATE_RUNS: sqlite::Shape = sqlite::Shape::new(
    "WITH v (id, step, wake_at, seq) AS (VALUES ",
    4,
    ") UPDATE raw_narrow_runs SET step = v.step, wake_at = v.wake_at, seq = v.seq \
     FROM v WHERE raw_narrow_runs.id = v.id",
);
static NARROW_INSERT_HISTORY: sqlite::Shape =
    sqlite::Shape::new("INSERT INTO raw_narrow_history VALUES ", 4, "");
static NARROW_INSERT_OUTBOX: sqlite::Shape =
    sqlite::Shape::new("INSERT INTO raw_narrow_outbox VALUES ", 2, "");

/// Bind one value of a narrow row.
fn put<'a, T>(a: &mut sqlite::Args<'a>, value: T) -> Result<()>
where
    T: sqlx::Encode<'a, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'a,
{
    sqlx::Arguments::add(a, value).map_err(|e| super::StoreError::Database(sqlx::Error::Encode(e)))
}

async fn cleanup(db: &Database) -> Result<()> {
    for table in ["outbox", "history", "runs"] {
        match db {
            Database::Sqlite(s) => {
                sqlx::query(&format!("DELETE FROM {table} WHERE flow = ?1"))
                    .bind(RAW_FLOW)
                    .execute(s.write_pool())
                    .await?;
            }
            Database::Postgres(p) => {
                sqlx::query(&format!("DELETE FROM {table} WHERE flow = $1"))
                    .bind(RAW_FLOW)
                    .execute(p.pool())
                    .await?;
            }
        }
    }
    Ok(())
}

/// A run as a flow entry leaves it: waiting at its first step, with a trigger event.
fn entered(i: usize, t0: Time) -> Run {
    let customer_id = format!("__raw__{i:08}");
    let event = Event {
        id: format!("__raw_evt__{i:08}"),
        customer_id: customer_id.clone(),
        name: "order_paid".into(),
        data: json!({ "order_id": format!("O{i:08}"), "amount": 129.5, "store": "SH-001" }),
        occurred_at: t0,
    };
    Run {
        id: format!("{RAW_FLOW}/{customer_id}/1"),
        flow: RAW_FLOW.into(),
        version: "0000000000000000".into(),
        customer_id,
        status: RunStatus::Waiting,
        step: Some("wait-1d".into()),
        wake_at: Some(t0 + chrono::Duration::days(1)),
        waiting_for: None,
        vars: Map::new(),
        event: Some(event),
        arm: Arm::Treated,
        splits: Default::default(),
        last_touch: None,
        goal_until: Some(t0 + chrono::Duration::days(14)),
        converted_at: None,
        outcome: None,
        seq: 1,
        entered_at: t0,
        updated_at: t0,
    }
}

/// The same run one transition later: it sent a message and waits at the next step.
fn advance(run: &Run, t0: Time) -> Run {
    let now = t0 + chrono::Duration::days(1);
    let mut vars = Map::new();
    vars.insert("coupon".into(), json!("C-2026"));
    Run {
        step: Some("wait-3d".into()),
        wake_at: Some(now + chrono::Duration::days(3)),
        vars,
        last_touch: Some("thanks".into()),
        seq: run.seq + 1,
        updated_at: now,
        ..run.clone()
    }
}

fn history_row(run: &Run, t0: Time) -> HistoryEntry {
    HistoryEntry {
        run_id: run.id.clone(),
        seq: run.seq,
        flow: run.flow.clone(),
        customer_id: run.customer_id.clone(),
        step: "thanks".into(),
        at: t0 + chrono::Duration::days(1),
        action: "sent".into(),
        detail: json!({ "channel": "sms", "template": "care/thanks" }),
    }
}

fn outbox_row(run: &Run, t0: Time) -> OutboxRow {
    OutboxRow {
        key: format!("{}/thanks", run.id),
        kind: OutboxKind::Message,
        run_id: run.id.clone(),
        flow: run.flow.clone(),
        customer_id: run.customer_id.clone(),
        step: "thanks".into(),
        channel: "sms".into(),
        address: Some("+8613800000000".into()),
        template: Some("care/thanks".into()),
        payload: json!({ "text": "Thank you for your order! Your coupon C-2026 is waiting." }),
        transactional: false,
        created_at: t0 + chrono::Duration::days(1),
    }
}

static SQLITE_UPDATE: sqlite::Shape = sqlite::Shape::new(
    "WITH v (id, status, step, wake_at, vars, last_touch, seq, updated_at) AS (VALUES ",
    8,
    ") UPDATE runs SET status = v.status, step = v.step, wake_at = v.wake_at, vars = v.vars, \
     last_touch = v.last_touch, seq = v.seq, updated_at = v.updated_at \
     FROM v WHERE runs.id = v.id",
);

fn sqlite_update<'a>(a: &mut sqlite::Args<'a>, r: &'a Run) -> Result<()> {
    let vars = to_json("runs", &r.vars)?;
    let values = (
        r.id.as_str(),
        r.status.as_str(),
        r.step.as_deref(),
        opt_ms(r.wake_at),
    );
    let encode = |e| super::StoreError::Database(sqlx::Error::Encode(e));
    sqlx::Arguments::add(a, values.0).map_err(encode)?;
    sqlx::Arguments::add(a, values.1).map_err(encode)?;
    sqlx::Arguments::add(a, values.2).map_err(encode)?;
    sqlx::Arguments::add(a, values.3).map_err(encode)?;
    sqlx::Arguments::add(a, vars).map_err(encode)?;
    sqlx::Arguments::add(a, r.last_touch.as_deref()).map_err(encode)?;
    sqlx::Arguments::add(a, i64::from(r.seq)).map_err(encode)?;
    sqlx::Arguments::add(a, ms(r.updated_at)).map_err(encode)?;
    Ok(())
}

/// Postgres: the three writes as one statement (data-modifying CTEs), like `commit`.
fn pg_ceiling_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut n = 9;
        let history = postgres::insert_history(&mut n);
        let outbox = postgres::insert_outbox(&mut n);
        format!(
            "WITH runs_ AS (
                 UPDATE runs SET status = t.st, step = t.sp, wake_at = t.w, vars = t.va::json,
                     last_touch = t.lt, seq = t.s, updated_at = t.ua
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],
                     $6::text[], $7::int8[], $8::int8[]) AS t(id, st, sp, w, va, lt, s, ua)
                 WHERE runs.id = t.id),
             history_ AS ({history}),
             outbox_ AS ({outbox})
             SELECT 1"
        )
    })
}

fn bind_pg_update<'a>(q: postgres::Q<'a>, runs: &[&'a Run]) -> Result<postgres::Q<'a>> {
    let mut id = Vec::with_capacity(runs.len());
    let mut status = Vec::with_capacity(runs.len());
    let mut step = Vec::with_capacity(runs.len());
    let mut wake_at = Vec::with_capacity(runs.len());
    let mut vars = Vec::with_capacity(runs.len());
    let mut last_touch = Vec::with_capacity(runs.len());
    let mut seq = Vec::with_capacity(runs.len());
    let mut updated_at = Vec::with_capacity(runs.len());
    for r in runs {
        id.push(r.id.as_str());
        status.push(r.status.as_str());
        step.push(r.step.as_deref());
        wake_at.push(opt_ms(r.wake_at));
        vars.push(to_json("runs", &r.vars)?);
        last_touch.push(r.last_touch.as_deref());
        seq.push(i64::from(r.seq));
        updated_at.push(ms(r.updated_at));
    }
    Ok(q.bind(id)
        .bind(status)
        .bind(step)
        .bind(wake_at)
        .bind(vars)
        .bind(last_touch)
        .bind(seq)
        .bind(updated_at))
}
