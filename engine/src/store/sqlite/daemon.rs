//! The daemon's side of the SQLite store: outbox claims and their settling, customer leases,
//! the daemons table (heartbeats, take-over), pauses, schedule ticks and per-flow counts.
//! The [`Store`](super::Store) impl in `mod.rs` delegates here.

use super::*;

/// `claim_customers`: rows `(customer_id, owner, until)`, then `now` — the parameter after
/// the rows (an unnumbered `?` takes the next number). A lease is taken when the row is new,
/// ran out (`until <= now`) or is the owner's own (extended); `RETURNING` names the ids
/// taken. The caller holds the write lock (`BEGIN IMMEDIATE`), so claims queue.
static CLAIM_CUSTOMERS: Shape = Shape::new(
    "INSERT INTO customer_leases (customer_id, owner, until) VALUES ",
    3,
    " ON CONFLICT (customer_id) DO UPDATE SET owner = excluded.owner, until = excluded.until \
     WHERE customer_leases.until <= ? OR customer_leases.owner = excluded.owner \
     RETURNING customer_id",
);

/// The columns of `outbox` that make an [`OutboxRow`] ([`OutboxDbRow`]).
const OUTBOX_COLUMNS: &str = "key, kind, run_id, flow, customer_id, step, channel, address, \
                              template, payload, transactional, created_at";

/// `claim_outbox`: pick the due rows from the `outbox_pending` index (its order is
/// `next_attempt_at`, then rowid) and lease them in the same statement. The caller holds the
/// write lock (`BEGIN IMMEDIATE`), so nothing runs between the pick and the lease; another
/// process's claim waits for the lock, then finds the leases. `RETURNING` has no order:
/// the rows carry theirs (`next_attempt_at`, `ord`).
const CLAIM_OUTBOX: &str = "\
UPDATE outbox SET lease_until = ?3, claimed_by = ?4
WHERE rowid IN (SELECT rowid FROM outbox
                WHERE status = 'pending' AND next_attempt_at <= ?1
                  AND (lease_until IS NULL OR lease_until < ?1)
                  AND channel NOT IN (SELECT value FROM json_each(?5))
                ORDER BY next_attempt_at, rowid LIMIT ?2)
RETURNING key, kind, run_id, flow, customer_id, step, channel, address, template, payload,
          transactional, created_at, attempts, lease_until, next_attempt_at, rowid AS ord";

/// `settle_outbox`: the outcomes as a `VALUES` table, joined on the key. A `NULL` keeps the
/// row's value (`attempts`: one more, for a send). Only pending rows change, so a late
/// outcome never undoes another dispatcher's.
static SETTLE_OUTBOX: Shape = Shape::new(
    "WITH v (key, status, attempts, next_attempt_at, last_error, sent_at, dead_at) AS (VALUES ",
    7,
    ") UPDATE outbox SET status = v.status, \
     attempts = coalesce(v.attempts, outbox.attempts + 1), \
     next_attempt_at = coalesce(v.next_attempt_at, outbox.next_attempt_at), \
     last_error = coalesce(v.last_error, outbox.last_error), \
     sent_at = coalesce(v.sent_at, outbox.sent_at), \
     dead_at = coalesce(v.dead_at, outbox.dead_at), \
     lease_until = NULL, claimed_by = NULL \
     FROM v WHERE outbox.key = v.key AND outbox.status = 'pending'",
);

pub(super) async fn claim_outbox(
    s: &SqliteStore,
    now: Time,
    limit: usize,
    owner: &str,
    lease_until: Time,
    skip: &[String],
) -> Result<Vec<Delivery>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut tx = s.begin().await?;
    let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_OUTBOX)
        .bind(ms(now))
        .bind(limit_i64(limit))
        .bind(ms(lease_until))
        .bind(owner)
        .bind(string_array(skip.iter().map(String::as_str)))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    ClaimedRow::into_deliveries(rows)
}

pub(super) async fn renew_outbox(
    s: &SqliteStore,
    keys: &[String],
    owner: &str,
    lease_until: Time,
) -> Result<u64> {
    if keys.is_empty() {
        return Ok(0);
    }
    let mut tx = s.begin().await?;
    let renewed = sqlx::query(
        "UPDATE outbox SET lease_until = ?3
         WHERE key IN (SELECT value FROM json_each(?1)) AND claimed_by = ?2
           AND status = 'pending' AND lease_until IS NOT NULL",
    )
    .bind(string_array(keys.iter().map(String::as_str)))
    .bind(owner)
    .bind(ms(lease_until))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(renewed)
}

pub(super) async fn release_outbox(s: &SqliteStore, keys: &[String], owner: &str) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut tx = s.begin().await?;
    sqlx::query(
        "UPDATE outbox SET lease_until = NULL, claimed_by = NULL
         WHERE key IN (SELECT value FROM json_each(?1)) AND claimed_by = ?2
           AND status = 'pending'",
    )
    .bind(string_array(keys.iter().map(String::as_str)))
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn heartbeat(s: &SqliteStore, owner: &str, now: Time) -> Result<()> {
    let mut tx = s.begin().await?;
    sqlx::query(
        "INSERT INTO daemons (owner, started_at, heartbeat_at) VALUES (?1, ?2, ?2)
         ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
    )
    .bind(owner)
    .bind(ms(now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn take_over(
    s: &SqliteStore,
    owner: &str,
    dead_before: Option<Time>,
) -> Result<Takeover> {
    let mut tx = s.begin().await?;
    // The owners whose claims go: the dead ones, or everyone but `owner`.
    let dead: Vec<String> = match dead_before {
        Some(t) => {
            sqlx::query_scalar(
                "SELECT owner FROM daemons WHERE heartbeat_at < ?1 AND owner <> ?2
                 ORDER BY owner",
            )
            .bind(ms(t))
            .bind(owner)
            .fetch_all(&mut *tx)
            .await?
        }
        None => Vec::new(),
    };
    if dead_before.is_some() && dead.is_empty() {
        return Ok(Takeover::default());
    }
    let (outbox, customers) = if dead_before.is_some() {
        let list = string_array(dead.iter().map(String::as_str));
        let outbox = sqlx::query(
            "UPDATE outbox SET lease_until = NULL, claimed_by = NULL
             WHERE status = 'pending' AND lease_until IS NOT NULL
               AND claimed_by IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let customers = sqlx::query(
            "DELETE FROM customer_leases WHERE owner IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM daemons WHERE owner IN (SELECT value FROM json_each(?1))")
            .bind(&list)
            .execute(&mut *tx)
            .await?;
        (outbox, customers)
    } else {
        let outbox = sqlx::query(
            "UPDATE outbox SET lease_until = NULL, claimed_by = NULL
             WHERE status = 'pending' AND lease_until IS NOT NULL
               AND claimed_by IS NOT ?1",
        )
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let customers = sqlx::query("DELETE FROM customer_leases WHERE owner <> ?1")
            .bind(owner)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM daemons WHERE owner <> ?1")
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        (outbox, customers)
    };
    tx.commit().await?;
    Ok(Takeover {
        daemons: dead,
        outbox,
        customers,
    })
}

pub(super) async fn settle_outbox(s: &SqliteStore, outcomes: &[DeliveryOutcome]) -> Result<()> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let settle = Settle::of(outcomes);
    let rows: Vec<&Settle> = settle.iter().collect();
    let mut tx = s.begin().await?;
    let mut pipe = Pipeline::new(&mut tx);
    SETTLE_OUTBOX.write(&mut pipe, &rows, bind_settle).await?;
    pipe.finish().await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn deliveries(s: &SqliteStore, customer_id: &str) -> Result<Vec<DeliveryState>> {
    let rows: Vec<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_COLUMNS}, {STATE_COLUMNS}
         FROM outbox WHERE customer_id = ?1 ORDER BY rowid"
    ))
    .bind(customer_id)
    .fetch_all(&s.read)
    .await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

/// The dispatch state of an outbox row ([`DeliveryStateRow`] after the row's own columns).
const STATE_COLUMNS: &str = "status, attempts, next_attempt_at, last_error, sent_at, dead_at";

pub(super) async fn dead_letters(
    s: &SqliteStore,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeliveryState>> {
    // Walks the `outbox_dead` index (dead rows by `dead_at`).
    let rows: Vec<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_COLUMNS}, {STATE_COLUMNS} FROM outbox
         WHERE status = 'dead' AND (?1 IS NULL OR flow = ?1) AND (?2 IS NULL OR channel = ?2)
           AND (?3 IS NULL OR instr(lower(COALESCE(last_error, '')), lower(?3)) > 0)
         ORDER BY dead_at DESC, key LIMIT ?4"
    ))
    .bind(filter.flow.as_deref())
    .bind(filter.channel.as_deref())
    .bind(filter.reason.as_deref())
    .bind(limit_i64(filter.limit))
    .fetch_all(&s.read)
    .await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

pub(super) async fn sandbox_messages(
    s: &SqliteStore,
    filter: &SandboxFilter,
) -> Result<Vec<DeliveryState>> {
    let channels = filter.narrowed_channels();
    if channels.is_empty() {
        return Ok(Vec::new());
    }
    // One statement per shape, no `?N IS NULL OR …`: the planner then walks `outbox_sent`
    // newest first (or one customer's rows), never the whole outbox. The channel names
    // travel as one JSON array, whatever their number.
    let customer = if filter.customer_id.is_some() {
        "AND customer_id = ?3"
    } else {
        ""
    };
    let q = format!(
        "SELECT {OUTBOX_COLUMNS}, {STATE_COLUMNS} FROM outbox
         WHERE status = 'sent' AND channel IN (SELECT value FROM json_each(?1)) {customer}
         ORDER BY sent_at DESC, rowid DESC LIMIT ?2"
    );
    let mut q = sqlx::query_as(&q)
        .bind(to_json("outbox", &channels)?)
        .bind(limit_i64(filter.limit));
    if let Some(c) = filter.customer_id.as_deref() {
        q = q.bind(c);
    }
    let rows: Vec<DeliveryStateRow> = q.fetch_all(&s.read).await?;
    rows.into_iter().map(DeliveryStateRow::into_state).collect()
}

pub(super) async fn delivery(s: &SqliteStore, key: &str) -> Result<Option<DeliveryState>> {
    let row: Option<DeliveryStateRow> = sqlx::query_as(&format!(
        "SELECT {OUTBOX_COLUMNS}, {STATE_COLUMNS} FROM outbox WHERE key = ?1"
    ))
    .bind(key)
    .fetch_optional(&s.read)
    .await?;
    row.map(DeliveryStateRow::into_state).transpose()
}

pub(super) async fn retry_dead_letter(s: &SqliteStore, key: &str, now: Time) -> Result<bool> {
    let mut tx = s.begin().await?;
    let done = sqlx::query(RETRY_DEAD)
        .bind(key)
        .bind(ms(now))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// `retry_dead_letter`: pending again, due now, a fresh set of attempts, unclaimed.
const RETRY_DEAD: &str = "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2,
     dead_at = NULL, lease_until = NULL, claimed_by = NULL
 WHERE key = ?1 AND status = 'dead'";

pub(super) async fn outbox_depth(s: &SqliteStore, now: Time) -> Result<OutboxDepth> {
    // Each count walks a partial index (`outbox_pending`, `outbox_dead`), never the
    // sent rows: this runs on every metrics scrape.
    let row: OutboxDepthRow = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending') AS pending,
                (SELECT COUNT(*) FROM outbox
                  WHERE status = 'pending' AND next_attempt_at <= ?1) AS due,
                (SELECT COUNT(*) FROM outbox WHERE status = 'dead') AS dead,
                (SELECT MIN(next_attempt_at) FROM outbox
                  WHERE status = 'pending' AND next_attempt_at <= ?1) AS oldest_due",
    )
    .bind(ms(now))
    .fetch_one(&s.read)
    .await?;
    row.into_depth()
}

pub(super) async fn set_paused(s: &SqliteStore, flow: &str, paused: bool, at: Time) -> Result<()> {
    let mut tx = s.begin().await?;
    sqlx::query(
        "INSERT INTO flow_state (flow, paused, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (flow) DO UPDATE SET paused = excluded.paused,
             updated_at = excluded.updated_at",
    )
    .bind(flow)
    .bind(paused)
    .bind(ms(at))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn paused_flows(s: &SqliteStore) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT flow FROM flow_state WHERE paused ORDER BY flow")
            .fetch_all(&s.read)
            .await?,
    )
}

pub(super) async fn claim_fire(
    s: &SqliteStore,
    flow: &str,
    fire_at: Time,
    now: Time,
) -> Result<bool> {
    let mut tx = s.begin().await?;
    let done = sqlx::query(
        "INSERT INTO schedule_fires (flow, fire_at, fired_at) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
    )
    .bind(flow)
    .bind(ms(fire_at))
    .bind(ms(now))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn last_fire(s: &SqliteStore, flow: &str) -> Result<Option<Time>> {
    let last: Option<i64> =
        sqlx::query_scalar("SELECT MAX(fire_at) FROM schedule_fires WHERE flow = ?1")
            .bind(flow)
            .fetch_one(&s.read)
            .await?;
    last.map(|ms| codec::time("schedule_fires", ms)).transpose()
}

pub(super) async fn flow_counts(s: &SqliteStore, flow: Option<&str>) -> Result<Vec<FlowCounts>> {
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
         WHERE ?1 IS NULL OR r.flow = ?1
         GROUP BY r.flow ORDER BY r.flow",
    )
    .bind(flow)
    .fetch_all(&s.read)
    .await?;
    Ok(rows.into_iter().map(FlowCountsRow::into_counts).collect())
}

pub(super) async fn claim_customers(
    s: &SqliteStore,
    ids: &[String],
    owner: &str,
    now: Time,
    until: Time,
) -> Result<Vec<String>> {
    let wanted = codec::lease_ids(ids);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let until = ms(until);
    let statements = CLAIM_CUSTOMERS.encode(&wanted, |a, id| {
        add!(a; id, owner, until);
        Ok(())
    })?;
    let mut held = Vec::with_capacity(wanted.len());
    let mut tx = s.begin().await?;
    for (sql, mut args) in statements {
        add!(&mut args; ms(now));
        let taken: Vec<String> = sqlx::query_scalar_with(sql, args)
            .fetch_all(&mut *tx)
            .await?;
        held.extend(taken);
    }
    tx.commit().await?;
    Ok(codec::in_given_order(ids, held))
}

pub(super) async fn release_customers(s: &SqliteStore, ids: &[String], owner: &str) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids = string_array(ids.iter().map(String::as_str));
    let mut tx = s.begin().await?;
    sqlx::query(
        "DELETE FROM customer_leases
         WHERE customer_id IN (SELECT value FROM json_each(?1)) AND owner = ?2",
    )
    .bind(ids)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
