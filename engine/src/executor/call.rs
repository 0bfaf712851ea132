//! The `call` step: the request goes out as an outbox row and the run parks until the answer
//! comes back ([`Input::CallResult`](super::Input::CallResult)). An answer is kept in
//! `vars.<save_as>` and the run goes on; a call that fails for good, or gets no answer within
//! its `timeout:` (a timer on the run), is recorded as `failed` with the last error and takes
//! the step's `on_error`, or ends the run with outcome `error`. An answer that arrives after
//! the run stopped waiting for it is recorded as `late` and changes nothing else.

use petgraph::graph::NodeIndex;
use serde_json::{Value as Json, json};

use super::{Exec, Flow, WAITING_FOR_CALL, secs};
use crate::duration::Duration;
use crate::flow::StepKind;
use crate::state::{OutboxKind, OutboxRow, RunStatus};

impl Exec<'_, '_> {
    /// Make the call: an outbox row for the dispatcher; the run waits for the answer, at
    /// most `timeout`.
    pub(super) fn call(
        &mut self,
        id: String,
        webhook: &str,
        body: Option<&Json>,
        save_as: &str,
        timeout: Option<Duration>,
    ) -> Flow {
        let body = match body {
            Some(b) => match self.render_json(b) {
                Ok(b) => b,
                Err(e) => {
                    self.record(
                        "error",
                        id,
                        json!({ "error": e.to_string(), "outcome": "error" }),
                    );
                    self.end("error");
                    return Flow::End;
                }
            },
            None => Json::Null,
        };
        let deadline = timeout.map(|t| self.cx.now + secs(t.as_secs()));
        let mut payload = json!({ "webhook": webhook, "body": body, "save_as": save_as });
        if let Some(d) = deadline {
            // The dispatcher stops retrying past it: nobody waits for a later answer.
            payload["deadline"] = json!(d.to_rfc3339());
        }
        self.out.outbox.push(OutboxRow {
            key: format!("{}/{}", self.run.id, id),
            kind: OutboxKind::Call,
            run_id: self.run.id.clone(),
            flow: self.run.flow.clone(),
            customer_id: self.run.customer_id.clone(),
            step: id.clone(),
            channel: webhook.to_owned(),
            address: None,
            template: None,
            payload,
            transactional: true,
            created_at: self.cx.now,
        });
        self.run.waiting_for = Some(WAITING_FOR_CALL.to_owned());
        self.run.wake_at = deadline;
        let detail = match deadline {
            Some(d) => json!({ "webhook": webhook, "until": d.to_rfc3339() }),
            None => json!({ "webhook": webhook }),
        };
        self.record("called", id, detail);
        Flow::Park
    }

    /// The call's answer (or its failure) came back.
    pub(super) fn call_result(&mut self, step: &str, response: &Json, error: Option<&str>) {
        let waiting_here = self.run.status == RunStatus::Waiting
            && self.run.waiting_for.as_deref() == Some(WAITING_FOR_CALL)
            && self.run.step.as_deref() == Some(step);
        let node = self.flow().step(step);
        let is_call =
            node.is_some_and(|n| matches!(self.flow().graph[n].kind, StepKind::Call { .. }));
        if !is_call {
            tracing::warn!(run = %self.run.id, step, "call result for a step that is not a call; dropped");
            return;
        }
        if !waiting_here {
            // The run stopped waiting (its timeout passed, or it ended): the answer is too
            // late to matter; say so, once (results are deduplicated per call).
            let detail = match error {
                None => {
                    json!({ "answered": true, "ignored": "the run no longer waits for this call" })
                }
                Some(e) => {
                    json!({ "answered": false, "error": e, "ignored": "the run no longer waits for this call" })
                }
            };
            self.record("late", step.to_owned(), detail);
            return;
        }
        let Some(node) = node else { return };
        match error {
            None => {
                if let StepKind::Call { save_as, next, .. } = &self.flow().graph[node].kind {
                    let (save_as, next) = (save_as.clone(), *next);
                    self.run.vars.insert(save_as.clone(), response.clone());
                    self.record("answered", step.to_owned(), json!({ "save_as": save_as }));
                    self.run.waiting_for = None;
                    self.run.wake_at = None;
                    self.advance(next);
                }
            }
            Some(e) => self.call_failed(node, e.to_owned(), false),
        }
    }

    /// The call's `timeout` passed with no answer.
    pub(super) fn call_timed_out(&mut self, node: NodeIndex) {
        let timeout = match &self.flow().graph[node].kind {
            StepKind::Call {
                timeout: Some(t), ..
            } => t.to_string(),
            _ => "its timeout".to_owned(),
        };
        self.call_failed(node, format!("no answer within {timeout}"), true);
    }

    /// Record the failure and take `on_error`, or end the run with outcome `error`. The
    /// call's `save_as` is left unset.
    fn call_failed(&mut self, node: NodeIndex, error: String, timed_out: bool) {
        let flow = self.cx.flow;
        let step = &flow.graph[node];
        let StepKind::Call {
            webhook, on_error, ..
        } = &step.kind
        else {
            return;
        };
        self.run.waiting_for = None;
        self.run.wake_at = None;
        let mut detail = json!({ "webhook": webhook, "error": error });
        if timed_out {
            detail["timeout"] = json!(true);
        }
        match on_error {
            Some(to) => {
                detail["next"] = json!(flow.graph[*to].id);
                self.record("failed", step.id.clone(), detail);
                self.advance(Some(*to));
            }
            None => {
                detail["outcome"] = json!("error");
                // Nothing handles it: the run ends in error, counted at its step.
                self.fail(&step.id, format!("call `{webhook}` failed: {error}"));
                self.record("failed", step.id.clone(), detail);
                self.end("error");
            }
        }
    }
}
