//! `canvas serve`: the daemon. An HTTP API takes events and profile updates into the inbox
//! (answering once they are committed), an engine loop applies the inbox and fires timers,
//! schedules and segment rechecks, and a dispatcher delivers the outbox through the
//! channels of `canvas.yaml`. SIGTERM or SIGINT stops taking work, lets what is in flight
//! finish, and exits 0.

pub mod actions;
mod api;
pub mod config;
mod dispatch;
mod liveness;
mod metrics;
mod reload;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canvas_engine::Registry;
use canvas_engine::clock::{Clock, SystemClock};
use canvas_engine::runtime::{self, FlowSet, Pace, Runtime, Stats};
use canvas_engine::state::Time;
use canvas_engine::store::{Database, Store};
use tokio::sync::{Notify, watch};

pub use config::ServeArgs;
use config::Settings;
use metrics::{Metrics, StepLabels};

/// The longest the engine loop sleeps: it catches work another daemon enqueued at least
/// this often.
const MAX_IDLE: Duration = Duration::from_millis(500);
/// How long each phase of an engine pass (due timers, then the inbox) may take before the
/// pass moves on: under any inbox backlog, timers are served within about twice this.
const PHASE_BUDGET: Duration = Duration::from_millis(200);
/// How often the paused flows are read from the database, for pauses made through another
/// daemon (a pause through this one applies at once).
const PAUSE_POLL: Duration = Duration::from_millis(200);

/// What the API handlers and the loops share.
pub struct App {
    pub db: Database,
    engine: RwLock<Arc<Runtime<Database>>>,
    /// Held while a new engine is built from the current one, so two reloads never undo
    /// each other.
    swap_lock: Mutex<()>,
    /// Held while the paused flows are read and applied.
    pause_lock: tokio::sync::Mutex<()>,
    /// Woken when the inbox has new items.
    pub wake: Notify,
    /// Woken when the engine committed outbox rows.
    pub outbox_wake: Notify,
    pub metrics: Metrics,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    /// Set once a shutdown began: `/readyz` answers 503 from then on.
    pub stopping: AtomicBool,
    /// The channels configured as `type: sandbox` (their rows are what `GET /v1/sandbox`
    /// lists). Channels are read once at start, like the adapters.
    pub sandbox_channels: Vec<String>,
}

impl App {
    /// The engine as it is now (flows and paused set are swapped, never mutated).
    pub fn engine(&self) -> Arc<Runtime<Database>> {
        match self.engine.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Build the next engine from the current one and swap it in (or keep the current one
    /// when `next` says `None`). Runs already executing keep the engine they started with.
    fn update(&self, next: impl FnOnce(&Runtime<Database>) -> Option<Runtime<Database>>) {
        let _guard = match self.swap_lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(runtime) = next(&self.engine()) {
            let runtime = Arc::new(runtime);
            match self.engine.write() {
                Ok(mut g) => *g = runtime,
                Err(poisoned) => *poisoned.into_inner() = runtime,
            }
        }
    }

    /// Re-read the paused flows from the database (several daemons share them). Every
    /// engine shares one paused set and reads it each round, so this takes effect at once.
    async fn refresh_paused(&self) -> anyhow::Result<()> {
        // One refresh at a time, so a read that began before a pause committed can never be
        // applied after the pause's own refresh (and undo it until the next poll).
        let _one = self.pause_lock.lock().await;
        let paused: HashSet<String> = self.db.paused_flows().await?.into_iter().collect();
        if self.engine().paused.replace(paused) {
            tracing::info!(paused = ?self.engine().paused.names(), "paused flows changed");
        }
        Ok(())
    }
}

/// A new engine like `engine` (same store, registry, paused flows, batch size and lease
/// settings) with these flows and policies.
fn successor(
    engine: &Runtime<Database>,
    flows: FlowSet,
    policy: canvas_engine::policy::Policy,
) -> Runtime<Database> {
    let mut next = Runtime::new(engine.store.clone(), flows, policy, engine.registry.clone());
    next.batch_size = engine.batch_size;
    next.paused = engine.paused.clone();
    next.failure_log = engine.failure_log.clone();
    next.owner = engine.owner.clone();
    next.lease = engine.lease;
    next
}

pub fn run(args: ServeArgs, registry: &Registry) -> anyhow::Result<ExitCode> {
    let settings = Settings::resolve(args, |v| std::env::var(v).ok())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(settings, registry.clone()))
}

/// Compile every flow under `dir`; any error refuses the whole set.
fn load_flows(dir: &Path, registry: &Registry) -> anyhow::Result<FlowSet> {
    let validation = canvas_engine::validate_paths(&[dir.to_path_buf()], registry)?;
    if !validation.is_valid() {
        return Err(config::describe(&validation.diagnostics)
            .context(format!("{} has errors", dir.display())));
    }
    for d in &validation.diagnostics {
        tracing::warn!(code = %d.code, "{}", d.headline());
    }
    Ok(FlowSet::new(validation.flows().cloned()))
}

/// The `channels:` section, secrets resolved from the environment, adapters built; every
/// channel the flows use must be there.
fn load_channels(
    settings: &Settings,
    flows: &FlowSet,
) -> anyhow::Result<canvas_channels::Channels> {
    let config: canvas_channels::ChannelsConfig = settings
        .policy
        .section("channels")
        .map_err(|e| config::describe(&e.diagnostics))?
        .unwrap_or_default();
    let resolved = config
        .resolve(|v| std::env::var(v).ok())
        .context("canvas.yaml `channels:`")?;
    let channels =
        canvas_channels::Channels::from_config(resolved).context("canvas.yaml `channels:`")?;
    let missing = dispatch::missing_channels(flows, &channels);
    if !missing.is_empty() {
        bail!(
            "the flows send on {} but `channels:` in {} does not configure {}; see docs/channels.md \
             (`type: sandbox` keeps messages in the database, to try flows without a provider)",
            missing
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", "),
            settings
                .config
                .as_ref()
                .map_or_else(|| "canvas.yaml".to_owned(), |p| p.display().to_string()),
            if missing.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(channels)
}

async fn serve(settings: Settings, registry: Registry) -> anyhow::Result<ExitCode> {
    let flows = load_flows(&settings.flows, &registry)?;
    let channels = Arc::new(load_channels(&settings, &flows)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let owner = format!(
        "{}:{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "canvas".to_owned()),
        std::process::id(),
        clock.now().timestamp_millis()
    );
    // `settings.database` prints without its password.
    let db = Database::connect_with(settings.database.expose(), settings.database_timeout)
        .await
        .with_context(|| format!("opening {}", settings.database))?;
    // After the URL proved good: one daemon per SQLite file.
    let _sqlite_lock = liveness::lock_sqlite(settings.database.expose(), &owner)?;
    liveness::take_over_at_start(&db, &owner, clock.now()).await?;
    let mut runtime = Runtime::new(db.clone(), flows, settings.policy.clone(), registry);
    if matches!(db, Database::Postgres(_)) {
        // Other daemons may share this database: lease customers per round.
        runtime.owner = Some(owner.clone());
        runtime.lease = chrono::Duration::from_std(settings.customer_lease)
            .unwrap_or(chrono::Duration::seconds(30));
    }
    runtime.register_versions(clock.now()).await?;
    for (flow, version, reason) in runtime.restore_versions().await? {
        tracing::warn!(%flow, %version, "runs pinned to this version cannot move: {reason}");
    }
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let local = listener.local_addr()?;
    let app = Arc::new(App {
        db,
        engine: RwLock::new(Arc::new(runtime)),
        swap_lock: Mutex::new(()),
        pause_lock: tokio::sync::Mutex::new(()),
        wake: Notify::new(),
        outbox_wake: Notify::new(),
        metrics: Metrics::new(),
        settings,
        clock,
        stopping: AtomicBool::new(false),
        sandbox_channels: channels
            .names()
            .filter(|(_, kind)| *kind == "sandbox")
            .map(|(name, _)| name.to_owned())
            .collect(),
    });
    app.refresh_paused().await?;
    if app.settings.tokens.is_empty() {
        tracing::warn!("no API token configured: the API is open to anyone who can reach {local}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine = tokio::spawn(engine_loop(app.clone(), stop_rx.clone()));
    let pauses = tokio::spawn(pause_watch(app.clone(), stop_rx.clone()));
    let flow_watch = reload::watch(&app.settings.flows)?;
    let watcher = tokio::spawn(reload::watch_flows(
        app.clone(),
        channels.clone(),
        flow_watch,
        stop_rx.clone(),
    ));
    let alive = tokio::spawn(liveness::run(app.clone(), owner.clone(), stop_rx.clone()));
    let dispatcher = tokio::spawn(dispatch::run(app.clone(), channels, owner, stop_rx.clone()));
    let router = api::router(app.clone());
    // Operators and tests read this line to learn the address (`--listen 127.0.0.1:0`).
    tracing::info!(%local, "canvas serve listening");
    eprintln!("canvas serve: listening on http://{local}");
    eprintln!("canvas serve: web UI on http://{local}/ui/flows");
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    shutdown_signal().await;
    tracing::info!("shutting down: no new requests; finishing work in flight");
    app.stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    app.wake.notify_waiters();
    http.await.context("the HTTP server task")??;
    engine.await.context("the engine task")?;
    dispatcher.await.context("the dispatcher task")?;
    watcher.await.context("the flow watcher task")?;
    pauses.await.context("the pause watcher task")?;
    alive.await.context("the heartbeat task")?;
    eprintln!("canvas serve: stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Apply the inbox, fire timers, schedules and segment rechecks; sleep until the next due
/// moment, new inbox items, or shutdown. A pass that fails (the database went away) is
/// logged and retried; committed work is never repeated, since every round commits its
/// inputs as applied in the same transaction.
async fn engine_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut last_fire: HashMap<String, Time> = HashMap::new();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        // Timers that come due while the pass runs are caught by `next_due` below.
        let started = app.clock.now();
        let more = match pass(&app, &mut last_fire).await {
            Ok(more) => {
                failures = 0;
                more
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::error!("engine pass failed (attempt {failures}): {e:#}");
                false
            }
        };
        if more {
            // The pass stopped at its budget with work left: straight on with the next.
            tokio::task::yield_now().await;
            continue;
        }
        let pause = if failures > 0 {
            Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)))
        } else {
            match app.engine().next_due(started).await {
                Ok(Some(t)) => (t - app.clock.now()).to_std().unwrap_or(Duration::ZERO),
                _ => MAX_IDLE,
            }
            .min(MAX_IDLE)
        };
        tokio::select! {
            () = app.wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// One engine pass; whether work was left for the next.
async fn pass(app: &App, last_fire: &mut HashMap<String, Time>) -> anyhow::Result<bool> {
    let stats = engine_pass(app, last_fire).await?;
    if stats.outbox > 0 {
        app.outbox_wake.notify_one();
    }
    Ok(stats.more)
}

/// Keep the shared paused set in step with the database.
async fn pause_watch(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = app.refresh_paused().await {
            tracing::warn!("reading paused flows failed: {e:#}");
        }
        tokio::select! {
            () = tokio::time::sleep(PAUSE_POLL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
}

async fn engine_pass(app: &App, last_fire: &mut HashMap<String, Time>) -> anyhow::Result<Stats> {
    let engine = app.engine();
    let m = &app.metrics;
    let observe = |phase: &'static str| {
        let mut t = Instant::now();
        move |s: &Stats| {
            m.commit_seconds
                .get_or_create(&Metrics::phase(phase))
                .observe(t.elapsed().as_secs_f64());
            t = Instant::now();
            let _ = s;
        }
    };
    let budget = chrono::Duration::from_std(PHASE_BUDGET).unwrap_or(chrono::Duration::MAX);
    let mut stats = Stats::default();
    // Each round takes the engine as it is then: a hot reload applies from the next round.
    let timers = Pace::live(&*app.clock, budget);
    stats.add(runtime::fire_due_from(|| app.engine(), timers, observe("timers")).await?);
    let inbox = Pace::live(&*app.clock, budget);
    stats.add(runtime::process_inbox_from(|| app.engine(), inbox, observe("inbox")).await?);
    let now = app.clock.now();
    // Schedules and segment rechecks: each (flow, moment) is claimed in the database, so
    // with several daemons exactly one enters the audience.
    for flow in engine.flows.current() {
        if !last_fire.contains_key(&flow.id) {
            let after = app.db.last_fire(&flow.id).await?.unwrap_or(now);
            last_fire.insert(flow.id.clone(), after);
        }
    }
    let due = engine.due_ticks(|id| last_fire.get(id).copied().unwrap_or(now), now);
    for (flow, at) in due {
        last_fire.insert(flow.id.clone(), at);
        if app.db.claim_fire(&flow.id, at, now).await? {
            let t = Instant::now();
            stats.add(
                engine
                    .enter_audience(std::slice::from_ref(&flow), now)
                    .await?,
            );
            m.commit_seconds
                .get_or_create(&Metrics::phase("schedule"))
                .observe(t.elapsed().as_secs_f64());
            tracing::info!(flow = %flow.id, %at, "schedule fired");
        }
    }
    for c in &stats.counts {
        if c.metric.starts_with("to:") {
            continue;
        }
        m.step_outcomes
            .get_or_create(&StepLabels {
                flow: c.flow.clone(),
                step: c.step.clone(),
                outcome: c.metric.clone(),
            })
            .inc_by(u64::try_from(c.n).unwrap_or(0));
    }
    m.transitions.inc_by(stats.transitions);
    m.runs_started.inc_by(stats.started);
    Ok(stats)
}
