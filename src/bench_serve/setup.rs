//! Set-up: a fresh database, a receiver, flows, daemons, customers with phone numbers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use canvas_engine::store::{Database, Store};
use indicatif::ProgressBar;

use super::daemon::{Daemon, Launch};
use super::db::FreshDb;
use super::load::{Auth, Post, drive};
use super::receiver::Receiver;
use super::report::progress;
use super::{Ctx, FLOW, PROFILE_BATCH, STALL, TEMPLATE};

/// Everything one measurement runs on. Fields drop in order: daemons first (SIGTERM), then
/// the bench's own connection, the receiver, the database, the folder.
pub(super) struct Setup {
    pub(super) daemons: Vec<Daemon>,
    /// How the daemons were started (to start one again after a kill).
    pub(super) launch: Launch,
    pub(super) store: Database,
    pub(super) recv: Receiver,
    pub(super) db: FreshDb,
    pub(super) _dir: TempDir,
}

/// What [`Setup::finish`] observed.
pub(super) struct Notes {
    pub(super) backend: String,
    pub(super) lines: Vec<String>,
}

/// What a measurement runs on, beyond the defaults: the bench-send flow, an `sms` webhook
/// channel to the receiver, one daemon, no profiles.
pub(super) struct Plan<'a> {
    pub(super) tag: &'a str,
    pub(super) database: Option<&'a str>,
    /// The `sms` channel's `concurrency`.
    pub(super) concurrency: usize,
    /// How long the receiver takes to answer.
    pub(super) delay: Duration,
    pub(super) daemons: usize,
    /// Customers given a phone number and a name before the clock starts.
    pub(super) customers: usize,
    /// More flow files beside `bench-send.yaml` (file name, YAML); one of that name replaces it.
    pub(super) flows: &'a [(&'a str, &'a str)],
    /// More settings of the `sms` channel, one `key: value` a line.
    pub(super) channel: &'a [String],
    /// A `server:` section (whole lines), or empty.
    pub(super) server: &'a str,
    /// Sign requests with this secret (the receiver checks each signature).
    pub(super) secret: Option<&'a str>,
}

impl<'a> Plan<'a> {
    pub(super) fn new(tag: &'a str, database: Option<&'a str>) -> Plan<'a> {
        Plan {
            tag,
            database,
            concurrency: 256,
            delay: Duration::ZERO,
            daemons: 1,
            customers: 0,
            flows: &[],
            channel: &[],
            server: "",
            secret: None,
        }
    }
}

/// The environment variable the daemons read the `sms` channel's signing secret from.
const SECRET_ENV: &str = "CANVAS_BENCH_SMS_SECRET";

impl Setup {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start(
        ctx: &Ctx<'_>,
        database: Option<&str>,
        tag: &str,
        concurrency: usize,
        delay: Duration,
        daemons: usize,
        customers: usize,
    ) -> anyhow::Result<Setup> {
        let plan = Plan {
            concurrency,
            delay,
            daemons,
            customers,
            ..Plan::new(tag, database)
        };
        Setup::with(ctx, &plan).await
    }

    pub(super) async fn with(ctx: &Ctx<'_>, plan: &Plan<'_>) -> anyhow::Result<Setup> {
        let dir = TempDir::new(plan.tag)?;
        let db = FreshDb::create(plan.database, plan.tag, &dir.0).await?;
        let recv = Receiver::start(plan.delay, plan.secret.map(|s| s.as_bytes().to_vec())).await?;
        let flows = dir.0.join("flows");
        std::fs::create_dir_all(flows.join("templates/bench"))?;
        std::fs::write(flows.join("bench-send.yaml"), FLOW)?;
        // Written after the default, so a scenario may replace it.
        for (name, yaml) in plan.flows {
            std::fs::write(flows.join(name), yaml)?;
        }
        std::fs::write(flows.join("templates/bench/hello.txt"), TEMPLATE)?;
        let config = flows.join("canvas.yaml");
        let mut channel = String::new();
        for line in plan.channel {
            channel.push_str(&format!("    {line}\n"));
        }
        if plan.secret.is_some() {
            channel.push_str(&format!("    secret_env: {SECRET_ENV}\n"));
        }
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
{channel}{}",
                recv.addr,
                plan.concurrency.max(1),
                plan.server,
            ),
        )?;
        let launch = Launch {
            exe: ctx.exe.clone(),
            flows,
            config,
            database: db.url.clone(),
            env: plan
                .secret
                .map(|s| vec![(SECRET_ENV.to_owned(), s.to_owned())])
                .unwrap_or_default(),
        };
        let mut started = Vec::with_capacity(plan.daemons);
        for _ in 0..plan.daemons.max(1) {
            started.push(Daemon::start(&launch).await?);
        }
        let store = Database::connect(&db.url)
            .await
            .with_context(|| format!("opening {}", db.label()))?;
        let mut setup = Setup {
            daemons: started,
            launch,
            store,
            recv,
            db,
            _dir: dir,
        };
        if plan.customers > 0 {
            setup.load_profiles(ctx, plan.customers).await?;
        }
        Ok(setup)
    }

    /// SIGKILL daemon `i` and start it again on the same database; the instant of the kill
    /// and of the new daemon listening.
    pub(super) async fn kill_and_restart(
        &mut self,
        i: usize,
    ) -> anyhow::Result<(Instant, Instant)> {
        let d = self
            .daemons
            .get_mut(i)
            .ok_or_else(|| anyhow!("no daemon {i}"))?;
        d.kill()?;
        let killed = Instant::now();
        *d = Daemon::start(&self.launch).await?;
        Ok((killed, Instant::now()))
    }

    /// Give every customer a phone number and a name, through the daemons' Segment
    /// endpoint, and wait for the engine to apply them. Not timed.
    pub(super) async fn load_profiles(&mut self, ctx: &Ctx<'_>, n: usize) -> anyhow::Result<()> {
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

    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        for d in &mut self.daemons {
            d.check_alive()?;
        }
        Ok(())
    }

    /// Wait until the receiver has seen `n` distinct keys; fail when deliveries stop.
    pub(super) async fn wait_delivered(&mut self, n: u64, bar: &ProgressBar) -> anyhow::Result<()> {
        self.wait_delivered_within(n, bar, STALL).await
    }

    /// [`Setup::wait_delivered`], failing only after `stall` without a new key.
    pub(super) async fn wait_delivered_within(
        &mut self,
        n: u64,
        bar: &ProgressBar,
        stall: Duration,
    ) -> anyhow::Result<()> {
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
            } else if progress_at.elapsed() > stall {
                bail!(
                    "deliveries stopped at {got} of {n} for {} s{}",
                    stall.as_secs(),
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
    pub(super) async fn finish(mut self) -> Notes {
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

pub(super) fn s_backend_label(backend: &str) -> &'static str {
    match backend {
        "postgres" => "Postgres (local server, a fresh database)",
        _ => "SQLite (a fresh file, WAL)",
    }
}

/// A folder in the temp folder, removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub(super) fn new(tag: &str) -> anyhow::Result<TempDir> {
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
