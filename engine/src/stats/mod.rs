//! Outcome counters: what happened at each step of each flow version, per day, kept as the
//! journeys run. The executor counts each transition it makes ([`Count`]), the runtime the
//! entries it refuses; a round's counts are summed ([`merge`]) and written by
//! `Store::commit` in the transaction that writes the transitions themselves, so a counter
//! never runs ahead of (or behind) the history it sums, through crashes and across daemons.
//! Pages and the API read the counters ([`FlowStats`]), never the history.
//!
//! A counter is `(flow, version, step, metric, day)`. `step` is a step id, or
//! [`FLOW`] (the empty string) for the flow as a whole. `day` is the local date, in the
//! engine's time zone (`canvas.yaml`'s `timezone`), of the round that counted it, as days
//! since 1970-01-01. The metric names are listed in `docs/runtime.md` ("Outcome counters").
//! Runs waiting at a step are a gauge, not a daily count: [`Count::waiting`] moves it by
//! one as runs arrive and leave.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

mod audit;
pub use audit::audit;

use chrono::{Datelike, NaiveDate};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::state::Time;

/// The `step` of flow-wide counters.
pub const FLOW: &str = "";

/// Metric names (besides the qualified ones built by the functions below).
pub mod metric {
    /// A run arrived at the step (flow-wide: a customer entered the flow).
    pub const ENTERED: &str = "entered";
    /// The runs waiting at the step now (the gauge's name in answers; never a daily row).
    pub const WAITING: &str = "waiting";
    /// A goal reached within its window, counted on the last touch and flow-wide.
    pub const CONVERTED: &str = "converted";
    /// Flow-wide: runs that ended, by outcome (`ended:completed`, `ended:exited`, …).
    pub const ENDED: &str = "ended";
    /// A step failed: an `error` history row (an expression that could not be evaluated,
    /// a plugin's error) or a `failed` one (a dead delivery, a failed call).
    pub const ERROR: &str = "error";
    pub const FAILED: &str = "failed";
    /// A failed send went out again on its next channel.
    pub const FELL_BACK: &str = "fell_back";
    /// Flow-wide: a customer the trigger matched who was not let in, by reason
    /// (`refused:paused`, `refused:opted_out`, `refused:where`, `refused:entry`).
    pub const REFUSED: &str = "refused";
}

/// `sent:CHANNEL`, `delayed:REASON`, `skipped:REASON`, `to:STEP`, `converted:ARM`, …
pub fn qualified(metric: &str, qualifier: &str) -> String {
    let mut s = String::with_capacity(metric.len() + 1 + qualifier.len());
    s.push_str(metric);
    s.push(':');
    s.push_str(qualifier);
    s
}

/// One change to one counter. The executor emits them one at a time; [`merge`] sums a
/// round's before they are written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Count {
    pub flow: String,
    pub version: String,
    /// A step id, or [`FLOW`].
    pub step: String,
    pub metric: String,
    /// Days since 1970-01-01 of the local date; `None` for the waiting gauge.
    pub day: Option<i32>,
    /// How much to add (negative only for the gauge).
    pub n: i64,
}

impl Count {
    /// The waiting gauge of `step` moves by `n` (+1 a run parks there, -1 it leaves).
    pub fn waiting(flow: &str, version: &str, step: &str, n: i64) -> Count {
        Count {
            flow: flow.to_owned(),
            version: version.to_owned(),
            step: step.to_owned(),
            metric: metric::WAITING.to_owned(),
            day: None,
            n,
        }
    }
}

/// One counter moved by a transition, of the transition's run's flow and version: a step id
/// (or [`FLOW`]), the metric (static for the fixed names, so counting allocates little), the
/// day (`None` for the waiting gauge) and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub step: String,
    pub metric: Cow<'static, str>,
    pub day: Option<i32>,
    pub n: i64,
}

/// A round's counters summed as they come: nested maps looked up by `&str`, so a counter
/// already seen in the round costs no allocation. `counts` gives them as the stores write
/// them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Per flow, version and day: step -> metric -> n. A round has very few of these.
    groups: Vec<Group>,
}

#[derive(Debug, Clone, PartialEq)]
struct Group {
    flow: String,
    version: String,
    day: Option<i32>,
    steps: HashMap<String, HashMap<Cow<'static, str>, i64>>,
}

impl Tally {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Add `n` to one counter.
    pub fn add(
        &mut self,
        flow: &str,
        version: &str,
        day: Option<i32>,
        step: &str,
        metric: Cow<'static, str>,
        n: i64,
    ) {
        let i = match self
            .groups
            .iter()
            .position(|g| g.day == day && g.flow == flow && g.version == version)
        {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    flow: flow.to_owned(),
                    version: version.to_owned(),
                    day,
                    steps: HashMap::new(),
                });
                self.groups.len() - 1
            }
        };
        let steps = &mut self.groups[i].steps;
        let metrics = match steps.get_mut(step) {
            Some(m) => m,
            None => steps.entry(step.to_owned()).or_default(),
        };
        match metrics.get_mut(metric.as_ref()) {
            Some(v) => *v += n,
            None => {
                metrics.insert(metric, n);
            }
        }
    }

    /// Add a transition's ticks, for its run's flow and version.
    pub fn add_ticks(&mut self, flow: &str, version: &str, ticks: Vec<Tick>) {
        for t in ticks {
            self.add(flow, version, t.day, &t.step, t.metric, t.n);
        }
    }

    /// Every counter, summed, zeros dropped, in key order ([`merge`]'s order).
    pub fn counts(&self) -> Vec<Count> {
        let mut out = Vec::new();
        for g in &self.groups {
            for (step, metrics) in &g.steps {
                for (metric, n) in metrics {
                    if *n != 0 {
                        out.push(Count {
                            flow: g.flow.clone(),
                            version: g.version.clone(),
                            step: step.clone(),
                            metric: metric.to_string(),
                            day: g.day,
                            n: *n,
                        });
                    }
                }
            }
        }
        merge(out)
    }
}

impl From<Vec<Count>> for Tally {
    fn from(counts: Vec<Count>) -> Tally {
        let mut t = Tally::default();
        for c in counts {
            t.add(
                &c.flow,
                &c.version,
                c.day,
                &c.step,
                Cow::Owned(c.metric),
                c.n,
            );
        }
        t
    }
}

/// The day bucket of an instant: its local date in `tz`, as days since 1970-01-01.
pub fn day_of(at: Time, tz: Tz) -> i32 {
    day_number(at.with_timezone(&tz).date_naive())
}

/// Days since 1970-01-01.
pub fn day_number(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - EPOCH_CE
}

/// The date of a day number.
pub fn date_of(day: i32) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(day.checked_add(EPOCH_CE)?)
}

/// `NaiveDate::from_ymd(1970, 1, 1).num_days_from_ce()`.
const EPOCH_CE: i32 = 719_163;

/// A round's counts summed per counter, zeros dropped, in key order: the order the stores
/// upsert them in, so two daemons writing overlapping counters lock rows in one order.
pub fn merge(counts: Vec<Count>) -> Vec<Count> {
    if counts.is_empty() {
        return counts;
    }
    let mut sum: BTreeMap<(String, String, String, String, Option<i32>), i64> = BTreeMap::new();
    for c in counts {
        *sum.entry((c.flow, c.version, c.step, c.metric, c.day))
            .or_default() += c.n;
    }
    sum.into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|((flow, version, step, metric, day), n)| Count {
            flow,
            version,
            step,
            metric,
            day,
            n,
        })
        .collect()
}

/// Which counters to read (`Store::flow_stats`): a flow, an inclusive range of days, and
/// optionally one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsQuery {
    pub flow: String,
    pub version: Option<String>,
    /// First day (days since 1970-01-01), inclusive.
    pub from: i32,
    /// Last day, inclusive.
    pub to: i32,
}

impl StatsQuery {
    /// Every day and every version of `flow`.
    pub fn all(flow: &str) -> StatsQuery {
        StatsQuery {
            flow: flow.to_owned(),
            version: None,
            from: i32::MIN,
            to: i32::MAX,
        }
    }
}

/// One summed counter as read: over the query's days, per version and step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRow {
    pub version: String,
    pub step: String,
    pub metric: String,
    pub n: u64,
}

/// One day of the flow-wide counters, for a chart or a "today" column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayRow {
    pub day: i32,
    pub metric: String,
    pub n: u64,
}

/// What `Store::flow_stats` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStats {
    /// Every counter of the range, summed over its days (and the daemons that wrote it).
    pub counts: Vec<StatRow>,
    /// The flow-wide counters per day of the range.
    pub days: Vec<DayRow>,
    /// Runs waiting now, per version and step (whatever the range: a gauge has no days).
    pub waiting: Vec<StatRow>,
    /// Every version of the flow the database has (oldest first), whatever the range and
    /// version asked for: what a version selector offers.
    pub versions: Vec<VersionInfo>,
}

/// A flow version as a selector shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    /// When the version was first loaded.
    pub created_at: Time,
    /// Its runs waiting now.
    pub waiting: u64,
}

/// The counters of one version (or all, summed) shaped for answers: per step, per metric.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTable {
    /// Flow-wide counters.
    pub flow: BTreeMap<String, u64>,
    /// Per step id: metric -> count, `waiting` included.
    pub steps: BTreeMap<String, BTreeMap<String, u64>>,
}

impl FlowStats {
    /// Sum the rows of `version` (every version when `None`) per step and metric.
    pub fn table(&self, version: Option<&str>) -> StepTable {
        let mut t = StepTable::default();
        for r in self.counts.iter().chain(&self.waiting) {
            if version.is_some_and(|v| v != r.version) {
                continue;
            }
            let slot = if r.step == FLOW {
                &mut t.flow
            } else {
                t.steps.entry(r.step.clone()).or_default()
            };
            *slot.entry(r.metric.clone()).or_default() += r.n;
        }
        t
    }
}

/// An edge of the flow's graph with the runs that took it over the range: `share` is the
/// part of the runs that arrived at `from` (`None` when none did).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeCount {
    pub from: String,
    pub to: String,
    pub n: u64,
    pub share: Option<f64>,
}

impl StepTable {
    /// A counter of a step (0 when never counted).
    pub fn get(&self, step: &str, metric: &str) -> u64 {
        self.steps
            .get(step)
            .and_then(|m| m.get(metric))
            .copied()
            .unwrap_or(0)
    }

    /// Every edge of `flow`'s graph with its count (one per pair of steps, however many
    /// labels join them).
    pub fn edges(&self, flow: &crate::flow::CompiledFlow) -> Vec<EdgeCount> {
        use petgraph::visit::EdgeRef;
        let mut out: Vec<EdgeCount> = Vec::new();
        for e in flow.graph.edge_references() {
            let (from, to) = (&flow.graph[e.source()].id, &flow.graph[e.target()].id);
            if out.iter().any(|x| x.from == *from && x.to == *to) {
                continue;
            }
            let n = self.get(from, &qualified("to", to));
            let arrived = self.get(from, metric::ENTERED);
            out.push(EdgeCount {
                from: from.clone(),
                to: to.clone(),
                n,
                share: (arrived > 0).then(|| n as f64 / arrived as f64),
            });
        }
        out
    }

    /// Each `split` step's arms: runs sent down each, their conversions, and the lift of
    /// each arm against the split's `control` arm when it has one.
    pub fn splits(&self, flow: &crate::flow::CompiledFlow) -> Vec<SplitStats> {
        use crate::flow::{SplitArm, StepKind};
        let mut out = Vec::new();
        for (_, step) in flow.steps() {
            let StepKind::Split { arms } = &step.kind else {
                continue;
            };
            let name = |arm: &SplitArm| match arm {
                SplitArm::Step(i) => flow.graph[*i].id.clone(),
                SplitArm::Control => "control".to_owned(),
            };
            let figures = |arm: &str| {
                (
                    self.get(&step.id, &qualified("to", arm)),
                    self.get(&step.id, &qualified(metric::CONVERTED, arm)),
                )
            };
            let control = arms
                .iter()
                .any(|(a, _)| *a == SplitArm::Control)
                .then(|| figures("control"));
            let arms = arms
                .iter()
                .map(|(arm, share)| {
                    let arm = name(arm);
                    let (entered, converted) = figures(&arm);
                    ArmStats {
                        lift: match control {
                            Some(c) if arm != "control" => lift((entered, converted), c),
                            _ => None,
                        },
                        share: *share,
                        arm,
                        entered,
                        converted,
                    }
                })
                .collect();
            out.push(SplitStats {
                step: step.id.clone(),
                arms,
            });
        }
        out
    }
}

/// One split step's arms (see [`StepTable::splits`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    pub step: String,
    pub arms: Vec<ArmStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmStats {
    /// The arm's next step id, or `control`.
    pub arm: String,
    /// The share of customers the flow gives it, in percent.
    pub share: f64,
    pub entered: u64,
    pub converted: u64,
    /// Against the split's control arm; `None` for the control itself, without a control,
    /// or while either arm is empty.
    pub lift: Option<Lift>,
}

/// A split arm's conversion against the control arm of the same split: the difference of
/// rates, with a 95% confidence interval (Wald interval of a difference of proportions),
/// and the relative lift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lift {
    /// Customers the arm took / converted among them.
    pub entered: u64,
    pub converted: u64,
    pub rate: f64,
    /// Rate minus the control's rate (absolute, e.g. 0.031 = 3.1 points).
    pub difference: f64,
    /// 95% interval of `difference`.
    pub low: f64,
    pub high: f64,
    /// `difference / control rate`; `None` when the control never converted.
    pub relative: Option<f64>,
}

/// Conversion of an arm (`entered`, `converted`) against its control; `None` when either
/// has nobody in it.
pub fn lift(arm: (u64, u64), control: (u64, u64)) -> Option<Lift> {
    let (n1, c1) = arm;
    let (n0, c0) = control;
    if n1 == 0 || n0 == 0 {
        return None;
    }
    let p1 = c1.min(n1) as f64 / n1 as f64;
    let p0 = c0.min(n0) as f64 / n0 as f64;
    let difference = p1 - p0;
    let se = (p1 * (1.0 - p1) / n1 as f64 + p0 * (1.0 - p0) / n0 as f64).sqrt();
    // 1.959964: the 97.5th percentile of the standard normal.
    let half = 1.959_964 * se;
    Some(Lift {
        entered: n1,
        converted: c1,
        rate: p1,
        difference,
        low: difference - half,
        high: difference + half,
        relative: (p0 > 0.0).then(|| difference / p0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(step: &str, metric: &str, n: i64) -> Count {
        Count {
            flow: "f".into(),
            version: "v".into(),
            step: step.into(),
            metric: metric.into(),
            day: Some(1),
            n,
        }
    }

    #[test]
    fn merge_sums_per_counter_in_key_order_and_drops_zeros() {
        let merged = merge(vec![
            c("b", "entered", 1),
            c("a", "entered", 1),
            c("b", "entered", 2),
            Count::waiting("f", "v", "a", 1),
            Count::waiting("f", "v", "a", -1),
        ]);
        assert_eq!(merged, vec![c("a", "entered", 1), c("b", "entered", 3)]);
    }

    #[test]
    fn days_are_local_dates() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-03-01T17:00:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        let utc = day_of(at, chrono_tz::UTC);
        let shanghai = day_of(at, chrono_tz::Asia::Shanghai);
        assert_eq!(shanghai, utc + 1, "01:00 on 2 March in Shanghai");
        assert_eq!(
            date_of(utc),
            NaiveDate::from_ymd_opt(2026, 3, 1),
            "day numbers round-trip"
        );
        assert_eq!(
            day_number(NaiveDate::from_ymd_opt(1970, 1, 1).expect("d")),
            0
        );
    }

    #[test]
    fn lift_has_a_95_percent_interval() {
        // 12% of 1000 against 10% of 1000: +2 points, interval about ±2.8 points.
        let l = lift((1000, 120), (1000, 100)).expect("lift");
        assert!((l.difference - 0.02).abs() < 1e-9);
        assert!((l.high - l.low - 2.0 * 1.959_964 * 0.013_986).abs() < 1e-5);
        assert!(l.low < 0.0 && l.high > 0.0, "not significant at this size");
        assert!((l.relative.expect("rel") - 0.2).abs() < 1e-9);
        assert_eq!(lift((0, 0), (10, 1)), None);
        assert_eq!(lift((10, 1), (10, 0)).and_then(|l| l.relative), None);
    }

    #[test]
    fn table_sums_versions_and_separates_flow_counters() {
        let s = FlowStats {
            counts: vec![
                StatRow {
                    version: "v1".into(),
                    step: "a".into(),
                    metric: "entered".into(),
                    n: 2,
                },
                StatRow {
                    version: "v2".into(),
                    step: "a".into(),
                    metric: "entered".into(),
                    n: 3,
                },
                StatRow {
                    version: "v2".into(),
                    step: FLOW.into(),
                    metric: "entered".into(),
                    n: 3,
                },
            ],
            waiting: vec![StatRow {
                version: "v2".into(),
                step: "a".into(),
                metric: "waiting".into(),
                n: 1,
            }],
            ..FlowStats::default()
        };
        let all = s.table(None);
        assert_eq!(all.steps["a"]["entered"], 5);
        assert_eq!(all.flow["entered"], 3);
        let v1 = s.table(Some("v1"));
        assert_eq!(v1.steps["a"].get("waiting"), None);
        assert_eq!(v1.flow.get("entered"), None);
    }
}
