//! `canvas`: the command line. Thin wiring of the engine and the node catalogue.

mod batch;
mod bench;
mod bench_engine;
mod bench_serve;
mod checks;
mod deadletters;
mod explain;
mod log;
mod outcomes;
mod output;
mod play;
mod serve;
mod status;
mod ui;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

/// mimalloc instead of glibc's malloc: the engine allocates and frees many short-lived
/// strings across threads (rows built on one thread, freed on another), where glibc spent
/// about a fifth of the CPU in `malloc_consolidate`/`unlink_chunk` (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand, ValueEnum};

/// Marketing-automation canvas: customer journeys as YAML graphs.
#[derive(Debug, Parser)]
#[command(name = "canvas", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// The dead letters, most recently dead first.
    List {
        #[command(flatten)]
        store: serve::config::StoreArgs,
        #[arg(long)]
        flow: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        /// Text the last error contains (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Send a dead letter again, under the same idempotency key.
    Retry {
        /// The outbox key (`RUN_ID/STEP_ID`), as `list` prints it.
        key: String,
        #[command(flatten)]
        store: serve::config::StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check flow files: every error with file:line:column and a hint.
    Validate {
        /// Flow files or folders (searched recursively). Default: `flows`.
        paths: Vec<PathBuf>,
        /// Output for people, for tools (json) or for GitHub Actions annotations.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Draw a flow as a Mermaid or Graphviz graph.
    Graph {
        /// A flow file, or a flow id found under `--flows`.
        flow: String,
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
        /// Where to look up a flow given by id.
        #[arg(long, default_value = "flows")]
        flows: PathBuf,
    },
    /// Run flow tests (`*.test.yaml`): scripted customers in virtual time, checked against
    /// what they must receive and where their runs must end.
    Test {
        /// Test files or folders (searched recursively). Default: `flows`.
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Play a customer timeline through a flow in virtual time and print each customer's
    /// trace: step, time, what was sent or skipped and why.
    Simulate {
        /// A flow file, or a flow id found under `--flows`.
        flow: String,
        /// The timeline: customers, events and profile updates (the test-file format).
        #[arg(long)]
        timeline: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        #[arg(long, default_value = "flows")]
        flows: PathBuf,
    },
    /// Add events and profile updates (JSON lines) to a database's inbox; events already
    /// there (same id) are dropped.
    Ingest {
        /// A file of JSON lines: `{"kind":"event","id":…,"customer_id":…,"name":…,
        /// "data":{…},"occurred_at":"…"}` or `{"kind":"profile","customer_id":…,"set":{…},"at":"…"}`.
        file: PathBuf,
        #[command(flatten)]
        store: serve::config::StoreArgs,
    },
    /// Apply the inbox and fire due timers once, then exit: a batch job (`canvas serve` does
    /// this continuously, and also fires schedules and segment rechecks). Safe to kill and
    /// rerun at any moment.
    Run {
        #[command(flatten)]
        store: serve::config::StoreArgs,
        /// Run as if it were this time (`2026-03-14T09:00+08:00`); default: now.
        #[arg(long)]
        at: Option<String>,
        /// Customers per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Where customers are and what the journeys achieved: runs waiting at each step,
    /// conversions per arm, and the lift of a holdout.
    Status {
        #[command(flatten)]
        store: serve::config::StoreArgs,
        /// One flow only.
        #[arg(long)]
        flow: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// A customer's story from the database: every run, each step and why, in the
    /// customer's time zone; with --step or --template, a plain answer (sent when, not sent
    /// why, never entered why).
    Explain {
        /// The customer id.
        customer: String,
        /// One flow only.
        #[arg(long)]
        flow: Option<String>,
        /// Answer for this step id.
        #[arg(long, conflicts_with = "template")]
        step: Option<String>,
        /// Answer for this template (`birthday/day`).
        #[arg(long)]
        template: Option<String>,
        #[command(flatten)]
        store: serve::config::StoreArgs,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Dead letters: messages the dispatcher gave up on; list them, or send one again.
    Deadletters {
        #[command(subcommand)]
        action: DeadLetters,
    },
    /// Run the daemon: the HTTP API, the engine loop (inbox, timers, schedules) and the
    /// dispatcher, until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// Print the JSON Schema of the flow language (committed as schema/flow.schema.json).
    Schema,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
    Github,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
}

fn main() -> ExitCode {
    log::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // `canvas simulate … | head`: the reader has gone, which is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Errors quote URLs ("opening postgres://…"): never with their password.
            let text = chain(&e);
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                canvas_engine::store::redact(&text)
            );
            ExitCode::from(2)
        }
    }
}

/// `e` and its causes, `: `-separated like `{:#}`, without a cause that its outer message
/// already quotes (sqlx's and the store's messages repeat their source's text).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut outer = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if !outer.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
        outer = message;
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let registry = canvas_nodes::catalogue();
    match cli.command {
        Command::Validate { paths, format } => {
            let paths = if paths.is_empty() {
                vec![PathBuf::from("flows")]
            } else {
                paths
            };
            let mut validation = canvas_engine::validate_paths(&paths, &registry)?;
            checks::check_policies(&paths, &mut validation, &registry);
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let mut stdout = std::io::stdout().lock();
            output::validation(&mut stdout, &validation, format, color)?;
            Ok(if validation.is_valid() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Graph {
            flow,
            format,
            flows,
        } => {
            let path = PathBuf::from(&flow);
            let validation = if path.is_file() {
                canvas_engine::validate_paths(&[path], &registry)?
            } else {
                let all = canvas_engine::validate_paths(std::slice::from_ref(&flows), &registry)
                    .with_context(|| format!("looking up flow `{flow}`"))?;
                let Some(file) = all
                    .files
                    .iter()
                    .find(|f| f.flow_id.as_deref() == Some(flow.as_str()))
                else {
                    bail!(
                        "no flow file `{flow}` and no flow with id `{flow}` under {}",
                        flows.display()
                    );
                };
                let file = file.path.clone();
                canvas_engine::validate_paths(&[file], &registry)?
            };
            let mut stdout = std::io::stdout().lock();
            let Some(compiled) = validation.flows().next() else {
                let color =
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
                output::validation(
                    &mut std::io::stderr().lock(),
                    &validation,
                    Format::Human,
                    color,
                )?;
                return Ok(ExitCode::from(1));
            };
            let text = match format {
                GraphFormat::Mermaid => canvas_engine::render::mermaid(compiled),
                GraphFormat::Dot => canvas_engine::render::dot(compiled),
            };
            stdout.write_all(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve::run(args, &registry),
        Command::Schema => {
            std::io::stdout()
                .lock()
                .write_all(canvas_engine::schema::flow_schema_json().as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest { file, store } => batch::ingest(&file, store.resolve()?),
        Command::Run {
            store,
            at,
            batch: size,
        } => batch::run(store.resolve()?, at.as_deref(), size.max(1), &registry),
        Command::Status {
            store,
            flow,
            format,
        } => status::status(store.resolve()?, flow.as_deref(), format),
        Command::Explain {
            customer,
            flow,
            step,
            template,
            store,
            format,
        } => explain::explain(
            store.resolve()?,
            explain::Question {
                customer,
                flow,
                step,
                template,
            },
            format,
        ),
        Command::Deadletters { action } => match action {
            DeadLetters::List {
                store,
                flow,
                channel,
                reason,
                limit,
                format,
            } => {
                let filter = canvas_engine::state::DeadLetterFilter {
                    flow,
                    channel,
                    reason,
                    limit: limit.clamp(1, 100_000),
                };
                deadletters::list(store.resolve()?, filter, format)
            }
            DeadLetters::Retry { key, store } => deadletters::retry(store.resolve()?, &key),
        },
        Command::Test { paths, format } => play::test(paths, format, &registry),
        Command::Simulate {
            flow,
            timeline,
            format,
            flows,
        } => play::simulate(&flow, &timeline, &flows, format, &registry),
        Command::Bench { what } => bench::run(what, &registry),
    }
}
