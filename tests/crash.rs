//! Crash safety, proven on the real binary: `canvas run` is SIGKILLed in the middle of large
//! batches, again and again, then rerun to the end. Every customer's history must be
//! complete and gap-free, and every outbox row must be there exactly once.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use canvas_engine::store::{SqliteStore, Store};

const CUSTOMERS: usize = 20_000;

const FLOW: &str = "flow: crash-five
name: Five steps
timezone: UTC
trigger:
  event: joined
steps:
  - id: hello
    send: sms
    template: c/hello
  - id: pause
    wait: { for: 1d }
  - id: still-here
    branch:
      - when: customer.tier != \"blocked\"
        next: follow-up
      - else: done
  - id: follow-up
    send: sms
    template: c/follow-up
  - id: done
    exit: finished
";

fn canvas() -> Command {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
}

fn write_inputs(dir: &Path) -> std::path::PathBuf {
    let flows = dir.join("flows");
    std::fs::create_dir_all(flows.join("templates/c")).unwrap();
    std::fs::write(flows.join("crash-five.yaml"), FLOW).unwrap();
    std::fs::write(
        flows.join("templates/c/hello.txt"),
        "Hi {{ customer.first_name }}\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("templates/c/follow-up.txt"),
        "Still here, {{ customer.first_name }}?\n",
    )
    .unwrap();
    std::fs::write(
        flows.join("canvas.yaml"),
        "timezone: UTC\nquiet_hours: off\n",
    )
    .unwrap();
    let path = dir.join("inbox.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..CUSTOMERS {
        writeln!(
            f,
            r#"{{"kind":"profile","customer_id":"c{i:06}","set":{{"phone":"+86{i:09}","first_name":"M{i}","tier":"silver"}},"at":"2026-03-02T10:00:00Z"}}"#
        )
        .unwrap();
    }
    for i in 0..CUSTOMERS {
        writeln!(
            f,
            r#"{{"kind":"event","id":"joined-{i}","customer_id":"c{i:06}","name":"joined","data":{{}},"occurred_at":"2026-03-02T10:00:00Z"}}"#
        )
        .unwrap();
    }
    path
}

async fn history_len(db: &Path) -> u64 {
    let store = SqliteStore::open(db).await.unwrap();
    store.counts().await.unwrap().history
}

/// Start `canvas run`, SIGKILL it after `after`; returns whether it was still running.
fn run_and_kill(db: &str, flows: &Path, at: &str, after: Duration) -> bool {
    let mut child = canvas()
        .args(["run", "--database", db, "--flows"])
        .arg(flows)
        .args(["--at", at, "--batch", "250"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // `kill` is SIGKILL on Unix: no destructor, no flush, no goodbye.
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_step_and_doubles_no_message() {
    let tmp = tempfile::tempdir().unwrap();
    let inbox = write_inputs(tmp.path());
    let db_path = tmp.path().join("canvas.db");
    let db = format!("sqlite://{}", db_path.display());
    let flows = tmp.path().join("flows");
    let out = canvas()
        .args(["ingest"])
        .arg(&inbox)
        .args(["--database", &db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut interrupted = 0;
    let mut partial_states = BTreeSet::new();
    for (phase, at) in [(0, "2026-03-02T10:00:00Z"), (1, "2026-03-03T10:00:00Z")] {
        for (round, ms) in [120u64, 260, 410, 330, 520, 700].into_iter().enumerate() {
            if run_and_kill(&db, &flows, at, Duration::from_millis(ms)) {
                interrupted += 1;
                let h = history_len(&db_path).await;
                partial_states.insert(h);
                eprintln!("phase {phase} kill {round} after {ms} ms: {h} history rows");
            }
        }
        // And then to the end.
        let out = canvas()
            .args(["run", "--database", &db, "--flows"])
            .arg(&flows)
            .args(["--at", at])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        interrupted >= 4,
        "the runs finished before they could be killed ({interrupted} kills); raise CUSTOMERS"
    );
    let full = 5 * CUSTOMERS as u64;
    assert!(
        partial_states.iter().any(|h| *h > 0 && *h < full),
        "no kill landed in the middle of the work: {partial_states:?}"
    );

    let store = SqliteStore::open(&db_path).await.unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.inbox_pending, 0);
    assert_eq!(counts.runs, CUSTOMERS as u64);
    assert_eq!(counts.waiting, 0);
    assert_eq!(counts.history, full, "every step of every customer, once");
    assert_eq!(
        counts.outbox,
        2 * CUSTOMERS as u64,
        "two messages per customer, once each"
    );

    // History: per run, seq 1..=5 without gaps, in the flow's order.
    let mut by_run: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for h in store.history(None).await.unwrap() {
        by_run.entry(h.run_id).or_default().push((h.seq, h.step));
    }
    assert_eq!(by_run.len(), CUSTOMERS);
    for (run, mut steps) in by_run {
        steps.sort();
        let seqs: Vec<u32> = steps.iter().map(|s| s.0).collect();
        let names: Vec<&str> = steps.iter().map(|s| s.1.as_str()).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5], "{run}");
        assert_eq!(
            names,
            vec!["hello", "pause", "still-here", "follow-up", "done"],
            "{run}"
        );
    }
    // The outcome counters, written in the transactions the kills interrupted, equal what
    // the history, runs and outbox say.
    let wrong = canvas_engine::stats::audit(&store, "crash-five")
        .await
        .unwrap();
    assert!(
        wrong.is_empty(),
        "counters disagree after the kills: {wrong:#?}"
    );
    let stats = store
        .flow_stats(&canvas_engine::stats::StatsQuery::all("crash-five"))
        .await
        .unwrap()
        .table(None);
    let n = CUSTOMERS as u64;
    assert_eq!(stats.flow["entered"], n);
    assert_eq!(stats.flow["ended:finished"], n);
    for step in ["hello", "pause", "still-here", "follow-up", "done"] {
        assert_eq!(stats.get(step, "entered"), n, "{step}");
    }
    assert_eq!(stats.get("hello", "sent:sms"), n);
    assert_eq!(stats.get("follow-up", "sent:sms"), n);
    assert_eq!(stats.get("still-here", "to:follow-up"), n);
    assert_eq!(stats.get("still-here", "to:done"), 0);
    assert_eq!(stats.get("pause", "waiting"), 0, "nobody waits any more");

    // Outbox: exactly the two keys per run.
    let keys: BTreeSet<String> = store
        .outbox(None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 2 * CUSTOMERS);
    for i in [0, 1, CUSTOMERS / 2, CUSTOMERS - 1] {
        assert!(keys.contains(&format!("crash-five/c{i:06}/1/hello")));
        assert!(keys.contains(&format!("crash-five/c{i:06}/1/follow-up")));
    }
}
