//! A round's working set: the customers it loaded, what it changes, and the background
//! commit of a sealed round.

use std::collections::{HashMap, HashSet};

use crate::executor::Transition;
use crate::flow::CompiledFlow;
use crate::state::{
    Batch, Customer, CustomerState, Enrolment, Failure, OutboxKind, Run, RunStatus, Time,
};
use crate::store::Result;

use super::Stats;

/// Turn a round's in-memory state into the batch to write, and its figures.
pub(super) fn seal(mut work: Work, now: Time) -> (Batch, Stats) {
    for (_, l) in work.customers {
        if l.customer_dirty {
            work.batch.customers.push(l.customer);
        }
        for (run, dirty) in l.runs.into_iter().chain(l.converting) {
            if dirty {
                work.batch.runs.push(run);
            }
        }
        for (e, dirty) in l.enrolments.into_values() {
            if dirty {
                work.batch.enrolments.push(e);
            }
        }
    }
    work.batch.at = now;
    work.batch.failures = merge_failures(std::mem::take(&mut work.batch.failures));
    let mut stats = work.stats;
    stats.counts = work
        .batch
        .counts
        .counts()
        .into_iter()
        .filter(|c| c.day.is_some())
        .collect();
    stats.transitions = work.batch.history.len() as u64;
    stats.outbox = work.batch.outbox.len() as u64;
    stats.calls = work
        .batch
        .outbox
        .iter()
        .filter(|o| o.kind == OutboxKind::Call)
        .cloned()
        .collect();
    if !work.batch.is_empty() {
        stats.commits = 1;
    }
    (work.batch, stats)
}

/// One failure per flow, step and customer, counts added, the last error kept: the store
/// upserts them in one statement, which may touch a row once.
fn merge_failures(failures: Vec<Failure>) -> Vec<Failure> {
    if failures.len() < 2 {
        return failures;
    }
    let mut merged: HashMap<(String, String, String), Failure> = HashMap::new();
    let mut order = Vec::new();
    for f in failures {
        let key = (f.flow.clone(), f.step.clone(), f.customer_id.clone());
        match merged.get_mut(&key) {
            Some(m) => {
                m.count += f.count;
                m.error = f.error;
                m.at = f.at;
            }
            None => {
                order.push(key.clone());
                merged.insert(key, f);
            }
        }
    }
    order
        .into_iter()
        .filter_map(|k| merged.remove(&k))
        .collect()
}

/// A round being committed in the background.
pub(super) struct Committing {
    pub(super) handle: tokio::task::JoinHandle<Result<()>>,
    pub(super) stats: Stats,
    pub(super) customers: HashSet<String>,
}

impl Committing {
    pub(super) fn touches(&self, ids: &[String]) -> bool {
        ids.iter().any(|id| self.customers.contains(id))
    }
}

/// Wait for a background commit; its figures count once it is durable.
pub(super) async fn finish(
    committing: Option<Committing>,
    progress: &mut impl FnMut(&Stats),
) -> Result<Stats> {
    let Some(c) = committing else {
        return Ok(Stats::default());
    };
    match c.handle.await {
        Ok(result) => result?,
        Err(e) => return Err(crate::store::StoreError::Task(e.to_string())),
    }
    progress(&c.stats);
    Ok(c.stats)
}

/// The customers of one round, and what the round writes.
#[derive(Default)]
pub(super) struct Work {
    pub(super) customers: HashMap<String, Loaded>,
    pub(super) batch: Batch,
    pub(super) stats: Stats,
}

impl Work {
    pub(super) fn entry(&mut self, id: &str, now: Time) -> Slot<'_> {
        let loaded = self
            .customers
            .entry(id.to_owned())
            .or_insert_with(|| Loaded::new(Customer::new(id, now)));
        Slot {
            loaded,
            batch: &mut self.batch,
            stats: &mut self.stats,
        }
    }
}

/// A customer's state in memory during a round; the flags say what must be written.
pub(super) struct Loaded {
    pub(super) customer: Customer,
    pub(super) customer_dirty: bool,
    pub(super) runs: Vec<(Run, bool)>,
    pub(super) converting: Vec<(Run, bool)>,
    pub(super) enrolments: HashMap<String, (Enrolment, bool)>,
}

impl Loaded {
    pub(super) fn new(customer: Customer) -> Loaded {
        Loaded {
            customer,
            customer_dirty: true,
            runs: Vec::new(),
            converting: Vec::new(),
            enrolments: HashMap::new(),
        }
    }

    pub(super) fn enrolment(&mut self, flow: &str) -> (&mut Enrolment, &mut bool) {
        let customer_id = self.customer.id.clone();
        let (e, d) = self.enrolments.entry(flow.to_owned()).or_insert_with(|| {
            (
                Enrolment {
                    flow: flow.to_owned(),
                    customer_id,
                    entries: 0,
                    last_entered_at: None,
                    active_run: None,
                    in_segment: false,
                },
                true,
            )
        });
        (e, d)
    }

    /// Move runs that ended out of the waiting list; free their enrolment.
    pub(super) fn settle(&mut self) {
        let mut i = 0;
        while i < self.runs.len() {
            if self.runs[i].0.status == RunStatus::Ended {
                let (run, dirty) = self.runs.remove(i);
                if let Some((e, d)) = self.enrolments.get_mut(&run.flow)
                    && e.active_run.as_deref() == Some(run.id.as_str())
                {
                    e.active_run = None;
                    *d = true;
                }
                self.converting.push((run, dirty));
            } else {
                i += 1;
            }
        }
    }
}

impl From<CustomerState> for Loaded {
    fn from(st: CustomerState) -> Loaded {
        Loaded {
            customer: st.customer,
            customer_dirty: false,
            runs: st.runs.into_iter().map(|r| (r, false)).collect(),
            converting: st.converting.into_iter().map(|r| (r, false)).collect(),
            enrolments: st
                .enrolments
                .into_iter()
                .map(|e| (e.flow.clone(), (e, false)))
                .collect(),
        }
    }
}

pub(super) struct Slot<'a> {
    pub(super) loaded: &'a mut Loaded,
    pub(super) batch: &'a mut Batch,
    pub(super) stats: &'a mut Stats,
}

pub(super) fn absorb(
    mut tr: Transition,
    flow: &CompiledFlow,
    dirty: &mut bool,
    customer_dirty: &mut bool,
    batch: &mut Batch,
) {
    if tr.customer_changed {
        *customer_dirty = true;
    }
    batch.failures.append(&mut tr.failures);
    batch
        .counts
        .add_ticks(&flow.id, &flow.hash.0, std::mem::take(&mut tr.counts));
    if tr.is_empty() {
        return;
    }
    *dirty = true;
    batch.history.extend(tr.history);
    batch.outbox.extend(tr.outbox);
    batch.conversions.extend(tr.conversion);
}
