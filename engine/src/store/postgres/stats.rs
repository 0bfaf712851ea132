//! Reads of the outcome counters (`step_counts`, `step_waiting`; see [`crate::stats`]).
//! Each is a range of the primary key: a page costs the counters it shows, whatever the
//! history holds.

use super::*;
use crate::store::counters;

pub(super) async fn flow_stats(s: &PgStore, q: &StatsQuery) -> Result<FlowStats> {
    let version = q.version.as_deref();
    let counts: Vec<counters::StatDbRow> = sqlx::query_as(
        "SELECT version, step, metric, SUM(n)::int8 AS n FROM step_counts
         WHERE flow = $1 AND day BETWEEN $2 AND $3 AND ($4 IS NULL OR version = $4)
         GROUP BY version, step, metric ORDER BY version, step, metric",
    )
    .bind(&q.flow)
    .bind(i64::from(q.from))
    .bind(i64::from(q.to))
    .bind(version)
    .fetch_all(&s.pool)
    .await?;
    let days: Vec<counters::DayDbRow> = sqlx::query_as(
        "SELECT day, metric, SUM(n)::int8 AS n FROM step_counts
         WHERE flow = $1 AND day BETWEEN $2 AND $3 AND step = '' AND ($4 IS NULL OR version = $4)
         GROUP BY day, metric ORDER BY day, metric",
    )
    .bind(&q.flow)
    .bind(i64::from(q.from))
    .bind(i64::from(q.to))
    .bind(version)
    .fetch_all(&s.pool)
    .await?;
    let waiting: Vec<counters::StatDbRow> = sqlx::query_as(
        "SELECT version, step, 'waiting'::text AS metric, SUM(n)::int8 AS n FROM step_waiting
         WHERE flow = $1 AND ($2 IS NULL OR version = $2)
         GROUP BY version, step HAVING SUM(n)::int8 <> 0 ORDER BY version, step",
    )
    .bind(&q.flow)
    .bind(version)
    .fetch_all(&s.pool)
    .await?;
    let versions: Vec<counters::VersionDbRow> = sqlx::query_as(
        "SELECT version, created_at FROM flow_versions WHERE flow = $1
         ORDER BY created_at, version",
    )
    .bind(&q.flow)
    .fetch_all(&s.pool)
    .await?;
    counters::flow_stats(counts, days, waiting, versions)
}
