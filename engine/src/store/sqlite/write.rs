//! SQLite writes, set-based: each table's rows go in as few multi-row statements as the
//! bind limit allows ([`Shape`]), pipelined on one connection ([`Pipeline`]) inside the
//! commit's transaction; the bind functions say how each record becomes a row.

use super::*;

// ---- set-based writes ---------------------------------------------------------------------

pub(crate) type Args<'a> = SqliteArguments<'a>;

/// Append values to a statement's arguments.
macro_rules! add {
    ($args:expr; $($value:expr),+ $(,)?) => {{
        $(
            sqlx::Arguments::add($args, $value)
                .map_err(|e| StoreError::Database(sqlx::Error::Encode(e)))?;
        )+
    }};
}

pub(super) type Exec<'a> =
    Pin<Box<dyn Future<Output = (&'a mut SqliteConnection, Result<u64>)> + Send + 'a>>;

pub(super) enum PipeState<'a> {
    Idle(&'a mut SqliteConnection),
    Busy(Exec<'a>),
    Failed,
}

/// Statements of one transaction, overlapped with their encoding: a statement is handed to
/// sqlx's SQLite worker thread as soon as it is encoded, and the next one is encoded while
/// SQLite executes it (two cores instead of one taking turns). Statements still run one at
/// a time and in order.
pub(crate) struct Pipeline<'a> {
    state: PipeState<'a>,
    affected: u64,
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new(conn: &'a mut SqliteConnection) -> Pipeline<'a> {
        Pipeline {
            state: PipeState::Idle(conn),
            affected: 0,
        }
    }

    async fn settle(&mut self) -> Result<&'a mut SqliteConnection> {
        match std::mem::replace(&mut self.state, PipeState::Failed) {
            PipeState::Idle(conn) => Ok(conn),
            PipeState::Busy(exec) => {
                let (conn, done) = exec.await;
                self.affected += done?;
                Ok(conn)
            }
            PipeState::Failed => Err(StoreError::Database(sqlx::Error::Protocol(
                "statement pipeline used after a failed statement".into(),
            ))),
        }
    }

    /// Wait for the previous statement, then start this one.
    pub(crate) async fn submit(&mut self, sql: &'static str, args: Args<'a>) -> Result<()> {
        let conn = self.settle().await?;
        let mut exec: Exec<'a> = Box::pin(async move {
            let done = sqlx::query_with(sql, args).execute(&mut *conn).await;
            (
                conn,
                done.map(|r| r.rows_affected()).map_err(StoreError::from),
            )
        });
        // One poll hands the statement to the worker thread; the caller's next encoding
        // then runs alongside it. The real waker is registered when the pipeline awaits.
        match exec.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready((conn, done)) => {
                self.affected += done?;
                self.state = PipeState::Idle(conn);
            }
            Poll::Pending => self.state = PipeState::Busy(exec),
        }
        Ok(())
    }

    /// Wait for the last statement; the rows affected by all of them.
    pub(crate) async fn finish(mut self) -> Result<u64> {
        self.settle().await?;
        Ok(self.affected)
    }
}

/// The largest statement: 2^10 = 1,024 rows (18,432 parameters for a run, well under
/// SQLite's 32,766).
pub(super) const MAX_ROWS_LOG2: usize = 10;

/// The rows of the next statement for `len` rows to go: 1,024, else the largest power of
/// two that fits.
pub(super) fn chunk_len(len: usize) -> usize {
    if len >= 1 << MAX_ROWS_LOG2 {
        1 << MAX_ROWS_LOG2
    } else {
        1 << (usize::BITS - 1 - len.leading_zeros())
    }
}

/// A multi-row statement `HEAD (?,…),(?,…),… TAIL` in 11 sizes, 1 to 1,024 rows. A write of
/// n rows issues ⌊n/1024⌋ statements of 1,024 rows and one per set bit of the remainder
/// (1,000 rows: 512+256+128+64+32+8). The texts never vary otherwise, so each stays
/// prepared in the writer connection's statement cache.
pub(crate) struct Shape {
    head: &'static str,
    cols: usize,
    tail: &'static str,
    sql: OnceLock<Vec<String>>,
}

impl Shape {
    pub(crate) const fn new(head: &'static str, cols: usize, tail: &'static str) -> Shape {
        Shape {
            head,
            cols,
            tail,
            sql: OnceLock::new(),
        }
    }

    /// The statement for `rows` rows, a power of two ≤ 1,024.
    fn sql(&'static self, rows: usize) -> &'static str {
        let all = self.sql.get_or_init(|| {
            let mut tuple = String::from("(");
            for c in 0..self.cols {
                tuple.push_str(if c == 0 { "?" } else { ",?" });
            }
            tuple.push(')');
            (0..=MAX_ROWS_LOG2)
                .map(|k| {
                    let n = 1usize << k;
                    let mut sql = String::with_capacity(
                        self.head.len() + n * (tuple.len() + 1) + self.tail.len(),
                    );
                    sql.push_str(self.head);
                    for i in 0..n {
                        if i > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&tuple);
                    }
                    sql.push_str(self.tail);
                    sql
                })
                .collect()
        });
        &all[rows.trailing_zeros() as usize]
    }

    /// The statements that write `rows`, encoded: for the raw-SQL benchmark, which times
    /// only the database, and for statements whose rows come back (`RETURNING`) or that take
    /// a parameter after the rows (bound by the caller).
    pub(crate) fn encode<'a, T: ?Sized>(
        &'static self,
        rows: &[&'a T],
        bind: impl Fn(&mut Args<'a>, &'a T) -> Result<()>,
    ) -> Result<Vec<(&'static str, Args<'a>)>> {
        let mut out = Vec::new();
        let mut rest = rows;
        while !rest.is_empty() {
            let n = chunk_len(rest.len());
            let (chunk, tail) = rest.split_at(n);
            let mut args = Args::default();
            sqlx::Arguments::reserve(&mut args, n * self.cols, 0);
            for row in chunk {
                bind(&mut args, row)?;
            }
            out.push((self.sql(n), args));
            rest = tail;
        }
        Ok(out)
    }

    /// Queue `rows` on the pipeline with as few statements as the sizes allow.
    pub(crate) async fn write<'a, T: ?Sized>(
        &'static self,
        pipe: &mut Pipeline<'a>,
        rows: &[&'a T],
        bind: impl Fn(&mut Args<'a>, &'a T) -> Result<()>,
    ) -> Result<()> {
        let mut rest = rows;
        while !rest.is_empty() {
            let n = chunk_len(rest.len());
            let (chunk, tail) = rest.split_at(n);
            let mut args = Args::default();
            sqlx::Arguments::reserve(&mut args, n * self.cols, 0);
            for row in chunk {
                bind(&mut args, row)?;
            }
            pipe.submit(self.sql(n), args).await?;
            rest = tail;
        }
        Ok(())
    }
}

pub(super) static UPSERT_CUSTOMERS: Shape = Shape::new(
    "INSERT INTO customers (id, attributes, timezone, sends, cooldowns, unsubscribed_at, \
     updated_at) VALUES ",
    7,
    " ON CONFLICT (id) DO UPDATE SET attributes = excluded.attributes, \
     timezone = excluded.timezone, sends = excluded.sends, cooldowns = excluded.cooldowns, \
     unsubscribed_at = excluded.unsubscribed_at, updated_at = excluded.updated_at",
);

pub(super) static UPSERT_ENROLMENTS: Shape = Shape::new(
    "INSERT INTO enrolments (customer_id, flow, entries, last_entered_at, active_run, \
     in_segment) VALUES ",
    6,
    " ON CONFLICT (customer_id, flow) DO UPDATE SET entries = excluded.entries, \
     last_entered_at = excluded.last_entered_at, active_run = excluded.active_run, \
     in_segment = excluded.in_segment",
);

pub(crate) static INSERT_HISTORY: Shape = Shape::new(
    "INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail) VALUES ",
    8,
    " ON CONFLICT DO NOTHING",
);

pub(crate) static INSERT_OUTBOX: Shape = Shape::new(
    "INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel, address, \
     template, payload, transactional, created_at, next_attempt_at) VALUES ",
    13,
    " ON CONFLICT DO NOTHING",
);

pub(super) static INSERT_CONVERSIONS: Shape = Shape::new(
    "INSERT INTO conversions (run_id, flow, version, customer_id, arm, last_touch, event_id, \
     at) VALUES ",
    8,
    " ON CONFLICT DO NOTHING",
);

pub(super) static UPSERT_FAILURES: Shape = Shape::new(
    "INSERT INTO failures (flow, step, customer_id, count, error, at) VALUES ",
    6,
    " ON CONFLICT (flow, step, customer_id) DO UPDATE SET count = failures.count + \
     excluded.count, error = excluded.error, at = excluded.at",
);

pub(super) static UPSERT_COUNTS: Shape = Shape::new(
    "INSERT INTO step_counts (flow, day, version, step, metric, shard, n) VALUES ",
    7,
    " ON CONFLICT (flow, day, version, step, metric, shard) DO UPDATE SET \
     n = step_counts.n + excluded.n",
);

pub(super) static UPSERT_WAITING: Shape = Shape::new(
    "INSERT INTO step_waiting (flow, version, step, shard, n) VALUES ",
    5,
    " ON CONFLICT (flow, version, step, shard) DO UPDATE SET n = step_waiting.n + excluded.n",
);

pub(crate) static UPSERT_RUNS: Shape = Shape::new(
    "INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at, waiting_for, \
     vars, event, arm, last_touch, goal_until, converted_at, outcome, seq, entered_at, \
     updated_at, splits) VALUES ",
    19,
    " ON CONFLICT (id) DO UPDATE SET flow = excluded.flow, version = excluded.version, \
     customer_id = excluded.customer_id, status = excluded.status, step = excluded.step, \
     wake_at = excluded.wake_at, waiting_for = excluded.waiting_for, vars = excluded.vars, \
     event = excluded.event, arm = excluded.arm, last_touch = excluded.last_touch, \
     goal_until = excluded.goal_until, converted_at = excluded.converted_at, \
     outcome = excluded.outcome, seq = excluded.seq, entered_at = excluded.entered_at, \
     updated_at = excluded.updated_at, splits = excluded.splits",
);

pub(super) static ENQUEUE: Shape = Shape::new(
    "INSERT INTO inbox (event_id, customer_id, item, at) VALUES ",
    4,
    " ON CONFLICT (event_id) DO NOTHING",
);

pub(super) static PUT_FLOW_VERSIONS: Shape = Shape::new(
    "INSERT INTO flow_versions (flow, version, source, created_at) VALUES ",
    4,
    " ON CONFLICT (flow, version) DO NOTHING",
);

pub(super) const INBOX_DONE: &str = "\
UPDATE inbox SET applied_at = ?2
WHERE seq IN (SELECT value FROM json_each(?1)) AND applied_at IS NULL";

// ---- customer leases ----------------------------------------------------------------------

/// `commit`'s lease check: how many of the customers (a JSON array) `?2` holds at `?3`. It
/// runs first in the commit's write transaction, so no claim lands between it and the writes.
pub(super) const LEASES_HELD: &str = "\
SELECT COUNT(*) FROM customer_leases
WHERE customer_id IN (SELECT value FROM json_each(?1)) AND owner = ?2 AND until > ?3";

// ---- the dispatcher -----------------------------------------------------------------------

pub(super) fn bind_settle<'a>(a: &mut Args<'a>, s: &'a Settle<'a>) -> Result<()> {
    add!(a; s.key, s.status, s.attempts, s.next_attempt_at, s.last_error, s.sent_at, s.dead_at);
    Ok(())
}

pub(super) fn bind_customer<'a>(a: &mut Args<'a>, c: &'a Customer) -> Result<()> {
    const T: &str = "customers";
    add!(a; c.id.as_str(), to_json(T, &c.attributes)?, c.timezone.as_deref(),
        to_json(T, &c.sends)?, to_json(T, &c.cooldowns)?, opt_ms(c.unsubscribed_at),
        ms(c.updated_at));
    Ok(())
}

pub(super) fn bind_enrolment<'a>(a: &mut Args<'a>, e: &'a Enrolment) -> Result<()> {
    add!(a; e.customer_id.as_str(), e.flow.as_str(), i64::from(e.entries),
        opt_ms(e.last_entered_at), e.active_run.as_deref(), e.in_segment);
    Ok(())
}

pub(crate) fn bind_history<'a>(a: &mut Args<'a>, h: &'a HistoryEntry) -> Result<()> {
    add!(a; h.run_id.as_str(), i64::from(h.seq), h.flow.as_str(), h.customer_id.as_str(),
        h.step.as_str(), ms(h.at), h.action.as_str(), to_json("history", &h.detail)?);
    Ok(())
}

pub(crate) fn bind_outbox<'a>(a: &mut Args<'a>, o: &'a OutboxRow) -> Result<()> {
    add!(a; o.key.as_str(), o.kind.as_str(), o.run_id.as_str(), o.flow.as_str(),
        o.customer_id.as_str(), o.step.as_str(), o.channel.as_str(), o.address.as_deref(),
        o.template.as_deref(), to_json("outbox", &o.payload)?, o.transactional,
        ms(o.created_at), ms(o.created_at));
    Ok(())
}

pub(super) fn bind_conversion<'a>(a: &mut Args<'a>, c: &'a Conversion) -> Result<()> {
    add!(a; c.run_id.as_str(), c.flow.as_str(), c.version.as_str(), c.customer_id.as_str(),
        arm_str(c.arm), c.last_touch.as_deref(), c.event_id.as_str(), ms(c.at));
    Ok(())
}

pub(super) fn bind_failure<'a>(a: &mut Args<'a>, f: &'a Failure) -> Result<()> {
    add!(a; f.flow.as_str(), f.step.as_str(), f.customer_id.as_str(),
        i64::try_from(f.count).unwrap_or(i64::MAX), f.error.as_str(), ms(f.at));
    Ok(())
}

pub(crate) fn bind_run<'a>(a: &mut Args<'a>, r: &'a Run) -> Result<()> {
    const T: &str = "runs";
    add!(a; r.id.as_str(), r.flow.as_str(), r.version.as_str(), r.customer_id.as_str(),
        r.status.as_str(), r.step.as_deref(), opt_ms(r.wake_at), r.waiting_for.as_deref(),
        to_json(T, &r.vars)?, r.event.as_ref().map(|e| to_json(T, e)).transpose()?,
        arm_str(r.arm), r.last_touch.as_deref(), opt_ms(r.goal_until),
        opt_ms(r.converted_at), r.outcome.as_deref(), i64::from(r.seq), ms(r.entered_at),
        ms(r.updated_at), codec::splits_json(r)?);
    Ok(())
}
