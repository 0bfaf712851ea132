//! The daemon's side of the Postgres store: outbox claims and their settling, customer leases,
//! the daemons table (heartbeats, take-over), pauses, schedule ticks and per-flow counts.
//! The [`Store`](super::Store) impl in `mod.rs` delegates here.

use super::*;

/// `claim_customers` in ONE statement: `$1` the ids (distinct, in byte order — the order
/// `ORDER BY n` inserts them and so locks their rows in; every lease statement locks in that
/// order, so claimers of overlapping sets never deadlock), `$2` the owner, `$3` now, `$4`
/// the new `until`. A lease is taken when the row is new, ran out, or is the owner's own
/// (extended). Claimers of one id at the same moment: the second waits on the first's row,
/// then judges the `WHERE` against what the first wrote, so exactly one wins; `RETURNING`
/// names the ids taken, in no order.
const CLAIM_CUSTOMERS: &str = "\
INSERT INTO customer_leases (customer_id, owner, until)
SELECT id, $2, $4 FROM unnest($1::text[]) WITH ORDINALITY AS t(id, n)
ORDER BY n
ON CONFLICT (customer_id) DO UPDATE SET owner = excluded.owner, until = excluded.until
WHERE customer_leases.until <= $3 OR customer_leases.owner = excluded.owner
RETURNING customer_id";

/// `release_customers`: the owner's rows among `$1`, locked in id order like every lease
/// statement (a plain `DELETE … = ANY` locks in whatever order its plan visits rows), then
/// deleted.
const RELEASE_CUSTOMERS: &str = "\
DELETE FROM customer_leases
WHERE customer_id IN (SELECT customer_id FROM customer_leases
                      WHERE customer_id = ANY($1::text[]) AND owner = $2
                      ORDER BY customer_id FOR UPDATE)";

/// The columns of `outbox` that make an [`OutboxRow`] ([`OutboxDbRow`]).
const OUTBOX_SELECT: &str = "key, kind, run_id, flow, customer_id, step, channel, address, \
     template, payload::text AS payload, transactional, created_at";

/// `claim_outbox`: pick the due rows from the `outbox_pending` index and lease them in one
/// statement. `FOR UPDATE SKIP LOCKED` makes concurrent claims (other tasks, other daemons)
/// pass over the rows one of them is leasing instead of waiting for it; a row leased by a
/// claim that committed meanwhile is re-checked against the new lease when locked, and left
/// out. `RETURNING` has no order: the rows carry theirs (`next_attempt_at`, `ord`).
const CLAIM_OUTBOX: &str = "\
UPDATE outbox SET lease_until = $3, claimed_by = $4
WHERE key IN (SELECT key FROM outbox
              WHERE status = 'pending' AND next_attempt_at <= $1
                AND (lease_until IS NULL OR lease_until < $1)
                AND NOT (channel = ANY($5::text[]))
              ORDER BY next_attempt_at, ord LIMIT $2
              FOR UPDATE SKIP LOCKED)
RETURNING key, kind, run_id, flow, customer_id, step, channel, address, template,
          payload::text AS payload, transactional, created_at, attempts::int8 AS attempts,
          lease_until, next_attempt_at, ord";

/// `settle_outbox` in one statement: the outcomes as column arrays, joined on the key. A
/// `NULL` keeps the row's value (`attempts`: one more, for a send). Only pending rows
/// change, so a late outcome never undoes another dispatcher's.
const SETTLE_OUTBOX: &str = "\
UPDATE outbox o SET status = v.status,
    attempts = coalesce(v.attempts, o.attempts + 1),
    next_attempt_at = coalesce(v.next_attempt_at, o.next_attempt_at),
    last_error = coalesce(v.last_error, o.last_error),
    sent_at = coalesce(v.sent_at, o.sent_at),
    dead_at = coalesce(v.dead_at, o.dead_at),
    lease_until = NULL, claimed_by = NULL
FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::int8[], $7::int8[])
    AS v(key, status, attempts, next_attempt_at, last_error, sent_at, dead_at)
WHERE o.key = v.key AND o.status = 'pending'";

pub(super) async fn claim_outbox(
    s: &PgStore,
    now: Time,
    limit: usize,
    owner: &str,
    lease_until: Time,
    skip: &[String],
) -> Result<Vec<Delivery>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_OUTBOX)
        .bind(ms(now))
        .bind(limit_i64(limit))
        .bind(ms(lease_until))
        .bind(owner)
        .bind(skip)
        .fetch_all(&s.pool)
        .await?;
    ClaimedRow::into_deliveries(rows)
}

pub(super) async fn renew_outbox(
    s: &PgStore,
    keys: &[String],
    owner: &str,
    lease_until: Time,
) -> Result<u64> {
    if keys.is_empty() {
        return Ok(0);
    }
    let renewed = sqlx::query(
        "UPDATE outbox SET lease_until = $3
         WHERE key = ANY($1::text[]) AND claimed_by = $2
           AND status = 'pending' AND lease_until IS NOT NULL",
    )
    .bind(keys)
    .bind(owner)
    .bind(ms(lease_until))
    .execute(&s.pool)
    .await?
    .rows_affected();
    Ok(renewed)
}

pub(super) async fn release_outbox(s: &PgStore, keys: &[String], owner: &str) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE outbox SET lease_until = NULL, claimed_by = NULL
         WHERE key = ANY($1::text[]) AND claimed_by = $2 AND status = 'pending'",
    )
    .bind(keys)
    .bind(owner)
    .execute(&s.pool)
    .await?;
    Ok(())
}

pub(super) async fn heartbeat(s: &PgStore, owner: &str, now: Time) -> Result<()> {
    sqlx::query(
        "INSERT INTO daemons (owner, started_at, heartbeat_at) VALUES ($1, $2, $2)
         ON CONFLICT (owner) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
    )
    .bind(owner)
    .bind(ms(now))
    .execute(&s.pool)
    .await?;
    Ok(())
}

pub(super) async fn take_over(
    s: &PgStore,
    owner: &str,
    dead_before: Option<Time>,
) -> Result<Takeover> {
    let mut tx = s.pool.begin().await?;
    // The dead daemons' rows are locked (`FOR UPDATE`), so two daemons taking over at
    // once free each claim once; a daemon beating again meanwhile waits for this.
    let dead: Vec<String> = match dead_before {
        Some(t) => {
            sqlx::query_scalar(
                "SELECT owner FROM daemons WHERE heartbeat_at < $1 AND owner <> $2
                 ORDER BY owner FOR UPDATE SKIP LOCKED",
            )
            .bind(ms(t))
            .bind(owner)
            .fetch_all(&mut *tx)
            .await?
        }
        None => {
            sqlx::query_scalar(
                "SELECT owner FROM daemons WHERE owner <> $1 ORDER BY owner FOR UPDATE",
            )
            .bind(owner)
            .fetch_all(&mut *tx)
            .await?
        }
    };
    if dead_before.is_some() && dead.is_empty() {
        return Ok(Takeover::default());
    }
    // Whose claims go: the dead daemons' ($1), or (no `dead_before`) all but $2's.
    let all = dead_before.is_none();
    let outbox = sqlx::query(
        "UPDATE outbox SET lease_until = NULL, claimed_by = NULL
         WHERE status = 'pending' AND lease_until IS NOT NULL
           AND (claimed_by = ANY($1::text[]) OR ($3 AND claimed_by IS DISTINCT FROM $2))",
    )
    .bind(&dead)
    .bind(owner)
    .bind(all)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Locked in id order, like every lease statement (see `CLAIM_CUSTOMERS`).
    let customers = sqlx::query(
        "DELETE FROM customer_leases
         WHERE customer_id IN (SELECT customer_id FROM customer_leases
                               WHERE owner = ANY($1::text[]) OR ($3 AND owner <> $2)
                               ORDER BY customer_id FOR UPDATE)",
    )
    .bind(&dead)
    .bind(owner)
    .bind(all)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM daemons WHERE owner = ANY($1::text[])")
        .bind(&dead)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Takeover {
        daemons: if all { Vec::new() } else { dead },
        outbox,
        customers,
    })
}

pub(super) async fn settle_outbox(s: &PgStore, outcomes: &[DeliveryOutcome]) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let settle = Settle::of(outcomes);
    let key: Vec<&str> = settle.iter().map(|s| s.key).collect();
    let status: Vec<&str> = settle.iter().map(|s| s.status).collect();
    let attempts: Vec<Option<i64>> = settle.iter().map(|s| s.attempts).collect();
    let next: Vec<Option<i64>> = settle.iter().map(|s| s.next_attempt_at).collect();
    let error: Vec<Option<&str>> = settle.iter().map(|s| s.last_error).collect();
    let sent: Vec<Option<i64>> = settle.iter().map(|s| s.sent_at).collect();
    let dead: Vec<Option<i64>> = settle.iter().map(|s| s.dead_at).collect();
    sqlx::query(SETTLE_OUTBOX)
        .bind(key)
        .bind(status)
        .bind(attempts)
        .bind(next)
        .bind(error)
        .bind(sent)
        .bind(dead)
        .execute(&s.pool)
        .await?;
    Ok(())
}

pub(super) async fn deliveries(s: &PgStore, customer_id: &str) -> Result<Vec<DeliveryState>> {
    let rows: Vec<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_SELECT}, {STATE_COLUMNS}
         FROM outbox WHERE customer_id = $1 ORDER BY ord"
    ))
    .bind(customer_id)
    .fetch_all(&s.pool)
    .await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

/// The dispatch state of an outbox row ([`DeliveryStateRow`] after the row's own columns).
const STATE_COLUMNS: &str =
    "status, attempts::int8 AS attempts, next_attempt_at, last_error, sent_at, dead_at";

pub(super) async fn dead_letters(
    s: &PgStore,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeliveryState>> {
    // Walks the `outbox_dead` index (dead rows by `dead_at`).
    let rows: Vec<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_SELECT}, {STATE_COLUMNS} FROM outbox
         WHERE status = 'dead' AND ($1::text IS NULL OR flow = $1)
           AND ($2::text IS NULL OR channel = $2)
           AND ($3::text IS NULL OR strpos(lower(COALESCE(last_error, '')), lower($3)) > 0)
         ORDER BY dead_at DESC, key LIMIT $4"
    ))
    .bind(filter.flow.as_deref())
    .bind(filter.channel.as_deref())
    .bind(filter.reason.as_deref())
    .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
    .fetch_all(&s.pool)
    .await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

pub(super) async fn sandbox_messages(
    s: &PgStore,
    filter: &SandboxFilter,
) -> Result<Vec<DeliveryState>> {
    let channels = filter.narrowed_channels();
    if channels.is_empty() {
        return Ok(Vec::new());
    }
    // One statement per shape (see the SQLite twin): `outbox_sent` newest first, or one
    // customer's rows.
    let customer = if filter.customer_id.is_some() {
        "AND customer_id = $3"
    } else {
        ""
    };
    let q = format!(
        "SELECT {OUTBOX_SELECT}, {STATE_COLUMNS} FROM outbox
         WHERE status = 'sent' AND channel = ANY($1::text[]) {customer}
         ORDER BY sent_at DESC, ord DESC LIMIT $2"
    );
    let mut q = sqlx::query_as(&q)
        .bind(&channels)
        .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX));
    if let Some(c) = filter.customer_id.as_deref() {
        q = q.bind(c);
    }
    let rows: Vec<DeliveryStateRow> = q.fetch_all(&s.pool).await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

pub(super) async fn delivery(s: &PgStore, key: &str) -> Result<Option<DeliveryState>> {
    let row: Option<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_SELECT}, {STATE_COLUMNS} FROM outbox WHERE key = $1"
    ))
    .bind(key)
    .fetch_optional(&s.pool)
    .await?;
    row.map(DeliveryStateRow::into_state).transpose()
}

pub(super) async fn retry_dead_letter(s: &PgStore, key: &str, now: Time) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2,
             dead_at = NULL, lease_until = NULL, claimed_by = NULL
         WHERE key = $1 AND status = 'dead'",
    )
    .bind(key)
    .bind(ms(now))
    .execute(&s.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn outbox_depth(s: &PgStore, now: Time) -> Result<OutboxDepth> {
    // Each count walks a partial index (`outbox_pending`, `outbox_dead`), never the
    // sent rows: this runs on every metrics scrape.
    let row: OutboxDepthRow = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending') AS pending,
                (SELECT COUNT(*) FROM outbox
                  WHERE status = 'pending' AND next_attempt_at <= $1) AS due,
                (SELECT COUNT(*) FROM outbox WHERE status = 'dead') AS dead,
                (SELECT MIN(next_attempt_at) FROM outbox
                  WHERE status = 'pending' AND next_attempt_at <= $1) AS oldest_due",
    )
    .bind(ms(now))
    .fetch_one(&s.pool)
    .await?;
    row.into_depth()
}

pub(super) async fn set_paused(s: &PgStore, flow: &str, paused: bool, at: Time) -> Result<()> {
    sqlx::query(
        "INSERT INTO flow_state (flow, paused, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (flow) DO UPDATE SET paused = EXCLUDED.paused,
             updated_at = EXCLUDED.updated_at",
    )
    .bind(flow)
    .bind(paused)
    .bind(ms(at))
    .execute(&s.pool)
    .await?;
    Ok(())
}

pub(super) async fn paused_flows(s: &PgStore) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT flow FROM flow_state WHERE paused ORDER BY flow")
            .fetch_all(&s.pool)
            .await?,
    )
}

pub(super) async fn claim_fire(s: &PgStore, flow: &str, fire_at: Time, now: Time) -> Result<bool> {
    // Concurrent inserts of one key: the second waits for the first to commit, then
    // inserts nothing.
    let done = sqlx::query(
        "INSERT INTO schedule_fires (flow, fire_at, fired_at) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(flow)
    .bind(ms(fire_at))
    .bind(ms(now))
    .execute(&s.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn last_fire(s: &PgStore, flow: &str) -> Result<Option<Time>> {
    let last: Option<i64> =
        sqlx::query_scalar("SELECT MAX(fire_at) FROM schedule_fires WHERE flow = $1")
            .bind(flow)
            .fetch_one(&s.pool)
            .await?;
    last.map(|ms| codec::time("schedule_fires", ms)).transpose()
}

pub(super) async fn flow_counts(s: &PgStore, flow: Option<&str>) -> Result<Vec<FlowCounts>> {
    // Conversions join on their run (at most one per run): `converted` counts the flow's
    // rows in `conversions`.
    let rows: Vec<FlowCountsRow> = sqlx::query_as(
        "SELECT r.flow AS flow,
                COUNT(*) AS entered,
                COUNT(*) FILTER (WHERE r.status = 'waiting') AS waiting,
                COUNT(*) FILTER (WHERE r.status = 'ended' AND (r.outcome IS NULL
                                 OR r.outcome NOT IN ('exited', 'error'))) AS completed,
                COUNT(*) FILTER (WHERE r.status = 'ended' AND r.outcome = 'exited')
                    AS exited,
                COUNT(*) FILTER (WHERE r.status = 'ended' AND r.outcome = 'error')
                    AS errored,
                COUNT(c.run_id) AS converted
         FROM runs r LEFT JOIN conversions c ON c.run_id = r.id
         WHERE $1::text IS NULL OR r.flow = $1
         GROUP BY r.flow ORDER BY r.flow",
    )
    .bind(flow)
    .fetch_all(&s.pool)
    .await?;
    Ok(rows.into_iter().map(FlowCountsRow::into_counts).collect())
}

pub(super) async fn claim_customers(
    s: &PgStore,
    ids: &[String],
    owner: &str,
    now: Time,
    until: Time,
) -> Result<Vec<String>> {
    let wanted = codec::lease_ids(ids);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let held: Vec<String> = sqlx::query_scalar(CLAIM_CUSTOMERS)
        .bind(&wanted)
        .bind(owner)
        .bind(ms(now))
        .bind(ms(until))
        .fetch_all(&s.pool)
        .await?;
    Ok(codec::in_given_order(ids, held))
}

pub(super) async fn release_customers(s: &PgStore, ids: &[String], owner: &str) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(RELEASE_CUSTOMERS)
        .bind(ids)
        .bind(owner)
        .execute(&s.pool)
        .await?;
    Ok(())
}
