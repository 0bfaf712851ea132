//! A `canvas serve` daemon for integration tests: the real binary on a fresh SQLite file and
//! a free port, and small HTTP helpers.

#![allow(dead_code)] // each test file uses part of it
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WRITE: &str = "write-token-1";
pub const READ: &str = "read-token-1";

pub const FLOW: &str = "flow: welcome
name: Welcome
timezone: UTC
trigger:
  event: signed_up
steps:
  - id: hello
    send: sms
    template: w/hello
    priority: transactional
  - id: wait-order
    wait:
      event: order_paid
      timeout: 7d
    on_timeout: done
  - id: thanks
    send: sms
    template: w/thanks
    priority: transactional
  - id: done
    exit: finished
";

/// An `sms` channel for tests that do not look at delivery: a webhook to a closed port,
/// dead-lettered at the first failure.
pub const SINK_SMS: &str = "channels:
  sms:
    type: webhook
    url: http://127.0.0.1:9/sink
    timeout: 1s
    retry: { max_attempts: 1 }
";

pub struct Daemon {
    child: Child,
    pub base: String,
    /// The flows folder it watches.
    pub flows: std::path::PathBuf,
    /// Every line it wrote to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Start `canvas serve` on a fresh SQLite file and a free port; `extra_config` is
    /// appended to canvas.yaml.
    pub fn start(extra_config: &str) -> Daemon {
        Daemon::start_with(extra_config, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with(extra_config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let flows = dir.path().join("flows");
        write_flows(&flows, extra_config);
        let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
        Daemon::spawn(flows, &database, env, Some(dir))
    }

    /// `canvas serve` on an existing flows folder and database.
    pub fn spawn(
        flows: std::path::PathBuf,
        database: &str,
        env: &[(&str, &str)],
        dir: Option<tempfile::TempDir>,
    ) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_canvas"))
            .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
            .arg(&flows)
            .arg("--database")
            .arg(database)
            .env("CANVAS_API_TOKEN", WRITE)
            .env("CANVAS_API_READ_TOKEN", READ)
            .env("CANVAS_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("canvas serve: listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
                eprintln!("[daemon] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the daemon printed its address");
        Daemon {
            child,
            base,
            flows,
            log,
            _dir: dir,
        }
    }

    /// SIGKILL: no goodbye, whatever was in flight stays claimed until its lease runs out.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Wait (up to 20 s) for a stderr line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the daemon never logged `{needle}`"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_flows(flows: &Path, extra_config: &str) {
    std::fs::create_dir_all(flows.join("templates/w")).unwrap();
    std::fs::write(flows.join("welcome.yaml"), FLOW).unwrap();
    std::fs::write(
        flows.join("templates/w/hello.txt"),
        "Welcome, {{ customer.first_name }}!\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("templates/w/thanks.txt"),
        "Thanks for order {{ event.data.order_id }}\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        format!("timezone: UTC\nquiet_hours: off\n{extra_config}"),
    )
    .unwrap();
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub async fn raw(url: &str, token: &str, body: &'static str) -> (u16, Value) {
    let resp = client()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Poll `GET url` until `done` holds for the JSON body (the engine applies the inbox
/// asynchronously), or fail after 20 s.
pub async fn until(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = call(reqwest::Method::GET, url, Some(READ), None).await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "gave up waiting on {url}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// The Postgres server the tests use: `CANVAS_TEST_POSTGRES_URL`, else the local server at
/// its standard address (a test that cannot reach it fails; it never passes unrun).
pub fn pg_base() -> String {
    std::env::var("CANVAS_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh database on the test server; dropped afterwards.
pub struct FreshDb {
    admin: String,
    name: String,
    pub url: String,
}

impl FreshDb {
    pub async fn create(base: &str, prefix: &str) -> FreshDb {
        use sqlx::Connection;
        let name = format!("{prefix}_{}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(base).await.unwrap_or_else(|e| {
            panic!(
                "Postgres at {base} cannot be reached: {e}. Start it, point \
                     CANVAS_TEST_POSTGRES_URL at a server, or leave the Postgres tests out so the \
                     summary counts them as filtered out: cargo test --workspace -- --skip postgres"
            )
        });
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        FreshDb {
            admin: base.to_owned(),
            url: format!("{prefix}/{name}"),
            name,
        }
    }

    pub async fn drop_it(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

/// Read-only SQL on a daemon's database (SQLite file or Postgres), for what the API does
/// not show. Queries must read the same on both.
pub enum Peek {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Peek {
    pub async fn connect(url: &str) -> Peek {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .read_only(true);
            Peek::Sqlite(sqlx::SqlitePool::connect_with(options).await.unwrap())
        } else {
            Peek::Postgres(sqlx::PgPool::connect(url).await.unwrap())
        }
    }

    /// One integer (a `COUNT(*)`, a `MAX`, …; `NULL` reads 0).
    pub async fn number(&self, sql: &str) -> i64 {
        let v: Option<i64> = match self {
            Peek::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
            Peek::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        };
        v.unwrap_or(0)
    }

    /// Rows of two integers.
    pub async fn pairs(&self, sql: &str) -> Vec<(i64, i64)> {
        match self {
            Peek::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
            Peek::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
        }
    }

    /// One column of text.
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        match self {
            Peek::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await.unwrap(),
            Peek::Postgres(p) => sqlx::query_scalar(sql).fetch_all(p).await.unwrap(),
        }
    }

    pub async fn close(self) {
        match self {
            Peek::Sqlite(p) => p.close().await,
            Peek::Postgres(p) => p.close().await,
        }
    }
}

/// Copy a folder and everything in it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The repository's `flows/` and root `canvas.yaml` (sandbox channels), as a checkout has
/// them, copied into `dir`; the flows folder.
pub fn shipped(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let flows = dir.join("flows");
    copy_dir(&root.join("flows"), &flows);
    std::fs::copy(root.join("canvas.yaml"), dir.join("canvas.yaml")).unwrap();
    flows
}

/// A fixed-offset zone where it is about `local_hour`:00 now, whenever the test runs
/// (`Etc/GMT+4` is UTC−4: the sign is POSIX's).
pub fn zone_at(local_hour: i64) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = i64::try_from((secs / 3600) % 24).unwrap();
    let offset = (local_hour - hour + 12).rem_euclid(24) - 12;
    match offset {
        0 => "Etc/GMT".to_owned(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// About 15:00 now: inside `new-member-welcome`'s 10:00–20:00 window and outside the
/// shipped 21:00–09:00 quiet hours.
pub fn afternoon_zone() -> String {
    zone_at(15)
}
