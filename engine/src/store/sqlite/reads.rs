//! Reads for operators and tests: outbox rows, history, runs, conversions, per-step and per-arm counts, customer ids. None of them is on the engine's hot path.
//! The [`Store`](super::Store) impl in `mod.rs` delegates here.

use super::*;

pub(super) async fn customer_ids(
    s: &SqliteStore,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>> {
    let text: String = match after {
        Some(after) => {
            sqlx::query_scalar(
                "SELECT json_group_array(id ORDER BY id) FROM
                   (SELECT id FROM customers WHERE id > ?1 ORDER BY id LIMIT ?2)",
            )
            .bind(after)
            .bind(limit_i64(limit))
            .fetch_one(&s.read)
            .await?
        }
        None => {
            sqlx::query_scalar(
                "SELECT json_group_array(id ORDER BY id) FROM
                   (SELECT id FROM customers ORDER BY id LIMIT ?1)",
            )
            .bind(limit_i64(limit))
            .fetch_one(&s.read)
            .await?
        }
    };
    parse_rows("customers", &text)
}

pub(super) async fn outbox(s: &SqliteStore, customer_id: Option<&str>) -> Result<Vec<OutboxRow>> {
    const COLUMNS: &str = "key, kind, run_id, flow, customer_id, step, channel, address, \
                           template, payload, transactional, created_at";
    let rows: Vec<OutboxDbRow> = match customer_id {
        Some(c) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM outbox WHERE customer_id = ?1 ORDER BY rowid"
            ))
            .bind(c)
            .fetch_all(&s.read)
            .await?
        }
        None => {
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM outbox ORDER BY rowid"))
                .fetch_all(&s.read)
                .await?
        }
    };
    rows.into_iter().map(OutboxDbRow::into_row).collect()
}

pub(super) async fn history(
    s: &SqliteStore,
    customer_id: Option<&str>,
) -> Result<Vec<HistoryEntry>> {
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
            .fetch_all(&s.read)
            .await?
        }
        None => {
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM history ORDER BY rowid"))
                .fetch_all(&s.read)
                .await?
        }
    };
    rows.into_iter().map(HistoryRow::into_entry).collect()
}

pub(super) async fn runs(s: &SqliteStore, customer_id: &str) -> Result<Vec<Run>> {
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE customer_id = ?1 ORDER BY entered_at, id"
    ))
    .bind(customer_id)
    .fetch_all(&s.read)
    .await?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(super) async fn waiting_at(
    s: &SqliteStore,
    flow: &str,
    step: &str,
    limit: usize,
) -> Result<Vec<Run>> {
    // `runs_waiting_at` (migration 0007) holds exactly these rows in this order.
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM runs
         WHERE status = 'waiting' AND flow = ?1 AND step = ?2
         ORDER BY entered_at, id LIMIT ?3"
    ))
    .bind(flow)
    .bind(step)
    .bind(limit_i64(limit))
    .fetch_all(&s.read)
    .await?;
    rows.into_iter().map(RunRow::into_run).collect()
}

pub(super) async fn conversions(s: &SqliteStore, flow: Option<&str>) -> Result<Vec<Conversion>> {
    const COLUMNS: &str = "run_id, flow, version, customer_id, arm, last_touch, event_id, at";
    let rows: Vec<ConversionRow> = match flow {
        Some(flow) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM conversions WHERE flow = ?1 ORDER BY at, run_id"
            ))
            .bind(flow)
            .fetch_all(&s.read)
            .await?
        }
        None => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM conversions ORDER BY at, run_id"
            ))
            .fetch_all(&s.read)
            .await?
        }
    };
    rows.into_iter()
        .map(ConversionRow::into_conversion)
        .collect()
}

/// Summed per flow step with window functions, the most recent row of each step alongside.
const FAILURE_COUNTS: &str = "SELECT flow, step, total, customers, customer_id, error, at FROM (
    SELECT flow, step, customer_id, error, at,
           SUM(count) OVER w AS total, COUNT(*) OVER w AS customers,
           ROW_NUMBER() OVER (PARTITION BY flow, step ORDER BY at DESC, customer_id) AS rn
    FROM failures WHERE ?1 IS NULL OR flow = ?1
    WINDOW w AS (PARTITION BY flow, step)
) AS t WHERE rn = 1 ORDER BY flow, step";

pub(super) async fn failure_counts(
    s: &SqliteStore,
    flow: Option<&str>,
) -> Result<Vec<FailureCount>> {
    let rows: Vec<FailureCountRow> = sqlx::query_as(FAILURE_COUNTS)
        .bind(flow)
        .fetch_all(&s.read)
        .await?;
    rows.into_iter().map(FailureCountRow::into_count).collect()
}

pub(super) async fn failures(s: &SqliteStore, customer_id: &str) -> Result<Vec<Failure>> {
    let rows: Vec<FailureRow> = sqlx::query_as(
        "SELECT flow, step, customer_id, count, error, at FROM failures
         WHERE customer_id = ?1 ORDER BY at DESC, flow, step",
    )
    .bind(customer_id)
    .fetch_all(&s.read)
    .await?;
    rows.into_iter().map(FailureRow::into_failure).collect()
}

pub(super) async fn node_counts(s: &SqliteStore, flow: Option<&str>) -> Result<Vec<NodeCount>> {
    let rows: Vec<NodeCountRow> = match flow {
        Some(flow) => {
            sqlx::query_as(
                "SELECT flow, step, COUNT(*) AS waiting FROM runs
                 WHERE status = 'waiting' AND flow = ?1
                 GROUP BY flow, step ORDER BY flow, step",
            )
            .bind(flow)
            .fetch_all(&s.read)
            .await?
        }
        None => {
            sqlx::query_as(
                "SELECT flow, step, COUNT(*) AS waiting FROM runs WHERE status = 'waiting'
                 GROUP BY flow, step ORDER BY flow, step",
            )
            .fetch_all(&s.read)
            .await?
        }
    };
    Ok(rows.into_iter().map(NodeCountRow::into_count).collect())
}

pub(super) async fn goal_report(
    s: &SqliteStore,
    flow: Option<&str>,
) -> Result<Vec<crate::store::ArmCount>> {
    let rows: Vec<codec::ArmCountRow> = sqlx::query_as(
        "SELECT r.flow AS flow, r.arm AS arm, COUNT(*) AS runs, COUNT(c.run_id) AS converted
         FROM runs r LEFT JOIN conversions c ON c.run_id = r.id
         WHERE ?1 IS NULL OR r.flow = ?1
         GROUP BY r.flow, r.arm ORDER BY r.flow, r.arm",
    )
    .bind(flow)
    .fetch_all(&s.read)
    .await?;
    rows.into_iter()
        .map(codec::ArmCountRow::into_count)
        .collect()
}

pub(super) async fn counts(s: &SqliteStore) -> Result<Counts> {
    let row: CountsRow = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM customers) AS customers,
                (SELECT COUNT(*) FROM runs) AS runs,
                (SELECT COUNT(*) FROM runs WHERE status = 'waiting') AS waiting,
                (SELECT COUNT(*) FROM history) AS history,
                (SELECT COUNT(*) FROM outbox) AS outbox,
                (SELECT COUNT(*) FROM conversions) AS conversions,
                (SELECT COUNT(*) FROM inbox WHERE applied_at IS NULL) AS inbox_pending",
    )
    .fetch_one(&s.read)
    .await?;
    Ok(row.into_counts())
}
