//! The runtime: routes inbox items, due timers, schedule ticks and segment checks to runs,
//! calls the pure executor, and commits what it returns, many customers per transaction.
//!
//! Every method takes `now` from its caller (who holds the [`crate::clock::Clock`]), so the
//! daemon, `canvas simulate` and `canvas test` share it.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::clock::Clock;
use crate::eval::{self, Scope};
use crate::executor::{self, Ctx, Input};
use crate::flow::{CompiledFlow, Trigger};
use crate::policy::Policy;
use crate::registry::Registry;
use crate::state::{
    CallResult, Customer, DeliveryFailure, Event, FlowVersion, InboxItem, Lease, OutboxRow,
    ProfileUpdate, RunStatus, Time, ZONE_KEY,
};
use crate::store::{Result, Store};
use serde_json::Value as Json;

mod apply;
use apply::holds;
mod failure_log;
mod flows;
mod work;

pub use failure_log::FailureLog;

pub use flows::{FlowSet, Published, VersionSource, version_record};
use work::{Committing, Loaded, Slot, Work, absorb, finish, seal};

/// What a round of work did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Inbox items applied.
    pub items: u64,
    /// Runs started.
    pub started: u64,
    /// Steps executed and checkpointed (history rows).
    pub transitions: u64,
    /// Outbox rows written.
    pub outbox: u64,
    pub commits: u64,
    /// `call` rows written this round, for a caller that answers calls in-process.
    pub calls: Vec<OutboxRow>,
    /// The pass stopped at the end of its [`Pace`] budget with work still waiting.
    pub more: bool,
    /// The daily outcome counters the pass committed, summed (not the waiting gauge), for
    /// a caller that exports them (the daemon's `/metrics`).
    pub counts: Vec<crate::stats::Count>,
}

impl Stats {
    pub fn add(&mut self, other: Stats) {
        self.items += other.items;
        self.started += other.started;
        self.transitions += other.transitions;
        self.outbox += other.outbox;
        self.commits += other.commits;
        self.calls.extend(other.calls);
        self.more |= other.more;
        if !other.counts.is_empty() {
            self.counts.extend(other.counts);
            // Summed as they come, so a long pass holds one entry per counter.
            if self.counts.len() > 1024 {
                self.counts = crate::stats::merge(std::mem::take(&mut self.counts));
            }
        }
    }
}

/// Where each round of a pass takes its `now` from, and when the pass stops.
///
/// A batch job or a test works at one instant until everything is done ([`Pace::at`]). The
/// daemon works in the present ([`Pace::live`]): every round reads the clock afresh, so what
/// it records (`applied_at`, run starts, timers it fires) is never earlier than the input
/// it applies, and a pass ends once its budget is spent, so the caller serves timers, picks
/// up reloaded flows and comes back for the rest.
#[derive(Clone, Copy)]
pub struct Pace<'a> {
    clock: Option<&'a dyn Clock>,
    at: Time,
    until: Option<Time>,
}

impl Pace<'static> {
    /// Every round at `now`, until the work is done.
    pub fn at(now: Time) -> Pace<'static> {
        Pace {
            clock: None,
            at: now,
            until: None,
        }
    }
}

impl<'a> Pace<'a> {
    /// Every round at `clock`'s time; no round starts once `budget` has gone by.
    pub fn live(clock: &'a dyn Clock, budget: chrono::Duration) -> Pace<'a> {
        let at = clock.now();
        Pace {
            clock: Some(clock),
            at,
            until: Some(at + budget),
        }
    }

    fn now(&self) -> Time {
        self.clock.map_or(self.at, |c| c.now())
    }

    /// Whether the budget is spent.
    fn spent(&self) -> bool {
        self.until.is_some_and(|until| self.now() >= until)
    }
}

/// The flows an operator paused, shared by a runtime and every successor built from it
/// (hot reload swaps runtimes; a pause must hold across them). Each round reads it as it
/// goes, so a pause takes effect at the next round, not at the next pass.
#[derive(Debug, Clone, Default)]
pub struct Paused(Arc<RwLock<HashSet<String>>>);

impl Paused {
    pub fn contains(&self, flow: &str) -> bool {
        self.read().contains(flow)
    }

    /// Replace the set; whether it changed.
    pub fn replace(&self, flows: HashSet<String>) -> bool {
        let mut set = self.0.write().unwrap_or_else(|e| e.into_inner());
        let changed = *set != flows;
        *set = flows;
        changed
    }

    /// The paused flows now, by name.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().iter().cloned().collect();
        names.sort();
        names
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashSet<String>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The runtime over one store.
pub struct Runtime<S> {
    pub store: S,
    pub flows: FlowSet,
    pub policy: Policy,
    pub registry: Registry,
    /// Customers per transaction.
    pub batch_size: usize,
    /// Flows an operator paused: nobody enters them and their timers hold (read past, left
    /// due) until they are resumed; events and call results still reach their runs.
    pub paused: Paused,
    /// Scale-out mode (several processes on one database): this process's name. Each round
    /// then leases its customers first (`Store::claim_customers`), works only on those it
    /// got, and commits fenced by the lease; customers another process holds wait for a
    /// later round, so one customer's inputs still apply in order. `None`: this process is
    /// the only one.
    pub owner: Option<String>,
    /// How long a round's customer leases last; a process that dies holding them blocks
    /// those customers this long.
    pub lease: chrono::Duration,
    /// Where run-time failures are logged, rate-limited (shared across hot reloads).
    pub failure_log: FailureLog,
}

impl<S: Store> Runtime<S> {
    pub fn new(store: S, flows: FlowSet, policy: Policy, registry: Registry) -> Runtime<S> {
        Runtime {
            store,
            flows,
            policy,
            registry,
            batch_size: 1000,
            paused: Paused::default(),
            owner: None,
            lease: chrono::Duration::seconds(30),
            failure_log: FailureLog::default(),
        }
    }

    /// Record the current flow versions, each with its source (see [`VersionSource`]).
    pub async fn register_versions(&self, now: Time) -> Result<()> {
        let versions: Vec<FlowVersion> = self
            .flows
            .current()
            .map(|f| version_record(f, now))
            .collect();
        self.store.put_flow_versions(&versions).await
    }

    /// Rebuild, from their recorded sources, the flow versions this process has not loaded
    /// (the flows folder changed while runs were pinned to them), so those runs carry on
    /// after a restart. Returns `(flow, version)` of each version that could not be rebuilt,
    /// with the reason; their runs wait until a process that knows the version takes them.
    pub async fn restore_versions(&mut self) -> Result<Vec<(String, String, String)>> {
        let recorded = self.store.flow_versions(None).await?;
        let mut failed = Vec::new();
        for v in recorded {
            if self.flows.version(&v.version).is_some() {
                continue;
            }
            let restored = serde_json::from_str::<VersionSource>(&v.source)
                .map_err(|_| {
                    "recorded before sources were kept (only its path is known)".to_owned()
                })
                .and_then(|src| src.restore(&v.version, &self.registry));
            match restored {
                Ok(flow) => {
                    tracing::info!(flow = %v.flow, version = %v.version, "older version restored for its runs");
                    self.flows.add_version(flow);
                }
                Err(reason) => failed.push((v.flow, v.version, reason)),
            }
        }
        Ok(failed)
    }

    /// Apply every pending inbox item, in order, a batch of items per transaction.
    pub async fn process_inbox(&self, now: Time) -> Result<Stats> {
        self.process_inbox_with(Pace::at(now), |_| {}).await
    }

    /// [`Runtime::process_inbox`] at `pace` (until its budget is spent: then `more` says
    /// items are left), reporting each committed round to `progress`.
    ///
    /// Rounds are pipelined: while one round commits, the next is read, loaded and executed.
    /// A round that shares a customer with the round still committing waits for that commit
    /// first, so every customer's state is loaded as committed and applied in order.
    pub async fn process_inbox_with(
        &self,
        pace: Pace<'_>,
        progress: impl FnMut(&Stats),
    ) -> Result<Stats> {
        process_inbox_from(|| self, pace, progress).await
    }

    /// Fire every timer due at `now`.
    pub async fn fire_due(&self, now: Time) -> Result<Stats> {
        self.fire_due_with(Pace::at(now), |_| {}).await
    }

    /// [`Runtime::fire_due`] at `pace`, each round firing what is due at its own time,
    /// reporting each committed round to `progress`; pipelined like
    /// [`Runtime::process_inbox_with`].
    pub async fn fire_due_with(
        &self,
        pace: Pace<'_>,
        progress: impl FnMut(&Stats),
    ) -> Result<Stats> {
        fire_due_from(|| self, pace, progress).await
    }

    /// Enter the audience of every schedule whose cron fires in `(after, now]`, and recheck
    /// segments whose period has come round; `after` is the previous tick.
    pub async fn tick(&self, after: Time, now: Time) -> Result<Stats> {
        let mut due: Vec<Arc<CompiledFlow>> = Vec::new();
        for flow in self.flows.by_precedence() {
            match &flow.trigger {
                Trigger::Schedule { cron, .. } => {
                    if next_cron(flow, &cron.cron, after).is_some_and(|t| t <= now) {
                        due.push(flow.clone());
                    }
                }
                Trigger::Segment { recheck, .. } => {
                    if next_recheck(recheck.as_secs(), after) <= now {
                        due.push(flow.clone());
                    }
                }
                Trigger::Event { .. } => {}
            }
        }
        if due.is_empty() {
            return Ok(Stats::default());
        }
        self.scan(&due, now).await
    }

    /// The schedule and segment-recheck moments that came round in `(after(flow), now]`: per flow,
    /// the latest one only, so a daemon that was down fires a missed schedule once rather
    /// than once per missed tick. The caller claims each `(flow, moment)` (see
    /// `Store::claim_fire`) so that several daemons fire it once, then calls
    /// [`Runtime::enter_audience`].
    pub fn due_ticks(
        &self,
        after: impl Fn(&str) -> Time,
        now: Time,
    ) -> Vec<(Arc<CompiledFlow>, Time)> {
        let mut due = Vec::new();
        for flow in self.flows.current() {
            let mut latest = None;
            let mut t = after(&flow.id);
            // Bounded: a cron can fire every minute, and a gap of days is possible.
            for _ in 0..100_000 {
                let next = match &flow.trigger {
                    Trigger::Schedule { cron, .. } => next_cron(flow, &cron.cron, t),
                    Trigger::Segment { recheck, .. } => Some(next_recheck(recheck.as_secs(), t)),
                    Trigger::Event { .. } => None,
                };
                match next {
                    Some(n) if n <= now && n > t => {
                        latest = Some(n);
                        t = n;
                    }
                    _ => break,
                }
            }
            if let Some(at) = latest {
                due.push((flow.clone(), at));
            }
        }
        due
    }

    /// Enter the audience of schedule flows, or recheck the segment of segment flows, over
    /// every customer in batches.
    pub async fn enter_audience(&self, flows: &[Arc<CompiledFlow>], now: Time) -> Result<Stats> {
        if flows.is_empty() {
            return Ok(Stats::default());
        }
        self.scan(flows, now).await
    }

    /// The next moment something is due after `after`: a timer, a schedule, a segment recheck.
    pub async fn next_due(&self, after: Time) -> Result<Option<Time>> {
        let mut next = self.store.next_wake(after).await?;
        for flow in self.flows.current() {
            let t = match &flow.trigger {
                Trigger::Schedule { cron, .. } => next_cron(flow, &cron.cron, after),
                Trigger::Segment { recheck, .. } => Some(next_recheck(recheck.as_secs(), after)),
                Trigger::Event { .. } => None,
            };
            next = match (next, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(next)
    }

    /// Evaluate schedule audiences and segment conditions of `flows` for every customer.
    async fn scan(&self, flows: &[Arc<CompiledFlow>], now: Time) -> Result<Stats> {
        // Flows whose ticks coincide compete for each customer's caps: by precedence.
        let mut flows = flows.to_vec();
        flows.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        let flows = flows.as_slice();
        let mut stats = Stats::default();
        let mut after: Option<String> = None;
        loop {
            let ids = self
                .store
                .customer_ids(after.as_deref(), self.batch_size)
                .await?;
            let Some(last) = ids.last().cloned() else {
                return Ok(stats);
            };
            let ids = self.claim_all(&ids, now).await?;
            let mut work = self.load(&ids, now).await?;
            for id in &ids {
                let mut cs = work.entry(id, now);
                for flow in flows {
                    match &flow.trigger {
                        Trigger::Schedule { audience, .. } => {
                            let member = match audience {
                                None => true,
                                Some(a) => holds(
                                    &self.policy,
                                    flow,
                                    &cs.loaded.customer,
                                    (a, "audience"),
                                    None,
                                    now,
                                    cs.batch,
                                ),
                            };
                            if member {
                                self.start(&mut cs, flow, None, now);
                            }
                        }
                        Trigger::Segment { .. } => self.segment_edge(&mut cs, flow, now),
                        Trigger::Event { .. } => {}
                    }
                }
            }
            stats.add(self.commit(work, &ids, now).await?);
            after = Some(last);
        }
    }

    /// Scale-out mode: lease `ids` for a round; the ones this process now holds.
    async fn claim(&self, ids: &[String], now: Time) -> Result<Vec<String>> {
        match &self.owner {
            None => Ok(ids.to_vec()),
            Some(owner) => {
                self.store
                    .claim_customers(ids, owner, now, now + self.lease)
                    .await
            }
        }
    }

    /// [`Runtime::claim`] for a schedule or segment scan, which must reach every customer:
    /// customers another process holds are asked for again until it lets go (a round
    /// takes well under a second); after ten seconds they are left out, with a warning.
    async fn claim_all(&self, ids: &[String], now: Time) -> Result<Vec<String>> {
        if self.owner.is_none() {
            return Ok(ids.to_vec());
        }
        let mut held: Vec<String> = Vec::with_capacity(ids.len());
        let mut want: Vec<String> = ids.to_vec();
        for _ in 0..200 {
            let got: HashSet<String> = self.claim(&want, now).await?.into_iter().collect();
            want.retain(|id| {
                if got.contains(id) {
                    held.push(id.clone());
                    false
                } else {
                    true
                }
            });
            if want.is_empty() {
                return Ok(held);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::warn!(
            customers = want.len(),
            "a scan left out customers another process kept leased"
        );
        Ok(held)
    }

    async fn load(&self, ids: &[String], now: Time) -> Result<Work> {
        let states = self.store.load(ids, now).await?;
        let mut work = Work::default();
        for st in states {
            work.customers
                .insert(st.customer.id.clone(), Loaded::from(st));
        }
        Ok(work)
    }

    /// Write a round in one transaction.
    async fn commit(&self, work: Work, customers: &[String], now: Time) -> Result<Stats> {
        let (mut batch, stats) = seal(work, now);
        self.failure_log.note(&batch.failures, now);
        if let Some(owner) = &self.owner {
            batch.lease = Some(Lease {
                owner: owner.clone(),
                customers: customers.to_vec(),
                now,
            });
        }
        if !batch.is_empty() {
            self.store.commit(&batch).await?;
        }
        if let Some(owner) = &self.owner {
            self.store.release_customers(customers, owner).await?;
        }
        Ok(stats)
    }

    /// Start committing a round in the background; the next round is prepared meanwhile.
    fn spawn_commit(&self, work: Work, customers: Vec<String>, now: Time) -> Committing {
        let (mut batch, stats) = seal(work, now);
        self.failure_log.note(&batch.failures, now);
        let store = self.store.clone();
        let owner = self.owner.clone();
        if let Some(owner) = &owner {
            batch.lease = Some(Lease {
                owner: owner.clone(),
                customers: customers.clone(),
                now,
            });
        }
        let release = customers.clone();
        let handle = tokio::spawn(async move {
            if !batch.is_empty() {
                store.commit(&batch).await?;
            }
            if let Some(owner) = owner {
                store.release_customers(&release, &owner).await?;
            }
            Ok(())
        });
        Committing {
            handle,
            stats,
            customers: customers.into_iter().collect(),
        }
    }

    fn ctx<'a>(&'a self, flow: &'a CompiledFlow, now: Time) -> Ctx<'a> {
        Ctx {
            flow,
            policy: &self.policy,
            registry: &self.registry,
            now,
        }
    }
}

/// [`Runtime::process_inbox_with`], taking the runtime afresh from `current` at every round:
/// the daemon swaps runtimes on a hot reload, and a round that starts after the swap applies
/// the new flow versions, however long the pass.
pub async fn process_inbox_from<S: Store, R: std::ops::Deref<Target = Runtime<S>>>(
    current: impl Fn() -> R,
    pace: Pace<'_>,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats> {
    let mut stats = Stats::default();
    let mut after = None;
    let mut committing: Option<Committing> = None;
    let mut skipped: HashSet<String> = HashSet::new();
    loop {
        if pace.spent() {
            stats.more = true;
            break;
        }
        // The runtime as it is now: a hot reload between rounds takes effect at once.
        let rt = current();
        let pending = rt.store.inbox_pending(after, rt.batch_size).await?;
        let Some(&(last, _)) = pending.last() else {
            break;
        };
        // Read after the items: they were committed before, so the round's time (their
        // `applied_at`) is never earlier than their receipt.
        let now = pace.now();
        after = Some(last);
        let mut ids = unique(pending.iter().map(|(_, i)| i.customer_id()));
        if committing.as_ref().is_some_and(|c| c.touches(&ids)) {
            stats.add(finish(committing.take(), &mut progress).await?);
        }
        let mut pending = pending;
        if rt.owner.is_some() {
            // A customer skipped once in this pass stays skipped: their later items
            // must not overtake the ones another process is applying.
            ids.retain(|id| !skipped.contains(id));
            let held: HashSet<String> = rt.claim(&ids, now).await?.into_iter().collect();
            skipped.extend(ids.iter().filter(|id| !held.contains(*id)).cloned());
            ids.retain(|id| held.contains(id));
            pending.retain(|(_, i)| held.contains(i.customer_id()));
            // Items read before the lease may have been applied by the process that
            // held these customers until now: keep only what is still unapplied.
            let seqs: Vec<i64> = pending.iter().map(|(seq, _)| *seq).collect();
            let unapplied: HashSet<i64> =
                rt.store.inbox_unapplied(&seqs).await?.into_iter().collect();
            pending.retain(|(seq, _)| unapplied.contains(seq));
            if ids.is_empty() {
                continue;
            }
        }
        let mut work = rt.load(&ids, now).await?;
        rt.load_runs_of(&mut work, &pending).await?;
        for (seq, item) in &pending {
            let mut cs = work.entry(item.customer_id(), now);
            match item {
                InboxItem::Event(e) => rt.on_event(&mut cs, e, now),
                InboxItem::Profile(p) => rt.on_profile(&mut cs, p, now),
                InboxItem::CallResult(c) => rt.on_call_result(&mut cs, c, now),
                InboxItem::DeliveryFailed(d) => rt.on_delivery_failed(&mut cs, d, now),
            }
            work.batch.inbox_done.push(*seq);
            work.stats.items += 1;
        }
        // One writer, in order: the previous round is committed before this one starts.
        stats.add(finish(committing.take(), &mut progress).await?);
        committing = Some(rt.spawn_commit(work, ids, now));
    }
    stats.add(finish(committing, &mut progress).await?);
    Ok(stats)
}

/// [`Runtime::fire_due_with`], taking the runtime afresh from `current` at every round (see
/// [`process_inbox_from`]).
pub async fn fire_due_from<S: Store, R: std::ops::Deref<Target = Runtime<S>>>(
    current: impl Fn() -> R,
    pace: Pace<'_>,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats> {
    let mut stats = Stats::default();
    let mut committing: Option<Committing> = None;
    // Customers whose due runs cannot move (pinned to a flow version this process has
    // not loaded): left due, and read past so they never hold up the timers behind them.
    let mut stuck: HashSet<String> = HashSet::new();
    loop {
        if pace.spent() {
            stats.more = true;
            break;
        }
        let rt = current();
        let now = pace.now();
        // Customers still committing are still due in the store: read past them too.
        let extra = committing.as_ref().map_or(0, |c| c.customers.len()) + stuck.len();
        let ids: Vec<String> = rt
            .store
            .due(now, rt.batch_size + extra)
            .await?
            .into_iter()
            .filter(|id| {
                !stuck.contains(id)
                    && !committing
                        .as_ref()
                        .is_some_and(|c| c.customers.contains(id))
            })
            .take(rt.batch_size)
            .collect();
        if ids.is_empty() {
            if committing.is_none() {
                break;
            }
            stats.add(finish(committing.take(), &mut progress).await?);
            continue;
        }
        let ids = if rt.owner.is_some() {
            // Customers another process holds are read past, like stuck ones; their
            // timers stay due for whoever holds them or for a later pass.
            let held: HashSet<String> = rt.claim(&ids, now).await?.into_iter().collect();
            stuck.extend(ids.iter().filter(|id| !held.contains(*id)).cloned());
            let ids: Vec<String> = ids.into_iter().filter(|id| held.contains(id)).collect();
            if ids.is_empty() {
                continue;
            }
            ids
        } else {
            ids
        };
        let mut work = rt.load(&ids, now).await?;
        for id in &ids {
            let mut cs = work.entry(id, now);
            rt.on_timers(&mut cs, now);
            let still_due = cs.loaded.runs.iter().any(|(r, _)| {
                r.status == RunStatus::Waiting && r.wake_at.is_some_and(|w| w <= now)
            });
            if still_due {
                stuck.insert(id.clone());
            }
        }
        stats.add(finish(committing.take(), &mut progress).await?);
        committing = Some(rt.spawn_commit(work, ids, now));
    }
    stats.add(finish(committing, &mut progress).await?);
    Ok(stats)
}

fn unique<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.filter(|id| seen.insert(*id))
        .map(str::to_owned)
        .collect()
}

/// The schedule's next tick in the flow's zone, with the daylight-saving policy of
/// [`crate::local_time`].
fn next_cron(flow: &CompiledFlow, cron: &croner::Cron, after: Time) -> Option<Time> {
    crate::local_time::next_tick(cron, flow.timezone, after)
}

/// Segment rechecks fall on multiples of the period since the epoch, so every process and
/// every simulation agrees on when they happen.
fn next_recheck(period_secs: u64, after: Time) -> Time {
    let p = i64::try_from(period_secs.max(60)).unwrap_or(i64::MAX);
    let t = after.timestamp();
    let next = (t.div_euclid(p) + 1) * p;
    chrono::DateTime::from_timestamp(next, 0).unwrap_or(after)
}
