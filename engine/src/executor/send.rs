//! `send`: the first channel the customer can receive, the engine's policies (caps, quiet
//! hours, opt-out), the message rendered from its templates into the outbox row.

use super::*;

impl Exec<'_, '_> {
    pub(super) fn send(&mut self, node: NodeIndex) -> Flow {
        let flow = self.cx.flow;
        let step = &flow.graph[node];
        let StepKind::Send {
            channels,
            template,
            files,
            priority,
            next,
            ..
        } = &step.kind
        else {
            return Flow::Go(None);
        };
        let (id, priority, next) = (step.id.as_str(), *priority, *next);
        // Fallback: the first channel the customer can receive on.
        let reachable = self.first_reachable(channels);
        let Some((channel, address)) = reachable else {
            self.count(id, stats::qualified("skipped", "no_address"));
            self.record("skipped", id.to_owned(), json!({ "template": template, "reason": format!("no address for {}", channels.join(", ")) }));
            self.run.wake_at = None;
            return Flow::Go(next);
        };
        let transactional = priority == Priority::Transactional;
        match self.cx.policy.decide(
            &channel,
            transactional,
            &self.customer.sends,
            self.cx.now,
            self.tz,
        ) {
            Decision::Send => {}
            Decision::Delay { until, reason } => {
                self.run.wake_at = Some(until);
                self.run.waiting_for = None;
                self.count(id, stats::qualified("delayed", reason_kind(&reason)));
                self.record("delayed", id.to_owned(), json!({ "channel": channel, "template": template, "until": until.to_rfc3339(), "reason": reason.to_string() }));
                return Flow::Park;
            }
            Decision::Skip { reason } => {
                self.run.wake_at = None;
                self.count(id, stats::qualified("skipped", reason_kind(&reason)));
                self.record("skipped", id.to_owned(), json!({ "channel": channel, "template": template, "reason": reason.to_string() }));
                return Flow::Go(next);
            }
        }
        self.run.wake_at = None;
        let payload = match self.render_message(&channel, files) {
            Ok(p) => p,
            Err(e) => {
                self.count(id, stats::qualified("skipped", "error"));
                self.record(
                    "skipped",
                    id.to_owned(),
                    json!({ "channel": channel, "template": template, "reason": e }),
                );
                return Flow::Go(next);
            }
        };
        let mut detail = json!({ "channel": channel, "template": template });
        if channel == SMS
            && let Some(text) = payload.get("text").and_then(Json::as_str)
        {
            // What the carrier bills: recorded so an operator sees a text that grew past one.
            let s = crate::sms::segments(text);
            detail["segments"] = json!(s.segments);
            detail["encoding"] = json!(s.encoding);
        }
        self.out.outbox.push(OutboxRow {
            key: format!("{}/{}", self.run.id, id),
            kind: OutboxKind::Message,
            run_id: self.run.id.clone(),
            flow: self.run.flow.clone(),
            customer_id: self.run.customer_id.clone(),
            step: id.to_owned(),
            channel: channel.clone(),
            address,
            template: Some(template.to_owned()),
            payload,
            transactional,
            created_at: self.cx.now,
        });
        if !transactional {
            self.customer.sends.push(SentMark {
                at: self.cx.now,
                channel: channel.clone(),
            });
            self.cx.policy.prune(&mut self.customer.sends, self.cx.now);
            self.out.customer_changed = true;
        }
        self.run.last_touch = Some(id.to_owned());
        self.record("sent", id.to_owned(), detail);
        Flow::Go(next)
    }

    /// The first of `channels` the customer has an address on (or that needs none), with
    /// the address.
    pub(super) fn first_reachable(&self, channels: &[String]) -> Option<(String, Option<String>)> {
        channels.iter().find_map(|c| {
            let spec = self.cx.registry.channel(c)?;
            match &spec.address {
                None => Some((c.clone(), None)),
                Some(attr) => match self.customer.attributes.get(attr) {
                    Some(Json::String(s)) if !s.trim().is_empty() => {
                        Some((c.clone(), Some(s.clone())))
                    }
                    Some(Json::Number(n)) => Some((c.clone(), Some(n.to_string()))),
                    _ => None,
                },
            }
        })
    }

    /// Render the channel's template files: `{subject?, text?, html?}`.
    pub(super) fn render_message(
        &self,
        channel: &str,
        files: &std::collections::BTreeMap<String, Vec<String>>,
    ) -> Result<Json, String> {
        let Some(paths) = files.get(channel) else {
            return Err(format!("no template file for {channel}"));
        };
        let mut payload = Map::new();
        for path in paths {
            let Some(file) = self.flow().templates.get(path) else {
                return Err(format!("template file {path} is not in the flow version"));
            };
            let text = self
                .with_scope(None, |s| eval::render_file(file, s))
                .map_err(|e| e.to_string())?;
            let (subject, body) = match text.strip_prefix("Subject:") {
                Some(rest) => {
                    let (s, b) = rest.split_once('\n').unwrap_or((rest, ""));
                    (
                        Some(s.trim().to_owned()),
                        b.trim_start_matches(['\r', '\n']).to_owned(),
                    )
                }
                None => (None, text),
            };
            if let Some(s) = subject {
                payload.insert("subject".into(), json!(s));
            }
            let (key, body) = if path.ends_with(".html") {
                ("html", body)
            } else if channel == EMAIL {
                ("text", body)
            } else {
                // A text file ends with a newline; an SMS, a push or a chat message must not
                // (it would be sent, and billed, as part of the text).
                ("text", body.trim_end_matches(['\n', '\r']).to_owned())
            };
            payload.insert(key.into(), json!(body));
        }
        Ok(Json::Object(payload))
    }
}

/// A policy rule's kind, as the outcome counters name it (`skipped:cap`, `delayed:quiet_hours`).
fn reason_kind(reason: &crate::policy::Reason) -> &'static str {
    match reason {
        crate::policy::Reason::Cap { .. } => "cap",
        crate::policy::Reason::QuietHours { .. } => "quiet_hours",
    }
}
