//! A flow's outcomes over a range of days, as the API (`GET /v1/flows/{id}/stats`), the web
//! UI and `canvas status` show them: the counters of [`canvas_engine::stats`] per step and
//! flow-wide, the edges with the share of runs that took them, the split arms with their
//! lift, the waiting runs, the versions. One shape, read from the counter tables only.

use std::collections::BTreeMap;

use canvas_engine::flow::CompiledFlow;
use canvas_engine::stats::{
    self, EdgeCount, FlowStats, SplitStats, StatsQuery, StepTable, VersionInfo,
};
use canvas_engine::store::Store;
use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::Serialize;

/// The longest range one request may ask for: a year and a day (a leap year's worth).
pub const MAX_DAYS: i64 = 366;
/// The range when none is asked for: the last 7 days, today included.
pub const DEFAULT_DAYS: i64 = 7;

/// An inclusive range of local dates (in the engine's time zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl Range {
    /// `from` / `to` as `YYYY-MM-DD` (either may be missing: `to` defaults to today, `from`
    /// to 6 days before `to`). A clear sentence when they are not dates, are reversed, or
    /// span more than [`MAX_DAYS`].
    pub fn parse(from: Option<&str>, to: Option<&str>, today: NaiveDate) -> Result<Range, String> {
        let date = |what: &str, s: &str| {
            NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| {
                format!("`{what}` must be a date as YYYY-MM-DD (such as 2026-12-01), not `{s}`")
            })
        };
        let to = match to.filter(|s| !s.trim().is_empty()) {
            Some(s) => date("to", s)?,
            None => today,
        };
        let from = match from.filter(|s| !s.trim().is_empty()) {
            Some(s) => date("from", s)?,
            None => to - chrono::Duration::days(DEFAULT_DAYS - 1),
        };
        if from > to {
            return Err(format!("`from` ({from}) is after `to` ({to})"));
        }
        let days = (to - from).num_days() + 1;
        if days > MAX_DAYS {
            return Err(format!(
                "the range spans {days} days; at most {MAX_DAYS} may be asked for at once"
            ));
        }
        Ok(Range { from, to })
    }

    /// The last `days` days up to `today`, included.
    pub fn last(days: i64, today: NaiveDate) -> Range {
        Range {
            from: today - chrono::Duration::days(days.max(1) - 1),
            to: today,
        }
    }
}

/// Today in the engine's zone.
pub fn today(now: canvas_engine::state::Time, tz: Tz) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// What the stats answer holds.
#[derive(Debug, Clone, Serialize)]
pub struct Outcomes {
    pub flow: String,
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// The zone the days are dates in.
    pub timezone: String,
    /// The version asked for; `None` sums every version.
    pub version: Option<String>,
    pub versions: Vec<VersionInfo>,
    /// Flow-wide counters over the range (`entered`, `ended:completed`, `converted`, …).
    pub totals: BTreeMap<String, u64>,
    /// Per step of the flow (the loaded version's steps first, in the order written, then
    /// steps only older versions have): its counters, `waiting` included.
    pub steps: Vec<StepOutcome>,
    pub edges: Vec<EdgeCount>,
    pub splits: Vec<SplitStats>,
    /// The flow-wide counters per day.
    pub days: Vec<DayOutcome>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    pub step: String,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DayOutcome {
    pub date: Option<NaiveDate>,
    pub counts: BTreeMap<String, u64>,
}

/// Read a flow's outcomes. `flow` is the loaded version (edges and splits are drawn from
/// its graph); `None` for a flow no longer loaded, whose counters are still shown.
pub async fn read<S: Store>(
    store: &S,
    id: &str,
    flow: Option<&CompiledFlow>,
    range: Range,
    version: Option<&str>,
    tz: Tz,
) -> canvas_engine::store::Result<Outcomes> {
    let q = StatsQuery {
        flow: id.to_owned(),
        version: version.map(str::to_owned),
        from: stats::day_number(range.from),
        to: stats::day_number(range.to),
    };
    let raw = store.flow_stats(&q).await?;
    Ok(shape(id, flow, range, version, tz, raw))
}

fn shape(
    id: &str,
    flow: Option<&CompiledFlow>,
    range: Range,
    version: Option<&str>,
    tz: Tz,
    raw: FlowStats,
) -> Outcomes {
    let table: StepTable = raw.table(version);
    let mut steps: Vec<StepOutcome> = Vec::new();
    if let Some(flow) = flow {
        for (_, s) in flow.steps() {
            steps.push(StepOutcome {
                step: s.id.clone(),
                counts: table.steps.get(&s.id).cloned().unwrap_or_default(),
            });
        }
    }
    for (step, counts) in &table.steps {
        if !steps.iter().any(|s| s.step == *step) {
            steps.push(StepOutcome {
                step: step.clone(),
                counts: counts.clone(),
            });
        }
    }
    let mut days: BTreeMap<i32, BTreeMap<String, u64>> = BTreeMap::new();
    for d in &raw.days {
        *days
            .entry(d.day)
            .or_default()
            .entry(d.metric.clone())
            .or_default() += d.n;
    }
    Outcomes {
        flow: id.to_owned(),
        from: range.from,
        to: range.to,
        timezone: tz.name().to_owned(),
        version: version.map(str::to_owned),
        versions: raw.versions,
        totals: table.flow.clone(),
        edges: flow.map(|f| table.edges(f)).unwrap_or_default(),
        splits: flow.map(|f| table.splits(f)).unwrap_or_default(),
        steps,
        days: days
            .into_iter()
            .map(|(day, counts)| DayOutcome {
                date: stats::date_of(day),
                counts,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    #[test]
    fn ranges_default_to_the_last_seven_days() {
        let today = d("2026-12-01");
        let r = Range::parse(None, None, today).expect("range");
        assert_eq!((r.from, r.to), (d("2026-11-25"), today));
        let r = Range::parse(Some("2026-11-01"), Some("2026-11-30"), today).expect("range");
        assert_eq!((r.from, r.to), (d("2026-11-01"), d("2026-11-30")));
        assert_eq!(
            Range::last(1, today),
            Range {
                from: today,
                to: today
            }
        );
    }

    #[test]
    fn bad_ranges_say_why() {
        let today = d("2026-12-01");
        let e = Range::parse(Some("yesterday"), None, today).expect_err("not a date");
        assert!(e.contains("`from` must be a date"), "{e}");
        let e = Range::parse(Some("2026-12-02"), Some("2026-12-01"), today).expect_err("rev");
        assert!(e.contains("after"), "{e}");
        let e = Range::parse(Some("2024-01-01"), Some("2026-01-01"), today).expect_err("long");
        assert!(e.contains("at most 366"), "{e}");
    }
}
