//! Hot reload: a change under `--flows` is validated and, when the whole folder is valid,
//! published — changed flows get a new version, runs already going stay on theirs, flows
//! removed from the folder take no new entries. An invalid change is rejected with its
//! diagnostics in the log, and the running versions carry on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use canvas_channels::Channels;
use canvas_engine::policy::Policy;
use canvas_engine::runtime::Published;
use canvas_engine::state::FlowVersion;
use canvas_engine::store::Store;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::App;

/// Editors write a file in several steps (truncate, write, rename): wait for the folder to
/// be quiet this long before reading it.
const SETTLE: Duration = Duration::from_millis(300);

/// A watch on the flows folder: keep the watcher alive as long as its events are read.
pub struct FlowWatch {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
}

/// Start watching `dir`. Done before the daemon says it is listening, so no change made
/// after that is missed; one check is queued at once for changes made while it started.
pub fn watch(dir: &std::path::Path) -> anyhow::Result<FlowWatch> {
    let (tx, events) = mpsc::unbounded_channel();
    let initial = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })
    .with_context(|| format!("watching {}", dir.display()))?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let _ = initial.send(());
    Ok(FlowWatch {
        _watcher: watcher,
        events,
    })
}

/// Reload on every change under the flows folder until shutdown.
pub async fn watch_flows(
    app: Arc<App>,
    channels: Arc<Channels>,
    flow_watch: FlowWatch,
    mut stop: watch::Receiver<bool>,
) {
    let FlowWatch {
        _watcher,
        events: mut rx,
    } = flow_watch;
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = stop.changed() => return,
        }
        // Let the burst of events settle.
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                () = tokio::time::sleep(SETTLE) => break,
                _ = stop.changed() => return,
            }
        }
        match reload(&app, &channels).await {
            Ok(p) if p.is_empty() => tracing::debug!("flows folder changed; no flow changed"),
            Ok(p) => tracing::info!(
                added = ?p.added, changed = ?p.changed, retired = ?p.retired,
                "flows reloaded"
            ),
            Err(e) => {
                tracing::error!("flow change rejected; the running versions carry on:\n{e:#}")
            }
        }
    }
}

/// Validate the flows folder (and its `canvas.yaml`) and publish it.
pub async fn reload(app: &App, channels: &Channels) -> anyhow::Result<Published> {
    let dir: PathBuf = app.settings.flows.clone();
    let engine = app.engine();
    let registry = engine.registry.clone();
    let config = app.settings.config.clone();
    let (validation, policy) = tokio::task::spawn_blocking(move || {
        let validation = canvas_engine::validate_paths(std::slice::from_ref(&dir), &registry);
        let policy = config.map(|path| Policy::load(&path));
        (validation, policy)
    })
    .await
    .context("the validation task")?;
    let validation = validation?;
    if !validation.is_valid() {
        return Err(super::config::describe(&validation.diagnostics));
    }
    let candidate = canvas_engine::runtime::FlowSet::new(validation.flows().cloned());
    let missing = super::dispatch::missing_channels(&candidate, channels);
    if !missing.is_empty() {
        anyhow::bail!(
            "the flows send on {} but `channels:` does not configure it; add it to canvas.yaml and restart",
            missing.join(", ")
        );
    }
    let policy = match policy {
        Some(Ok(p)) => p,
        Some(Err(e)) => return Err(super::config::describe(&e.diagnostics)),
        None => engine.policy.clone(),
    };
    // Record the versions before any run can enter on them.
    let now = app.clock.now();
    let versions: Vec<FlowVersion> = validation
        .flows()
        .map(|f| canvas_engine::runtime::version_record(f, now))
        .collect();
    app.db.put_flow_versions(&versions).await?;
    let mut published = Published::default();
    app.update(|engine| {
        if policy.sections != engine.policy.sections {
            tracing::warn!(
                "`server:` or `channels:` in canvas.yaml changed: restart the daemon to apply them"
            );
        }
        let mut flows = engine.flows.clone();
        published = flows.publish(validation.flows().cloned());
        Some(super::successor(engine, flows, policy))
    });
    app.wake.notify_one();
    Ok(published)
}
