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
//!
//! Customers get a phone number first (Segment `identify` through the daemon's own API, not
//! timed) so the flow's `send: sms` produces a message; the `sms` channel is a webhook to
//! the receiver.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use canvas_engine::store::{Database, Store, redact};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value as Json, json};
use sqlx::Connection as _;

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
    All,
}

/// `canvas bench serve` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which measurement; `all` runs them in order and prints a summary.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// `sqlite://PATH` (default: a fresh file in the temp folder) or `postgres://…` (a fresh
    /// database `canvas_bench_<pid>_<scenario>` is created there and dropped after). `scale`
    /// needs Postgres: without a `postgres://` URL here it uses CANVAS_TEST_POSTGRES_URL or
    /// postgres://postgres@127.0.0.1:5432/test.
    #[arg(long)]
    pub database: Option<String>,
    /// Events (one customer each). Default: 200,000 for ingest, 100,000 for deliver, 20,000
    /// for scale (latency sends --rate × --seconds).
    #[arg(long)]
    pub events: Option<usize>,
    /// Events per request (ingest, deliver, scale).
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Concurrent HTTP clients (ingest, deliver, scale).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Events per second (latency).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to send at --rate (latency).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The `sms` channel's `concurrency` (ingest, latency, deliver).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long the receiver takes to answer (scale).
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// The `sms` channel's `concurrency` in each daemon (scale).
    #[arg(long, default_value_t = 32)]
    pub scale_concurrency: usize,
    /// How many daemons share the database in the second scale measurement.
    #[arg(long, default_value_t = 3)]
    pub daemons: usize,
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
            Scenario::Ingest => ingest(&ctx).await,
            Scenario::Latency => latency(&ctx).await,
            Scenario::Deliver => deliver(&ctx).await,
            Scenario::Scale => scale(&ctx).await,
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
            "  {:<9} {:<9} {:>14}  {:<28} {:<15} result",
            "scenario", "backend", "figure", "", "target"
        )?;
        for o in &outcomes {
            writeln!(
                out,
                "  {:<9} {:<9} {:>14}  {:<28} {:<15} {}",
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
            writeln!(out, "  {:<9} failed: {e}", s.name())?;
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

// ---------------------------------------------------------------------------------------------
// Scenarios

async fn ingest(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(200_000);
    let mut s = Setup::start(
        ctx,
        ctx.args.database.as_deref(),
        "ingest",
        ctx.args.concurrency,
        Duration::ZERO,
        1,
        n,
    )
    .await?;
    let bodies = event_bodies(n, ctx.args.batch, &[s.daemons[0].base.clone()]);
    let bar = progress(n as u64, "POST /v1/events");
    let cpu = CpuWindow::start(&s.daemons);
    let started_ms = chrono::Utc::now().timestamp_millis();
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    let cpu = cpu.finish(&s.daemons);
    bar.finish_and_clear();
    let rate = driven.accepted as f64 / driven.elapsed.as_secs_f64();
    if driven.accepted != n as u64 {
        bail!(
            "the daemon accepted {} of {n} events ({} duplicates)",
            driven.accepted,
            driven.duplicates
        );
    }
    // Not the target, but what it means: does the engine keep up, or is the inbox a queue?
    let drain = progress(n as u64, "engine + delivery");
    s.wait_delivered(n as u64, &drain).await?;
    drain.finish_and_clear();
    let all_delivered = s.recv.last_ms().unwrap_or(started_ms) - started_ms;
    let lat = Dist::of(driven.latencies_ms.clone());
    let notes = s.finish().await;
    let mut report = vec![
        format!(
            "{n} events (one customer each) in batches of {} from {} clients, {}",
            ctx.args.batch,
            ctx.args.clients,
            s_backend_label(&notes.backend)
        ),
        format!(
            "accepted (HTTP 200)  {} events/s  ({} s; {} requests, {} retried)",
            number(rate, 0),
            secs(driven.elapsed),
            driven.requests,
            driven.retries
        ),
        format!("request latency      {}", lat.text("ms")),
        format!(
            "end to end           all {n} delivered {} s after the first event: {} events/s through engine and dispatcher",
            secs_ms(all_delivered),
            number(n as f64 / (all_delivered.max(1) as f64 / 1000.0), 0)
        ),
        format!("CPU while posting    {}", cpu.text()),
    ];
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "ingest",
        backend: notes.backend.clone(),
        measure: "events/s accepted",
        value: rate,
        target: "≥ 20,000/s".into(),
        met: rate >= 20_000.0,
        caveat: None,
        report,
        figures: json!({
            "events": n, "batch": ctx.args.batch, "clients": ctx.args.clients,
            "seconds": driven.elapsed.as_secs_f64(), "events_per_second": rate,
            "request_latency_ms": lat, "retries": driven.retries,
            "all_delivered_after_ms": all_delivered, "cpu": cpu,
        }),
    })
}

async fn latency(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let rate = ctx.args.rate;
    if !rate.is_finite() || rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let n = (rate * ctx.args.seconds as f64).round() as usize;
    if n == 0 {
        bail!("--rate × --seconds is less than one event");
    }
    let mut s = Setup::start(
        ctx,
        ctx.args.database.as_deref(),
        "latency",
        ctx.args.concurrency,
        Duration::ZERO,
        1,
        n,
    )
    .await?;
    let url = format!("{}/v1/events", s.daemons[0].base);
    let bar = progress(n as u64, &format!("{rate:.0} events/s"));
    let cpu = CpuWindow::start(&s.daemons);
    // Small batches on a 10 ms timer: at each tick, every event whose moment has come.
    let tick = Duration::from_millis(10);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut occurred = vec![0i64; n];
    let mut requests = tokio::task::JoinSet::new();
    // Watch the outbox for each event's row to be committed, by key, every 5 ms.
    let posted = Arc::new(AtomicUsize::new(0));
    let watcher = tokio::spawn(watch_outbox(
        Peek::connect(&s.db.url).await?,
        posted.clone(),
        n,
    ));
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < n {
        interval.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(n);
        if due <= sent {
            continue;
        }
        let now = chrono::Utc::now();
        let stamp = now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let now_ms = now.timestamp_millis();
        let mut from = sent;
        while from < due {
            let to = (from + 1000).min(due);
            occurred[from..to].iter_mut().for_each(|o| *o = now_ms);
            let body = Bytes::from(events_json(from..to, Some(&stamp)));
            let client = ctx.client.clone();
            let url = url.clone();
            requests.spawn(async move { post(&client, &url, Auth::Bearer, body).await });
            from = to;
        }
        bar.set_position(due as u64);
        sent = due;
        posted.store(sent, Ordering::Release);
    }
    let send_secs = start.elapsed().as_secs_f64();
    let mut http = Vec::new();
    let mut retries = 0;
    while let Some(r) = requests.join_next().await {
        let r = r.context("a request task")??;
        http.push(r.latency_ms);
        retries += r.retries;
    }
    bar.finish_and_clear();
    let drain = progress(n as u64, "delivering");
    s.wait_delivered(n as u64, &drain).await?;
    drain.finish_and_clear();
    let cpu = cpu.finish(&s.daemons);
    let visible = watcher.await.context("the outbox watcher")??;
    let rows = s.store.outbox(None).await?;
    if rows.len() != n {
        bail!("{} outbox rows for {n} events", rows.len());
    }
    let committed = Dist::of(
        visible
            .iter()
            .zip(&occurred)
            .map(|(v, o)| (v - o) as f64)
            .collect(),
    );
    let seen = s.recv.first_seen();
    let mut to_outbox = Vec::with_capacity(n);
    let mut to_delivery = Vec::with_capacity(n);
    let mut before = 0usize;
    for row in &rows {
        let i = customer_index(&row.customer_id)?;
        let sent_ms = occurred[i];
        let created = row.created_at.timestamp_millis() - sent_ms;
        if created < 0 {
            before += 1;
        }
        to_outbox.push(created as f64);
        if let Some(at) = seen.get(&row.key) {
            to_delivery.push((at - sent_ms) as f64);
        }
    }
    let outbox = Dist::of(to_outbox);
    let delivered = Dist::of(to_delivery);
    let http = Dist::of(http);
    let notes = s.finish().await;
    let p99 = committed.p99;
    let mut report = vec![
        format!(
            "{n} events at {rate:.0}/s for {} s ({} s to send), batches of ≤ 1,000 every 10 ms, {}",
            ctx.args.seconds,
            number(send_secs, 1),
            s_backend_label(&notes.backend)
        ),
        format!(
            "event → outbox row committed (seen by polling) {}",
            committed.text("ms")
        ),
        format!(
            "event → outbox row (created_at − occurred_at)  {}",
            outbox.text("ms")
        ),
        format!(
            "event → delivered at the receiver              {}",
            delivered.text("ms")
        ),
        format!(
            "request latency                                {}",
            http.text("ms")
        ),
        format!("CPU over the run     {}", cpu.text()),
    ];
    if before > 0 {
        report.push(format!(
            "note: {before} outbox rows have created_at before their event's occurred_at: created_at is the instant the engine pass began, not the commit; the committed figure is the one judged"
        ));
    }
    if retries > 0 {
        report.push(format!("{retries} requests retried"));
    }
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "latency",
        backend: notes.backend.clone(),
        measure: "ms p99 event → outbox row",
        value: p99,
        target: "p99 ≤ 50 ms".into(),
        met: p99 <= 50.0,
        caveat: None,
        report,
        figures: json!({
            "events": n, "rate": rate, "seconds": ctx.args.seconds,
            "event_to_outbox_committed_ms": committed, "poll_interval_ms": POLL.as_millis() as u64,
            "event_to_outbox_created_at_ms": outbox, "event_to_delivered_ms": delivered,
            "request_latency_ms": http, "outbox_before_event": before, "cpu": cpu,
        }),
    })
}

async fn deliver(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(100_000);
    let mut s = Setup::start(
        ctx,
        ctx.args.database.as_deref(),
        "deliver",
        ctx.args.concurrency,
        Duration::ZERO,
        1,
        n,
    )
    .await?;
    let d = measure_delivery(ctx, &mut s, n).await?;
    let notes = s.finish().await;
    let mut report = vec![format!(
        "{n} events posted at once ({} s), `sms` concurrency {}, receiver answers at once, {}",
        number(d.post_secs, 2),
        ctx.args.concurrency,
        s_backend_label(&notes.backend)
    )];
    report.extend(d.lines());
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "deliver",
        backend: notes.backend.clone(),
        measure: "messages/s delivered",
        value: d.rate,
        target: "≥ 5,000/s".into(),
        met: d.rate >= 5_000.0 && d.clean(),
        caveat: (!d.clean()).then(|| d.problem()),
        report,
        figures: d.json(),
    })
}

async fn scale(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(20_000);
    let url = match ctx.args.database.as_deref() {
        Some(u) if is_postgres(u) => u.to_owned(),
        _ => std::env::var("CANVAS_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
    };
    let delay = Duration::from_millis(ctx.args.delay_ms);
    let k = ctx.args.daemons.max(2);
    let mut results = Vec::new();
    for daemons in [1, k] {
        let mut s = Setup::start(
            ctx,
            Some(&url),
            &format!("scale{daemons}"),
            ctx.args.scale_concurrency,
            delay,
            daemons,
            n,
        )
        .await?;
        let d = measure_delivery(ctx, &mut s, n).await?;
        let notes = s.finish().await;
        results.push((daemons, d, notes));
    }
    let (one, many) = (&results[0], &results[1]);
    let ratio = many.1.rate / one.1.rate;
    let clean = results.iter().all(|(_, d, _)| d.clean());
    let ceiling = ctx.args.scale_concurrency as f64 * 1000.0 / ctx.args.delay_ms.max(1) as f64;
    let mut report = vec![format!(
        "{n} events, receiver answers after {} ms, `sms` concurrency {} per daemon (ceiling {} messages/s per daemon), {}",
        ctx.args.delay_ms,
        ctx.args.scale_concurrency,
        number(ceiling, 0),
        s_backend_label(&one.2.backend)
    )];
    for (daemons, d, notes) in &results {
        report.push(format!(
            "{daemons} daemon{}:",
            if *daemons == 1 { "" } else { "s" }
        ));
        report.extend(d.lines().into_iter().map(|l| format!("  {l}")));
        report.extend(notes.lines.iter().map(|l| format!("  {l}")));
    }
    report.push(format!(
        "ratio {k} daemons / 1: {}× ({} / {} messages/s); every event's message delivered exactly once: {}",
        number(ratio, 2),
        number(many.1.rate, 0),
        number(one.1.rate, 0),
        if clean { "yes" } else { "NO" }
    ));
    Ok(Outcome {
        scenario: "scale",
        backend: one.2.backend.clone(),
        measure: "× messages/s, N daemons vs 1",
        value: ratio,
        target: "≥ 2.5×".into(),
        met: ratio >= 2.5 && clean,
        caveat: results
            .iter()
            .find(|(_, d, _)| !d.clean())
            .map(|(daemons, d, _)| format!("{daemons} daemons: {}", d.problem())),
        report,
        figures: json!({
            "events": n, "delay_ms": ctx.args.delay_ms, "concurrency_per_daemon": ctx.args.scale_concurrency,
            "one": one.1.json(), "many": many.1.json(), "daemons": k, "ratio": ratio,
            "every_key_once": clean,
        }),
    })
}

/// Deliveries of a burst of `n` events: the rate at the receiver and the checks.
struct Delivery {
    post_secs: f64,
    posted_per_second: f64,
    rate: f64,
    window_secs: f64,
    requests: u64,
    duplicates: usize,
    missing: usize,
    unexpected: usize,
    /// Customers with more than one outbox row: their one event was applied twice.
    twice: usize,
    extra_rows: usize,
    first_delivery_secs: f64,
    latency: Dist,
    cpu: CpuUse,
    daemons: usize,
}

impl Delivery {
    /// Every message delivered, once, and one per event.
    fn clean(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.unexpected == 0 && self.twice == 0
    }

    /// What is wrong when not [`Delivery::clean`], in a few words.
    fn problem(&self) -> String {
        let mut p = Vec::new();
        if self.twice > 0 {
            p.push(format!(
                "{} events applied twice",
                number(self.twice as f64, 0)
            ));
        }
        if self.duplicates > 0 {
            p.push(format!("{} keys received twice", self.duplicates));
        }
        if self.missing > 0 {
            p.push(format!("{} keys never received", self.missing));
        }
        if self.unexpected > 0 {
            p.push(format!("{} unknown keys", self.unexpected));
        }
        p.join(", ")
    }

    fn lines(&self) -> Vec<String> {
        vec![
            format!(
                "delivered            {} messages/s at the receiver (first to last delivery: {} s)",
                number(self.rate, 0),
                number(self.window_secs, 2)
            ),
            format!(
                "posted               in {} s ({} events/s); the first delivery came {} s after the first POST",
                number(self.post_secs, 2),
                number(self.posted_per_second, 0),
                number(self.first_delivery_secs, 2)
            ),
            format!("event → delivered    {}", self.latency.text("ms")),
            format!(
                "receiver             {} requests, {} keys twice or more, {} outbox keys never received, {} unknown keys",
                self.requests, self.duplicates, self.missing, self.unexpected
            ),
            if self.twice == 0 {
                "engine               one outbox row per event, as the flow says".to_owned()
            } else {
                format!(
                    "ENGINE               {} customers' one event was applied twice: {} extra runs, {} extra messages delivered",
                    number(self.twice as f64, 0),
                    number(self.extra_rows as f64, 0),
                    number(self.extra_rows as f64, 0)
                )
            },
            format!("CPU over the window  {}", self.cpu.text()),
        ]
    }

    fn json(&self) -> Json {
        json!({
            "daemons": self.daemons,
            "messages_per_second": self.rate, "window_seconds": self.window_secs,
            "post_seconds": self.post_secs, "first_delivery_after_seconds": self.first_delivery_secs,
            "event_to_delivered_ms": self.latency, "requests": self.requests,
            "duplicates": self.duplicates, "missing": self.missing, "unexpected": self.unexpected,
            "customers_with_two_runs": self.twice, "extra_outbox_rows": self.extra_rows,
            "cpu": self.cpu,
        })
    }
}

async fn measure_delivery(ctx: &Ctx<'_>, s: &mut Setup, n: usize) -> anyhow::Result<Delivery> {
    let bases: Vec<String> = s.daemons.iter().map(|d| d.base.clone()).collect();
    let bodies = event_bodies(n, ctx.args.batch, &bases);
    let bar = progress(n as u64, "POST /v1/events");
    let cpu = CpuWindow::start(&s.daemons);
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    bar.finish_and_clear();
    if driven.accepted != n as u64 {
        bail!("the daemons accepted {} of {n} events", driven.accepted);
    }
    let done = progress(n as u64, "delivered");
    s.wait_delivered(n as u64, &done).await?;
    // Every event applied, then every outbox row delivered: an event applied twice makes a
    // second run, with a key of its own, that must be counted too.
    // A round that read its items before another daemon applied them may still be
    // committing when the inbox is empty: wait for the outbox to stay the same for a second.
    let mut last = (u64::MAX, Instant::now());
    let rows = loop {
        let counts = s.store.counts().await?;
        if counts.inbox_pending > 0 || counts.outbox != last.0 {
            last = (counts.outbox, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            break s.store.outbox(None).await?;
        }
        s.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    done.set_length(rows.len() as u64);
    s.wait_delivered(rows.len() as u64, &done).await?;
    done.finish_and_clear();
    let cpu = cpu.finish(&s.daemons);
    let mut per_customer: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per_customer.entry(r.customer_id.as_str()).or_default() += 1;
    }
    let twice = per_customer.values().filter(|c| **c > 1).count();
    if per_customer.len() != n {
        bail!(
            "{} of {n} customers got an outbox row ({} rows)",
            per_customer.len(),
            rows.len()
        );
    }
    let (first, last) = s
        .recv
        .window()
        .ok_or_else(|| anyhow!("nothing was delivered"))?;
    let window = last.duration_since(first).as_secs_f64();
    let seen = s.recv.seen();
    let mut missing = 0;
    let mut latency = Vec::with_capacity(n);
    for row in &rows {
        match seen.get(&row.key) {
            Some(&(_, at)) => {
                let i = customer_index(&row.customer_id)?;
                let batch = i / ctx.args.batch.max(1);
                latency.push((at - driven.answered_ms[batch]) as f64);
            }
            None => missing += 1,
        }
    }
    let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let unexpected = seen.keys().filter(|k| !keys.contains(k.as_str())).count();
    let duplicates = seen.values().filter(|(c, _)| *c > 1).count();
    Ok(Delivery {
        post_secs: driven.elapsed.as_secs_f64(),
        posted_per_second: n as f64 / driven.elapsed.as_secs_f64(),
        rate: if window > 0.0 {
            s.recv.unique() as f64 / window
        } else {
            0.0
        },
        window_secs: window,
        requests: s.recv.requests(),
        duplicates,
        missing,
        unexpected,
        twice,
        extra_rows: rows.len() - n,
        first_delivery_secs: first
            .saturating_duration_since(driven.started)
            .as_secs_f64(),
        latency: Dist::of(latency),
        cpu,
        daemons: s.daemons.len(),
    })
}

/// How often the latency scenario looks for new outbox rows.
const POLL: Duration = Duration::from_millis(5);

/// A read-only connection for [`watch_outbox`].
enum Peek {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Peek {
    async fn connect(url: &str) -> anyhow::Result<Peek> {
        use std::str::FromStr as _;
        Ok(if is_postgres(url) {
            Peek::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await?,
            )
        } else {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.read_only(true);
            Peek::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?,
            )
        })
    }

    /// Keys in `[from, to)`: the primary-key index, a handful of rows per call.
    async fn keys(&self, from: &str, to: &str) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Peek::Postgres(p) => {
                sqlx::query_scalar("SELECT key FROM outbox WHERE key >= $1 AND key < $2")
                    .bind(from)
                    .bind(to)
                    .fetch_all(p)
                    .await?
            }
            Peek::Sqlite(p) => {
                sqlx::query_scalar("SELECT key FROM outbox WHERE key >= ? AND key < ?")
                    .bind(from)
                    .bind(to)
                    .fetch_all(p)
                    .await?
            }
        })
    }
}

/// When each customer's outbox row became visible (committed), in Unix ms: every `POLL`,
/// the keys of the customers posted so far and not yet seen. A row first returned by the
/// query that started at `t` was committed before `t` and after the previous query
/// started, so these are upper bounds, each within one poll interval.
async fn watch_outbox(peek: Peek, posted: Arc<AtomicUsize>, n: usize) -> anyhow::Result<Vec<i64>> {
    let key = |i: usize| format!("bench-send/c{i:08}/");
    let mut visible = vec![0i64; n];
    let mut frontier = 0usize;
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress_at = Instant::now();
    while frontier < n {
        interval.tick().await;
        let upto = posted.load(Ordering::Acquire).min(n);
        if upto <= frontier {
            continue;
        }
        let t = chrono::Utc::now().timestamp_millis();
        for k in peek.keys(&key(frontier), &key(upto)).await? {
            let i = k
                .strip_prefix("bench-send/c")
                .and_then(|r| r.split('/').next())
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| anyhow!("unexpected outbox key `{k}`"))?;
            if i < n && visible[i] == 0 {
                visible[i] = t;
            }
        }
        let before = frontier;
        while frontier < n && visible[frontier] != 0 {
            frontier += 1;
        }
        if frontier != before {
            progress_at = Instant::now();
        } else if progress_at.elapsed() > STALL {
            bail!(
                "no new outbox row for {} s (at {frontier} of {n})",
                STALL.as_secs()
            );
        }
    }
    if let Peek::Postgres(p) = &peek {
        p.close().await;
    }
    Ok(visible)
}

// ---------------------------------------------------------------------------------------------
// Set-up: a fresh database, a receiver, flows, daemons, customers with phone numbers

/// Everything one measurement runs on. Fields drop in order: daemons first (SIGTERM), then
/// the bench's own connection, the receiver, the database, the folder.
struct Setup {
    daemons: Vec<Daemon>,
    store: Database,
    recv: Receiver,
    db: FreshDb,
    _dir: TempDir,
}

/// What [`Setup::finish`] observed.
struct Notes {
    backend: String,
    lines: Vec<String>,
}

impl Setup {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        ctx: &Ctx<'_>,
        database: Option<&str>,
        tag: &str,
        concurrency: usize,
        delay: Duration,
        daemons: usize,
        customers: usize,
    ) -> anyhow::Result<Setup> {
        let dir = TempDir::new(tag)?;
        let db = FreshDb::create(database, tag, &dir.0).await?;
        let recv = Receiver::start(delay).await?;
        let flows = dir.0.join("flows");
        std::fs::create_dir_all(flows.join("templates/bench"))?;
        std::fs::write(flows.join("bench-send.yaml"), FLOW)?;
        std::fs::write(flows.join("templates/bench/hello.txt"), TEMPLATE)?;
        let config = flows.join("canvas.yaml");
        std::fs::write(
            &config,
            format!(
                "timezone: UTC
caps: []
quiet_hours: off
channels:
  sms:
    type: webhook
    url: http://{}/sms
    timeout: 30s
    concurrency: {}
    retry: {{ max_attempts: 5, base: 100ms, max: 1s }}
",
                recv.addr,
                concurrency.max(1)
            ),
        )?;
        let mut started = Vec::with_capacity(daemons);
        for _ in 0..daemons {
            started.push(Daemon::start(&ctx.exe, &flows, &config, &db.url).await?);
        }
        let store = Database::connect(&db.url)
            .await
            .with_context(|| format!("opening {}", db.label()))?;
        let mut setup = Setup {
            daemons: started,
            store,
            recv,
            db,
            _dir: dir,
        };
        setup.load_profiles(ctx, customers).await?;
        Ok(setup)
    }

    /// Give every customer a phone number and a name, through the daemons' Segment
    /// endpoint, and wait for the engine to apply them. Not timed.
    async fn load_profiles(&mut self, ctx: &Ctx<'_>, n: usize) -> anyhow::Result<()> {
        let bar = progress(n as u64, "loading customers");
        let mut posts = Vec::new();
        for (b, from) in (0..n).step_by(PROFILE_BATCH).enumerate() {
            let to = (from + PROFILE_BATCH).min(n);
            let mut body = String::from("{\"batch\":[");
            for i in from..to {
                if i > from {
                    body.push(',');
                }
                body.push_str(&format!(
                    "{{\"type\":\"identify\",\"userId\":\"c{i:08}\",\"messageId\":\"p{i}\",\"traits\":{{\"phone\":\"+86138{i:08}\",\"first_name\":\"Member{i}\"}}}}"
                ));
            }
            body.push_str("]}");
            let base = &self.daemons[b % self.daemons.len()].base;
            posts.push(Post {
                url: format!("{base}/v1/batch"),
                auth: Auth::WriteKey,
                body: Bytes::from(body),
                events: (to - from) as u64,
            });
        }
        let driven = drive(&ctx.client, posts, ctx.args.clients, &bar).await?;
        if driven.accepted != n as u64 {
            bail!("the daemon accepted {} of {n} profiles", driven.accepted);
        }
        bar.set_message("applying customers");
        let started = Instant::now();
        loop {
            let counts = self.store.counts().await?;
            bar.set_position(counts.customers);
            if counts.inbox_pending == 0 && counts.customers >= n as u64 {
                break;
            }
            self.check_alive()?;
            if started.elapsed() > Duration::from_secs(600) {
                bail!(
                    "the engine applied {} of {n} profiles in 10 minutes",
                    counts.customers
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bar.finish_and_clear();
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for d in &mut self.daemons {
            d.check_alive()?;
        }
        Ok(())
    }

    /// Wait until the receiver has seen `n` distinct keys; fail when deliveries stop.
    async fn wait_delivered(&mut self, n: u64, bar: &ProgressBar) -> anyhow::Result<()> {
        let mut last = 0;
        let mut progress_at = Instant::now();
        loop {
            let got = self.recv.unique();
            bar.set_position(got);
            if got >= n {
                return Ok(());
            }
            if got != last {
                last = got;
                progress_at = Instant::now();
            } else if progress_at.elapsed() > STALL {
                bail!(
                    "deliveries stopped at {got} of {n} for {} s{}",
                    STALL.as_secs(),
                    self.daemons
                        .iter()
                        .map(|d| d.log_tail())
                        .collect::<String>()
                );
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the daemons (SIGTERM, wait) and say how they exited; clean up.
    async fn finish(mut self) -> Notes {
        let mut lines = Vec::new();
        for d in &mut self.daemons {
            match d.stop().await {
                Ok(true) => {}
                Ok(false) => lines.push(format!(
                    "warning: a daemon did not exit cleanly on SIGTERM{}",
                    d.log_tail()
                )),
                Err(e) => lines.push(format!("warning: stopping a daemon: {e:#}")),
            }
        }
        if let Database::Postgres(pg) = &self.store {
            pg.close().await;
        }
        Notes {
            backend: self.db.backend().to_owned(),
            lines,
        }
    }
}

fn s_backend_label(backend: &str) -> &'static str {
    match backend {
        "postgres" => "Postgres (local server, a fresh database)",
        _ => "SQLite (a fresh file, WAL)",
    }
}

/// A folder in the temp folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<TempDir> {
        let dir =
            std::env::temp_dir().join(format!("canvas-bench-serve-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A database made for one measurement and removed on drop: a SQLite file, or a Postgres
/// database created on the server of the URL given.
struct FreshDb {
    url: String,
    kind: FreshKind,
}

enum FreshKind {
    Sqlite(PathBuf),
    Postgres { admin: String, name: String },
}

impl FreshDb {
    async fn create(database: Option<&str>, tag: &str, dir: &Path) -> anyhow::Result<FreshDb> {
        match database {
            Some(url) if is_postgres(url) => {
                let name = format!("canvas_bench_{}_{tag}", std::process::id());
                let mut conn = admin(url)
                    .await
                    .with_context(|| format!("connecting to {}", redact(url)))?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("creating database {name}"))?;
                conn.close().await?;
                Ok(FreshDb {
                    url: with_database(url, &name)?,
                    kind: FreshKind::Postgres {
                        admin: url.to_owned(),
                        name,
                    },
                })
            }
            Some(url) => {
                let path = url.strip_prefix("sqlite://").unwrap_or(url);
                let path = PathBuf::from(format!("{path}.{tag}"));
                remove_sqlite(&path);
                Ok(FreshDb {
                    url: format!("sqlite://{}", path.display()),
                    kind: FreshKind::Sqlite(path),
                })
            }
            None => {
                let path = dir.join("canvas.db");
                Ok(FreshDb {
                    url: format!("sqlite://{}", path.display()),
                    kind: FreshKind::Sqlite(path),
                })
            }
        }
    }

    fn backend(&self) -> &'static str {
        match self.kind {
            FreshKind::Sqlite(_) => "sqlite",
            FreshKind::Postgres { .. } => "postgres",
        }
    }

    fn label(&self) -> String {
        redact(&self.url).into_owned()
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        match &self.kind {
            FreshKind::Sqlite(path) => remove_sqlite(path),
            FreshKind::Postgres { admin, name } => {
                // Drop may run inside the async runtime: a thread of its own, with its own.
                let (admin, db) = (admin.clone(), name.clone());
                let done = std::thread::spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let mut conn = self::admin(&admin).await?;
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await?;
                        conn.close().await?;
                        Ok(())
                    })
                })
                .join();
                if !matches!(done, Ok(Ok(()))) {
                    let _ = writeln!(
                        std::io::stderr(),
                        "warning: could not drop the benchmark database {name}; drop it by hand"
                    );
                }
            }
        }
    }
}

/// A connection to the server of `url` for CREATE and DROP DATABASE, which may take seconds
/// (a checkpoint): not worth sqlx's slow-statement warning in the middle of the report.
async fn admin(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    use sqlx::ConnectOptions as _;
    use std::str::FromStr as _;
    sqlx::postgres::PgConnectOptions::from_str(url)?
        .disable_statement_logging()
        .connect()
        .await
}

fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let start = url
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow!("not a URL: {}", redact(url)))?;
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = head[start..].find('/').map_or(head.len(), |i| start + i);
    Ok(format!("{}/{name}{query}", &head[..authority_end]))
}

// ---------------------------------------------------------------------------------------------
// A daemon: `canvas serve` as a child process, stopped on drop

struct Daemon {
    child: Option<Child>,
    pid: u32,
    base: String,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Daemon {
    async fn start(
        exe: &Path,
        flows: &Path,
        config: &Path,
        database: &str,
    ) -> anyhow::Result<Daemon> {
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
            .arg(flows)
            .arg("--config")
            .arg(config)
            .arg("--database")
            .arg(database)
            .env("CANVAS_API_TOKEN", TOKEN)
            .env("CANVAS_WRITE_KEY", WRITE_KEY)
            .env_remove("CANVAS_API_READ_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let pid = child.id();
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("canvas serve: listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
                if let Ok(mut l) = sink.lock() {
                    if l.len() == 40 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            pid,
            base: String::new(),
            log,
        };
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(base)) => daemon.base = base,
            Ok(Err(_)) => bail!("the daemon exited before listening{}", daemon.log_tail()),
            Err(_) => bail!("the daemon did not listen within 60 s{}", daemon.log_tail()),
        }
        Ok(daemon)
    }

    fn log_tail(&self) -> String {
        let lines = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        if lines.is_empty() {
            return String::new();
        }
        let mut text = format!("; daemon {} said:", self.pid);
        for l in lines.iter().rev().take(10).rev() {
            text.push_str("\n    ");
            text.push_str(l);
        }
        text
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!("daemon {} exited ({status}){}", self.pid, self.log_tail());
        }
        Ok(())
    }

    /// SIGTERM, then wait for it to finish what is in flight (30 s at most, then SIGKILL).
    /// True when it exited with status 0.
    async fn stop(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        sigterm(self.pid);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sigterm(self.pid);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// The receiver: answers every delivery (after `delay`), counts idempotency keys

struct Receiver {
    addr: SocketAddr,
    state: Arc<RecvState>,
    task: tokio::task::JoinHandle<()>,
}

struct RecvState {
    delay: Duration,
    unique: AtomicU64,
    requests: AtomicU64,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Key → (times received, Unix ms of the first).
    keys: HashMap<String, (u32, i64)>,
    first: Option<Instant>,
    last: Option<Instant>,
    last_ms: Option<i64>,
}

impl Receiver {
    async fn start(delay: Duration) -> anyhow::Result<Receiver> {
        let state = Arc::new(RecvState {
            delay,
            unique: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
        });
        let app = axum::Router::new()
            .route("/sms", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("starting the receiver")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, state, task })
    }

    fn unique(&self) -> u64 {
        self.state.unique.load(Ordering::Relaxed)
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    fn window(&self) -> Option<(Instant, Instant)> {
        let s = self.state.seen.lock().ok()?;
        Some((s.first?, s.last?))
    }

    fn last_ms(&self) -> Option<i64> {
        self.state.seen.lock().ok()?.last_ms
    }

    fn seen(&self) -> HashMap<String, (u32, i64)> {
        self.state
            .seen
            .lock()
            .map(|s| s.keys.clone())
            .unwrap_or_default()
    }

    fn first_seen(&self) -> HashMap<String, i64> {
        self.state
            .seen
            .lock()
            .map(|s| s.keys.iter().map(|(k, (_, at))| (k.clone(), *at)).collect())
            .unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<Arc<RecvState>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let Ok(mut seen) = state.seen.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let entry = seen.keys.entry(key.to_owned()).or_insert((0, now_ms));
    entry.0 += 1;
    if entry.0 == 1 {
        state.unique.fetch_add(1, Ordering::Relaxed);
        seen.first.get_or_insert(now);
        seen.last = Some(now);
        seen.last_ms = Some(now_ms);
    }
    StatusCode::OK
}

// ---------------------------------------------------------------------------------------------
// Load: prepared request bodies, sent by concurrent clients

#[derive(Clone, Copy)]
enum Auth {
    Bearer,
    WriteKey,
}

struct Post {
    url: String,
    auth: Auth,
    body: Bytes,
    /// Events (or profiles) in the body: what the progress bar counts.
    events: u64,
}

/// `{"events":[…]}` for customers `range`; `occurred_at` omitted means "when received".
fn events_json(range: std::ops::Range<usize>, occurred_at: Option<&str>) -> String {
    let mut s = String::with_capacity(range.len() * 140 + 16);
    s.push_str("{\"events\":[");
    let from = range.start;
    for i in range {
        if i > from {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"id\":\"e{i}\",\"customer_id\":\"c{i:08}\",\"name\":\"{EVENT}\",\"data\":{{\"source\":\"bench\",\"amount\":{}}}",
            i % 500
        ));
        if let Some(t) = occurred_at {
            s.push_str(&format!(",\"occurred_at\":\"{t}\""));
        }
        s.push('}');
    }
    s.push_str("]}");
    s
}

/// The bodies of `n` events in batches, built before the clock starts; batch `b` goes to
/// daemon `b % bases.len()`.
fn event_bodies(n: usize, batch: usize, bases: &[String]) -> Vec<Post> {
    let batch = batch.max(1);
    (0..n)
        .step_by(batch)
        .enumerate()
        .map(|(b, from)| {
            let to = (from + batch).min(n);
            Post {
                url: format!("{}/v1/events", bases[b % bases.len()]),
                auth: Auth::Bearer,
                body: Bytes::from(events_json(from..to, None)),
                events: (to - from) as u64,
            }
        })
        .collect()
}

struct Answer {
    latency_ms: f64,
    /// Unix ms when the 200 came back.
    answered_ms: i64,
    accepted: u64,
    duplicates: u64,
    retries: u64,
}

/// POST one body; a failure (not 200, or no answer) is retried up to 10 times — ids make a
/// repeat harmless — and reported as an error after that. The latency is the last attempt's.
async fn post(
    client: &reqwest::Client,
    url: &str,
    auth: Auth,
    body: Bytes,
) -> anyhow::Result<Answer> {
    let mut retries = 0;
    loop {
        let req = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone());
        let req = match auth {
            Auth::Bearer => req.bearer_auth(TOKEN),
            Auth::WriteKey => req.basic_auth(WRITE_KEY, None::<&str>),
        };
        let t = Instant::now();
        let problem = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.bytes().await;
                let latency_ms = t.elapsed().as_secs_f64() * 1e3;
                match bytes {
                    Ok(b) if status == reqwest::StatusCode::OK => {
                        let v: Json = serde_json::from_slice(&b).context("the daemon's answer")?;
                        return Ok(Answer {
                            latency_ms,
                            answered_ms: chrono::Utc::now().timestamp_millis(),
                            accepted: v["accepted"].as_u64().unwrap_or(0),
                            duplicates: v["duplicates"].as_u64().unwrap_or(0),
                            retries,
                        });
                    }
                    Ok(b) => format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
                    Err(e) => format!("HTTP {status}, reading the body: {e}"),
                }
            }
            Err(e) => format!("{e}"),
        };
        retries += 1;
        if retries > 10 {
            bail!("POST {url} failed 10 times; last: {problem}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Driven {
    started: Instant,
    elapsed: Duration,
    requests: usize,
    latencies_ms: Vec<f64>,
    /// Per post, in order: Unix ms when it was answered.
    answered_ms: Vec<i64>,
    accepted: u64,
    duplicates: u64,
    retries: u64,
}

/// Send every post, `clients` at a time, as fast as they are answered.
async fn drive(
    client: &reqwest::Client,
    posts: Vec<Post>,
    clients: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Driven> {
    let posts = Arc::new(posts);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..clients.max(1) {
        let (posts, next, client, bar) = (posts.clone(), next.clone(), client.clone(), bar.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = posts.get(i) else {
                    return Ok::<_, anyhow::Error>(answers);
                };
                let a = post(&client, &p.url, p.auth, p.body.clone()).await?;
                bar.inc(p.events);
                answers.push((i, a));
            }
        });
    }
    let mut all = Vec::with_capacity(posts.len());
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("a client task")??);
    }
    let elapsed = started.elapsed();
    all.sort_by_key(|(i, _)| *i);
    Ok(Driven {
        started,
        elapsed,
        requests: all.len(),
        latencies_ms: all.iter().map(|(_, a)| a.latency_ms).collect(),
        answered_ms: all.iter().map(|(_, a)| a.answered_ms).collect(),
        accepted: all.iter().map(|(_, a)| a.accepted).sum(),
        duplicates: all.iter().map(|(_, a)| a.duplicates).sum(),
        retries: all.iter().map(|(_, a)| a.retries).sum(),
    })
}

fn customer_index(id: &str) -> anyhow::Result<usize> {
    id.strip_prefix('c')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("unexpected customer id `{id}` in the outbox"))
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Percentiles (nearest rank) of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Dist {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    fn text(&self, unit: &str) -> String {
        let d = if self.max < 100.0 { 1 } else { 0 };
        format!(
            "p50 {} · p90 {} · p99 {} · max {} {unit} (n = {})",
            number(self.p50, d),
            number(self.p90, d),
            number(self.p99, d),
            number(self.max, d),
            self.n
        )
    }
}

/// `1234567.8` → `1,234,568` (or with `decimals`).
fn number(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (k, c) in int.chars().enumerate() {
        if k > 0 && (int.len() - k) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if v < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

fn secs(d: Duration) -> String {
    number(d.as_secs_f64(), 2)
}

fn secs_ms(ms: i64) -> String {
    number(ms as f64 / 1000.0, 2)
}

fn progress(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{msg:<24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_owned());
    bar
}

// ---------------------------------------------------------------------------------------------
// The machine and where the CPU went

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    memory_mb: u64,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_mb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |p| p.get()),
        cpu,
        memory_mb,
    }
}

/// CPU use over a window, from /proc (Linux; empty elsewhere), in % of one core.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct CpuUse {
    /// The daemons together.
    daemons: f64,
    /// This process: clients and receiver.
    bench: f64,
    /// Everything else busy: the database server, the kernel, other processes.
    other: f64,
    idle: f64,
    /// 100 × cores.
    capacity: f64,
}

impl CpuUse {
    fn text(&self) -> String {
        if self.capacity == 0.0 {
            return "not measured (no /proc)".to_owned();
        }
        format!(
            "daemon{} {:.0}% · bench (clients, receiver) {:.0}% · other (database, kernel) {:.0}% · idle {:.0}%, of {:.0}%",
            if self.daemons > 0.0 { "s" } else { "" },
            self.daemons,
            self.bench,
            self.other,
            self.idle,
            self.capacity
        )
    }
}

struct CpuWindow {
    at: Instant,
    machine: Option<(u64, u64)>,
    me: Option<u64>,
    daemons: Vec<Option<u64>>,
}

impl CpuWindow {
    fn start(daemons: &[Daemon]) -> CpuWindow {
        CpuWindow {
            at: Instant::now(),
            machine: machine_ticks(),
            me: process_ticks("self"),
            daemons: daemons
                .iter()
                .map(|d| process_ticks(&d.pid.to_string()))
                .collect(),
        }
    }

    fn finish(self, daemons: &[Daemon]) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64();
        let hz = clock_ticks() * secs / 100.0; // ticks per 1% of a core over the window
        let (Some((t0, i0)), Some((t1, i1))) = (self.machine, machine_ticks()) else {
            return CpuUse::default();
        };
        if hz <= 0.0 {
            return CpuUse::default();
        }
        let total = (t1 - t0) as f64 / hz;
        let idle = (i1 - i0) as f64 / hz;
        let me = match (self.me, process_ticks("self")) {
            (Some(a), Some(b)) => (b - a) as f64 / hz,
            _ => 0.0,
        };
        let daemons: f64 = self
            .daemons
            .iter()
            .zip(daemons)
            .filter_map(|(a, d)| Some((process_ticks(&d.pid.to_string())? - (*a)?) as f64 / hz))
            .sum();
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        CpuUse {
            daemons,
            bench: me,
            other: (total - idle - daemons - me).max(0.0),
            idle,
            capacity: 100.0 * cores,
        }
    }
}

/// (all ticks, idle + iowait ticks) from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already)
    let total: u64 = v.iter().take(8).sum();
    Some((total, v.get(3)? + v.get(4).copied().unwrap_or(0)))
}

/// utime + stime of a process (`self` or a pid), in clock ticks.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x").ok(),
            Some("postgres://postgres@127.0.0.1:5432/x".to_owned())
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x").ok(),
            Some("postgres://u:p@h/x?sslmode=disable".to_owned())
        );
        assert_eq!(
            with_database("postgres://h:5432", "x").ok(),
            Some("postgres://h:5432/x".to_owned())
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Dist::of(vec![7.0]).p99, 7.0);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(number(1234567.8, 0), "1,234,568");
        assert_eq!(number(999.0, 0), "999");
        assert_eq!(number(2.456, 2), "2.46");
        assert_eq!(number(-1500.0, 0), "-1,500");
    }

    #[test]
    fn event_bodies_are_json() {
        let posts = event_bodies(5, 2, &["http://a".into(), "http://b".into()]);
        assert_eq!(posts.len(), 3);
        assert_eq!(posts[1].url, "http://b/v1/events");
        let v: Json = serde_json::from_slice(&posts[2].body).expect("json");
        assert_eq!(v["events"][0]["customer_id"], json!("c00000004"));
        let v: Json = serde_json::from_str(&events_json(0..1, Some("2026-01-01T00:00:00.000Z")))
            .expect("json");
        assert_eq!(
            v["events"][0]["occurred_at"],
            json!("2026-01-01T00:00:00.000Z")
        );
    }
}
