//! What each input does to one customer in a round: an event (opt-out, triggers, waits), a
//! profile change, a call's result, a dead delivery, due timers, a segment edge, and the
//! start of a run — with competing flows taken in the operator's order.

use super::*;

impl<S: Store> Runtime<S> {
    /// A customer's runs in the order competing flows are decided (higher `priority`, then
    /// the flow id), so the caps go to the flow the operator ranks first — whatever order
    /// the store returned them in.
    pub(super) fn order_runs(&self, loaded: &mut work::Loaded) {
        loaded.runs.sort_by_cached_key(|(run, _)| {
            let priority = self.flows.version(&run.version).map_or(0, |f| f.priority);
            (std::cmp::Reverse(priority), run.flow.clone())
        });
    }

    pub(super) fn on_event(&self, cs: &mut Slot<'_>, event: &Event, now: Time) {
        // Runs already going (and ended runs whose goal window is open) see the event first,
        // so a run started by this very event does not count it as its goal.
        self.order_runs(cs.loaded);
        let loaded = &mut *cs.loaded;
        for i in 0..loaded.runs.len() + loaded.converting.len() {
            let (run, dirty) = if i < loaded.runs.len() {
                &mut loaded.runs[i]
            } else {
                &mut loaded.converting[i - loaded.runs.len()]
            };
            let Some(flow) = self.flows.version(&run.version) else {
                continue;
            };
            let tr = executor::step(
                &self.ctx(flow, now),
                run,
                &mut loaded.customer,
                Input::Event(event),
            );
            absorb(tr, flow, dirty, &mut loaded.customer_dirty, cs.batch);
        }
        loaded.settle();
        if let Some(opt) = &self.policy.unsubscribe {
            if event.name == opt.event {
                // Out of every flow at once, and out of new ones until they opt in again.
                for (run, dirty) in &mut loaded.runs {
                    let Some(flow) = self.flows.version(&run.version) else {
                        continue;
                    };
                    let tr = executor::stop(&self.ctx(flow, now), run, &mut loaded.customer, event);
                    absorb(tr, flow, dirty, &mut loaded.customer_dirty, cs.batch);
                }
                loaded.settle();
                loaded.customer.unsubscribed_at = Some(now);
                loaded.customer_dirty = true;
                return;
            }
            if event.name == opt.resubscribe && loaded.customer.unsubscribed_at.is_some() {
                loaded.customer.unsubscribed_at = None;
                loaded.customer_dirty = true;
            }
        }
        for flow in self.flows.started_by(&event.name) {
            if let Trigger::Event {
                condition: Some(c), ..
            } = &flow.trigger
                && !holds(
                    &self.policy,
                    flow,
                    &cs.loaded.customer,
                    (c, "trigger"),
                    Some(event),
                    now,
                    cs.batch,
                )
            {
                // (A `where` that failed is counted as a failure besides.)
                refused(cs.batch, flow, "where", &self.policy, now);
                continue;
            }
            self.start(cs, flow, Some(event), now);
        }
    }

    pub(super) fn on_profile(&self, cs: &mut Slot<'_>, update: &ProfileUpdate, now: Time) {
        self.order_runs(cs.loaded);
        let loaded = &mut *cs.loaded;
        for (k, v) in &update.set {
            if v.is_null() {
                loaded.customer.attributes.remove(k);
            } else {
                loaded.customer.attributes.insert(k.clone(), v.clone());
            }
        }
        // One zone, whichever spelling set it. Ingestion refuses a bad one; an update that
        // got past it anyway (an old inbox row) leaves the zone as it was.
        match update.zone() {
            Ok(Some(zone)) => {
                match &zone {
                    Some(name) => loaded
                        .customer
                        .attributes
                        .insert(ZONE_KEY.to_owned(), Json::String(name.clone())),
                    None => loaded.customer.attributes.remove(ZONE_KEY),
                };
                loaded.customer.timezone = zone;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(customer = %update.customer_id, "profile update: {e}; the time zone is unchanged");
                if let Some(old) = loaded.customer.timezone.clone() {
                    loaded
                        .customer
                        .attributes
                        .insert(ZONE_KEY.to_owned(), Json::String(old));
                } else {
                    loaded.customer.attributes.remove(ZONE_KEY);
                }
            }
        }
        loaded.customer.updated_at = now;
        loaded.customer_dirty = true;
        for (run, dirty) in &mut loaded.runs {
            let Some(flow) = self.flows.version(&run.version) else {
                continue;
            };
            let tr = executor::step(
                &self.ctx(flow, now),
                run,
                &mut loaded.customer,
                Input::Profile,
            );
            absorb(tr, flow, dirty, &mut loaded.customer_dirty, cs.batch);
        }
        loaded.settle();
        for flow in self.flows.by_precedence() {
            if matches!(flow.trigger, Trigger::Segment { .. }) {
                self.segment_edge(cs, flow, now);
            }
        }
    }

    pub(super) fn on_call_result(&self, cs: &mut Slot<'_>, result: &CallResult, now: Time) {
        let input = Input::CallResult {
            step: &result.step,
            response: &result.response,
            error: result.error.as_deref(),
        };
        self.on_run_input(cs, &result.run_id, input, now);
    }

    pub(super) fn on_delivery_failed(
        &self,
        cs: &mut Slot<'_>,
        failure: &DeliveryFailure,
        now: Time,
    ) {
        self.on_run_input(cs, &failure.run_id, Input::DeliveryFailed(failure), now);
    }

    /// An input for one run, waiting or ended (see [`Runtime::load_runs_of`]).
    pub(super) fn on_run_input(
        &self,
        cs: &mut Slot<'_>,
        run_id: &str,
        input: Input<'_>,
        now: Time,
    ) {
        let loaded = &mut *cs.loaded;
        let Some((run, dirty)) = loaded
            .runs
            .iter_mut()
            .chain(loaded.converting.iter_mut())
            .find(|(r, _)| r.id == run_id)
        else {
            tracing::warn!(run = %run_id, "input for a run that does not exist; dropped");
            return;
        };
        let Some(flow) = self.flows.version(&run.version) else {
            tracing::error!(run = %run.id, version = %run.version, "run is pinned to a flow version this process has not loaded");
            return;
        };
        let tr = executor::step(&self.ctx(flow, now), run, &mut loaded.customer, input);
        absorb(tr, flow, dirty, &mut loaded.customer_dirty, cs.batch);
        loaded.settle();
    }

    /// Call results and failed deliveries may concern a run that has ended (a send does not
    /// block: the run may be past its last step when the delivery dies): such runs are not
    /// among what `Store::load` returns, so they are read here, for the round to apply the
    /// input to and write back.
    pub(super) async fn load_runs_of(
        &self,
        work: &mut Work,
        pending: &[(i64, InboxItem)],
    ) -> Result<()> {
        for (_, item) in pending {
            let (customer, run_id) = match item {
                InboxItem::CallResult(c) => (&c.customer_id, &c.run_id),
                InboxItem::DeliveryFailed(d) => (&d.customer_id, &d.run_id),
                InboxItem::Event(_) | InboxItem::Profile(_) => continue,
            };
            let Some(loaded) = work.customers.get_mut(customer) else {
                continue;
            };
            let known = loaded
                .runs
                .iter()
                .chain(loaded.converting.iter())
                .any(|(r, _)| r.id == *run_id);
            if known {
                continue;
            }
            if let Some(run) = self
                .store
                .runs(customer)
                .await?
                .into_iter()
                .find(|r| r.id == *run_id && r.status == RunStatus::Ended)
            {
                loaded.converting.push((run, false));
            }
        }
        Ok(())
    }

    pub(super) fn on_timers(&self, cs: &mut Slot<'_>, now: Time) {
        self.order_runs(cs.loaded);
        let loaded = &mut *cs.loaded;
        for (run, dirty) in &mut loaded.runs {
            if run.wake_at.is_none_or(|w| w > now) || self.paused.contains(&run.flow) {
                continue;
            }
            let Some(flow) = self.flows.version(&run.version) else {
                tracing::error!(run = %run.id, version = %run.version, "run is pinned to a flow version this process has not loaded");
                continue;
            };
            let tr = executor::step(
                &self.ctx(flow, now),
                run,
                &mut loaded.customer,
                Input::Timer,
            );
            absorb(tr, flow, dirty, &mut loaded.customer_dirty, cs.batch);
        }
        loaded.settle();
    }

    /// Segment triggers enter on the edge from outside to inside.
    pub(super) fn segment_edge(&self, cs: &mut Slot<'_>, flow: &Arc<CompiledFlow>, now: Time) {
        let Trigger::Segment { condition, .. } = &flow.trigger else {
            return;
        };
        let inside = holds(
            &self.policy,
            flow,
            &cs.loaded.customer,
            (condition, "segment"),
            None,
            now,
            cs.batch,
        );
        let was = cs
            .loaded
            .enrolments
            .get(&flow.id)
            .is_some_and(|(e, _)| e.in_segment);
        if inside != was {
            let (e, dirty) = cs.loaded.enrolment(&flow.id);
            e.in_segment = inside;
            *dirty = true;
        }
        if inside && !was {
            self.start(cs, flow, None, now);
        }
    }

    pub(super) fn start(
        &self,
        cs: &mut Slot<'_>,
        flow: &Arc<CompiledFlow>,
        event: Option<&Event>,
        now: Time,
    ) {
        let loaded = &mut *cs.loaded;
        let why = if self.paused.contains(&flow.id) {
            Some("paused")
        } else if loaded.customer.unsubscribed_at.is_some() {
            Some("opted_out")
        } else {
            None
        };
        if let Some(why) = why {
            refused(cs.batch, flow, why, &self.policy, now);
            return;
        }
        let customer_id = loaded.customer.id.clone();
        let (enrolment, enrolment_dirty) = loaded.enrolment(&flow.id);
        if executor::may_enter(flow, Some(enrolment), now).is_err() {
            refused(cs.batch, flow, "entry", &self.policy, now);
            return;
        }
        let mut run = executor::new_run(flow, &customer_id, enrolment.entries, event, now);
        enrolment.entries += 1;
        enrolment.last_entered_at = Some(run.entered_at);
        enrolment.active_run = Some(run.id.clone());
        *enrolment_dirty = true;
        let tr = executor::step(
            &self.ctx(flow, now),
            &mut run,
            &mut loaded.customer,
            Input::Start,
        );
        let mut dirty = true;
        absorb(tr, flow, &mut dirty, &mut loaded.customer_dirty, cs.batch);
        loaded.runs.push((run, true));
        loaded.settle();
        cs.stats.started += 1;
    }
}

/// Whether a trigger condition, audience or segment (`part`) holds for a customer. One that
/// cannot be evaluated for this customer (a missing attribute read without `has()`) does not
/// hold, and is counted as a failure of that part of the flow, so the operator sees why
/// nobody entered.
#[allow(clippy::too_many_arguments)]
pub(super) fn holds(
    policy: &Policy,
    flow: &CompiledFlow,
    customer: &Customer,
    (expr, part): (&crate::expr::Expr, &str),
    event: Option<&Event>,
    now: Time,
    batch: &mut crate::state::Batch,
) -> bool {
    let profile = customer.profile();
    let event = event.map(Event::to_json);
    let scope = Scope {
        customer: &profile,
        event: event.as_ref(),
        vars: None,
        flow: None,
        now,
        tz: executor::customer_tz(customer, policy),
    };
    match eval::eval_bool(expr, &scope) {
        Ok(b) => b,
        Err(e) => {
            let what = if part == "trigger" {
                "trigger `where`"
            } else {
                part
            };
            batch.failures.push(crate::state::Failure {
                flow: flow.id.clone(),
                step: part.to_owned(),
                customer_id: customer.id.clone(),
                count: 1,
                error: format!("{what} failed: {e}"),
                at: now,
            });
            false
        }
    }
}

/// Count a customer the trigger matched but who was not let in, and why: `paused`,
/// `opted_out`, `where` (the trigger's condition was false or failed), `entry` (the entry
/// rule: already in the flow, once only, too soon to re-enter).
fn refused(
    batch: &mut crate::state::Batch,
    flow: &CompiledFlow,
    why: &str,
    policy: &Policy,
    now: Time,
) {
    batch.counts.add(
        &flow.id,
        &flow.hash.0,
        Some(crate::stats::day_of(now, policy.timezone)),
        crate::stats::FLOW,
        crate::stats::qualified(crate::stats::metric::REFUSED, why).into(),
        1,
    );
}
