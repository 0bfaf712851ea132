//! Fresh databases for one measurement (a SQLite file, or a Postgres database created and
//! dropped), and read-only connections to them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use sqlx::Connection as _;

pub(super) fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A database made for one measurement and removed on drop: a SQLite file, or a Postgres
/// database created on the server of the URL given.
pub(super) struct FreshDb {
    pub(super) url: String,
    pub(super) kind: FreshKind,
}

pub(super) enum FreshKind {
    Sqlite(PathBuf),
    Postgres { admin: String, name: String },
}

impl FreshDb {
    pub(super) async fn create(
        database: Option<&str>,
        tag: &str,
        dir: &Path,
    ) -> anyhow::Result<FreshDb> {
        match database {
            Some(url) if is_postgres(url) => {
                let name = format!("canvas_bench_{}_{tag}", std::process::id());
                let mut conn = admin(url)
                    .await
                    .with_context(|| format!("connecting to {}", redact(url)))?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("creating database {name}"))?;
                conn.close().await?;
                Ok(FreshDb {
                    url: with_database(url, &name)?,
                    kind: FreshKind::Postgres {
                        admin: url.to_owned(),
                        name,
                    },
                })
            }
            Some(url) => {
                let path = url.strip_prefix("sqlite://").unwrap_or(url);
                let path = PathBuf::from(format!("{path}.{tag}"));
                remove_sqlite(&path);
                Ok(FreshDb {
                    url: format!("sqlite://{}", path.display()),
                    kind: FreshKind::Sqlite(path),
                })
            }
            None => {
                let path = dir.join("canvas.db");
                Ok(FreshDb {
                    url: format!("sqlite://{}", path.display()),
                    kind: FreshKind::Sqlite(path),
                })
            }
        }
    }

    pub(super) fn backend(&self) -> &'static str {
        match self.kind {
            FreshKind::Sqlite(_) => "sqlite",
            FreshKind::Postgres { .. } => "postgres",
        }
    }

    pub(super) fn label(&self) -> String {
        redact(&self.url)
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        match &self.kind {
            FreshKind::Sqlite(path) => remove_sqlite(path),
            FreshKind::Postgres { admin, name } => {
                // Drop may run inside the async runtime: a thread of its own, with its own.
                let (admin, db) = (admin.clone(), name.clone());
                let done = std::thread::spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let mut conn = self::admin(&admin).await?;
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await?;
                        conn.close().await?;
                        Ok(())
                    })
                })
                .join();
                if !matches!(done, Ok(Ok(()))) {
                    let _ = writeln!(
                        std::io::stderr(),
                        "warning: could not drop the benchmark database {name}; drop it by hand"
                    );
                }
            }
        }
    }
}

/// A connection to the server of `url` for CREATE and DROP DATABASE, which may take seconds
/// (a checkpoint): not worth sqlx's slow-statement warning in the middle of the report.
pub(super) async fn admin(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    use sqlx::ConnectOptions as _;
    use std::str::FromStr as _;
    sqlx::postgres::PgConnectOptions::from_str(url)?
        .disable_statement_logging()
        .connect()
        .await
}

pub(super) fn remove_sqlite(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// `url` with its database name replaced by `name`.
pub(super) fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let start = url
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow!("not a URL: {}", redact(url)))?;
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = head[start..].find('/').map_or(head.len(), |i| start + i);
    Ok(format!("{}/{name}{query}", &head[..authority_end]))
}

/// A URL (or a message quoting one) without its secrets: the engine's one redaction.
pub(super) fn redact(url: &str) -> String {
    canvas_engine::store::redact(url).into_owned()
}

/// A read-only connection for [`watch_outbox`].
/// A value bound to a [`Peek::fetch`] query.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

pub(super) enum Peek {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Peek {
    pub(super) async fn connect(url: &str) -> anyhow::Result<Peek> {
        use sqlx::ConnectOptions as _;
        use std::str::FromStr as _;
        Ok(if is_postgres(url) {
            // Read-only like the SQLite side: the bench looks, it never writes.
            // Post-run queries over whole tables may take seconds: not worth sqlx's
            // slow-statement warning in the middle of the report.
            let options = sqlx::postgres::PgConnectOptions::from_str(url)?
                .options([("default_transaction_read_only", "on")])
                .disable_statement_logging();
            Peek::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?,
            )
        } else {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
                .read_only(true)
                .disable_statement_logging();
            Peek::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?,
            )
        })
    }

    /// The rows of `sql`, written for Postgres (`$1`, `$2`, …; SQLite reads them as `?1`,
    /// `?2`, …), with `binds` in order.
    pub(super) async fn fetch<T>(&self, sql: &str, binds: &[Bind<'_>]) -> anyhow::Result<Vec<T>>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        Ok(match self {
            Peek::Postgres(p) => {
                let mut q = sqlx::query_as::<_, T>(sql);
                for b in binds {
                    q = match b {
                        Bind::Int(i) => q.bind(*i),
                        Bind::Text(t) => q.bind(*t),
                    };
                }
                q.fetch_all(p).await?
            }
            Peek::Sqlite(p) => {
                let sql = sql.replace('$', "?");
                let mut q = sqlx::query_as::<_, T>(&sql);
                for b in binds {
                    q = match b {
                        Bind::Int(i) => q.bind(*i),
                        Bind::Text(t) => q.bind(*t),
                    };
                }
                q.fetch_all(p).await?
            }
        })
    }

    /// The one number `sql` answers (a `count(*)`, say); 0 for no row or NULL.
    pub(super) async fn number(&self, sql: &str, binds: &[Bind<'_>]) -> anyhow::Result<i64> {
        let rows: Vec<(Option<i64>,)> = self.fetch(sql, binds).await?;
        Ok(rows.first().and_then(|r| r.0).unwrap_or(0))
    }

    pub(super) async fn close(&self) {
        match self {
            Peek::Postgres(p) => p.close().await,
            Peek::Sqlite(p) => p.close().await,
        }
    }

    /// Keys in `[from, to)`: the primary-key index, a handful of rows per call.
    pub(super) async fn keys(&self, from: &str, to: &str) -> anyhow::Result<Vec<String>> {
        Ok(match self {
            Peek::Postgres(p) => {
                sqlx::query_scalar("SELECT key FROM outbox WHERE key >= $1 AND key < $2")
                    .bind(from)
                    .bind(to)
                    .fetch_all(p)
                    .await?
            }
            Peek::Sqlite(p) => {
                sqlx::query_scalar("SELECT key FROM outbox WHERE key >= ? AND key < ?")
                    .bind(from)
                    .bind(to)
                    .fetch_all(p)
                    .await?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x").ok(),
            Some("postgres://postgres@127.0.0.1:5432/x".to_owned())
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x").ok(),
            Some("postgres://u:p@h/x?sslmode=disable".to_owned())
        );
        assert_eq!(
            with_database("postgres://h:5432", "x").ok(),
            Some("postgres://h:5432/x".to_owned())
        );
    }
}
