//! The store contract for the daemon, one suite for both backends (see `store.rs`):
//! dispatcher claims, pauses, schedule ticks, flow counts, customer leases, and the daemons
//! table that lets a live daemon take over the claims of a dead one.

use std::sync::Arc;

use canvas_engine::state::{
    Batch, DeadLetterFilter, DeliveryOutcome, DeliveryState, DeliveryStatus, FlowCounts,
    OutboxDepth, OutboxRow, Run, Time,
};
use canvas_engine::store::{Database, Store};
use chrono::Duration;

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
    dead_letters_are_listed_and_sent_again_under_their_key,
    concurrent_claims_never_share_a_row,
    pause_and_resume_flows,
    schedule_ticks_fire_once,
    flow_counts_per_outcome,
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

/// Defect: dead letters could be seen only one customer at a time and never sent again.
async fn dead_letters_are_listed_and_sent_again_under_their_key(db: Arc<Database>) {
    let rows = four_rows(&db).await;
    let key = |i: usize| rows[i].key.clone();
    assert_eq!(claim(&db, t(5), 10, t(6)).await, vec!["x", "a", "b"]);
    db.settle_outbox(&[
        DeliveryOutcome::Dead {
            key: key(0),
            attempts: 3,
            at: t(5),
            error: "HTTP 400: Not A Phone Number".into(),
        },
        DeliveryOutcome::Dead {
            key: key(1),
            attempts: 1,
            at: t(6),
            error: "timeout".into(),
        },
        DeliveryOutcome::Sent {
            key: key(2),
            at: t(5),
        },
    ])
    .await
    .expect("settle");
    let list = async |flow: Option<&str>, channel: Option<&str>, reason: Option<&str>, limit| {
        db.dead_letters(&DeadLetterFilter {
            flow: flow.map(str::to_owned),
            channel: channel.map(str::to_owned),
            reason: reason.map(str::to_owned),
            limit,
        })
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| d.row.key)
        .collect::<Vec<_>>()
    };
    assert_eq!(
        list(None, None, None, 10).await,
        vec![key(1), key(0)],
        "newest first"
    );
    assert_eq!(list(None, None, None, 1).await, vec![key(1)]);
    assert_eq!(
        list(Some("care"), Some(&rows[0].channel), None, 10)
            .await
            .len(),
        2
    );
    assert!(list(Some("other"), None, None, 10).await.is_empty());
    assert!(list(None, Some("email-nope"), None, 10).await.is_empty());
    assert_eq!(
        list(None, None, Some("not a phone"), 10).await,
        vec![key(0)]
    );
    assert_eq!(
        list(None, None, Some("100%_"), 10).await,
        Vec::<String>::new()
    );

    let dead = db.delivery(&key(0)).await.expect("read").expect("a row");
    assert_eq!(
        (dead.status, dead.dead_at),
        (DeliveryStatus::Dead, Some(t(5)))
    );
    assert!(db.retry_dead_letter(&key(0), t(20)).await.expect("retry"));
    let again = db.delivery(&key(0)).await.expect("read").expect("a row");
    assert_eq!(
        (
            again.status,
            again.attempts,
            again.next_attempt_at,
            again.dead_at
        ),
        (DeliveryStatus::Pending, 0, Some(t(20)), None)
    );
    assert_eq!(
        again.last_error.as_deref(),
        Some("HTTP 400: Not A Phone Number")
    );
    assert!(
        !db.retry_dead_letter(&key(0), t(21)).await.expect("retry"),
        "not dead now"
    );
    assert!(
        !db.retry_dead_letter(&key(2), t(21)).await.expect("retry"),
        "a sent row"
    );
    assert!(
        !db.retry_dead_letter("no/such/key", t(21))
            .await
            .expect("retry")
    );
    assert!(db.delivery("no/such/key").await.expect("read").is_none());
    assert_eq!(list(None, None, None, 10).await, vec![key(1)]);
    // The same row, same key, claimed again from its new due time.
    let claimed = db
        .claim_outbox(t(20), 10, "daemon-1", t(30), &[])
        .await
        .expect("claim");
    assert!(
        claimed
            .iter()
            .any(|d| d.row.key == key(0) && d.attempts == 0)
    );
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
        dead_at: (status == DeliveryStatus::Dead).then_some(t(5)),
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
