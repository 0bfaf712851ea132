//! `canvas ingest` and `canvas run`: the engine on a database, one batch job at a time —
//! ingest a file of events and profile updates, then apply the inbox and fire due timers.
//! A killed `canvas run` loses nothing: rerun it and it carries on where the last committed
//! batch ended.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use canvas_engine::Registry;
use canvas_engine::clock::{Clock, SystemClock};
use canvas_engine::runtime::{FlowSet, Runtime, Stats};
use canvas_engine::scenario::parse_time;
use canvas_engine::state::InboxItem;
use canvas_engine::store::{Database, Store};

/// The longest line `canvas ingest` reads.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Items per inbox insert.
const CHUNK: usize = 5_000;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Read JSON lines of inbox items: `{"kind":"event",…}` or `{"kind":"profile",…}`.
pub fn read_items(path: &Path) -> anyhow::Result<Vec<InboxItem>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut items = Vec::new();
    let mut line = String::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = std::io::Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        n += 1;
        if line.len() > MAX_LINE_BYTES {
            bail!(
                "{}:{n}: a line is longer than {MAX_LINE_BYTES} bytes",
                path.display()
            );
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let item: InboxItem = serde_json::from_str(text)
            .with_context(|| format!("{}:{n}: not an event or profile update", path.display()))?;
        if item.customer_id().is_empty() {
            bail!("{}:{n}: `customer_id` is empty", path.display());
        }
        // `timezone` and `set.timezone` are the customer's one zone: a bad one is refused.
        if let InboxItem::Profile(update) = &item
            && let Err(e) = update.zone()
        {
            bail!("{}:{n}: {e}", path.display());
        }
        items.push(item);
    }
    Ok(items)
}

pub fn ingest(file: &Path, store: crate::serve::config::Store) -> anyhow::Result<ExitCode> {
    let items = read_items(file)?;
    let database = &store.database;
    let rt = runtime()?;
    rt.block_on(async {
        let db = Database::connect_with(database.expose(), store.database_timeout)
            .await
            .with_context(|| format!("opening {database}"))?;
        let mut accepted = 0;
        for chunk in items.chunks(CHUNK) {
            accepted += db.enqueue(chunk).await?;
        }
        writeln!(
            std::io::stdout(),
            "ingested {accepted} of {} items ({} duplicates dropped)",
            items.len(),
            items.len() - accepted
        )?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Apply the inbox and fire every timer due at `at` (default: now by the system clock).
pub fn run(
    store: crate::serve::config::Store,
    at: Option<&str>,
    batch: usize,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let now = match at {
        Some(t) => parse_time(t)
            .map_err(|e| anyhow::anyhow!("--at: {e}"))?
            .to_utc(),
        None => SystemClock.now(),
    };
    let flows = store.flows.as_path();
    let validation = canvas_engine::validate_paths(&[PathBuf::from(flows)], registry)?;
    if !validation.is_valid() {
        bail!(
            "{} has errors: {}; run `canvas validate {}`",
            flows.display(),
            crate::output::first_errors(&validation),
            flows.display()
        );
    }
    let flow_set = FlowSet::new(validation.flows().cloned());
    let policy = store.policy;
    let database = &store.database;
    let rt = runtime()?;
    rt.block_on(async {
        let db = Database::connect_with(database.expose(), store.database_timeout)
            .await
            .with_context(|| format!("opening {database}"))?;
        let mut runtime = Runtime::new(db, flow_set, policy, registry.clone());
        runtime.batch_size = batch;
        runtime.register_versions(now).await?;
        for (flow, version, reason) in runtime.restore_versions().await? {
            tracing::warn!(%flow, %version, "runs pinned to this version cannot move: {reason}");
        }
        let mut stats = Stats::default();
        // Timers first, then inputs: the order a daemon ticking at `now` would use.
        stats.add(runtime.fire_due(now).await?);
        stats.add(runtime.process_inbox(now).await?);
        stats.add(runtime.fire_due(now).await?);
        writeln!(
            std::io::stdout(),
            "applied {} inbox items, started {} runs, {} steps, {} outbox rows, {} commits",
            stats.items,
            stats.started,
            stats.transitions,
            stats.outbox,
            stats.commits
        )?;
        Ok(ExitCode::SUCCESS)
    })
}
