//! The raw-SQL ceiling: how many checkpointed transitions per second the database itself can
//! take, with no engine in the way. `canvas bench` reports the engine's rate as a share of it.
//!
//! A "transition" here is the least a checkpoint must write: the run row moves on (one
//! `UPDATE` of the batch's runs), one history row and one outbox row are inserted — per batch
//! exactly those three statements, in one transaction, into the engine's own tables with the
//! same statement shapes `commit` uses (`json_each(?)` on SQLite, `UNNEST($n::…[])` on
//! Postgres; the history and outbox inserts are the very statements of `commit`). Only the
//! transactions are timed: the rows are encoded beforehand.
//!
//! The benchmark's rows use their own flow id ([`RAW_FLOW`]) and customer ids, so they never
//! collide with engine data; they are deleted before and after the measurement (the deletes
//! scan by flow, so prefer a bench database to a large production one).

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
    for chunk in runs.chunks(batch) {
        insert_runs(db, chunk).await?;
    }
    let advanced: Vec<Run> = runs.iter().map(|r| advance(r, t0)).collect();
    let history: Vec<HistoryEntry> = advanced.iter().map(|r| history_row(r, t0)).collect();
    let outbox: Vec<OutboxRow> = advanced.iter().map(|r| outbox_row(r, t0)).collect();

    let seconds = match db {
        Database::Sqlite(s) => {
            let mut work = Vec::new();
            for ((r, h), o) in advanced
                .chunks(batch)
                .zip(history.chunks(batch))
                .zip(outbox.chunks(batch))
            {
                work.push((
                    sqlite_update(r)?,
                    sqlite::encode_history(h)?,
                    sqlite::encode_outbox(o)?,
                ));
            }
            let start = Instant::now();
            for (runs, history, outbox) in work {
                let mut tx = s.begin().await?;
                sqlx::query(SQLITE_UPDATE)
                    .bind(runs)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sqlite::INSERT_HISTORY)
                    .bind(history)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sqlite::INSERT_OUTBOX)
                    .bind(outbox)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            start.elapsed().as_secs_f64()
        }
        Database::Postgres(p) => {
            let mut work = Vec::new();
            for ((r, h), o) in advanced
                .chunks(batch)
                .zip(history.chunks(batch))
                .zip(outbox.chunks(batch))
            {
                work.push((
                    PgUpdate::new(r)?,
                    postgres::HistoryCols::new(h)?,
                    postgres::OutboxCols::new(o)?,
                ));
            }
            let start = Instant::now();
            for (runs, history, outbox) in work {
                let mut tx = p.begin().await?;
                runs.bind(sqlx::query(PG_UPDATE)).execute(&mut *tx).await?;
                history
                    .bind(sqlx::query(postgres::INSERT_HISTORY))
                    .execute(&mut *tx)
                    .await?;
                outbox
                    .bind(sqlx::query(postgres::INSERT_OUTBOX))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
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

async fn cleanup(db: &Database) -> Result<()> {
    for table in ["outbox", "history", "runs"] {
        let sql = match db {
            Database::Sqlite(_) => format!("DELETE FROM {table} WHERE flow = ?1"),
            Database::Postgres(_) => format!("DELETE FROM {table} WHERE flow = $1"),
        };
        match db {
            Database::Sqlite(s) => {
                sqlx::query(&sql)
                    .bind(RAW_FLOW)
                    .execute(s.write_pool())
                    .await?;
            }
            Database::Postgres(p) => {
                sqlx::query(&sql).bind(RAW_FLOW).execute(p.pool()).await?;
            }
        }
    }
    Ok(())
}

async fn insert_runs(db: &Database, runs: &[Run]) -> Result<()> {
    match db {
        Database::Sqlite(s) => {
            let mut tx = s.begin().await?;
            sqlx::query(sqlite::UPSERT_RUNS)
                .bind(sqlite::encode_runs(runs)?)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Database::Postgres(p) => {
            let mut tx = p.begin().await?;
            postgres::RunCols::new(runs.iter())?
                .bind(sqlx::query(postgres::UPSERT_RUNS))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
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

const SQLITE_UPDATE: &str = "\
UPDATE runs SET status = value->>1, step = value->>2, wake_at = value->>3, vars = value->>4,
    last_touch = value->>5, seq = value->>6, updated_at = value->>7
FROM json_each(?1) WHERE runs.id = value->>0";

fn sqlite_update(runs: &[Run]) -> Result<String> {
    let mut rows = sqlite::JsonRows::new(runs.len() * 120);
    for r in runs {
        rows.row()
            .str(&r.id)
            .str(r.status.as_str())
            .opt_str(r.step.as_deref());
        rows.opt_int(opt_ms(r.wake_at)).json("runs", &r.vars)?;
        rows.opt_str(r.last_touch.as_deref())
            .int(i64::from(r.seq))
            .int(ms(r.updated_at));
    }
    Ok(rows.finish())
}

const PG_UPDATE: &str = "\
UPDATE runs SET status = t.st, step = t.sp, wake_at = t.w, vars = t.va::json,
    last_touch = t.lt, seq = t.s, updated_at = t.ua
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
    $7::int8[], $8::int8[]) AS t(id, st, sp, w, va, lt, s, ua)
WHERE runs.id = t.id";

struct PgUpdate {
    id: Vec<String>,
    status: Vec<&'static str>,
    step: Vec<Option<String>>,
    wake_at: Vec<Option<i64>>,
    vars: Vec<String>,
    last_touch: Vec<Option<String>>,
    seq: Vec<i64>,
    updated_at: Vec<i64>,
}

impl PgUpdate {
    fn new(runs: &[Run]) -> Result<PgUpdate> {
        let mut u = PgUpdate {
            id: Vec::new(),
            status: Vec::new(),
            step: Vec::new(),
            wake_at: Vec::new(),
            vars: Vec::new(),
            last_touch: Vec::new(),
            seq: Vec::new(),
            updated_at: Vec::new(),
        };
        for r in runs {
            u.id.push(r.id.clone());
            u.status.push(r.status.as_str());
            u.step.push(r.step.clone());
            u.wake_at.push(opt_ms(r.wake_at));
            u.vars.push(to_json("runs", &r.vars)?);
            u.last_touch.push(r.last_touch.clone());
            u.seq.push(i64::from(r.seq));
            u.updated_at.push(ms(r.updated_at));
        }
        Ok(u)
    }

    fn bind(
        self,
        q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(self.id)
            .bind(self.status)
            .bind(self.step)
            .bind(self.wake_at)
            .bind(self.vars)
            .bind(self.last_touch)
            .bind(self.seq)
            .bind(self.updated_at)
    }
}
