//! The steps that change something besides the run: `update` (the profile), `task` (work for
//! staff, through the outbox) and a plugin's kind (through the registry).

use super::*;

impl Exec<'_, '_> {
    pub(super) fn update(&mut self, id: String, kind: &StepKind) -> Flow {
        let StepKind::Update {
            set,
            add,
            tag,
            untag,
            next,
        } = kind
        else {
            return Flow::Go(None);
        };
        let mut detail = Map::new();
        for (k, v) in set {
            let v = self.render_json(v).unwrap_or_else(|_| v.clone());
            self.customer.attributes.insert(k.clone(), v);
        }
        for (k, n) in add {
            let cur = self
                .customer
                .attributes
                .get(k)
                .and_then(Json::as_f64)
                .unwrap_or(0.0);
            let sum = cur + n;
            let v = if sum.fract() == 0.0 && sum.abs() < 9e15 {
                json!(sum as i64)
            } else {
                json!(sum)
            };
            self.customer.attributes.insert(k.clone(), v);
        }
        if !tag.is_empty() || !untag.is_empty() {
            let mut tags: Vec<Json> = match self.customer.attributes.get("tags") {
                Some(Json::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            for t in tag {
                if !tags.iter().any(|x| x.as_str() == Some(t)) {
                    tags.push(json!(t));
                }
            }
            tags.retain(|x| !untag.iter().any(|u| x.as_str() == Some(u)));
            self.customer
                .attributes
                .insert("tags".to_owned(), Json::Array(tags));
        }
        detail.insert(
            "set".into(),
            json!(set.iter().map(|(k, _)| k).collect::<Vec<_>>()),
        );
        detail.insert(
            "add".into(),
            json!(add.iter().map(|(k, _)| k).collect::<Vec<_>>()),
        );
        detail.insert("tag".into(), json!(tag));
        detail.insert("untag".into(), json!(untag));
        self.customer.updated_at = self.cx.now;
        self.out.customer_changed = true;
        self.record("updated", id, Json::Object(detail));
        Flow::Go(*next)
    }

    pub(super) fn task(&mut self, id: String, kind: &StepKind) -> Flow {
        let StepKind::Task {
            assign,
            text,
            due,
            next,
        } = kind
        else {
            return Flow::Go(None);
        };
        let assignee = match self.eval_value(assign) {
            Ok(Json::String(s)) => Some(s),
            Ok(Json::Null) | Err(_) => None,
            Ok(other) => Some(other.to_string()),
        };
        let rendered = self.render_text(&format!("{}/{}", self.run.flow, id), text);
        match (assignee, rendered) {
            (Some(assignee), Ok(text)) => {
                let due_at = self.cx.now + secs(due.as_secs());
                self.out.outbox.push(OutboxRow {
                    key: format!("{}/{}", self.run.id, id),
                    kind: OutboxKind::Task,
                    run_id: self.run.id.clone(),
                    flow: self.run.flow.clone(),
                    customer_id: self.run.customer_id.clone(),
                    step: id.clone(),
                    channel: "task".to_owned(),
                    address: Some(assignee.clone()),
                    template: None,
                    payload: json!({ "assign": assignee, "text": text, "due_at": due_at.to_rfc3339() }),
                    transactional: true,
                    created_at: self.cx.now,
                });
                self.run.last_touch = Some(id.clone());
                self.record(
                    "task",
                    id,
                    json!({ "assign": assignee, "due_at": due_at.to_rfc3339() }),
                );
            }
            (None, _) => {
                self.count(&id, stats::qualified("skipped", "no_address"));
                self.record("skipped", id, json!({ "reason": format!("`{}` names nobody for this customer", assign.source()) }));
            }
            (_, Err(e)) => {
                self.count(&id, stats::qualified("skipped", "error"));
                self.record("skipped", id, json!({ "reason": e.to_string() }));
            }
        }
        Flow::Go(*next)
    }

    pub(super) fn plugin(&mut self, id: String, kind: &StepKind) -> Flow {
        let StepKind::Plugin {
            kind,
            with,
            outputs,
            next,
        } = kind
        else {
            return Flow::Go(None);
        };
        let Some(plugin) = self.cx.registry.kind(kind) else {
            self.record(
                "error",
                id,
                json!({ "error": format!("node kind `{kind}` is not registered") }),
            );
            return Flow::Go(*next);
        };
        let plugin = plugin.clone();
        let (flow_id, run_id, now) = (self.run.flow.clone(), self.run.id.clone(), self.cx.now);
        let before = self.customer.cooldowns.clone();
        let result = {
            let mut pcx = PluginCx {
                flow: &flow_id,
                step: &id,
                run_id: &run_id,
                customer: self.customer,
                now,
            };
            plugin.run(with, &mut pcx)
        };
        if self.customer.cooldowns != before {
            self.customer.updated_at = now;
            self.out.customer_changed = true;
        }
        match result {
            Ok(None) => {
                self.record(kind, id, json!({ "output": "next" }));
                Flow::Go(*next)
            }
            Ok(Some(output)) => {
                self.record(kind, id, json!({ "output": output }));
                match outputs.iter().find(|(o, _)| *o == output) {
                    Some((_, t)) => Flow::Go(*t),
                    None => Flow::Go(None),
                }
            }
            Err(e) => {
                self.record("error", id, json!({ "error": e }));
                Flow::Go(*next)
            }
        }
    }
}
