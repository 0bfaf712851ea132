//! The store contract for the daemon, one suite for both backends (see `store.rs`):
//! dispatcher claims, pauses, schedule ticks, flow counts, customer leases, and the daemons
//! table that lets a live daemon take over the claims of a dead one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use canvas_engine::state::{
    Batch, DeliveryOutcome, DeliveryState, DeliveryStatus, FlowCounts, InboxItem, Lease,
    OutboxDepth, OutboxRow, Run, Time,
};
use canvas_engine::store::{Counts, Database, Store, StoreError};
use chrono::Duration;
use sqlx::Connection;

mod common;
use common::*;

store_tests!(
    claim_leases_due_rows_until_the_lease_runs_out,
    claim_respects_the_limit,
    claim_passes_over_full_channels,
    renewed_leases_keep_rows_from_every_claimer,
    released_rows_are_claimable_at_once_with_attempts_unchanged,
    a_dead_daemons_claims_are_taken_over_at_once,
    a_sole_daemon_takes_over_every_other_claim,
    settle_sent_retry_dead,
    concurrent_claims_never_share_a_row,
    pause_and_resume_flows,
    schedule_ticks_fire_once,
    flow_counts_per_outcome,
    leases_go_to_one_owner_until_they_run_out,
    the_holder_extends_its_lease,
    release_frees_only_the_owners_leases,
    concurrent_claimers_never_share_a_customer,
    commit_is_fenced_by_the_lease,
    fenced_commits_race_takeovers,
);

// ---- the daemon: dispatcher leases, pauses, schedule ticks, flow counts ------------------------

/// An outbox row of customer `c1` (one customer keeps the batch's order) due at `due`.
fn due_row(name: &str, due: Time) -> OutboxRow {
    let r = run("c1", "care", 1, None);
    OutboxRow {
        created_at: due,
        ..outbox(&r, name)
    }
}

/// Rows x, a (both due at t(1), x written first), b (t(3)) and c (t(10)), written in the
/// order b, x, a, c.
async fn four_rows(db: &Database) -> Vec<OutboxRow> {
    let rows = vec![
        due_row("b", t(3)),
        due_row("x", t(1)),
        due_row("a", t(1)),
        due_row("c", t(10)),
    ];
    commit(
        db,
        &Batch {
            outbox: rows.clone(),
            ..Batch::default()
        },
    )
    .await;
    rows
}

async fn claim(db: &Database, now: Time, limit: usize, lease_until: Time) -> Vec<String> {
    db.claim_outbox(now, limit, "daemon-1", lease_until, &[])
        .await
        .expect("claim")
        .into_iter()
        .map(|d| d.row.key.rsplit('/').next().unwrap_or_default().to_owned())
        .collect()
}

async fn claim_leases_due_rows_until_the_lease_runs_out(db: Arc<Database>) {
    let rows = four_rows(&db).await;
    let claimed = db
        .claim_outbox(t(5), 10, "daemon-1", t(6), &[])
        .await
        .expect("claim");
    // Earliest due first, then in insertion order; c is not due yet.
    assert_eq!(
        claimed.iter().map(|d| &d.row).collect::<Vec<_>>(),
        vec![&rows[1], &rows[2], &rows[0]]
    );
    assert!(
        claimed
            .iter()
            .all(|d| d.attempts == 0 && d.lease_until == t(6))
    );
    // Leased: nobody else gets them, not even once the lease's instant is reached.
    assert_eq!(claim(&db, t(5), 10, t(6)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(6), 10, t(7)).await, Vec::<String>::new());
    // The lease ran out (the dispatcher died): claimable again.
    assert_eq!(claim(&db, t(7), 10, t(8)).await, vec!["x", "a", "b"]);
    assert_eq!(claim(&db, t(20), 10, t(21)).await, vec!["x", "a", "b", "c"]);
    assert_eq!(claim(&db, t(20), 10, t(21)).await, Vec::<String>::new());
    // A claim changes no delivery state.
    let states = db.deliveries("c1").await.expect("deliveries");
    assert!(
        states
            .iter()
            .all(|s| s.status == DeliveryStatus::Pending && s.attempts == 0),
        "{states:?}"
    );
}

async fn claim_respects_the_limit(db: Arc<Database>) {
    four_rows(&db).await;
    assert_eq!(claim(&db, t(5), 0, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(5), 2, t(60)).await, vec!["x", "a"]);
    assert_eq!(claim(&db, t(5), 2, t(60)).await, vec!["b"]);
    assert_eq!(claim(&db, t(5), 2, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(10), 2, t(60)).await, vec!["c"]);
}

async fn settle_sent_retry_dead(db: Arc<Database>) {
    assert_eq!(
        db.outbox_depth(t(0)).await.expect("depth"),
        OutboxDepth::default()
    );
    db.settle_outbox(&[]).await.expect("settle nothing");
    let rows = four_rows(&db).await;
    let key = |i: usize| rows[i].key.clone();
    assert_eq!(
        db.outbox_depth(t(5)).await.expect("depth"),
        OutboxDepth {
            pending: 4,
            due: 3,
            dead: 0,
            oldest_due: Some(t(1)),
        }
    );
    assert_eq!(claim(&db, t(5), 10, t(6)).await, vec!["x", "a", "b"]);
    db.settle_outbox(&[
        DeliveryOutcome::Sent {
            key: key(1),
            at: t(5),
        },
        DeliveryOutcome::Retry {
            key: key(2),
            attempts: 1,
            next_attempt_at: t(30),
            error: "timeout".into(),
        },
        DeliveryOutcome::Dead {
            key: key(0),
            attempts: 3,
            at: t(5),
            error: "400: not a phone number".into(),
        },
        // Unknown keys are ignored.
        DeliveryOutcome::Sent {
            key: "nobody/x".into(),
            at: t(5),
        },
    ])
    .await
    .expect("settle");
    let state = |i: usize,
                 status,
                 attempts,
                 next: Time,
                 last_error: Option<&str>,
                 sent_at: Option<Time>| DeliveryState {
        row: rows[i].clone(),
        status,
        attempts,
        next_attempt_at: Some(next),
        last_error: last_error.map(str::to_owned),
        sent_at,
    };
    use DeliveryStatus::{Dead, Pending, Sent};
    assert_eq!(
        db.deliveries("c1").await.expect("deliveries"),
        vec![
            state(0, Dead, 3, t(3), Some("400: not a phone number"), None),
            state(1, Sent, 1, t(1), None, Some(t(5))),
            state(2, Pending, 1, t(30), Some("timeout"), None),
            state(3, Pending, 0, t(10), None, None),
        ],
        "in insertion order"
    );
    assert_eq!(db.deliveries("c2").await.expect("deliveries"), vec![]);
    assert_eq!(
        db.outbox_depth(t(20)).await.expect("depth"),
        OutboxDepth {
            pending: 2,
            due: 1,
            dead: 1,
            oldest_due: Some(t(10)),
        }
    );
    // Settling released the lease at once; the retry waits for its time.
    assert_eq!(claim(&db, t(5), 10, t(60)).await, Vec::<String>::new());
    assert_eq!(claim(&db, t(20), 10, t(60)).await, vec!["c"]);
    let again = db
        .claim_outbox(t(70), 10, "daemon-2", t(80), &[])
        .await
        .expect("claim");
    assert_eq!(
        again
            .iter()
            .map(|d| (d.row.key.clone(), d.attempts))
            .collect::<Vec<_>>(),
        vec![(key(3), 0), (key(2), 1)]
    );
    // A late outcome for a row already settled changes nothing; a second send counts one
    // more attempt and keeps the last error; the last outcome of a key wins.
    db.settle_outbox(&[
        DeliveryOutcome::Retry {
            key: key(1),
            attempts: 2,
            next_attempt_at: t(90),
            error: "late".into(),
        },
        DeliveryOutcome::Retry {
            key: key(0),
            attempts: 4,
            next_attempt_at: t(90),
            error: "late".into(),
        },
        DeliveryOutcome::Sent {
            key: key(2),
            at: t(71),
        },
        DeliveryOutcome::Retry {
            key: key(3),
            attempts: 1,
            next_attempt_at: t(80),
            error: "first".into(),
        },
        DeliveryOutcome::Retry {
            key: key(3),
            attempts: 1,
            next_attempt_at: t(85),
            error: "second".into(),
        },
    ])
    .await
    .expect("settle");
    assert_eq!(
        db.deliveries("c1").await.expect("deliveries"),
        vec![
            state(0, Dead, 3, t(3), Some("400: not a phone number"), None),
            state(1, Sent, 1, t(1), None, Some(t(5))),
            state(2, Sent, 2, t(30), Some("timeout"), Some(t(71))),
            state(3, Pending, 1, t(85), Some("second"), None),
        ]
    );
    assert_eq!(
        db.outbox_depth(t(100)).await.expect("depth"),
        OutboxDepth {
            pending: 1,
            due: 1,
            dead: 1,
            oldest_due: Some(t(85)),
        }
    );
}

/// Two dispatchers (tasks on their own connections) claim from one outbox at the same time:
/// every row is claimed exactly once.
async fn concurrent_claims_never_share_a_row(db: Arc<Database>) {
    const N: usize = 300;
    let rows: Vec<OutboxRow> = (0..N)
        .map(|i| {
            let r = run(&format!("c{i:03}"), "care", 1, None);
            OutboxRow {
                created_at: t(i64::try_from(i % 7).expect("small")),
                ..outbox(&r, "welcome")
            }
        })
        .collect();
    commit(
        &db,
        &Batch {
            outbox: rows.clone(),
            ..Batch::default()
        },
    )
    .await;
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let dispatcher = |owner: &'static str| {
        let db = db.clone();
        let start = start.clone();
        tokio::spawn(async move {
            start.wait().await;
            let mut keys = Vec::new();
            loop {
                let claimed = db
                    .claim_outbox(t(10), 7, owner, t(60), &[])
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    break keys;
                }
                keys.extend(claimed.into_iter().map(|d| d.row.key));
                tokio::task::yield_now().await;
            }
        })
    };
    let (one, two) = (dispatcher("daemon-1"), dispatcher("daemon-2"));
    let one = one.await.expect("dispatcher 1");
    let two = two.await.expect("dispatcher 2");
    let mut all: Vec<String> = one.iter().chain(&two).cloned().collect();
    all.sort();
    let total = all.len();
    all.dedup();
    assert_eq!(total, all.len(), "a row was claimed twice");
    let mut want: Vec<String> = rows.into_iter().map(|r| r.key).collect();
    want.sort();
    assert_eq!(all, want, "every row claimed");
}

async fn pause_and_resume_flows(db: Arc<Database>) {
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        Vec::<String>::new()
    );
    db.set_paused("winback", true, t(1)).await.expect("pause");
    db.set_paused("birthday", true, t(2)).await.expect("pause");
    db.set_paused("winback", true, t(3))
        .await
        .expect("pause again (idempotent)");
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        vec!["birthday", "winback"]
    );
    db.set_paused("winback", false, t(4)).await.expect("resume");
    db.set_paused("care", false, t(5))
        .await
        .expect("resume a flow never paused");
    assert_eq!(db.paused_flows().await.expect("paused"), vec!["birthday"]);
    db.set_paused("winback", true, t(6)).await.expect("pause");
    assert_eq!(
        db.paused_flows().await.expect("paused"),
        vec!["birthday", "winback"]
    );
}

async fn schedule_ticks_fire_once(db: Arc<Database>) {
    assert_eq!(db.last_fire("daily").await.expect("last fire"), None);
    assert!(db.claim_fire("daily", t(0), t(0)).await.expect("claim"));
    assert!(!db.claim_fire("daily", t(0), t(1)).await.expect("claim"));
    assert!(db.claim_fire("weekly", t(0), t(0)).await.expect("claim"));
    assert!(
        db.claim_fire("daily", t(1_440), t(1_440))
            .await
            .expect("claim")
    );
    // A missed older tick can still be claimed; the last fire is the latest tick.
    assert!(
        db.claim_fire("daily", t(-1_440), t(1_441))
            .await
            .expect("claim")
    );
    assert_eq!(
        db.last_fire("daily").await.expect("last fire"),
        Some(t(1_440))
    );
    assert_eq!(db.last_fire("weekly").await.expect("last fire"), Some(t(0)));
    // Daemons racing for one tick: exactly one wins.
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.claim_fire("hourly", t(60), t(60)).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        if racer.await.expect("racer").expect("claim") {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        db.last_fire("hourly").await.expect("last fire"),
        Some(t(60))
    );
}

async fn flow_counts_per_outcome(db: Arc<Database>) {
    assert_eq!(db.flow_counts(None).await.expect("flow counts"), vec![]);
    let with_outcome = |r: Run, outcome: &str| Run {
        outcome: Some(outcome.into()),
        ..ended(r, None, None)
    };
    let waiting = run("c1", "care", 1, Some(t(60)));
    let completed = ended(run("c2", "care", 1, None), None, Some(t(30)));
    let timed_out = with_outcome(run("c3", "care", 1, None), "timeout");
    let exited = with_outcome(run("c4", "care", 1, None), "exited");
    let errored = with_outcome(run("c5", "care", 1, None), "error");
    let birthday = run("c1", "birthday", 1, None);
    commit(
        &db,
        &Batch {
            runs: vec![
                waiting.clone(),
                completed.clone(),
                timed_out,
                exited,
                errored,
                birthday,
            ],
            conversions: vec![conversion(&completed), conversion(&waiting)],
            ..Batch::default()
        },
    )
    .await;
    let care = FlowCounts {
        flow: "care".into(),
        entered: 5,
        waiting: 1,
        completed: 2,
        exited: 1,
        errored: 1,
        converted: 2,
    };
    let birthday = FlowCounts {
        flow: "birthday".into(),
        entered: 1,
        waiting: 1,
        ..FlowCounts::default()
    };
    assert_eq!(
        db.flow_counts(None).await.expect("flow counts"),
        vec![birthday, care.clone()],
        "by flow"
    );
    assert_eq!(
        db.flow_counts(Some("care")).await.expect("flow counts"),
        vec![care]
    );
    assert_eq!(
        db.flow_counts(Some("nope")).await.expect("flow counts"),
        vec![]
    );
}

// ---- customer leases ---------------------------------------------------------------------------

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|&id| id.to_owned()).collect()
}

/// Claim `list` for `owner` at `now` until `until`: the ids it now holds.
async fn lease(db: &Database, list: &[&str], owner: &str, now: Time, until: Time) -> Vec<String> {
    db.claim_customers(&ids(list), owner, now, until)
        .await
        .expect("claim customers")
}

async fn release(db: &Database, list: &[&str], owner: &str) {
    db.release_customers(&ids(list), owner)
        .await
        .expect("release customers");
}

const NONE: Vec<String> = Vec::new();

async fn leases_go_to_one_owner_until_they_run_out(db: Arc<Database>) {
    assert_eq!(lease(&db, &[], "d1", t(0), t(5)).await, NONE);
    // Free ids: all taken, in the order given, each once.
    assert_eq!(
        lease(&db, &["c3", "c1", "c2", "c1"], "d1", t(0), t(5)).await,
        ids(&["c3", "c1", "c2"])
    );
    // Held: another owner gets only the free one, up to the lease's last instant.
    assert_eq!(
        lease(&db, &["c2", "c4", "c1"], "d2", t(1), t(9)).await,
        ids(&["c4"])
    );
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d2", t(4), t(9)).await,
        NONE
    );
    // Run out (`until <= now`): the next claimer takes them.
    assert_eq!(
        lease(&db, &["c2", "c1"], "d2", t(5), t(9)).await,
        ids(&["c2", "c1"])
    );
    // The first owner, back from a stall, keeps only what nobody took over.
    assert_eq!(
        lease(&db, &["c1", "c2", "c3", "c4"], "d1", t(6), t(9)).await,
        ids(&["c3"])
    );
}

async fn the_holder_extends_its_lease(db: Arc<Database>) {
    assert_eq!(
        lease(&db, &["c1", "c2"], "d1", t(0), t(5)).await,
        ids(&["c1", "c2"])
    );
    // Claiming its own lease again extends it; c2, not extended, runs out at t(5).
    assert_eq!(lease(&db, &["c1"], "d1", t(4), t(10)).await, ids(&["c1"]));
    assert_eq!(
        lease(&db, &["c1", "c2"], "d2", t(6), t(20)).await,
        ids(&["c2"])
    );
    assert_eq!(lease(&db, &["c1"], "d2", t(9), t(20)).await, NONE);
    // A lease that ran out but was not taken over is still the owner's to extend.
    assert_eq!(lease(&db, &["c1"], "d1", t(12), t(30)).await, ids(&["c1"]));
    assert_eq!(lease(&db, &["c1"], "d2", t(20), t(40)).await, NONE);
    assert_eq!(lease(&db, &["c1"], "d2", t(30), t(40)).await, ids(&["c1"]));
    // A lease can also be shortened by its holder (`until` is what the last claim says).
    assert_eq!(lease(&db, &["c1"], "d2", t(31), t(32)).await, ids(&["c1"]));
    assert_eq!(lease(&db, &["c1"], "d1", t(32), t(40)).await, ids(&["c1"]));
}

async fn release_frees_only_the_owners_leases(db: Arc<Database>) {
    lease(&db, &["c1", "c2"], "d1", t(0), t(5)).await;
    lease(&db, &["c3"], "d2", t(0), t(5)).await;
    release(&db, &[], "d1").await;
    release(&db, &["c1", "c3", "nobody"], "d1").await;
    // c1 is free at once; c2 is still d1's, c3 still d2's.
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d3", t(1), t(5)).await,
        ids(&["c1"])
    );
    // Releasing again leaves the new holder's lease alone.
    release(&db, &["c1"], "d1").await;
    assert_eq!(lease(&db, &["c1"], "d1", t(2), t(5)).await, NONE);
    release(&db, &["c3"], "d2").await;
    assert_eq!(
        lease(&db, &["c3", "c2", "c1"], "d1", t(2), t(5)).await,
        ids(&["c3", "c2"])
    );
}

/// Daemons (tasks on their own connections) claim overlapping sets of customers at the same
/// moment, half of them listing theirs backwards: every id goes to exactly one of them — on
/// free ids, then again once all those leases ran out. Claims lock rows in one order, so
/// none of them fails on a deadlock either.
async fn concurrent_claimers_never_share_a_customer(db: Arc<Database>) {
    const DAEMONS: usize = 6;
    const IDS: usize = 120;
    let all: Vec<String> = (0..IDS).map(|i| format!("c{i:03}")).collect();
    for now in [t(0), t(10)] {
        let until = now + Duration::minutes(5);
        let start = Arc::new(tokio::sync::Barrier::new(DAEMONS));
        let daemons: Vec<_> = (0..DAEMONS)
            .map(|d| {
                let (db, start) = (db.clone(), start.clone());
                // 60 ids from 15·d on, wrapping around: each id is wanted by 3 daemons.
                let mut want: Vec<String> =
                    (0..60).map(|i| all[(15 * d + i) % IDS].clone()).collect();
                if d % 2 == 1 {
                    want.reverse();
                }
                tokio::spawn(async move {
                    let owner = format!("daemon-{d}");
                    start.wait().await;
                    let held = db
                        .claim_customers(&want, &owner, now, until)
                        .await
                        .expect("claim");
                    (owner, want, held)
                })
            })
            .collect();
        let mut holder: HashMap<String, String> = HashMap::new();
        let mut by_owner: Vec<(String, Vec<String>)> = Vec::new();
        for daemon in daemons {
            let (owner, want, held) = daemon.await.expect("daemon");
            let asked: Vec<String> = want
                .iter()
                .filter(|id| held.contains(id))
                .cloned()
                .collect();
            assert_eq!(held, asked, "{owner}: ids it asked for, in its order");
            for id in &held {
                if let Some(other) = holder.insert(id.clone(), owner.clone()) {
                    panic!("{id} went to {other} and to {owner}");
                }
            }
            by_owner.push((owner, held));
        }
        assert_eq!(holder.len(), IDS, "every id went to a daemon");
        // The table agrees: nobody else gets one, each holder extends all of its own.
        assert_eq!(
            db.claim_customers(&all, "newcomer", now, until)
                .await
                .expect("claim"),
            NONE
        );
        for (owner, held) in by_owner {
            assert_eq!(
                db.claim_customers(&held, &owner, now, until)
                    .await
                    .expect("claim"),
                held
            );
        }
    }
}

/// A round's batch for `customers`: per customer its run, one history and one outbox row;
/// inbox items `done` applied.
fn round(customers: &[&str], done: &[i64], lease: Option<Lease>) -> Batch {
    let mut batch = Batch {
        at: t(1),
        inbox_done: done.to_vec(),
        lease,
        ..Batch::default()
    };
    for &id in customers {
        let r = run(id, "care", 1, Some(t(60)));
        batch.customers.push(customer(id));
        batch.history.push(history(&r, 1, "welcome"));
        batch.outbox.push(outbox(&r, "welcome"));
        batch.runs.push(r);
    }
    batch
}

fn fence(owner: &str, customers: &[&str], now: Time) -> Option<Lease> {
    Some(Lease {
        owner: owner.into(),
        customers: ids(customers),
        now,
    })
}

async fn lease_lost(db: &Database, batch: &Batch) -> (String, usize) {
    match db.commit(batch).await {
        Err(StoreError::LeaseLost { owner, missing }) => (owner, missing),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

async fn commit_is_fenced_by_the_lease(db: Arc<Database>) {
    db.enqueue(&[
        InboxItem::Event(event("e1", "c1", t(0))),
        InboxItem::Event(event("e2", "c2", t(0))),
    ])
    .await
    .expect("enqueue");
    let seqs: Vec<i64> = db
        .inbox_pending(None, 10)
        .await
        .expect("pending")
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d1", t(0), t(5))
            .await
            .len(),
        3
    );
    // Held: written.
    commit(
        &db,
        &round(&["c1"], &seqs[..1], fence("d1", &["c1", "c2"], t(1))),
    )
    .await;
    let written = Counts {
        customers: 1,
        runs: 1,
        waiting: 1,
        history: 1,
        outbox: 1,
        conversions: 0,
        inbox_pending: 1,
    };
    assert_eq!(counts(&db).await, written);
    let (history, outbox) = (
        db.history(None).await.expect("history"),
        db.outbox(None).await.expect("outbox"),
    );

    // d1 stalled past its lease: refused even before anyone took the customers over.
    let late = round(&["c1", "c2"], &seqs[1..], fence("d1", &["c1", "c2"], t(5)));
    assert_eq!(lease_lost(&db, &late).await, ("d1".into(), 2));
    // Taken over: d2 took c2 once it ran out; d1 extended c1 and c3, not c2.
    assert_eq!(lease(&db, &["c2"], "d2", t(6), t(10)).await, ids(&["c2"]));
    assert_eq!(
        lease(&db, &["c1", "c2", "c3"], "d1", t(6), t(10)).await,
        ids(&["c1", "c3"])
    );
    let stolen = round(
        &["c1", "c2"],
        &seqs[1..],
        fence("d1", &["c1", "c2", "c3", "c2"], t(7)),
    );
    let err = db.commit(&stolen).await.expect_err("lease lost");
    assert!(
        matches!(&err, StoreError::LeaseLost { owner, missing: 1 } if owner == "d1"),
        "{err:?}"
    );
    assert!(err.to_string().contains("redone"), "{err}");
    // Never claimed, or claimed by someone else.
    let unclaimed = round(&["c9"], &seqs[1..], fence("d1", &["c1", "c9"], t(7)));
    assert_eq!(lease_lost(&db, &unclaimed).await, ("d1".into(), 1));
    let other = round(&["c1"], &seqs[1..], fence("d3", &["c1"], t(7)));
    assert_eq!(lease_lost(&db, &other).await, ("d3".into(), 1));
    // None of it was written: no rows, and the inbox item is still pending.
    assert_eq!(counts(&db).await, written);
    assert_eq!(db.history(None).await.expect("history"), history);
    assert_eq!(db.outbox(None).await.expect("outbox"), outbox);
    assert_eq!(db.runs("c2").await.expect("runs"), vec![]);

    // The new holder commits.
    commit(&db, &round(&["c2"], &seqs[1..], fence("d2", &["c2"], t(7)))).await;
    assert_eq!(
        counts(&db).await,
        Counts {
            customers: 2,
            runs: 2,
            waiting: 2,
            history: 2,
            outbox: 2,
            inbox_pending: 0,
            ..written
        }
    );
    // A lease alone is no work: an empty batch commits as a no-op, lease lost or not.
    let empty = Batch {
        lease: fence("d1", &["c2"], t(7)),
        ..Batch::default()
    };
    assert!(empty.is_empty());
    db.commit(&empty).await.expect("nothing to write");
    // Without a lease nothing is checked (one daemon): written as before, over d2's lease.
    commit(&db, &round(&["c2", "c4"], &[], None)).await;
    assert_eq!(counts(&db).await.customers, 3);
    assert_eq!(db.runs("c4").await.expect("runs").len(), 1);
    // A released lease no longer covers a commit.
    release(&db, &["c2"], "d2").await;
    let released = round(&["c2"], &[], fence("d2", &["c2"], t(8)));
    assert_eq!(lease_lost(&db, &released).await, ("d2".into(), 1));
}

/// Commits under a lease that runs out right then race daemons taking the customers over (on
/// Postgres the commit share-locks the lease rows and the takeovers wait for it, or the
/// commit waits for them and finds the leases gone). Each commit is written whole or not at
/// all, as it reports; the takeovers share no customer; nothing fails on a deadlock.
async fn fenced_commits_race_takeovers(db: Arc<Database>) {
    const ROUNDS: i64 = 8;
    const CUSTOMERS: usize = 30;
    for r in 0..ROUNDS {
        let (now, until) = (t(10 * r), t(10 * r + 1));
        let mine: Vec<String> = (0..CUSTOMERS).map(|i| format!("r{r}-c{i:02}")).collect();
        let held = db
            .claim_customers(&mine, "d1", now, until)
            .await
            .expect("claim");
        assert_eq!(held, mine);
        let names: Vec<&str> = mine.iter().map(String::as_str).collect();
        let batch = round(&names, &[], fence("d1", &names, now));
        let start = Arc::new(tokio::sync::Barrier::new(4));
        let committer = {
            let (db, start) = (db.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                db.commit(&batch).await
            })
        };
        let takers: Vec<_> = (0..3)
            .map(|d| {
                let (db, start) = (db.clone(), start.clone());
                let mut want: Vec<String> = mine[d * 5..d * 5 + 20].to_vec();
                if d == 1 {
                    want.reverse();
                }
                tokio::spawn(async move {
                    start.wait().await;
                    db.claim_customers(
                        &want,
                        &format!("taker-{d}"),
                        until,
                        until + Duration::minutes(1),
                    )
                    .await
                    .expect("claim")
                })
            })
            .collect();
        let committed = match committer.await.expect("committer") {
            Ok(()) => true,
            Err(StoreError::LeaseLost { .. }) => false,
            Err(e) => panic!("round {r}: {e}"),
        };
        let mut taken = HashSet::new();
        for taker in takers {
            for id in taker.await.expect("taker") {
                assert!(taken.insert(id.clone()), "round {r}: {id} taken twice");
            }
        }
        let runs = db.runs(&mine[0]).await.expect("runs").len();
        assert_eq!(
            runs,
            usize::from(committed),
            "round {r}: written as reported"
        );
        let history = db
            .history(Some(&mine[CUSTOMERS - 1]))
            .await
            .expect("history")
            .len();
        assert_eq!(
            history,
            usize::from(committed),
            "round {r}: written as reported"
        );
        // Ids 0..30 wanted by the takers: 0..20, 5..25, 10..30 — all went to one of them.
        assert_eq!(taken.len(), CUSTOMERS, "round {r}");
    }
}

/// On Postgres a commit under a lease share-locks the lease rows until it ends: a takeover
/// started while the commit is under way waits for it, then takes the customer. The commit
/// is held mid-transaction by a lock on the customer row it writes (after the check).
#[tokio::test]
async fn postgres_takeover_waits_for_a_fenced_commit() {
    with_postgres("takeover_waits", |db| async move {
        let Database::Postgres(pg) = &*db else {
            panic!("a Postgres store")
        };
        let schema = pg.schema().expect("a test schema").to_owned();
        let url = std::env::var(PG_ENV).expect("the Postgres URL");
        commit(&db, &round(&["c1"], &[], None)).await;
        assert_eq!(lease(&db, &["c1"], "d1", t(0), t(5)).await, ids(&["c1"]));

        let mut blocker = sqlx::PgConnection::connect(&url)
            .await
            .expect("connect to Postgres");
        sqlx::query(&format!("SET search_path = \"{schema}\""))
            .execute(&mut blocker)
            .await
            .expect("search path");
        let blocker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut blocker)
            .await
            .expect("pid");
        sqlx::query("BEGIN")
            .execute(&mut blocker)
            .await
            .expect("begin");
        sqlx::query("SELECT 1 FROM customers WHERE id = 'c1' FOR UPDATE")
            .execute(&mut blocker)
            .await
            .expect("lock the customer row");

        let committer = {
            let db = db.clone();
            tokio::spawn(async move {
                db.commit(&round(&["c1"], &[], fence("d1", &["c1"], t(4))))
                    .await
            })
        };
        // Wait until the commit, past its lease check, is stuck on the customer row.
        let mut stuck = false;
        for _ in 0..200 {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(blocker_pid)
            .fetch_one(&mut blocker)
            .await
            .expect("pg_stat_activity");
            if waiting > 0 {
                stuck = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(stuck, "the commit waits on the customer row");

        // d1's lease has run out by d2's clock: d2 may take c1, but only after the commit.
        let mut taker = {
            let db = db.clone();
            tokio::spawn(async move {
                db.claim_customers(&ids(&["c1"]), "d2", t(5), t(9))
                    .await
                    .expect("claim")
            })
        };
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut taker).await;
        assert!(
            early.is_err(),
            "the takeover waits for the commit: {early:?}"
        );
        sqlx::query("ROLLBACK")
            .execute(&mut blocker)
            .await
            .expect("rollback");
        blocker.close().await.expect("close");
        committer
            .await
            .expect("committer")
            .expect("the commit held its lease");
        assert_eq!(taker.await.expect("taker"), ids(&["c1"]));
        assert_eq!(db.history(Some("c1")).await.expect("history").len(), 1);
    })
    .await;
}

/// Rows of customer `c1` on two channels: s1, s2 on sms and w1 on webhook, all due at t(1).
async fn two_channel_rows(db: &Database) {
    let mut rows = vec![
        due_row("s1", t(1)),
        due_row("w1", t(1)),
        due_row("s2", t(1)),
    ];
    rows[1].channel = "webhook".into();
    commit(
        db,
        &Batch {
            outbox: rows,
            ..Batch::default()
        },
    )
    .await;
}

async fn claim_as(db: &Database, owner: &str, now: Time, skip: &[&str]) -> Vec<String> {
    let skip: Vec<String> = skip.iter().map(|s| (*s).to_owned()).collect();
    db.claim_outbox(now, 10, owner, now + Duration::minutes(2), &skip)
        .await
        .expect("claim")
        .into_iter()
        .map(|d| d.row.key.rsplit('/').next().unwrap_or_default().to_owned())
        .collect()
}

fn keys(names: &[&str]) -> Vec<String> {
    let r = run("c1", "care", 1, None);
    names.iter().map(|n| format!("{}/{n}", r.id)).collect()
}

/// A channel whose rows the dispatcher cannot send within their lease is passed over, so
/// the rows are neither held past their lease nor block other channels.
async fn claim_passes_over_full_channels(db: Arc<Database>) {
    two_channel_rows(&db).await;
    assert_eq!(claim_as(&db, "d1", t(5), &["sms"]).await, vec!["w1"]);
    assert_eq!(
        claim_as(&db, "d1", t(5), &["webhook"]).await,
        vec!["s1", "s2"]
    );
}

/// Defect: rows waiting for a rate-limited channel outlived their lease and were claimed
/// again (95 of 150 keys sent twice). A renewed lease keeps them the holder's.
async fn renewed_leases_keep_rows_from_every_claimer(db: Arc<Database>) {
    two_channel_rows(&db).await;
    assert_eq!(claim_as(&db, "d1", t(5), &[]).await.len(), 3);
    // Past the first lease (t(7)); the renewal runs to t(20).
    let renewed = db
        .renew_outbox(&keys(&["s1", "w1"]), "d1", t(20))
        .await
        .expect("renew");
    assert_eq!(renewed, 2);
    // Another daemon's renewal of rows it does not hold changes nothing.
    assert_eq!(
        db.renew_outbox(&keys(&["s2"]), "d2", t(30))
            .await
            .expect("renew"),
        0
    );
    assert_eq!(claim_as(&db, "d2", t(10), &[]).await, vec!["s2"]);
    // Past the renewal (and d2's own lease on s2, to t(12)).
    assert_eq!(
        claim_as(&db, "d2", t(21), &[]).await,
        vec!["s1", "w1", "s2"]
    );
}

async fn released_rows_are_claimable_at_once_with_attempts_unchanged(db: Arc<Database>) {
    two_channel_rows(&db).await;
    assert_eq!(claim_as(&db, "d1", t(5), &[]).await.len(), 3);
    // Only the holder's release counts.
    db.release_outbox(&keys(&["s1"]), "d2")
        .await
        .expect("release");
    assert!(claim_as(&db, "d2", t(5), &[]).await.is_empty());
    db.release_outbox(&keys(&["s1", "s2"]), "d1")
        .await
        .expect("release");
    let again = db
        .claim_outbox(t(5), 10, "d2", t(6), &[])
        .await
        .expect("claim");
    assert_eq!(
        again
            .iter()
            .map(|d| (d.row.step.as_str(), d.attempts))
            .collect::<Vec<_>>(),
        vec![("s1", 0), ("s2", 0)]
    );
}

/// Defect: after a SIGKILL the survivors waited out the dead daemon's claims (a 2-minute
/// lease: 110–123 s until the outbox drained). A daemon whose heartbeat stopped loses its
/// claims to the first live daemon that looks, and nobody else's are touched.
async fn a_dead_daemons_claims_are_taken_over_at_once(db: Arc<Database>) {
    two_channel_rows(&db).await;
    db.heartbeat("dead", t(0)).await.expect("beat");
    db.heartbeat("alive", t(0)).await.expect("beat");
    assert_eq!(
        claim_as(&db, "dead", t(1), &["webhook"]).await,
        vec!["s1", "s2"]
    );
    assert_eq!(claim_as(&db, "alive", t(1), &[]).await, vec!["w1"]);
    assert_eq!(lease(&db, &["c1"], "dead", t(1), t(30)).await, ids(&["c1"]));
    db.heartbeat("alive", t(3)).await.expect("beat");
    // Nobody is dead yet at t(0): nothing moves.
    let none = db.take_over("alive", Some(t(0))).await.expect("take over");
    assert!(none.is_empty(), "{none:?}");
    let taken = db.take_over("alive", Some(t(2))).await.expect("take over");
    assert_eq!(taken.daemons, vec!["dead".to_owned()]);
    assert_eq!((taken.outbox, taken.customers), (2, 1));
    // Its rows and customer go to the next claimer long before their leases run out; the
    // live daemon keeps its own.
    assert_eq!(claim_as(&db, "other", t(3), &[]).await, vec!["s1", "s2"]);
    assert_eq!(
        lease(&db, &["c1"], "other", t(3), t(30)).await,
        ids(&["c1"])
    );
    // Forgotten: a second look finds nothing.
    assert!(
        db.take_over("alive", Some(t(2)))
            .await
            .expect("again")
            .is_empty()
    );
}

/// SQLite has one daemon: the one starting takes every claim over, whoever held it.
async fn a_sole_daemon_takes_over_every_other_claim(db: Arc<Database>) {
    two_channel_rows(&db).await;
    assert_eq!(
        claim_as(&db, "killed", t(1), &["webhook"]).await,
        vec!["s1", "s2"]
    );
    assert_eq!(claim_as(&db, "me", t(1), &[]).await, vec!["w1"]);
    let taken = db.take_over("me", None).await.expect("take over");
    assert_eq!(taken.outbox, 2);
    assert_eq!(claim_as(&db, "me", t(2), &[]).await, vec!["s1", "s2"]);
}
