//! `canvas bench …`: rerunnable benchmarks whose figures go into BENCHMARKS.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use canvas_engine::Registry;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Validate N generated flow files (copies of the flows folder under new ids), in process.
    Validate {
        /// How many flow files to generate.
        #[arg(long, default_value_t = 1000)]
        files: usize,
        /// How many timed rounds (the first, cold round is reported apart).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The flows folder to copy from.
        #[arg(long, default_value = "flows")]
        flows: PathBuf,
        /// Keep the generated corpus in this folder (to time `canvas validate` on it).
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Enrol N customers in a 5-step flow (send, wait, branch, send, exit), drive them to
    /// the end, and compare with raw set-based SQL doing the same writes, in the same run.
    Engine {
        /// How many customers.
        #[arg(long, default_value_t = 200_000)]
        customers: usize,
        /// `sqlite://PATH` (default: a fresh file in the temp folder) or `postgres://…`
        /// (a fresh schema is created and dropped).
        #[arg(long)]
        database: Option<String>,
        /// Customers per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Skip the raw-SQL ceiling.
        #[arg(long)]
        no_raw: bool,
    },
    /// Load `canvas serve` daemons (started from this binary) over HTTP: ingestion
    /// throughput, event-to-outbox latency, delivery rate, and scale-out over Postgres.
    Serve(crate::bench_serve::Args),
    /// Time the web UI's pages (and the stats API) on a database filled with a million runs
    /// and five million history rows; budget 200 ms a page.
    Pages(crate::bench_serve::pages::Args),
}

pub fn run(bench: Bench, registry: &Registry) -> anyhow::Result<ExitCode> {
    match bench {
        Bench::Validate {
            files,
            rounds,
            flows,
            keep,
        } => validate(files, rounds.max(1), &flows, keep, registry),
        Bench::Engine {
            customers,
            database,
            batch,
            no_raw,
        } => crate::bench_engine::run(customers, database, batch.max(1), !no_raw, registry),
        Bench::Serve(args) => crate::bench_serve::run(args),
        Bench::Pages(args) => crate::bench_serve::pages::run(args),
    }
}

fn validate(
    n: usize,
    rounds: usize,
    flows: &Path,
    keep: Option<PathBuf>,
    registry: &Registry,
) -> anyhow::Result<ExitCode> {
    let source = canvas_engine::validate_paths(&[flows.to_path_buf()], registry)
        .with_context(|| format!("reading {}", flows.display()))?;
    if !source.is_valid() {
        bail!(
            "{} has errors; run `canvas validate {}` first",
            flows.display(),
            flows.display()
        );
    }
    let originals: Vec<(String, String)> = source
        .files
        .iter()
        .filter_map(|f| Some((f.flow_id.clone()?, std::fs::read_to_string(&f.path).ok()?)))
        .collect();
    if originals.is_empty() {
        bail!("no flows under {}", flows.display());
    }
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("canvas-bench-{}", std::process::id()))
    });
    let corpus = dir.join("flows");
    std::fs::create_dir_all(&corpus)?;
    copy_dir(&flows.join("templates"), &corpus.join("templates"))?;
    for i in 0..n {
        let (id, text) = &originals[i % originals.len()];
        let new_id = format!("{id}-{i}");
        let text = text.replacen(&format!("flow: {id}"), &format!("flow: {new_id}"), 1);
        std::fs::write(corpus.join(format!("{new_id}.yaml")), text)?;
    }

    let bar = ProgressBar::new(rounds as u64 + 1).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("validating {n} files"));
    let mut times: Vec<Duration> = Vec::new();
    let mut cold = Duration::ZERO;
    for round in 0..=rounds {
        let t = Instant::now();
        let v = canvas_engine::validate_paths(std::slice::from_ref(&corpus), registry)?;
        let took = t.elapsed();
        if !v.is_valid() || v.files.len() != n {
            bail!(
                "the generated corpus did not validate cleanly ({} files, {} diagnostics)",
                v.files.len(),
                v.diagnostics.len()
            );
        }
        if round == 0 {
            cold = took;
        } else {
            times.push(took);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    times.sort();
    let median = times[times.len() / 2];
    let best = times[0];
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "canvas bench validate: {n} flow files, {rounds} rounds, {} threads",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    )?;
    writeln!(out, "  first round   {:>9.1} ms", ms(cold))?;
    writeln!(out, "  best          {:>9.1} ms", ms(best))?;
    writeln!(
        out,
        "  median        {:>9.1} ms  ({:.0} µs per file, {:.0} files/s)",
        ms(median),
        median.as_secs_f64() * 1e6 / n as f64,
        n as f64 / median.as_secs_f64()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
