//! Where `canvas serve` takes its settings from: flags, then `CANVAS_*` environment
//! variables, then the `server:` section of `canvas.yaml`, then defaults — the first that
//! says something wins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use canvas_engine::policy::Policy;
use canvas_engine::store::DatabaseUrl;
use serde::Deserialize;

/// The longest request body, by default (a batch of 1,000 events of ~4 KB each).
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// The most events (or Segment messages) in one batch, by default.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// The shortest `database_timeout` accepted: below it a busy but healthy database fails.
const MIN_DATABASE_TIMEOUT: Duration = Duration::from_millis(100);

/// Where the engine's data is: the flows folder, `canvas.yaml` and the database. `canvas
/// serve`, `run`, `ingest` and `status` all take these and resolve them with
/// [`StoreArgs::resolve`], so the operator's commands read the daemon's database.
#[derive(Debug, Default, clap::Args)]
pub struct StoreArgs {
    /// The flows folder (searched recursively). Env: CANVAS_FLOWS. Default: `flows`.
    #[arg(long, env = "CANVAS_FLOWS")]
    pub flows: Option<PathBuf>,
    /// The engine's config file. Env: CANVAS_CONFIG. Default: `canvas.yaml` in the flows
    /// folder or its parent, when there is one.
    #[arg(long, env = "CANVAS_CONFIG")]
    pub config: Option<PathBuf>,
    /// `sqlite://PATH` or `postgres://…`. Env: CANVAS_DATABASE_URL. Default:
    /// `server.database` in canvas.yaml, else `sqlite://canvas.db`.
    // `hide_env_values`: `--help` would print the URL from the environment, password and all.
    #[arg(long, env = "CANVAS_DATABASE_URL", hide_env_values = true)]
    pub database: Option<DatabaseUrl>,
    /// How long to wait for the database before giving up: a request answers 503 and
    /// start-up fails after this long (`500ms`, `5s`). Env: CANVAS_DATABASE_TIMEOUT.
    /// Default: `server.database_timeout` in canvas.yaml, else 5s.
    #[arg(long, env = "CANVAS_DATABASE_TIMEOUT")]
    pub database_timeout: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address to listen on. Env: CANVAS_LISTEN. Default: 127.0.0.1:8080.
    #[arg(long, env = "CANVAS_LISTEN")]
    pub listen: Option<SocketAddr>,
}

/// [`StoreArgs`], resolved: flag, then environment (both by clap), then `canvas.yaml`'s
/// `server:` section, then the default.
pub struct Store {
    pub flows: PathBuf,
    pub config: Option<PathBuf>,
    pub policy: Policy,
    pub section: ServerSection,
    pub database: DatabaseUrl,
    pub database_timeout: Duration,
}

impl StoreArgs {
    /// The one place the database URL, its timeout and `canvas.yaml` are decided.
    pub fn resolve(self) -> anyhow::Result<Store> {
        let flows = self.flows.unwrap_or_else(|| PathBuf::from("flows"));
        let config = match self.config {
            Some(path) => {
                if !path.is_file() {
                    bail!("--config {}: no such file", path.display());
                }
                Some(path)
            }
            None => find_config(&flows),
        };
        let policy = match &config {
            Some(path) => Policy::load(path).map_err(|e| describe(&e.diagnostics))?,
            None => Policy::default(),
        };
        let section: ServerSection = policy
            .section("server")
            .map_err(|e| describe(&e.diagnostics))?
            .unwrap_or_default();
        let database = self
            .database
            .or(section.database.clone().map(DatabaseUrl::from))
            .unwrap_or_else(|| DatabaseUrl::from("sqlite://canvas.db"));
        let timeout = match (self.database_timeout, section.database_timeout.clone()) {
            (Some(t), _) => Some(("--database-timeout (CANVAS_DATABASE_TIMEOUT)", t)),
            (None, Some(t)) => Some(("server.database_timeout", t)),
            (None, None) => None,
        };
        let database_timeout = match timeout {
            None => canvas_engine::store::DEFAULT_TIMEOUT,
            Some((what, t)) => {
                let d = canvas_channels::parse_duration(&t).with_context(|| what.to_owned())?;
                if d < MIN_DATABASE_TIMEOUT {
                    bail!(
                        "{what}: `{t}` is shorter than {}ms, which would fail a busy but healthy \
                         database",
                        MIN_DATABASE_TIMEOUT.as_millis()
                    );
                }
                d
            }
        };
        Ok(Store {
            flows,
            config,
            policy,
            section,
            database,
            database_timeout,
        })
    }
}

/// The `server:` section of `canvas.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on.
    pub listen: Option<String>,
    /// `sqlite://PATH` or `postgres://…`.
    pub database: Option<String>,
    /// How long to wait for the database (default 5s), e.g. `2s`.
    pub database_timeout: Option<String>,
    /// Bearer tokens: each names its scope and where its secret is.
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    /// Segment-compatible ingestion (`/v1/batch`, `/v1/track`, `/v1/identify`).
    pub segment: Option<SegmentSpec>,
    /// Request size limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// How long claims last when several daemons share a Postgres database.
    #[serde(default)]
    pub leases: LeasesSpec,
}

/// Durations such as `30s`, `2m`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasesSpec {
    /// A round's hold on its customers (default 30s): a daemon that dies holding them
    /// blocks those customers this long.
    pub customers: Option<String>,
    /// A dispatcher's hold on the outbox rows it claimed (default 2m): a row claimed by a
    /// daemon that died is delivered by another after this long. Must exceed the time a
    /// row can wait for its channel's rate limit plus the request itself.
    pub outbox: Option<String>,
    /// How long a daemon's heartbeat may be silent before the others take over its claims
    /// (default 5s). Daemons beat every fifth of this.
    pub dead_after: Option<String>,
}

/// A bearer token: its scope, and its value in an environment variable (`env`) or, for a
/// development setup, in the file itself (`token`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    pub scope: Scope,
    pub env: Option<String>,
    pub token: Option<String>,
}

/// What a token may do: `read` the API, or also `write` (ingest, pause, resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Read,
    Write,
}

/// The write keys the Segment/RudderStack SDKs send as the HTTP basic-auth user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSpec {
    /// Environment variable holding the write key.
    pub write_key_env: Option<String>,
    /// The write key itself (development only: prefer `write_key_env`).
    pub write_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest request body in bytes.
    pub max_body_bytes: Option<usize>,
    /// Most events or messages in one batch.
    pub max_batch: Option<usize>,
}

/// Everything `canvas serve` runs with, resolved. Its `Debug` shows no secret: the database
/// URL without its password, tokens and write keys by count.
pub struct Settings {
    pub flows: PathBuf,
    pub config: Option<PathBuf>,
    pub policy: Policy,
    pub database: DatabaseUrl,
    /// The longest wait for the database (pool, connection, SQLite lock; each API request's
    /// database work as a whole).
    pub database_timeout: Duration,
    pub listen: SocketAddr,
    /// `(token, scope)`.
    pub tokens: Vec<(String, Scope)>,
    pub write_keys: Vec<String>,
    pub max_body: usize,
    pub max_batch: usize,
    pub customer_lease: std::time::Duration,
    pub outbox_lease: std::time::Duration,
    pub dead_after: std::time::Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("flows", &self.flows)
            .field("config", &self.config)
            .field("database", &self.database)
            .field("database_timeout", &self.database_timeout)
            .field("listen", &self.listen)
            .field("tokens", &format_args!("{} token(s)", self.tokens.len()))
            .field(
                "write_keys",
                &format_args!("{} key(s)", self.write_keys.len()),
            )
            .field("max_body", &self.max_body)
            .field("max_batch", &self.max_batch)
            .field("customer_lease", &self.customer_lease)
            .field("outbox_lease", &self.outbox_lease)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Resolve the settings; `env` reads an environment variable (injected for tests).
    pub fn resolve(
        args: ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Settings> {
        let Store {
            flows,
            config,
            policy,
            section,
            database,
            database_timeout,
        } = args.store.resolve()?;
        let listen = match args.listen {
            Some(a) => a,
            None => match &section.listen {
                Some(text) => text.parse().with_context(|| {
                    format!("server.listen: `{text}` is not an address such as 127.0.0.1:8080")
                })?,
                None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            },
        };
        let mut tokens = Vec::new();
        for (var, scope) in [
            ("CANVAS_API_TOKEN", Scope::Write),
            ("CANVAS_API_READ_TOKEN", Scope::Read),
        ] {
            if let Some(t) = env(var).filter(|t| !t.is_empty()) {
                tokens.push((t, scope));
            }
        }
        for (i, spec) in section.tokens.iter().enumerate() {
            let value = secret(
                &format!("server.tokens[{i}]"),
                spec.env.as_deref(),
                spec.token.as_deref(),
                &env,
            )?;
            tokens.push((value, spec.scope));
        }
        let mut write_keys = Vec::new();
        if let Some(k) = env("CANVAS_WRITE_KEY").filter(|k| !k.is_empty()) {
            write_keys.push(k);
        }
        if let Some(spec) = &section.segment {
            write_keys.push(secret(
                "server.segment",
                spec.write_key_env.as_deref(),
                spec.write_key.as_deref(),
                &env,
            )?);
        }
        if tokens.is_empty() && !listen.ip().is_loopback() {
            bail!(
                "no API token: set CANVAS_API_TOKEN (write) or CANVAS_API_READ_TOKEN, or `server.tokens` in the config; without one, `canvas serve` only listens on a loopback address"
            );
        }
        let max_body = section.limits.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
        let max_batch = section.limits.max_batch.unwrap_or(DEFAULT_MAX_BATCH);
        if max_body == 0 || max_batch == 0 {
            bail!("server.limits: `max_body_bytes` and `max_batch` must be at least 1");
        }
        let lease = |what: &str,
                     text: &Option<String>,
                     default: u64|
         -> anyhow::Result<std::time::Duration> {
            match text {
                None => Ok(std::time::Duration::from_secs(default)),
                Some(t) => {
                    let d = canvas_channels::parse_duration(t)
                        .with_context(|| format!("server.leases.{what}: `{t}`"))?;
                    if d < std::time::Duration::from_secs(1) {
                        bail!("server.leases.{what}: `{t}` is shorter than a second");
                    }
                    Ok(d)
                }
            }
        };
        let customer_lease = lease("customers", &section.leases.customers, 30)?;
        let outbox_lease = lease("outbox", &section.leases.outbox, 120)?;
        let dead_after = lease("dead_after", &section.leases.dead_after, 5)?;
        Ok(Settings {
            flows,
            config,
            policy,
            database,
            database_timeout,
            listen,
            tokens,
            write_keys,
            max_body,
            max_batch,
            customer_lease,
            outbox_lease,
            dead_after,
        })
    }
}

/// Diagnostics as one error: each with file:line:col and its hint.
pub fn describe(diagnostics: &[canvas_engine::diagnostic::Diagnostic]) -> anyhow::Error {
    let mut text = String::new();
    for d in diagnostics {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&d.headline());
        if let Some(help) = &d.help {
            text.push_str(&format!("\n  help: {help}"));
        }
    }
    anyhow::anyhow!(text)
}

/// `canvas.yaml` in the flows folder, else in its parent.
fn find_config(flows: &Path) -> Option<PathBuf> {
    canvas_engine::project::folders_up(flows)
        .into_iter()
        .take(2)
        .map(|d| d.join(canvas_engine::policy::FILE_NAME))
        .find(|p| p.is_file())
}

/// A secret named by an environment variable (`env`) or written inline (`value`).
fn secret(
    what: &str,
    var: Option<&str>,
    value: Option<&str>,
    env: &impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    match (var, value) {
        (Some(var), None) => match env(var) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => bail!("{what}: the environment variable `{var}` is not set"),
        },
        (None, Some(v)) if !v.is_empty() => Ok(v.to_owned()),
        (None, Some(_)) => bail!("{what}: the value is empty"),
        (Some(_), Some(_)) => bail!("{what}: give `env` or the value, not both"),
        (None, None) => bail!("{what}: say where the secret is, e.g. `env: CANVAS_API_TOKEN`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            store: StoreArgs {
                flows: Some(PathBuf::from("/nonexistent/flows")),
                ..StoreArgs::default()
            },
            listen: None,
        }
    }

    #[test]
    fn defaults_and_env_tokens() {
        let s = Settings::resolve(args(), |v| {
            (v == "CANVAS_API_TOKEN").then(|| "t1".to_owned())
        })
        .expect("resolves");
        assert_eq!(s.database.expose(), "sqlite://canvas.db");
        assert_eq!(s.database_timeout, Duration::from_secs(5));
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(s.tokens, vec![("t1".to_owned(), Scope::Write)]);
        assert_eq!(s.max_batch, DEFAULT_MAX_BATCH);
    }

    #[test]
    fn public_address_needs_a_token() {
        let mut a = args();
        a.listen = Some(SocketAddr::from(([0, 0, 0, 0], 8080)));
        let e = Settings::resolve(a, |_| None).expect_err("refused");
        assert!(e.to_string().contains("no API token"), "{e}");
    }

    #[test]
    fn config_section_is_read_and_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canvas.yaml");
        std::fs::write(
            &path,
            "timezone: UTC\nserver:\n  listen: 127.0.0.1:9000\n  database: sqlite://x.db\n  tokens:\n    - { scope: read, env: RO }\n  limits: { max_batch: 10 }\n",
        )
        .expect("write");
        let mut a = args();
        a.store.config = Some(path.clone());
        a.store.database = Some("sqlite://flag.db".into());
        let s = Settings::resolve(a, |v| (v == "RO").then(|| "ro".to_owned())).expect("resolves");
        assert_eq!(s.database.expose(), "sqlite://flag.db");
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(s.tokens, vec![("ro".to_owned(), Scope::Read)]);
        assert_eq!(s.max_batch, 10);

        let mut a = args();
        a.store.config = Some(path);
        let e = Settings::resolve(a, |_| None).expect_err("missing env");
        assert!(e.to_string().contains("`RO` is not set"), "{e}");
    }

    #[test]
    fn database_timeout_from_flag_or_file_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canvas.yaml");
        std::fs::write(&path, "server:\n  database_timeout: 2s\n").expect("write");
        let mut a = args();
        a.store.config = Some(path.clone());
        let s = Settings::resolve(a, |_| None).expect("resolves");
        assert_eq!(s.database_timeout, Duration::from_secs(2));
        let mut a = args();
        a.store.config = Some(path);
        a.store.database_timeout = Some("750ms".into());
        let s = Settings::resolve(a, |_| None).expect("resolves");
        assert_eq!(s.database_timeout, Duration::from_millis(750));
        for (bad, says) in [("5", "no unit"), ("10ms", "shorter than 100ms")] {
            let mut a = args();
            a.store.database_timeout = Some(bad.into());
            let e = Settings::resolve(a, |_| None).expect_err("refused");
            let text = format!("{e:#}");
            assert!(
                text.contains("--database-timeout") && text.contains(says),
                "{text}"
            );
        }
    }

    #[test]
    fn settings_debug_shows_no_secret() {
        let mut a = args();
        a.store.database = Some(
            "postgres://canvas:PLANTED-pw@db/canvas"
                .parse()
                .expect("url"),
        );
        let s = Settings::resolve(a, |v| {
            (v == "CANVAS_API_TOKEN").then(|| "PLANTED-token".to_owned())
        })
        .expect("resolves");
        let text = format!("{s:?}");
        assert!(!text.contains("PLANTED"), "{text}");
        assert!(text.contains("postgres://canvas:***@db/canvas"), "{text}");
    }

    #[test]
    fn unknown_server_key_points_at_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canvas.yaml");
        std::fs::write(&path, "server:\n  lisen: 127.0.0.1:9000\n").expect("write");
        let mut a = args();
        a.store.config = Some(path);
        let e = Settings::resolve(a, |_| None).expect_err("typo");
        let text = e.to_string();
        assert!(text.contains("unknown key `lisen`"), "{text}");
        assert!(text.contains("did you mean `listen`"), "{text}");
    }
}
