//! `canvas bench pages`: how fast the web UI's pages (and the stats API) answer on a big
//! database. A daemon started with the repository's `flows/` and `canvas.yaml` records its
//! flow versions in a fresh database; the benchmark then fills it with set-based SQL —
//! `--runs` runs (one customer each, a fifth still waiting), `--history` history rows, an
//! outbox row per run (one in twenty dead, the rest sent), and a year of outcome counters
//! per step — restarts the daemon on it, signs in like a browser, and times each page over
//! `--rounds` requests. Budget: 200 ms a page.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value as Json;

use super::TOKEN;
use super::daemon::{Daemon, Launch};
use super::db::{FreshDb, is_postgres};
use super::report::machine;
use super::setup::TempDir;

/// A page's budget.
const BUDGET: Duration = Duration::from_millis(200);

/// `canvas bench pages` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs in the database (one customer each).
    #[arg(long, default_value_t = 1_000_000)]
    pub runs: usize,
    /// History rows in the database (spread over the runs).
    #[arg(long, default_value_t = 5_000_000)]
    pub history: usize,
    /// `sqlite://PATH` (default: a fresh file in the temp folder) or `postgres://…` (a fresh
    /// database is created there and dropped after).
    #[arg(long)]
    pub database: Option<String>,
    /// Timed requests per page (after two untimed ones).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// The flows the daemon runs.
    #[arg(long, default_value = "flows")]
    pub flows: PathBuf,
    /// Its `canvas.yaml` (sandbox channels: nothing is sent anywhere).
    #[arg(long, default_value = "canvas.yaml")]
    pub config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(bench(args))
}

/// A flow as the daemon loaded it: id, version, step ids.
struct Flow {
    id: String,
    version: String,
    steps: Vec<String>,
}

async fn bench(args: Args) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.rounds == 0 {
        bail!("--runs and --rounds must be at least 1");
    }
    let dir = TempDir::new("pages")?;
    let db = FreshDb::create(args.database.as_deref(), "pages", dir.path()).await?;
    let launch = Launch {
        exe: std::env::current_exe().context("finding this binary")?,
        flows: args.flows.clone(),
        config: args.config.clone(),
        database: db.url.clone(),
        env: Vec::new(),
    };
    // The daemon migrates the database and records the versions of its flows.
    let mut daemon = Daemon::start(&launch).await?;
    let client = reqwest::Client::new();
    let flows = loaded_flows(&client, &daemon.base).await?;
    daemon.stop().await?;
    if flows.is_empty() {
        bail!("no flows under {}", args.flows.display());
    }
    let t = Instant::now();
    fill(&db.url, &flows, args.runs, args.history).await?;
    let filled = t.elapsed();

    let mut daemon = Daemon::start(&launch).await?;
    let base = daemon.base.clone();
    let cookie = sign_in(&base).await?;
    let big = &flows[0];
    let waiting_step = &big.steps[0];
    let pages = [
        ("flows list", "/ui/flows".to_owned()),
        ("flow canvas (7 days)", format!("/ui/flows/{}", big.id)),
        (
            "flow canvas (a year)",
            format!(
                "/ui/flows/{}?from={}&to={}",
                big.id,
                days_ago(364),
                days_ago(0)
            ),
        ),
        (
            "waiting at a step",
            format!("/ui/flows/{}/steps/{waiting_step}", big.id),
        ),
        ("customer story", "/ui/customers/c0000000".to_owned()),
        ("dead letters", "/ui/deadletters".to_owned()),
        ("sandbox inbox", "/ui/sandbox".to_owned()),
        (
            "stats API (a year)",
            format!("/v1/flows/{}/stats?from={}", big.id, days_ago(364)),
        ),
    ];
    let mut out = std::io::stdout().lock();
    let m = machine();
    writeln!(
        out,
        "canvas bench pages: {} — {} runs, {} history rows, {} outbox rows, {} flows; filled in {:.0} s",
        db.backend(),
        args.runs,
        args.history,
        args.runs,
        flows.len(),
        filled.as_secs_f64()
    )?;
    writeln!(
        out,
        "  machine: {} cores, {}, {} MB; {} timed requests per page, budget {} ms",
        m.cores,
        m.cpu,
        m.memory_mb,
        args.rounds,
        BUDGET.as_millis()
    )?;
    writeln!(
        out,
        "  {:<22} {:>9} {:>9} {:>9}  ",
        "page", "median", "p95", "max"
    )?;
    let mut over = 0;
    for (name, path) in &pages {
        let url = format!("{base}{path}");
        let mut times = Vec::with_capacity(args.rounds);
        for round in 0..args.rounds + 2 {
            let t = Instant::now();
            let resp = client
                .get(&url)
                .header(reqwest::header::COOKIE, &cookie)
                .bearer_auth(TOKEN)
                .send()
                .await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            let took = t.elapsed();
            if !status.is_success() {
                bail!(
                    "{path} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
            }
            if round >= 2 {
                times.push(took);
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
        let max = times[times.len() - 1];
        let verdict = if p95 <= BUDGET { "ok" } else { "OVER BUDGET" };
        if p95 > BUDGET {
            over += 1;
        }
        writeln!(
            out,
            "  {name:<22} {:>7.1}ms {:>7.1}ms {:>7.1}ms  {verdict}",
            ms(median),
            ms(p95),
            ms(max)
        )?;
    }
    daemon.stop().await?;
    drop(db);
    Ok(if over == 0 {
        ExitCode::SUCCESS
    } else {
        writeln!(
            out,
            "  {over} pages over the {} ms budget (p95)",
            BUDGET.as_millis()
        )?;
        ExitCode::FAILURE
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A local date `n` days back, for the range queries (the engine's zone need not match:
/// a year either way covers the counters).
fn days_ago(n: i64) -> String {
    (chrono::Utc::now().date_naive() - chrono::Duration::days(n)).to_string()
}

async fn loaded_flows(client: &reqwest::Client, base: &str) -> anyhow::Result<Vec<Flow>> {
    let list: Json = client
        .get(format!("{base}/v1/flows"))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut flows = Vec::new();
    for f in list["flows"].as_array().into_iter().flatten() {
        let id = f["id"].as_str().unwrap_or_default().to_owned();
        let one: Json = client
            .get(format!("{base}/v1/flows/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let steps: Vec<String> = one["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["step"].as_str().map(str::to_owned))
            .collect();
        if !steps.is_empty() {
            flows.push(Flow {
                id,
                version: f["version"].as_str().unwrap_or_default().to_owned(),
                steps,
            });
        }
    }
    Ok(flows)
}

/// Sign in as a browser does: the login form, then the session cookie.
async fn sign_in(base: &str) -> anyhow::Result<String> {
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .post(format!("{base}/ui/login"))
        .form(&[("token", TOKEN), ("next", "/ui/flows")])
        .send()
        .await?;
    let cookie = resp
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    cookie.with_context(|| format!("the login answered {} without a session", resp.status()))
}

/// Fill the database with set-based SQL (ids and values are generated here, never input).
async fn fill(url: &str, flows: &[Flow], runs: usize, history: usize) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    let per_run = history.div_ceil(runs).max(1);
    let n_flows = flows.len();
    let today = (now / 86_400_000) as i32;
    if is_postgres(url) {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await?;
        sqlx::query(
            "INSERT INTO customers (id, attributes, timezone, sends, cooldowns, updated_at)
             SELECT 'c' || lpad(i::text, 7, '0'),
                    json_build_object('first_name', '客' || i, 'phone', '+86138' || lpad(i::text, 8, '0')),
                    NULL, '[]', '{}', $2
             FROM generate_series(0, $1 - 1) AS i",
        )
        .bind(i64::try_from(runs)?)
        .bind(now)
        .execute(&pool)
        .await?;
        for (f, flow) in flows.iter().enumerate() {
            let steps: Vec<&str> = flow.steps.iter().map(String::as_str).collect();
            let args = (
                i64::try_from(runs)?,
                i64::try_from(n_flows)?,
                i64::try_from(f)?,
            );
            sqlx::query(
                "INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at,
                     waiting_for, vars, event, arm, last_touch, goal_until, converted_at,
                     outcome, seq, entered_at, updated_at)
                 SELECT $4 || '/c' || lpad(i::text, 7, '0') || '/1', $4, $5,
                     'c' || lpad(i::text, 7, '0'),
                     CASE WHEN i % 5 = 0 THEN 'waiting' ELSE 'ended' END,
                     CASE WHEN i % 5 = 0 THEN ($6::text[])[1 + (i / $2) % cardinality($6::text[])] END,
                     CASE WHEN i % 5 = 0 THEN $7 + i END, NULL, '{}', NULL, 'treated', NULL,
                     NULL, NULL, CASE WHEN i % 5 = 0 THEN NULL ELSE 'completed' END, $8,
                     $7 - i * 1000, $7
                 FROM generate_series(0, $1 - 1) AS i WHERE i % $2 = $3",
            )
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&flow.version)
            .bind(&steps)
            .bind(now)
            .bind(i64::try_from(per_run)?)
            .execute(&pool)
            .await?;
            sqlx::query(
                "INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail)
                 SELECT $4 || '/c' || lpad(i::text, 7, '0') || '/1', k, $4,
                     'c' || lpad(i::text, 7, '0'),
                     ($5::text[])[1 + (k - 1) % cardinality($5::text[])], $6 - i * 1000 + k,
                     'sent', '{\"channel\":\"sms\",\"template\":\"bench/hello\"}'
                 FROM generate_series(0, $1 - 1) AS i, generate_series(1, $7) AS k
                 WHERE i % $2 = $3",
            )
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&steps)
            .bind(now)
            .bind(i64::try_from(per_run)?)
            .execute(&pool)
            .await?;
            sqlx::query(
                "INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel, address,
                     template, payload, transactional, created_at, status, attempts,
                     next_attempt_at, last_error, sent_at, dead_at)
                 SELECT $4 || '/c' || lpad(i::text, 7, '0') || '/1/' || $5, 'message',
                     $4 || '/c' || lpad(i::text, 7, '0') || '/1', $4, 'c' || lpad(i::text, 7, '0'),
                     $5, 'sms', '+86138' || lpad(i::text, 8, '0'), 'bench/hello',
                     '{\"text\":\"你好, welcome\"}', false, $6 - i * 1000,
                     CASE WHEN i % 20 = 0 THEN 'dead' ELSE 'sent' END, 1, $6 - i * 1000,
                     CASE WHEN i % 20 = 0 THEN 'HTTP 400: bad number' END,
                     CASE WHEN i % 20 = 0 THEN NULL ELSE $6 - i * 1000 END,
                     CASE WHEN i % 20 = 0 THEN $6 - i * 1000 END
                 FROM generate_series(0, $1 - 1) AS i WHERE i % $2 = $3",
            )
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&flow.steps[0])
            .bind(now)
            .execute(&pool)
            .await?;
        }
        for sql in counters_sql(flows, runs, today) {
            sqlx::query(&sql).execute(&pool).await?;
        }
        sqlx::query("ANALYZE").execute(&pool).await?;
        pool.close().await;
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Off),
            )
            .await?;
        const NUMBERS: &str =
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1)";
        sqlx::query(&format!(
            "{NUMBERS} INSERT INTO customers (id, attributes, timezone, sends, cooldowns, updated_at)
             SELECT printf('c%07d', i),
                    json_object('first_name', '客' || i, 'phone', printf('+86138%08d', i)),
                    NULL, '[]', '{{}}', ?2 FROM n"
        ))
        .bind(i64::try_from(runs)?)
        .bind(now)
        .execute(&pool)
        .await?;
        for (f, flow) in flows.iter().enumerate() {
            let steps = serde_json::to_string(&flow.steps)?;
            let n_steps = i64::try_from(flow.steps.len())?;
            let args = (
                i64::try_from(runs)?,
                i64::try_from(n_flows)?,
                i64::try_from(f)?,
            );
            sqlx::query(&format!(
                "{NUMBERS} INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at,
                     waiting_for, vars, event, arm, last_touch, goal_until, converted_at,
                     outcome, seq, entered_at, updated_at)
                 SELECT printf('%s/c%07d/1', ?4, i), ?4, ?5, printf('c%07d', i),
                     iif(i % 5 = 0, 'waiting', 'ended'),
                     iif(i % 5 = 0, json_extract(?6, printf('$[%d]', (i / ?2) % ?7)), NULL),
                     iif(i % 5 = 0, ?8 + i, NULL), NULL, '{{}}', NULL, 'treated', NULL, NULL,
                     NULL, iif(i % 5 = 0, NULL, 'completed'), ?9, ?8 - i * 1000, ?8
                 FROM n WHERE i % ?2 = ?3"
            ))
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&flow.version)
            .bind(&steps)
            .bind(n_steps)
            .bind(now)
            .bind(i64::try_from(per_run)?)
            .execute(&pool)
            .await?;
            sqlx::query(&format!(
                "{NUMBERS}, k(j) AS (SELECT 1 UNION ALL SELECT j + 1 FROM k WHERE j < ?8)
                 INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail)
                 SELECT printf('%s/c%07d/1', ?4, i), j, ?4, printf('c%07d', i),
                     json_extract(?5, printf('$[%d]', (j - 1) % ?6)), ?7 - i * 1000 + j,
                     'sent', '{{\"channel\":\"sms\",\"template\":\"bench/hello\"}}'
                 FROM n, k WHERE i % ?2 = ?3"
            ))
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&steps)
            .bind(n_steps)
            .bind(now)
            .bind(i64::try_from(per_run)?)
            .execute(&pool)
            .await?;
            sqlx::query(&format!(
                "{NUMBERS} INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel,
                     address, template, payload, transactional, created_at, status, attempts,
                     next_attempt_at, last_error, sent_at, dead_at)
                 SELECT printf('%s/c%07d/1/%s', ?4, i, ?5), 'message', printf('%s/c%07d/1', ?4, i),
                     ?4, printf('c%07d', i), ?5, 'sms', printf('+86138%08d', i), 'bench/hello',
                     '{{\"text\":\"你好, welcome\"}}', 0, ?6 - i * 1000,
                     iif(i % 20 = 0, 'dead', 'sent'), 1, ?6 - i * 1000,
                     iif(i % 20 = 0, 'HTTP 400: bad number', NULL),
                     iif(i % 20 = 0, NULL, ?6 - i * 1000), iif(i % 20 = 0, ?6 - i * 1000, NULL)
                 FROM n WHERE i % ?2 = ?3"
            ))
            .bind(args.0)
            .bind(args.1)
            .bind(args.2)
            .bind(&flow.id)
            .bind(&flow.steps[0])
            .bind(now)
            .execute(&pool)
            .await?;
        }
        for sql in counters_sql(flows, runs, today) {
            sqlx::query(&sql).execute(&pool).await?;
        }
        sqlx::query("ANALYZE").execute(&pool).await?;
        pool.close().await;
    }
    Ok(())
}

/// A year of outcome counters (flow-wide and per step, a few metrics each, one shard) and
/// the waiting gauge: literal `INSERT`s, the same text for both backends.
fn counters_sql(flows: &[Flow], runs: usize, today: i32) -> Vec<String> {
    let per_day = (runs / flows.len().max(1) / 365).max(1);
    let mut rows: Vec<String> = Vec::new();
    let mut waiting: Vec<String> = Vec::new();
    for flow in flows {
        let (f, v) = (&flow.id, &flow.version);
        for day in today - 364..=today {
            for (metric, n) in [("entered", per_day), ("converted", per_day / 10)] {
                rows.push(format!("('{f}', {day}, '{v}', '', '{metric}', 0, {n})"));
            }
            rows.push(format!(
                "('{f}', {day}, '{v}', '', 'ended:completed', 0, {per_day})"
            ));
            for (i, step) in flow.steps.iter().enumerate() {
                rows.push(format!(
                    "('{f}', {day}, '{v}', '{step}', 'entered', 0, {per_day})"
                ));
                rows.push(format!(
                    "('{f}', {day}, '{v}', '{step}', 'sent:sms', 0, {per_day})"
                ));
                if let Some(next) = flow.steps.get(i + 1) {
                    rows.push(format!(
                        "('{f}', {day}, '{v}', '{step}', 'to:{next}', 0, {per_day})"
                    ));
                }
            }
        }
        for step in &flow.steps {
            let n = runs / 5 / flows.len().max(1) / flow.steps.len();
            waiting.push(format!("('{f}', '{v}', '{step}', 0, {n})"));
        }
    }
    let mut out: Vec<String> = rows
        .chunks(500)
        .map(|c| {
            format!(
                "INSERT INTO step_counts (flow, day, version, step, metric, shard, n) VALUES {}",
                c.join(", ")
            )
        })
        .collect();
    out.extend(waiting.chunks(500).map(|c| {
        format!(
            "INSERT INTO step_waiting (flow, version, step, shard, n) VALUES {}",
            c.join(", ")
        )
    }));
    out
}
