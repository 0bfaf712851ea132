//! `canvas bench engine`: checkpointed transitions per second through the whole engine
//! (inbox → executor → set-based commit, timers → executor → commit), next to the ceiling of
//! raw set-based SQL doing the same writes on the same backend, in the same run.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use canvas_engine::Registry;
use canvas_engine::policy::Policy;
use canvas_engine::runtime::{FlowSet, Pace, Runtime};
use canvas_engine::state::{Event, InboxItem, ProfileUpdate, Time};
use canvas_engine::store::{Database, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

const FLOW: &str = r#"flow: bench-five
name: Five steps
description: The benchmark journey - send, wait, branch, send, exit.
timezone: UTC
trigger:
  event: joined
steps:
  - id: hello
    send: sms
    template: bench/hello
  - id: pause
    wait: { for: 1d }
  - id: still-here
    branch:
      - when: customer.tier != "blocked"
        next: follow-up
      - else: done
  - id: follow-up
    send: sms
    template: bench/follow-up
  - id: done
    exit: finished
"#;

pub fn run(
    n: usize,
    database: Option<String>,
    batch: usize,
    raw: bool,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(n, database, batch, raw, registry))
}

/// A fresh database for one measurement, and how to clean it up.
struct Fresh {
    db: Database,
    label: String,
    file: Option<PathBuf>,
}

async fn fresh(database: Option<&str>, tag: &str) -> anyhow::Result<Fresh> {
    match database {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let schema = format!("canvas_bench_{tag}_{}", std::process::id());
            let store = canvas_engine::store::PgStore::connect_with_schema(url, &schema)
                .await
                .with_context(|| format!("connecting to {}", canvas_engine::store::redact(url)))?;
            Ok(Fresh {
                db: Database::Postgres(store),
                label: "postgres (local server)".to_owned(),
                file: None,
            })
        }
        Some(url) => {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            let path = PathBuf::from(format!("{path}.{tag}"));
            let _ = std::fs::remove_file(&path);
            let db = Database::connect(&format!("sqlite://{}", path.display())).await?;
            Ok(Fresh {
                db,
                label: "sqlite (file, WAL)".to_owned(),
                file: Some(path),
            })
        }
        None => {
            let path =
                std::env::temp_dir().join(format!("canvas-bench-{}-{tag}.db", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let db = Database::connect(&format!("sqlite://{}", path.display())).await?;
            Ok(Fresh {
                db,
                label: "sqlite (file, WAL)".to_owned(),
                file: Some(path),
            })
        }
    }
}

impl Fresh {
    async fn cleanup(self) {
        if let Database::Postgres(pg) = &self.db
            && let Err(e) = pg.drop_schema().await
        {
            tracing::warn!("could not drop the benchmark schema: {e}");
        }
        drop(self.db);
        if let Some(f) = self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", f.display()));
            }
        }
    }
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{msg:<24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_owned());
    bar
}

async fn bench(
    n: usize,
    database: Option<String>,
    batch: usize,
    raw: bool,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("canvas-bench-flow-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("templates/bench"))?;
    std::fs::write(dir.join("bench-five.yaml"), FLOW)?;
    std::fs::write(
        dir.join("templates/bench/hello.txt"),
        "Hi {{ customer.first_name }}, welcome to the club.\n",
    )?;
    std::fs::write(
        dir.join("templates/bench/follow-up.txt"),
        "{{ customer.first_name }}, your first visit gift is waiting.\n",
    )?;
    let validation = canvas_engine::validate_paths(std::slice::from_ref(&dir), registry)?;
    let Some(flow) = validation.flows().next().cloned() else {
        bail!(
            "the benchmark flow does not validate: {:?}",
            validation.diagnostics
        );
    };
    let fresh_db = fresh(database.as_deref(), "engine").await?;
    let label = fresh_db.label.clone();
    // A weekday morning, UTC customers: no quiet hours, caps leave room for two sends a day
    // apart, so every customer takes all five steps.
    let t0: Time = chrono::DateTime::parse_from_rfc3339("2026-01-05T10:00:00Z")?.to_utc();
    let mut runtime = Runtime::new(
        fresh_db.db,
        FlowSet::new([flow]),
        Policy::default(),
        registry.clone(),
    );
    runtime.batch_size = batch;
    // Recording a version reads its file: remove the scratch folder only afterwards.
    let registered = runtime.register_versions(t0).await;
    let _ = std::fs::remove_dir_all(&dir);
    registered?;

    // Set-up, not timed: profiles, then the events that enrol them.
    let setup = bar(2 * n as u64, "loading customers");
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let items: Vec<InboxItem> = chunk
            .iter()
            .map(|i| {
                let mut set = serde_json::Map::new();
                set.insert("phone".into(), json!(format!("+86138{i:08}")));
                set.insert("first_name".into(), json!(format!("Member{i}")));
                set.insert(
                    "tier".into(),
                    json!(if i % 3 == 0 { "gold" } else { "silver" }),
                );
                InboxItem::Profile(ProfileUpdate {
                    id: None,
                    customer_id: format!("c{i:08}"),
                    set,
                    timezone: Some("UTC".into()),
                    at: t0,
                })
            })
            .collect();
        runtime.store.enqueue(&items).await?;
        setup.inc(items.len() as u64);
    }
    runtime.process_inbox(t0).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let items: Vec<InboxItem> = chunk
            .iter()
            .map(|i| {
                InboxItem::Event(Event {
                    id: format!("joined-{i}"),
                    customer_id: format!("c{i:08}"),
                    name: "joined".into(),
                    data: json!({}),
                    occurred_at: t0,
                })
            })
            .collect();
        runtime.store.enqueue(&items).await?;
        setup.inc(items.len() as u64);
    }
    setup.finish_and_clear();

    let enrol = bar(n as u64, "enrol, send, wait");
    let started = Instant::now();
    let first = runtime
        .process_inbox_with(Pace::at(t0), |round| enrol.inc(round.items))
        .await?;
    let enrol_secs = started.elapsed().as_secs_f64();
    enrol.finish_and_clear();
    let waiting = runtime.store.counts().await?.waiting;
    let rss_waiting = rss_mb("VmRSS");

    let t1 = t0 + chrono::Duration::days(1);
    let fire = bar(n as u64, "timers, branch, send, exit");
    let started = Instant::now();
    // Each customer takes three steps in this phase: branch, send, exit.
    let second = runtime
        .fire_due_with(Pace::at(t1), |round| fire.inc(round.transitions / 3))
        .await?;
    let fire_secs = started.elapsed().as_secs_f64();
    fire.finish_and_clear();

    let counts = runtime.store.counts().await?;
    let expect_history = 5 * n as u64;
    if counts.history != expect_history
        || counts.outbox != 2 * n as u64
        || counts.waiting != 0
        || waiting != n as u64
    {
        bail!(
            "the engine did not do the expected work: {} waiting after enrolment, then {} history rows (want {expect_history}), {} outbox rows (want {}), {} still waiting",
            waiting,
            counts.history,
            counts.outbox,
            2 * n,
            counts.waiting
        );
    }
    let fresh_engine = Fresh {
        db: runtime.store,
        label: label.clone(),
        file: fresh_db.file,
    };
    fresh_engine.cleanup().await;

    let transitions = first.transitions + second.transitions;
    let secs = enrol_secs + fire_secs;
    let rate = transitions as f64 / secs;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "canvas bench engine: {n} customers, {label}, {batch} customers per transaction, {} cores",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    )?;
    writeln!(
        out,
        "  enrol → send → wait       {:>8.2} s  {:>9.0} transitions/s",
        enrol_secs,
        first.transitions as f64 / enrol_secs
    )?;
    writeln!(
        out,
        "  timer → branch → send → exit {:>5.2} s  {:>9.0} transitions/s",
        fire_secs,
        second.transitions as f64 / fire_secs
    )?;
    writeln!(
        out,
        "  engine                    {:>8.2} s  {:>9.0} transitions/s  ({transitions} checkpointed, {} commits)",
        secs,
        rate,
        first.commits + second.commits
    )?;
    if let Some(mb) = rss_waiting {
        writeln!(
            out,
            "  resident with {n} runs waiting: {mb:.0} MB (peak {:.0} MB)",
            rss_mb("VmHWM").unwrap_or(mb)
        )?;
    }
    drop(out);
    if raw {
        let fresh_raw = fresh(database.as_deref(), "raw").await?;
        let report = canvas_engine::store::raw::raw_ceiling(&fresh_raw.db, n, 1000).await?;
        // SQLite only: the same writes into the issue's narrow tables, to show what the
        // width of the engine's rows costs.
        let narrow = match &fresh_raw.db {
            Database::Sqlite(s) => {
                Some(canvas_engine::store::raw::narrow_ceiling(s, n, 1000).await?)
            }
            Database::Postgres(_) => None,
        };
        fresh_raw.cleanup().await;
        let ceiling = report.transitions as f64 / report.seconds;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "  raw set-based SQL         {:>8.2} s  {:>9.0} transitions/s  (1 UPDATE + 2 INSERTs per 1000, no engine)",
            report.seconds, ceiling
        )?;
        writeln!(
            out,
            "  engine share of the raw ceiling: {:.0}%",
            100.0 * rate / ceiling
        )?;
        if let Some(narrow) = narrow {
            writeln!(
                out,
                "  raw, narrow tables        {:>8.2} s  {:>9.0} transitions/s  (the same writes, 4+4+2 columns, no secondary index: {:.1}× the engine's rows)",
                narrow.seconds,
                narrow.per_second(),
                narrow.per_second() / ceiling
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A line of /proc/self/status in MB (Linux); `None` elsewhere.
fn rss_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
