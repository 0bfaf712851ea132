//! `GET /metrics`: the daemon's Prometheus metrics. Counters are bumped where things happen;
//! gauges that describe the database (outbox depth, timer lag) are read when scraped, so
//! every daemon sharing a database reports the same figures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `api` (`/v1/events`, `/v1/customers`) or `segment` (`/v1/batch`, `/v1/track`, …).
    pub source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SendLabels {
    pub channel: String,
    /// `sent`, `retry`, `dead`.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `pending`, `due`, `dead`.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `inbox`, `timers`, `schedule`.
    pub phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub flow: String,
    /// A step id, or `trigger`, `audience`, `segment`, `goal`, `exit`.
    pub step: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub flow: String,
    /// A step id, or empty for the flow as a whole.
    pub step: String,
    /// The counter's name (`entered`, `sent:sms`, `skipped:cap`, `ended:completed`, …; see
    /// docs/runtime.md "Outcome counters"). Edges (`to:STEP`) are left out.
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitingLabels {
    pub flow: String,
    pub step: String,
}

pub struct Metrics {
    registry: Registry,
    pub events_in: Family<SourceLabel, Counter>,
    pub profiles_in: Family<SourceLabel, Counter>,
    pub inbox_accepted: Family<SourceLabel, Counter>,
    pub inbox_duplicates: Family<SourceLabel, Counter>,
    pub transitions: Counter,
    pub runs_started: Counter,
    pub sends: Family<SendLabels, Counter>,
    pub commit_seconds: Family<PhaseLabel, Histogram>,
    pub timer_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub outbox_depth: Family<StatusLabel, Gauge>,
    pub outbox_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub failures: Family<FailureLabels, Gauge>,
    pub step_outcomes: Family<StepLabels, Counter>,
    pub step_waiting: Family<WaitingLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("canvas");
        let events_in = Family::<SourceLabel, Counter>::default();
        registry.register(
            "events_received",
            "Events received in valid requests (duplicates included)",
            events_in.clone(),
        );
        let profiles_in = Family::<SourceLabel, Counter>::default();
        registry.register(
            "profile_updates_received",
            "Profile updates received in valid requests (duplicates included)",
            profiles_in.clone(),
        );
        let inbox_accepted = Family::<SourceLabel, Counter>::default();
        registry.register(
            "inbox_accepted",
            "Events and profile updates committed to the inbox",
            inbox_accepted.clone(),
        );
        let inbox_duplicates = Family::<SourceLabel, Counter>::default();
        registry.register(
            "inbox_duplicates",
            "Events and profile updates dropped because their id was already in the inbox",
            inbox_duplicates.clone(),
        );
        let transitions = Counter::default();
        registry.register(
            "transitions",
            "Steps executed and checkpointed",
            transitions.clone(),
        );
        let runs_started = Counter::default();
        registry.register("runs_started", "Runs started", runs_started.clone());
        let sends = Family::<SendLabels, Counter>::default();
        registry.register(
            "sends",
            "Delivery attempts by channel and result",
            sends.clone(),
        );
        let commit_seconds = Family::<PhaseLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "batch_commit_seconds",
            "Time to load, execute and commit one round of customers",
            commit_seconds.clone(),
        );
        let timer_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "due_timer_lag_seconds",
            "How long the earliest due timer has been waiting to fire (0 when none is due)",
            timer_lag_seconds.clone(),
        );
        let outbox_depth = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "outbox_depth",
            "Outbox rows by dispatch status (pending, due, dead)",
            outbox_depth.clone(),
        );
        let outbox_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_lag_seconds",
            "How long the oldest due outbox row has been waiting (0 when none is due)",
            outbox_lag_seconds.clone(),
        );
        let failures = Family::<FailureLabels, Gauge>::default();
        registry.register(
            "run_failures",
            "Run-time failures recorded in the database per flow step, by every daemon: \
             expressions that could not be evaluated (nobody entered, a rule did not apply) \
             and steps that ended a run with an error. Only grows",
            failures.clone(),
        );
        let step_outcomes = Family::<StepLabels, Counter>::default();
        registry.register(
            "step_outcomes",
            "Outcome counters this daemon committed, per flow, step and outcome (sum over \
             daemons; the database's totals are in GET /v1/flows/{id}/stats)",
            step_outcomes.clone(),
        );
        let step_waiting = Family::<WaitingLabels, Gauge>::default();
        registry.register(
            "step_waiting",
            "Runs waiting at each step of each loaded flow now, from the database (the same \
             on every daemon)",
            step_waiting.clone(),
        );
        Metrics {
            registry,
            events_in,
            profiles_in,
            inbox_accepted,
            inbox_duplicates,
            transitions,
            runs_started,
            sends,
            commit_seconds,
            timer_lag_seconds,
            outbox_depth,
            outbox_lag_seconds,
            failures,
            step_outcomes,
            step_waiting,
        }
    }

    pub fn source(source: &str) -> SourceLabel {
        SourceLabel {
            source: source.to_owned(),
        }
    }

    pub fn phase(phase: &str) -> PhaseLabel {
        PhaseLabel {
            phase: phase.to_owned(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
