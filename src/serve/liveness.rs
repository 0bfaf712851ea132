//! Who is alive, so a daemon that died never makes the others wait out its claims.
//!
//! On Postgres (several daemons) each daemon beats in the `daemons` table under the name
//! its claims carry, and frees at once the outbox and customer claims of any daemon whose
//! beat stopped for `server.leases.dead_after`. On SQLite (one daemon per file) a starting
//! daemon locks `<file>.lock` — refusing to start when a live daemon holds it — and then
//! takes every claim over: whoever held them is gone.

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use canvas_engine::state::Time;
use canvas_engine::store::{Database, Store, Takeover};
use tokio::sync::watch;

use super::App;

/// The lock a daemon holds on its SQLite file while it runs; the kernel releases it when
/// the process ends, however it ends.
pub struct FileLock {
    _file: std::fs::File,
}

/// Take the daemon lock of a SQLite database (`None` for Postgres or memory).
pub fn lock_sqlite(url: &str, owner: &str) -> anyhow::Result<Option<FileLock>> {
    let Some(file) = Database::sqlite_file(url) else {
        return Ok(None);
    };
    let path = PathBuf::from(format!("{file}.lock"));
    let mut lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the daemon lock {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            bail!(
                "another daemon ({}) is running on {file}: SQLite takes one daemon; stop it \
                 first, or share a Postgres database between daemons",
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    // Say who holds it, for the message above.
    lock.set_len(0)?;
    lock.rewind()?;
    lock.write_all(owner.as_bytes())?;
    Ok(Some(FileLock { _file: lock }))
}

/// At start, before anything is claimed: on SQLite every claim left in the file is a dead
/// daemon's (this one holds the lock), so all of them are freed now; on Postgres the first
/// beat, so the others know whose claims are whose from the first one on.
pub async fn take_over_at_start(db: &Database, owner: &str, now: Time) -> anyhow::Result<()> {
    match db {
        Database::Sqlite(_) => report(&db.take_over(owner, None).await?),
        Database::Postgres(_) => db.heartbeat(owner, now).await?,
    }
    Ok(())
}

/// On Postgres: beat every fifth of `dead_after`, and take over the claims of daemons
/// silent for longer than `dead_after`.
pub async fn run(app: Arc<App>, owner: String, mut stop: watch::Receiver<bool>) {
    if !matches!(app.db, Database::Postgres(_)) {
        return;
    }
    let dead_after = app.settings.dead_after;
    let every = (dead_after / 5).max(Duration::from_millis(100));
    let silence = chrono::Duration::from_std(dead_after).unwrap_or(chrono::Duration::MAX);
    loop {
        let now = app.clock.now();
        if let Err(e) = app.db.heartbeat(&owner, now).await {
            tracing::warn!("heartbeat failed: {e}");
        }
        match app.db.take_over(&owner, Some(now - silence)).await {
            Ok(taken) => report(&taken),
            Err(e) => tracing::warn!("looking for dead daemons failed: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
}

fn report(taken: &Takeover) {
    if taken.outbox > 0 || taken.customers > 0 {
        tracing::warn!(
            daemons = ?taken.daemons,
            outbox_rows = taken.outbox,
            customers = taken.customers,
            "took over the claims of daemons that stopped"
        );
    } else if !taken.daemons.is_empty() {
        // A daemon that stopped cleanly holds nothing: only its heartbeat row goes.
        tracing::info!(daemons = ?taken.daemons, "forgot daemons that stopped");
    }
}
