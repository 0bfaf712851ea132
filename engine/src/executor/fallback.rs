//! Fallback on failure: a `send: [wechat, sms]` whose delivery on `wechat` is dead (a
//! permanent error, or retries exhausted) tries `sms`, the next channel of the list the
//! customer has an address on.
//!
//! The dispatcher feeds the dead delivery back as [`Input::DeliveryFailed`](super::Input);
//! the fallback belongs to the step that sent, not to where the run is now: the run may
//! have moved on (sends do not block) or ended. The new message has its own idempotency key
//! (`RUN/STEP/CHANNEL`), commits in the same transaction as the history rows recording the
//! failed attempt and the fallback, and moves the step's cap mark to its channel instead of
//! adding a second one: a step counts against caps once, on the channel it reached.
//!
//! No fallback is sent (the history says why): when the step says `fallback: address`, when
//! no later channel reaches the customer, when the run left the journey by an exit rule or
//! an opt-out or ended at its goal, or when caps or quiet hours would hold the fallback back
//! now.

use serde_json::json;

use super::Exec;
use crate::flow::{Fallback, StepKind};
use crate::policy::Decision;
use crate::state::{DeliveryFailure, OutboxKind, OutboxRow};

impl Exec<'_, '_> {
    pub(super) fn delivery_failed(&mut self, f: &DeliveryFailure) {
        let flow = self.cx.flow;
        let Some(node) = flow.step(&f.step) else {
            tracing::warn!(run = %self.run.id, step = %f.step, "failed delivery for a step the flow version does not have");
            return;
        };
        let StepKind::Send {
            channels,
            template,
            files,
            priority,
            fallback,
            ..
        } = &flow.graph[node].kind
        else {
            return;
        };
        let step = f.step.clone();
        let mut failed = json!({
            "channel": f.channel,
            "template": template,
            "key": f.key,
            "error": f.error,
        });
        let later = channels
            .iter()
            .position(|c| *c == f.channel)
            .map_or(&[][..], |i| &channels[i + 1..]);
        let held = if *fallback == Fallback::Address {
            Some("the step falls back only on a missing address (`fallback: address`)".to_owned())
        } else if later.is_empty() {
            Some("no further channel to fall back to".to_owned())
        } else if self.customer.unsubscribed_at.is_some()
            || self.run.outcome.as_deref() == Some("exited")
        {
            Some("the customer left the journey".to_owned())
        } else if self.run.outcome.as_deref() == Some("goal") {
            // `goal: { exit: true }`: what the step said no longer applies.
            Some("the run reached its goal and ended".to_owned())
        } else {
            None
        };
        if let Some(reason) = held {
            failed["no_fallback"] = json!(reason);
            self.record("failed", step, failed);
            return;
        }
        let Some((channel, address)) = self.first_reachable(later) else {
            failed["no_fallback"] = json!(format!("no address for {}", later.join(", ")));
            self.record("failed", step, failed);
            return;
        };
        let transactional = *priority == crate::model::Priority::Transactional;
        // The step's own mark (from the send that failed) is not counted twice. The outbox
        // keeps times to the millisecond, the mark to the nanosecond.
        let mark = self.customer.sends.iter().position(|m| {
            m.at.timestamp_millis() == f.sent_at.timestamp_millis() && m.channel == f.channel
        });
        let mut others = self.customer.sends.clone();
        if let Some(i) = mark {
            others.remove(i);
        }
        match self
            .cx
            .policy
            .decide(&channel, transactional, &others, self.cx.now, self.tz)
        {
            Decision::Send => {}
            Decision::Delay { reason, .. } | Decision::Skip { reason } => {
                failed["no_fallback"] = json!(format!("{channel} held back: {reason}"));
                self.record("failed", step, failed);
                return;
            }
        }
        let payload = match self.render_message(&channel, files) {
            Ok(p) => p,
            Err(e) => {
                failed["no_fallback"] = json!(format!("{channel}: {e}"));
                self.record("failed", step, failed);
                return;
            }
        };
        let key = format!("{}/{}/{}", self.run.id, step, channel);
        self.out.outbox.push(OutboxRow {
            key: key.clone(),
            kind: OutboxKind::Message,
            run_id: self.run.id.clone(),
            flow: self.run.flow.clone(),
            customer_id: self.run.customer_id.clone(),
            step: step.clone(),
            channel: channel.clone(),
            address,
            template: Some(template.clone()),
            payload,
            transactional,
            created_at: self.cx.now,
        });
        if let Some(i) = mark {
            // Counted once: the mark now names the channel the message went out on.
            self.customer.sends[i].channel = channel.clone();
            self.out.customer_changed = true;
        }
        failed["fallback"] = json!(channel);
        self.record("failed", step.clone(), failed);
        self.record(
            "fallback",
            step,
            json!({ "from": f.channel, "channel": channel, "template": template, "key": key }),
        );
    }
}
