//! Competing flows are decided by the operator, not by the alphabet: when several marketing
//! flows want the same customer at the same moment and the caps allow fewer messages, the
//! flow with the higher `priority:` sends (then the lower flow id). Played as flow tests
//! (`also:` loads the competitor) on a SQLite file and on Postgres: at entry (one event starts
//! both), at a timer (both runs wake at once; the order the store returns runs in must not
//! matter) and at a schedule tick.

use std::path::Path;

use canvas_engine::CompiledFlow;
use canvas_engine::policy::Policy;
use canvas_engine::registry::{ChannelSpec, Registry};
use canvas_engine::scenario;
use canvas_engine::store::{PgStore, SqliteStore, Store};
use canvas_engine::testing;

fn registry() -> Registry {
    let mut r = Registry::new();
    r.add_channel(ChannelSpec {
        name: "sms".into(),
        address: Some("phone".into()),
        description: String::new(),
    });
    r
}

/// A flow `id` with `priority` (none: the default) entering by `trigger`, that may wait
/// an hour, then sends `p/hi`.
fn flow(id: &str, priority: Option<i64>, trigger: &str, wait: bool) -> String {
    let priority = priority
        .map(|p| format!("priority: {p}\n"))
        .unwrap_or_default();
    let wait = if wait {
        "  - id: pause\n    wait: { for: 1h }\n"
    } else {
        ""
    };
    format!(
        "flow: {id}\nname: {id}\ntimezone: UTC\n{priority}trigger:\n{trigger}steps:\n{wait}  - id: hi\n    send: sms\n    template: p/hi\n"
    )
}

/// (winner, loser): in each pair the loser's id sorts first, so the alphabet alone would
/// pick it.
const PAIRS: &[(&str, &str, &[&str])] = &[
    // (winner, loser, when the winner's messages go out)
    ("z-service", "a-promo", &["2026-03-02T10:00Z"]),
    ("z-later", "a-later", &["2026-03-02T11:00Z"]),
    (
        "z-tick",
        "a-tick",
        &["2026-03-02T09:00Z", "2026-03-03T09:00Z"],
    ),
    // Equal priorities: the flow id decides.
    ("m-tie", "n-tie", &["2026-03-02T12:00Z"]),
];

fn write_project(dir: &Path) {
    std::fs::create_dir_all(dir.join("templates/p")).expect("mkdir");
    std::fs::write(dir.join("templates/p/hi.txt"), "Hi\n").expect("write");
    let event = |name: &str| format!("  event: {name}\n");
    let tick = "  schedule: \"0 9 * * *\"\n  audience: has(customer.phone)\n";
    for (id, priority, trigger, wait) in [
        ("a-promo", None, event("signed_up"), false),
        ("z-service", Some(10), event("signed_up"), false),
        ("a-later", Some(0), event("visited"), true),
        ("z-later", Some(5), event("visited"), true),
        ("a-tick", Some(-3), tick.to_owned(), false),
        ("z-tick", Some(3), tick.to_owned(), false),
        ("m-tie", Some(7), event("tied"), false),
        ("n-tie", Some(7), event("tied"), false),
    ] {
        std::fs::write(
            dir.join(format!("{id}.yaml")),
            flow(id, priority, &trigger, wait),
        )
        .expect("write flow");
    }
}

fn test_file(flow: &str, also: &str, sent: &[&str]) -> String {
    let sent = if sent.is_empty() {
        " []".to_owned()
    } else {
        sent.iter()
            .map(|at| format!("\n      - {{ at: {at}, channel: sms, template: p/hi }}"))
            .collect()
    };
    format!(
        "flow: {flow}
also: [{also}]
start: 2026-03-02T00:00:00Z
run_until: 2026-03-04T00:00:00Z
customers:
  - id: c1
    attributes: {{ phone: \"+1\" }}
events:
  - {{ at: 2026-03-02T10:00Z, customer: c1, name: signed_up }}
  - {{ at: 2026-03-02T10:00Z, customer: c1, name: visited }}
  - {{ at: 2026-03-02T12:00Z, customer: c1, name: tied }}
expect:
  - customer: c1
    sent:{sent}
"
    )
}

/// Every pair, both ways round: the winner sends, the loser is capped.
async fn play<S: Store, F, Fut>(backend: &str, mut store: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    write_project(dir.path());
    let v = canvas_engine::validate_paths(&[dir.path().to_path_buf()], &registry()).expect("read");
    assert!(v.is_valid(), "{:#?}", v.diagnostics);
    let flows: Vec<CompiledFlow> = v.flows().cloned().collect();
    let refs: Vec<&CompiledFlow> = flows.iter().collect();
    // One message a day across flows: only one of each pair can have it.
    let policy = Policy::from_str(
        Path::new("canvas.yaml"),
        "timezone: UTC\ncaps: [{ max: 1, per: 1d }]\nquiet_hours: off\n",
    )
    .expect("policy");
    let mut failures = Vec::new();
    for (winner, loser, at) in PAIRS {
        for (flow, also, sent) in [(winner, loser, *at), (loser, winner, &[][..])] {
            let file = dir.path().join(format!("{flow}.test.yaml"));
            std::fs::write(&file, test_file(flow, also, sent)).expect("write test");
            let sc = scenario::load(&file, None).unwrap_or_else(|e| panic!("{e}"));
            let outcome = scenario::run_on(&sc, &refs, policy.clone(), registry(), store().await)
                .await
                .unwrap_or_else(|e| panic!("{flow}: {e}"));
            let report = testing::check(&sc, &outcome.runtime.store, &outcome.stats)
                .await
                .expect("check");
            failures.extend(
                report
                    .failures
                    .into_iter()
                    .map(|f| format!("[{backend}] {flow} against {also}: {}", f.message)),
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_flows_were_decided_by_the_alphabet_sqlite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut n = 0;
    play("sqlite", || {
        n += 1;
        let path = tmp.path().join(format!("p{n}.db"));
        async move { SqliteStore::open(&path).await.expect("open sqlite") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_flows_were_decided_by_the_alphabet_postgres() {
    // Never skipped: without a reachable server the test fails.
    let url = std::env::var("CANVAS_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (u, n) = (url.clone(), names.clone());
    let result = tokio::spawn(async move {
        play("postgres", || {
            let (u, n) = (u.clone(), n.clone());
            async move {
                let schema = {
                    let mut names = n.lock().expect("lock");
                    let s = format!("canvas_priority_{}_{}", std::process::id(), names.len());
                    names.push(s.clone());
                    s
                };
                PgStore::connect_with_schema(&u, &schema)
                    .await
                    .unwrap_or_else(|e| panic!("Postgres at {u} must be reachable: {e}"))
            }
        })
        .await;
    })
    .await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let created = names.lock().expect("lock").clone();
    for s in created {
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE"))
            .execute(&pool)
            .await
            .expect("drop schema");
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[test]
fn a_priority_out_of_range_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_project(dir.path());
    for (value, says) in [
        (
            "5000",
            "`priority` is 5000; it must be a whole number from -1000 to 1000",
        ),
        (
            "-1001",
            "`priority` is -1001; it must be a whole number from -1000 to 1000",
        ),
        ("high", "expected"),
    ] {
        let text = flow("a-promo", None, "  event: signed_up\n", false)
            .replace("trigger:", &format!("priority: {value}\ntrigger:"));
        std::fs::write(dir.path().join("a-promo.yaml"), text).expect("write");
        let v = canvas_engine::validate_paths(&[dir.path().join("a-promo.yaml")], &registry())
            .expect("read");
        let d = v.diagnostics.first().expect("a diagnostic");
        assert_eq!(d.code.as_str(), "CNV0103", "{d:?}");
        assert!(d.message.contains(says), "{}", d.message);
        assert_eq!(d.location.map(|l| l.line), Some(4), "{d:?}");
    }
}
