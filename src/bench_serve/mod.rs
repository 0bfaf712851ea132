//! `canvas bench serve`: the daemon measured from outside. Every figure comes from real
//! `canvas serve` processes (this binary, started as a child), real HTTP on loopback, a real
//! database (a fresh SQLite file, or a fresh Postgres database created and dropped), and a
//! webhook receiver in this process that answers the daemon's deliveries and counts their
//! idempotency keys.
//!
//! Scenarios:
//! - `ingest`: `POST /v1/events` in batches from concurrent clients, as fast as the daemon
//!   answers; events/s accepted and request latency.
//! - `latency`: a steady rate of events, each stamped with the instant it was sent; the time
//!   from the event to its outbox row being committed (seen by polling the outbox by key
//!   every 5 ms), to the row's `created_at`, and to its delivery at the receiver.
//! - `deliver`: a burst of events, then outbox rows delivered per second at the receiver.
//! - `scale` (Postgres): the same with a slow receiver, one daemon and then several on one
//!   database; messages/s of each and their ratio; every event's message delivered exactly
//!   once (one outbox row per event, no key twice, none missing).
//! - `sustained`: clients post back to back while a timer flow keeps timers due and the
//!   load's flow is paused midway; due-timer lag, entries after the pause, inbox rows
//!   applied before they were received.
//! - `rate-limit`: a rate-limited channel with more messages than it can send within its
//!   outbox lease; keys received twice, and the age of each signature on arrival.
//! - `recovery`: the daemon SIGKILLed and restarted while it delivers; seconds from the last
//!   kill until every message has arrived.
//!
//! Customers get a phone number first (Segment `identify` through the daemon's own API, not
//! timed) so the flow's `send: sms` produces a message (sustained's flow sets one itself);
//! the `sms` channel is a webhook to the receiver.

mod daemon;
mod db;
mod deliver;
mod ingest;
mod latency;
mod load;
pub mod pages;
mod rate_limit;
mod receiver;
mod recovery;
mod report;
mod scale;
mod setup;
mod sustained;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Value as Json, json};

use report::{machine, number};

/// The write token the daemons are started with.
const TOKEN: &str = "canvas-bench-token";
/// The Segment write key (profiles are loaded through `/v1/batch`).
const WRITE_KEY: &str = "canvas-bench-write-key";
const EVENT: &str = "bench_event";
/// Profiles per Segment batch (the daemon's default `max_batch`).
const PROFILE_BATCH: usize = 1000;
/// Give up when the receiver sees no new delivery for this long.
const STALL: Duration = Duration::from_secs(60);

const FLOW: &str = "flow: bench-send
name: Bench send
description: The daemon benchmark journey - one event, one SMS, exit.
timezone: UTC
trigger:
  event: bench_event
steps:
  - id: hello
    send: sms
    template: bench/hello
  - id: done
    exit: sent
";

const TEMPLATE: &str = "Hi {{ customer.first_name | default(\"there\") }}, welcome to the club.\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Ingest,
    Latency,
    Deliver,
    Scale,
    Sustained,
    RateLimit,
    Recovery,
    All,
}

/// `canvas bench serve` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which measurement; `all` runs ingest, latency, deliver and scale in order and prints
    /// a summary (sustained, rate-limit and recovery run only when named).
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// `sqlite://PATH` (default: a fresh file in the temp folder) or `postgres://…` (a fresh
    /// database `canvas_bench_<pid>_<scenario>` is created there and dropped after). `scale`
    /// needs Postgres: without a `postgres://` URL here it uses CANVAS_TEST_POSTGRES_URL or
    /// postgres://postgres@127.0.0.1:5432/test.
    #[arg(long)]
    pub database: Option<String>,
    /// Events (one customer each). Default: 200,000 for ingest, 100,000 for deliver, 20,000
    /// for scale, 150 for rate-limit, 60,000 for recovery (latency sends --rate × --seconds;
    /// sustained posts for --seconds).
    #[arg(long)]
    pub events: Option<usize>,
    /// Events per request (ingest, deliver, scale, sustained, rate-limit, recovery).
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Concurrent HTTP clients (ingest, deliver, scale, sustained).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Events per second (latency).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to send at --rate (latency), or to post back to back (sustained).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The `sms` channel's `concurrency` (ingest, latency, deliver, sustained, rate-limit,
    /// recovery).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long the receiver takes to answer (scale, recovery).
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// The `sms` channel's `concurrency` in each daemon (scale).
    #[arg(long, default_value_t = 32)]
    pub scale_concurrency: usize,
    /// How many daemons share the database in the second scale measurement.
    #[arg(long, default_value_t = 3)]
    pub daemons: usize,
    /// Daemons sharing the database (sustained; more than one needs Postgres).
    #[arg(long, default_value_t = 1)]
    pub sustained_daemons: usize,
    /// The `sms` channel's `rate_limit`, messages per second (rate-limit).
    #[arg(long, default_value_t = 5.0)]
    pub rate_limit: f64,
    /// `server.leases.outbox` (rate-limit): shorter than the time the channel needs for
    /// --events at --rate-limit, so claimed rows outlive their lease.
    #[arg(long, default_value = "10s")]
    pub outbox_lease: String,
    /// SIGKILLs of the daemon while it delivers (recovery).
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Time between one restart and the next kill (recovery).
    #[arg(long, default_value_t = 1000)]
    pub kill_every_ms: u64,
    /// Print the results as JSON on standard output instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        tokio::select! {
            r = bench(args) => r,
            // Return (rather than die) so every guard stops its daemons and drops its data.
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The whole run

#[derive(Debug, Serialize)]
struct Outcome {
    scenario: &'static str,
    backend: String,
    /// What the target is about, e.g. `events/s accepted`.
    measure: &'static str,
    value: f64,
    target: String,
    met: bool,
    /// Why a figure that reaches its target still counts as missed, for the summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    caveat: Option<String>,
    /// Human-readable lines (also in the text output).
    report: Vec<String>,
    figures: Json,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Ingest => "ingest",
            Scenario::Latency => "latency",
            Scenario::Deliver => "deliver",
            Scenario::Scale => "scale",
            Scenario::Sustained => "sustained",
            Scenario::RateLimit => "rate-limit",
            Scenario::Recovery => "recovery",
            Scenario::All => "all",
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<ExitCode> {
    if args.events == Some(0) {
        bail!("--events must be at least 1");
    }
    if !(1..=crate::serve::config::DEFAULT_MAX_BATCH).contains(&args.batch) {
        bail!(
            "--batch must be between 1 and {} (the daemon's default server.limits.max_batch)",
            crate::serve::config::DEFAULT_MAX_BATCH
        );
    }
    let exe = std::env::current_exe().context("locating the canvas binary")?;
    let machine = machine();
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Ingest,
            Scenario::Latency,
            Scenario::Deliver,
            Scenario::Scale,
        ],
        s => vec![s],
    };
    if !args.json {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "canvas bench serve: {} cores ({}), {} MB; daemons are this binary, driven over HTTP on loopback",
            machine.cores, machine.cpu, machine.memory_mb
        )?;
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let ctx = Ctx {
        exe,
        client,
        args: &args,
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failures: Vec<(Scenario, String)> = Vec::new();
    for scenario in scenarios {
        let result = match scenario {
            Scenario::Ingest => ingest::ingest(&ctx).await,
            Scenario::Latency => latency::latency(&ctx).await,
            Scenario::Deliver => deliver::deliver(&ctx).await,
            Scenario::Scale => scale::scale(&ctx).await,
            Scenario::Sustained => sustained::sustained(&ctx).await,
            Scenario::RateLimit => rate_limit::rate_limit(&ctx).await,
            Scenario::Recovery => recovery::recovery(&ctx).await,
            Scenario::All => continue,
        };
        match result {
            Ok(o) => {
                if !args.json {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "\n{} ({}):", o.scenario, o.backend)?;
                    for line in &o.report {
                        writeln!(out, "  {line}")?;
                    }
                }
                outcomes.push(o);
            }
            Err(e) => {
                let text = format!("{e:#}");
                let mut err = std::io::stderr().lock();
                writeln!(err, "bench serve {}: {text}", scenario.name())?;
                failures.push((scenario, text));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = json!({
            "machine": machine,
            "results": outcomes,
            "failed": failures.iter().map(|(s, e)| json!({"scenario": s.name(), "error": e})).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else if outcomes.len() + failures.len() > 1 {
        writeln!(out, "\nsummary:")?;
        writeln!(
            out,
            "  {:<10} {:<9} {:>14}  {:<32} {:<15} result",
            "scenario", "backend", "figure", "", "target"
        )?;
        for o in &outcomes {
            writeln!(
                out,
                "  {:<10} {:<9} {:>14}  {:<32} {:<15} {}",
                o.scenario,
                o.backend,
                number(o.value, if o.value < 100.0 { 2 } else { 0 }),
                o.measure,
                o.target,
                match (&o.caveat, o.met) {
                    (Some(c), _) => format!("MISSED: {c}"),
                    (None, true) => "met".to_owned(),
                    (None, false) => "MISSED".to_owned(),
                }
            )?;
        }
        for (s, e) in &failures {
            writeln!(out, "  {:<10} failed: {e}", s.name())?;
        }
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct Ctx<'a> {
    exe: PathBuf,
    client: reqwest::Client,
    args: &'a Args,
}
