//! The operator's commands (`canvas ingest`, `run`, `status`) read the database from the
//! same settings as `canvas serve`: `--database`, `CANVAS_DATABASE_URL`, `server.database` in
//! `canvas.yaml`, then `sqlite://canvas.db`. A read-only command never creates a database.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{FreshDb, pg_base, write_flows};

/// `canvas ARGS` in `dir`, with none of the settings' environment variables but `env`.
fn canvas_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canvas"));
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1");
    for var in [
        "CANVAS_DATABASE_URL",
        "CANVAS_FLOWS",
        "CANVAS_CONFIG",
        "CANVAS_DATABASE_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A project folder (`flows/` with canvas.yaml holding `extra_config`) and a signed-up customer.
fn project(extra_config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_flows(&dir.path().join("flows"), extra_config);
    std::fs::write(
        dir.path().join("inbox.jsonl"),
        "{\"kind\":\"profile\",\"customer_id\":\"c1\",\"set\":{\"phone\":\"+1\"},\"at\":\"2026-03-02T10:00:00Z\"}\n\
         {\"kind\":\"event\",\"id\":\"e1\",\"customer_id\":\"c1\",\"name\":\"signed_up\",\"occurred_at\":\"2026-03-02T10:00:00Z\"}\n",
    )
    .unwrap();
    dir
}

/// Ingest, run and status in `dir` with `env`: the run must be visible to `status`, and no
/// `canvas.db` may appear in the working folder.
fn ingest_run_status(dir: &Path, env: &[(&str, &str)]) {
    let out = ok(&canvas_in(dir, &["ingest", "inbox.jsonl"], env));
    assert!(out.contains("ingested 2 of 2 items"), "{out}");
    ok(&canvas_in(
        dir,
        &["run", "--at", "2026-03-02T12:00:00Z"],
        env,
    ));
    let status = ok(&canvas_in(dir, &["status"], env));
    assert!(
        status.contains("welcome\n  waiting  wait-order 1"),
        "status read another database: {status}"
    );
    assert!(
        !dir.join("canvas.db").exists(),
        "a command created canvas.db in the working folder instead of using the setting"
    );
}

#[test]
fn operator_commands_ignored_canvas_database_url_sqlite() {
    let dir = project("");
    let db = dir.path().join("elsewhere.db");
    let url = format!("sqlite://{}", db.display());
    ingest_run_status(dir.path(), &[("CANVAS_DATABASE_URL", &url)]);
    assert!(db.is_file());
}

#[test]
fn operator_commands_ignored_server_database_in_canvas_yaml() {
    let dir = project("");
    let db = dir.path().join("from-config.db");
    let config = dir.path().join("flows/canvas.yaml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("server:\n  database: sqlite://{}\n", db.display()));
    std::fs::write(&config, text).unwrap();
    ingest_run_status(dir.path(), &[]);
    assert!(db.is_file());
}

#[tokio::test]
async fn operator_commands_ignored_canvas_database_url_postgres() {
    let fresh = FreshDb::create(&pg_base(), "canvas_settings_pg").await;
    let dir = project("");
    let url = fresh.url.clone();
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        ingest_run_status(&path, &[("CANVAS_DATABASE_URL", &url)]);
    })
    .await
    .unwrap();
    fresh.drop_it().await;
}

#[test]
fn status_created_an_empty_database_and_said_no_runs_yet() {
    let dir = tempfile::tempdir().unwrap();
    let out = canvas_in(dir.path(), &["status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no database at canvas.db"), "{stderr}");
    assert!(!dir.path().join("canvas.db").exists());
    // The same for a database named by the environment.
    let missing = dir.path().join("missing.db");
    let url = format!("sqlite://{}", missing.display());
    let out = canvas_in(dir.path(), &["status"], &[("CANVAS_DATABASE_URL", &url)]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no database at {}", missing.display())),
        "{stderr}"
    );
    assert!(!missing.exists());
}

#[tokio::test]
async fn status_created_tables_in_an_empty_postgres_database_postgres() {
    let fresh = FreshDb::create(&pg_base(), "canvas_settings_empty_pg").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = (dir.path().to_owned(), fresh.url.clone());
    let out = tokio::task::spawn_blocking(move || {
        canvas_in(&path, &["status"], &[("CANVAS_DATABASE_URL", &url)])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no database at postgres://") && stderr.contains("no Canvas tables"),
        "{stderr}"
    );
    let peek = common::Peek::connect(&fresh.url).await;
    let tables = peek
        .number("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")
        .await;
    peek.close().await;
    assert_eq!(tables, 0, "status created tables");
    fresh.drop_it().await;
}
