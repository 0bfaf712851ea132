//! The outcome counters in the store, one suite for both backends (see `store.rs` for how
//! the suite runs): counts written with a batch add up per day, version and step across
//! commits and daemons (shards), the waiting gauge moves both ways, ranges and versions
//! narrow the answer, and nothing is counted from a batch that lost its lease.

use std::sync::Arc;

use canvas_engine::state::{Batch, FlowVersion, Lease};
use canvas_engine::stats::{Count, FLOW, StatsQuery};
use canvas_engine::store::{Database, Store, StoreError};

mod common;
use common::*;

store_tests!(
    counters_add_up_per_day_version_and_daemon,
    a_batch_that_lost_its_lease_counts_nothing,
);

fn count(version: &str, step: &str, metric: &str, day: i32, n: i64) -> Count {
    Count {
        flow: "care".into(),
        version: version.into(),
        step: step.into(),
        metric: metric.into(),
        day: Some(day),
        n,
    }
}

fn batch(counts: Vec<Count>, lease: Option<Lease>) -> Batch {
    Batch {
        counts: counts.into(),
        at: t(0),
        lease,
        ..Batch::default()
    }
}

fn query(from: i32, to: i32, version: Option<&str>) -> StatsQuery {
    StatsQuery {
        flow: "care".into(),
        version: version.map(str::to_owned),
        from,
        to,
    }
}

async fn counters_add_up_per_day_version_and_daemon(db: Arc<Database>) {
    db.put_flow_versions(&[
        FlowVersion {
            flow: "care".into(),
            version: "v1".into(),
            source: "a".into(),
            created_at: t(0),
        },
        FlowVersion {
            flow: "care".into(),
            version: "v2".into(),
            source: "b".into(),
            created_at: t(10),
        },
    ])
    .await
    .expect("versions");
    // Two daemons (two lease owners: two shards) and a lease-less writer add to the same
    // counters; the same counter twice in one batch is summed before the upsert.
    for (owner, customer) in [("daemon-a", "c1"), ("daemon-b", "c2")] {
        db.claim_customers(&[customer.into()], owner, t(0), t(60))
            .await
            .expect("claim");
        let lease = Lease {
            owner: owner.into(),
            customers: vec![customer.into()],
            now: t(1),
        };
        db.commit(&batch(
            vec![
                count("v1", FLOW, "entered", 100, 1),
                count("v1", "welcome", "entered", 100, 1),
                count("v1", "welcome", "sent:sms", 100, 1),
                count("v1", "welcome", "sent:sms", 100, 1),
                Count::waiting("care", "v1", "wait", 1),
            ],
            Some(lease),
        ))
        .await
        .expect("commit");
    }
    db.commit(&batch(
        vec![
            count("v2", FLOW, "entered", 101, 3),
            count("v2", "welcome", "entered", 101, 3),
            count("v1", FLOW, "entered", 102, 1),
            Count::waiting("care", "v1", "wait", -1),
            Count::waiting("care", "v2", "wait", 2),
        ],
        None,
    ))
    .await
    .expect("commit");

    let all = db.flow_stats(&query(0, 1000, None)).await.expect("stats");
    let t_all = all.table(None);
    assert_eq!(
        t_all.flow["entered"], 6,
        "2 + 3 + 1 over every day and version"
    );
    assert_eq!(
        t_all.get("welcome", "sent:sms"),
        4,
        "summed over shards and the batch"
    );
    assert_eq!(t_all.get("wait", "waiting"), 3, "1 + 1 - 1 on v1, 2 on v2");
    assert_eq!(all.table(Some("v1")).get("wait", "waiting"), 1);
    assert_eq!(
        all.versions
            .iter()
            .map(|v| (v.version.as_str(), v.waiting))
            .collect::<Vec<_>>(),
        vec![("v1", 1), ("v2", 2)],
        "every version, oldest first, with its waiting runs"
    );
    let days: Vec<(i32, u64)> = all
        .days
        .iter()
        .filter(|d| d.metric == "entered")
        .map(|d| (d.day, d.n))
        .collect();
    assert_eq!(
        days,
        vec![(100, 2), (101, 3), (102, 1)],
        "flow-wide, per day"
    );

    let one_day = db.flow_stats(&query(101, 101, None)).await.expect("stats");
    assert_eq!(one_day.table(None).flow["entered"], 3, "only day 101");
    assert_eq!(
        one_day.table(None).get("wait", "waiting"),
        3,
        "the gauge has no days: the same whatever the range"
    );
    let v1 = db
        .flow_stats(&query(0, 1000, Some("v1")))
        .await
        .expect("stats");
    assert_eq!(
        v1.table(None).flow["entered"],
        3,
        "v1 only: 2 on day 100, 1 on day 102"
    );
    assert!(v1.counts.iter().all(|r| r.version == "v1"));
    let other = StatsQuery {
        flow: "winback".into(),
        ..query(0, 1000, None)
    };
    let none = db.flow_stats(&other).await.expect("stats");
    assert!(none.counts.is_empty() && none.waiting.is_empty() && none.versions.is_empty());
}

async fn a_batch_that_lost_its_lease_counts_nothing(db: Arc<Database>) {
    // Nobody claimed c1 for daemon-a: the commit is refused whole, counters included.
    let lease = Lease {
        owner: "daemon-a".into(),
        customers: vec!["c1".into()],
        now: t(1),
    };
    let err = db
        .commit(&batch(
            vec![count("v1", FLOW, "entered", 100, 1)],
            Some(lease),
        ))
        .await
        .expect_err("lease lost");
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err:?}");
    let s = db.flow_stats(&query(0, 1000, None)).await.expect("stats");
    assert!(s.counts.is_empty(), "{s:?}");
}
