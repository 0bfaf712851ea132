//! The engine's semantics, end to end: every `journeys/*.test.yaml` scenario (entry rules,
//! caps and quiet hours, holdouts and goals, waits, calls, schedules, segments…) played on
//! a SQLite file and on Postgres, checked against its expectations. Both backends must pass
//! the same files. Plus what a scenario file cannot say: version pinning and replays.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use canvas_engine::CompiledFlow;
use canvas_engine::policy::Policy;
use canvas_engine::registry::{ChannelSpec, Registry};
use canvas_engine::runtime::{FlowSet, Runtime};
use canvas_engine::scenario;
use canvas_engine::state::{Event, InboxItem, ProfileUpdate, RunStatus, Time};
use canvas_engine::store::{PgStore, SqliteStore, Store};
use canvas_engine::testing;

mod common;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/journeys")
}

/// The channels the fixtures use (the full catalogue lives in `canvas-nodes`, which depends
/// on this crate).
fn registry() -> Registry {
    let mut r = Registry::new();
    for (name, address) in [
        ("sms", Some("phone")),
        ("email", Some("email")),
        ("wechat", Some("wechat_id")),
    ] {
        r.add_channel(ChannelSpec {
            name: name.into(),
            address: address.map(Into::into),
            description: String::new(),
        });
    }
    r
}

fn flows(dir: &Path) -> Vec<CompiledFlow> {
    let v =
        canvas_engine::validate_paths(&[dir.to_path_buf()], &registry()).expect("read fixtures");
    assert!(
        v.is_valid(),
        "fixture flows must validate: {:#?}",
        v.diagnostics
    );
    v.flows().cloned().collect()
}

fn test_files() -> Vec<PathBuf> {
    let files = testing::discover(&[dir()]).expect("list fixtures");
    assert!(
        files.len() >= 9,
        "expected the journey fixtures, found {files:?}"
    );
    files
}

async fn play_all<S: Store, F, Fut>(backend: &str, mut store: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let flows = flows(&dir());
    let refs: Vec<&CompiledFlow> = flows.iter().collect();
    let policy = Policy::load(dir().join("canvas.yaml")).expect("fixture policy");
    let mut failures = Vec::new();
    for file in test_files() {
        let sc = scenario::load(&file, None).unwrap_or_else(|e| panic!("{e}"));
        let outcome = scenario::run_on(&sc, &refs, policy.clone(), registry(), store().await)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let report = testing::check(&sc, &outcome.runtime.store, &outcome.stats)
            .await
            .expect("check");
        assert!(report.expectations > 0, "{} checks nothing", file.display());
        for f in report.failures {
            failures.push(format!(
                "[{backend}] {}:{}: {}",
                file.display(),
                f.line,
                f.message
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_on_sqlite_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    play_all("sqlite", || {
        n += 1;
        let path = tmp.path().join(format!("j{n}.db"));
        async move { SqliteStore::open(&path).await.expect("open sqlite") }
    })
    .await;
}

/// A fresh schema per scenario on the Postgres server, dropped afterwards.
struct PgSchemas {
    url: String,
    names: std::sync::Mutex<Vec<String>>,
}

impl PgSchemas {
    async fn fresh(self: &Arc<Self>) -> PgStore {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = {
            let mut names = self.names.lock().expect("lock");
            let schema = format!(
                "canvas_journey_{}_{}_{nanos}",
                std::process::id(),
                names.len()
            );
            names.push(schema.clone());
            schema
        };
        PgStore::connect_with_schema(&self.url, &schema)
            .await
            .unwrap_or_else(|e| panic!("{}", common::pg_unreachable(&self.url, &e)))
    }

    async fn drop_all(&self) {
        let pool = sqlx::PgPool::connect(&self.url).await.expect("connect");
        let names = self.names.lock().expect("lock").clone();
        for s in names {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE"))
                .execute(&pool)
                .await
                .expect("drop schema");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_on_postgres() {
    let url = common::pg_url();
    let schemas = Arc::new(PgSchemas {
        url,
        names: Default::default(),
    });
    let s = schemas.clone();
    let result = tokio::spawn(async move {
        play_all("postgres", || {
            let s = s.clone();
            async move { s.fresh().await }
        })
        .await;
    })
    .await;
    schemas.drop_all().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn at(s: &str) -> Time {
    scenario::parse_time(s).expect("time").to_utc()
}

fn event(id: &str, customer: &str, name: &str, t: &str) -> InboxItem {
    InboxItem::Event(Event {
        id: id.into(),
        customer_id: customer.into(),
        name: name.into(),
        data: serde_json::json!({}),
        occurred_at: at(t),
    })
}

/// A profile update giving customer `c` a phone number, at the start of these tests.
fn phone(c: &str) -> InboxItem {
    let mut set = serde_json::Map::new();
    set.insert("phone".into(), serde_json::json!("+1"));
    InboxItem::Profile(ProfileUpdate {
        id: None,
        customer_id: c.into(),
        set,
        timezone: None,
        at: at("2026-03-02T10:00Z"),
    })
}

/// A run stays on the version it entered with; a new version affects new entries only.
#[tokio::test]
async fn runs_stay_on_their_flow_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("templates/j")).expect("mkdir");
    for t in ["a", "b", "c"] {
        std::fs::write(
            tmp.path().join(format!("templates/j/{t}.txt")),
            format!("{t}\n"),
        )
        .expect("write");
    }
    let v1 = "flow: pinned\nname: P\ntimezone: UTC\ntrigger: { event: go }\nsteps:\n  - { id: first, send: sms, template: j/a }\n  - { id: pause, wait: { for: 1d } }\n  - { id: last, send: sms, template: j/b }\n";
    let v2 = "flow: pinned\nname: P\ntimezone: UTC\ntrigger: { event: go }\nsteps:\n  - { id: first, send: sms, template: j/a }\n  - { id: pause, wait: { for: 2d } }\n  - { id: changed, send: sms, template: j/c }\n";
    std::fs::write(tmp.path().join("pinned.yaml"), v1).expect("write");
    let first = flows(tmp.path()).remove(0);
    std::fs::write(tmp.path().join("pinned.yaml"), v2).expect("write");
    let second = flows(tmp.path()).remove(0);
    assert_ne!(first.hash, second.hash);

    let store = SqliteStore::open(tmp.path().join("db.sqlite"))
        .await
        .expect("open");
    let mut rt = Runtime::new(
        store,
        FlowSet::new([first.clone()]),
        Policy::default(),
        registry(),
    );
    rt.store
        .enqueue(&[
            phone("old"),
            phone("new"),
            event("e1", "old", "go", "2026-03-02T10:00Z"),
        ])
        .await
        .expect("enqueue");
    rt.process_inbox(at("2026-03-02T10:00Z"))
        .await
        .expect("process");
    // Deploy v2 while `old` waits on v1.
    rt.flows.add(second.clone());
    rt.register_versions(at("2026-03-02T11:00Z"))
        .await
        .expect("versions");
    rt.store
        .enqueue(&[event("e2", "new", "go", "2026-03-02T11:00Z")])
        .await
        .expect("enqueue");
    rt.process_inbox(at("2026-03-02T11:00Z"))
        .await
        .expect("process");
    rt.fire_due(at("2026-03-03T10:00Z")).await.expect("fire");
    rt.fire_due(at("2026-03-04T11:00Z")).await.expect("fire");

    let old = rt.store.runs("old").await.expect("runs");
    let new = rt.store.runs("new").await.expect("runs");
    assert_eq!(old[0].version, first.hash.0);
    assert_eq!(new[0].version, second.hash.0);
    let sent = |rows: Vec<canvas_engine::state::OutboxRow>| {
        rows.into_iter()
            .map(|o| (o.step, o.created_at))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sent(rt.store.outbox(Some("old")).await.expect("outbox")),
        vec![
            ("first".into(), at("2026-03-02T10:00Z")),
            ("last".into(), at("2026-03-03T10:00Z"))
        ]
    );
    assert_eq!(
        sent(rt.store.outbox(Some("new")).await.expect("outbox")),
        vec![
            ("first".into(), at("2026-03-02T11:00Z")),
            ("changed".into(), at("2026-03-04T11:00Z"))
        ]
    );
}

/// Feeding the same inputs twice (a replay after a crash, a client retry) changes nothing:
/// events are deduplicated by id and timers already fired are not due again.
#[tokio::test]
async fn replayed_inputs_change_nothing() {
    let flows = flows(&dir());
    let welcome = flows
        .iter()
        .find(|f| f.id == "welcome")
        .expect("welcome")
        .clone();
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(tmp.path().join("db.sqlite"))
        .await
        .expect("open");
    let rt = Runtime::new(
        store,
        FlowSet::new([welcome]),
        Policy::default(),
        registry(),
    );
    let items = vec![
        phone("c"),
        event("signup-1", "c", "signed_up", "2026-03-02T10:00Z"),
    ];
    assert_eq!(rt.store.enqueue(&items).await.expect("enqueue"), 2);
    rt.process_inbox(at("2026-03-02T10:00Z"))
        .await
        .expect("process");
    let before = rt.store.counts().await.expect("counts");
    // The event again: dropped at the inbox.
    assert_eq!(rt.store.enqueue(&items[1..]).await.expect("enqueue"), 0);
    rt.process_inbox(at("2026-03-02T10:05Z"))
        .await
        .expect("process");
    rt.fire_due(at("2026-03-02T10:05Z")).await.expect("fire");
    assert_eq!(rt.store.counts().await.expect("counts"), before);
    let runs = rt.store.runs("c").await.expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Waiting);
}

/// After a restart that dropped a flow version, runs pinned to it cannot move — and must not
/// hold up the timers of anyone else.
#[tokio::test]
async fn runs_on_an_unknown_version_do_not_block_other_timers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(tmp.path().join("templates/j")).expect("mkdir");
    std::fs::write(tmp.path().join("templates/j/a.txt"), "a\n").expect("write");
    let flow = |wait: &str| {
        format!(
            "flow: pinned\nname: P\ntimezone: UTC\ntrigger: {{ event: go }}\nsteps:\n  - {{ id: pause, wait: {{ for: {wait} }} }}\n  - {{ id: last, send: sms, template: j/a }}\n"
        )
    };
    std::fs::write(tmp.path().join("pinned.yaml"), flow("1h")).expect("write");
    let v1 = flows(tmp.path()).remove(0);
    std::fs::write(tmp.path().join("pinned.yaml"), flow("2h")).expect("write");
    let v2 = flows(tmp.path()).remove(0);
    let db = tmp.path().join("db.sqlite");
    // Before the deploy: `old` enters on v1.
    let before = Runtime::new(
        SqliteStore::open(&db).await.expect("open"),
        FlowSet::new([v1]),
        Policy::default(),
        registry(),
    );
    before
        .store
        .enqueue(&[phone("old"), event("e1", "old", "go", "2026-03-02T10:00Z")])
        .await
        .expect("enqueue");
    before
        .process_inbox(at("2026-03-02T10:00Z"))
        .await
        .expect("process");
    // After: the process knows v2 only; `new` enters on it.
    let mut after = Runtime::new(
        SqliteStore::open(&db).await.expect("open"),
        FlowSet::new([v2]),
        Policy::default(),
        registry(),
    );
    after.batch_size = 1;
    after
        .store
        .enqueue(&[phone("new"), event("e2", "new", "go", "2026-03-02T10:00Z")])
        .await
        .expect("enqueue");
    after
        .process_inbox(at("2026-03-02T10:00Z"))
        .await
        .expect("process");
    // Both are due; `old` first, and it cannot move.
    let stats = after.fire_due(at("2026-03-02T12:00Z")).await.expect("fire");
    assert_eq!(stats.outbox, 1);
    assert_eq!(
        after.store.outbox(Some("new")).await.expect("outbox").len(),
        1
    );
    let old = after.store.runs("old").await.expect("runs");
    assert_eq!(
        (old[0].status, old[0].step.as_deref()),
        (RunStatus::Waiting, Some("pause"))
    );
}

/// The daemon's tick list: per schedule or segment flow, the latest moment that came round
/// since the last one — a missed run of ticks fires once, at the latest.
#[tokio::test]
async fn due_ticks_give_the_latest_missed_moment_once() {
    let all = flows(&dir());
    let runtime = Runtime::new(
        SqliteStore::memory().await.expect("memory store"),
        FlowSet::new(
            all.into_iter()
                .filter(|f| f.id == "weekly" || f.id == "lapsed"),
        ),
        Policy::default(),
        registry(),
    );
    let since = |t: &'static str| move |_: &str| at(t);
    // Mondays 10:00 Shanghai = 02:00 UTC. 2026-03-02 is a Monday.
    let ticks = runtime.due_ticks(since("2026-03-02T01:00Z"), at("2026-03-02T01:59Z"));
    assert!(
        ticks.iter().all(|(f, _)| f.id != "weekly"),
        "not yet Monday 10:00"
    );
    let ticks = runtime.due_ticks(since("2026-03-02T01:00Z"), at("2026-03-02T02:00Z"));
    let weekly: Vec<_> = ticks.iter().filter(|(f, _)| f.id == "weekly").collect();
    assert_eq!(weekly.len(), 1);
    assert_eq!(weekly[0].1, at("2026-03-02T02:00Z"));
    // Three Mondays missed: one tick, the last.
    let ticks = runtime.due_ticks(since("2026-03-01T00:00Z"), at("2026-03-20T00:00Z"));
    let weekly: Vec<_> = ticks.iter().filter(|(f, _)| f.id == "weekly").collect();
    assert_eq!(weekly.len(), 1);
    assert_eq!(weekly[0].1, at("2026-03-16T02:00Z"));
    // The hourly segment recheck: on the hour, the latest one.
    let lapsed: Vec<_> = ticks.iter().filter(|(f, _)| f.id == "lapsed").collect();
    assert_eq!(lapsed.len(), 1);
    assert_eq!(lapsed[0].1, at("2026-03-20T00:00Z"));
    // Nothing twice: counting from the last tick, nothing is due.
    let ticks = runtime.due_ticks(since("2026-03-20T00:00Z"), at("2026-03-20T00:30Z"));
    assert!(
        ticks.is_empty(),
        "{:?}",
        ticks.iter().map(|(f, t)| (&f.id, t)).collect::<Vec<_>>()
    );
}

/// A reload publishes new and changed flows, retires removed ones, and keeps every version.
#[test]
fn publish_keeps_old_versions_and_retires_removed_flows() {
    let all = flows(&dir());
    let welcome = all
        .iter()
        .find(|f| f.id == "welcome")
        .expect("welcome")
        .clone();
    let weekly = all
        .iter()
        .find(|f| f.id == "weekly")
        .expect("weekly")
        .clone();
    let mut set = FlowSet::new([welcome.clone(), weekly.clone()]);
    let mut changed = welcome.clone();
    changed.hash = canvas_engine::flow::FlowHash("changed".into());
    let published = set.publish([changed]);
    assert_eq!(published.changed, vec!["welcome".to_owned()]);
    assert_eq!(published.retired, vec!["weekly".to_owned()]);
    assert!(published.added.is_empty());
    assert_eq!(
        set.get("welcome").map(|f| f.hash.0.as_str()),
        Some("changed")
    );
    assert!(set.get("weekly").is_none(), "retired: no new entries");
    assert!(set.version(&weekly.hash.0).is_some(), "runs on it carry on");
    assert!(
        set.version(&welcome.hash.0).is_some(),
        "the old welcome version stays"
    );
}
