//! The store contract for customer leases, one suite for both backends (see `store.rs`):
//! one daemon works on a customer at a time, a commit is fenced by its round's leases, and a
//! takeover waits for a fenced commit in flight.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use canvas_engine::state::{Batch, InboxItem, Lease, Time};
use canvas_engine::store::{Counts, Database, Store, StoreError};
use chrono::Duration;
use sqlx::Connection;

mod common;
use common::*;

store_tests!(
    leases_go_to_one_owner_until_they_run_out,
    the_holder_extends_its_lease,
    release_frees_only_the_owners_leases,
    concurrent_claimers_never_share_a_customer,
    commit_is_fenced_by_the_lease,
    fenced_commits_race_takeovers,
);

// ---- customer leases ---------------------------------------------------------------------------

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
        let url = pg_url();
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
