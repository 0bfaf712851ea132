//! The outcome counters' rows as both backends write and read them (see [`crate::stats`]):
//! the shard a batch adds to, the summed rows a read returns, and the answer they make.

use super::Result;
use super::codec::time;

/// The counter shard a batch writes to: one per daemon (by its lease owner), so daemons
/// sharing a Postgres database never wait on each other's counter rows; readers sum the
/// shards. 0 for a batch without a lease (one daemon, tests).
pub(crate) fn shard(batch: &crate::state::Batch) -> i64 {
    const SHARDS: u64 = 16;
    let Some(lease) = &batch.lease else { return 0 };
    // FNV-1a: stable across builds and processes, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lease.owner.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    i64::try_from(h % SHARDS).unwrap_or(0)
}

/// A summed counter as both backends read it (`flow_stats`).
#[derive(sqlx::FromRow)]
pub(crate) struct StatDbRow {
    pub version: String,
    pub step: String,
    pub metric: String,
    pub n: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct DayDbRow {
    pub day: i64,
    pub metric: String,
    pub n: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct VersionDbRow {
    pub version: String,
    pub created_at: i64,
}

/// `flow_stats`' answer from its three reads. Counts are never negative in a consistent
/// database; one that is (a hand-edited row) reads as 0 rather than failing the page.
pub(crate) fn flow_stats(
    counts: Vec<StatDbRow>,
    days: Vec<DayDbRow>,
    waiting: Vec<StatDbRow>,
    versions: Vec<VersionDbRow>,
) -> Result<crate::stats::FlowStats> {
    use crate::stats::{DayRow, FlowStats, StatRow, VersionInfo};
    let row = |r: StatDbRow| StatRow {
        version: r.version,
        step: r.step,
        metric: r.metric,
        n: u64::try_from(r.n).unwrap_or(0),
    };
    let waiting: Vec<StatRow> = waiting.into_iter().map(row).collect();
    let mut out_versions = Vec::with_capacity(versions.len());
    for v in versions {
        let parked = waiting
            .iter()
            .filter(|w| w.version == v.version)
            .map(|w| w.n)
            .sum();
        out_versions.push(VersionInfo {
            created_at: time("flow_versions", v.created_at)?,
            version: v.version,
            waiting: parked,
        });
    }
    Ok(FlowStats {
        counts: counts.into_iter().map(row).collect(),
        days: days
            .into_iter()
            .map(|d| DayRow {
                day: i32::try_from(d.day).unwrap_or_default(),
                metric: d.metric,
                n: u64::try_from(d.n).unwrap_or(0),
            })
            .collect(),
        waiting,
        versions: out_versions,
    })
}
