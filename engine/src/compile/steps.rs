//! The meaning of each step kind: `send` and its templates, `wait`, `branch`, `split`,
//! `update`, `call`, `task` and plugin steps, each checked with every error it deserves.

use super::*;

impl Cx<'_> {
    pub(super) fn step(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let present: Vec<(&str, Span)> = [
            raw.send.as_ref().map(|v| ("send", v.span)),
            raw.wait.as_ref().map(|v| ("wait", v.span)),
            raw.branch.as_ref().map(|v| ("branch", v.span)),
            raw.split.as_ref().map(|v| ("split", v.span)),
            raw.update.as_ref().map(|v| ("update", v.span)),
            raw.call.as_ref().map(|v| ("call", v.span)),
            raw.task.as_ref().map(|v| ("task", v.span)),
            raw.exit.as_ref().map(|v| ("exit", v.span)),
            raw.use_.as_ref().map(|v| ("use", v.span)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let kind = match present.as_slice() {
            [one] => one.0,
            [] => {
                self.error(
                    Code::Conflict,
                    raw.id.span,
                    format!("step `{}` does nothing", raw.id.value),
                )
                .help = Some(format!("give it one of {}", quote_list(STEP_KINDS)));
                return None;
            }
            [_, second, ..] => {
                let names: Vec<&str> = present.iter().map(|p| p.0).collect();
                self.error(
                    Code::Conflict,
                    second.1,
                    format!(
                        "step `{}` has {}; a step does one thing",
                        raw.id.value,
                        quote_all(&names)
                    ),
                )
                .help = Some("split it into consecutive steps".to_owned());
                return None;
            }
        };
        let is_event_wait = raw.wait.as_ref().is_some_and(|w| w.event.is_some());
        self.misplaced(
            raw.template.as_ref(),
            "template",
            kind == "send",
            "`template` goes with `send`",
        );
        self.misplaced(
            raw.priority.as_ref(),
            "priority",
            kind == "send",
            "`priority` goes with `send`",
        );
        self.misplaced(
            raw.on_timeout.as_ref(),
            "on_timeout",
            is_event_wait,
            "`on_timeout` goes with `wait: { event: …, timeout: … }`",
        );
        self.misplaced(
            raw.on_error.as_ref(),
            "on_error",
            kind == "call",
            "`on_error` goes with `call`: the step to run when the call fails",
        );
        self.misplaced(
            raw.fallback.as_ref(),
            "fallback",
            kind == "send",
            "`fallback` goes with `send: [CHANNEL, …]`",
        );
        self.misplaced(
            raw.with.as_ref(),
            "with",
            kind == "use",
            "`with` goes with `use`",
        );
        self.misplaced(raw.on.as_ref(), "on", kind == "use", "`on` goes with `use`");
        if let (Some(n), "branch" | "split" | "exit") = (&raw.next, kind) {
            self.error(
                Code::Misplaced,
                n.span,
                format!("a `{kind}` step has no `next`"),
            )
            .help = Some(match kind {
                "exit" => "the run ends here".to_owned(),
                _ => format!("each arm of the {kind} names its own step"),
            });
            return None;
        }
        match kind {
            "send" => self.send(raw, ids, following, pos, edges),
            "wait" => self.wait(raw, ids, following, pos, edges),
            "branch" => self.branch(raw, ids, pos, edges),
            "split" => self.split(raw, ids, pos, edges),
            "update" => self.update(raw, ids, following, pos, edges),
            "call" => self.call(raw, ids, following, pos, edges),
            "task" => self.task(raw, ids, following, pos, edges),
            "exit" => {
                let outcome = raw.exit.as_ref()?;
                if !is_snake(&outcome.value) {
                    self.error(
                        Code::BadId,
                        outcome.span,
                        format!("outcome `{}` is not snake_case", outcome.value),
                    )
                    .help = Some(format!(
                        "e.g. `{}`",
                        to_kebab(&outcome.value).replace('-', "_")
                    ));
                    return None;
                }
                Some(StepKind::Exit {
                    outcome: outcome.value.clone(),
                })
            }
            _ => self.plugin(raw, ids, following, pos, edges),
        }
    }

    pub(super) fn send(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let send = raw.send.as_ref()?;
        let channels: Vec<String> = send.value.names().into_iter().map(str::to_owned).collect();
        let mut ok = true;
        if channels.is_empty() {
            self.error(Code::MissingKey, send.span, "`send` names no channel");
            ok = false;
        }
        for (i, c) in channels.iter().enumerate() {
            if channels[..i].contains(c) {
                self.error(
                    Code::Conflict,
                    send.span,
                    format!("channel `{c}` is listed twice"),
                );
                ok = false;
            } else if self.registry.channel(c).is_none() {
                let known: Vec<&str> = self.registry.channels().map(|s| s.name.as_str()).collect();
                let help = match did_you_mean(c, known.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("known channels: {}", quote_list(&known)),
                };
                self.error(
                    Code::UnknownChannel,
                    send.span,
                    format!("unknown channel `{c}`"),
                )
                .help = Some(help);
                ok = false;
            }
        }
        let Some(template) = &raw.template else {
            self.error(Code::MissingKey, send.span, "a `send` step needs a `template`")
                .help = Some("add `template: NAME`; it resolves to templates/NAME.CHANNEL.txt or templates/NAME.txt".to_owned());
            return None;
        };
        let files = if ok {
            self.resolve_templates(template, &channels)?
        } else {
            BTreeMap::new()
        };
        if let Some(f) = &raw.fallback
            && channels.len() < 2
        {
            self.error(
                Code::Misplaced,
                f.span,
                "`fallback` does not apply to a single channel",
            )
            .help = Some(
                "list the channels to fall back through, e.g. `send: [wechat, sms]`".to_owned(),
            );
            ok = false;
        }
        let fallback = match raw.fallback.as_ref().map(|f| f.value) {
            None | Some(FallbackMode::Failure) => Fallback::Failure,
            Some(FallbackMode::Address) => Fallback::Address,
        };
        let next = self.next(raw, ids, following, pos, edges)?;
        ok.then(|| StepKind::Send {
            channels,
            template: template.value.clone(),
            files,
            priority: raw
                .priority
                .as_ref()
                .map_or(Priority::Marketing, |p| p.value),
            fallback,
            next,
        })
    }

    pub(super) fn resolve_templates(
        &mut self,
        name: &Spanned<String>,
        channels: &[String],
    ) -> Option<BTreeMap<String, Vec<String>>> {
        let valid_name = !name.value.is_empty()
            && name.value.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != ".."
                    && seg != "."
                    && seg
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
            });
        if !valid_name {
            self.error(Code::MissingTemplate, name.span, format!("`{}` is not a template name", name.value))
                .help = Some("template names are paths under templates/ without an extension, e.g. `birthday/day`".to_owned());
            return None;
        }
        let mut out = BTreeMap::new();
        let mut ok = true;
        for channel in channels {
            match self.templates.resolve(&name.value, channel) {
                Resolution::Missing { looked_for } => {
                    let root = self.templates.root.display().to_string();
                    let mut help = format!(
                        "create {root}/{}; looked for {}",
                        looked_for.last().map_or("", String::as_str),
                        quote_list(&looked_for)
                    );
                    if let Some(s) = did_you_mean(&name.value, self.templates.names()) {
                        help = format!("did you mean `{s}`? ({help})");
                    }
                    self.error(
                        Code::MissingTemplate,
                        name.span,
                        format!(
                            "template `{}` has no file for channel `{channel}`",
                            name.value
                        ),
                    )
                    .help = Some(help);
                    ok = false;
                }
                Resolution::Found(paths) => {
                    let mut files = Vec::new();
                    for path in paths {
                        match self.template_file(&path, channel == "email") {
                            Some(f) => files.push(f),
                            None => ok = false,
                        }
                    }
                    out.insert(channel.clone(), files);
                }
            }
        }
        ok.then_some(out)
    }

    /// Check one template file (once per file across all flows) and keep its text.
    pub(super) fn template_file(&mut self, path: &Path, email: bool) -> Option<String> {
        let checked = self.templates.check(path);
        match &*checked {
            Checked::Unreadable(e) => {
                self.diags.push(Diagnostic::new(
                    Code::Io,
                    path,
                    None,
                    format!("cannot read template: {e}"),
                ));
                None
            }
            Checked::Issues(_, issues) => {
                for issue in issues {
                    let span = issue.line.map(|l| Span::point(l as u32, 0));
                    let file = issue.file.as_deref().unwrap_or(path);
                    let mut d =
                        Diagnostic::new(issue_code(issue.kind), file, span, &*issue.message);
                    d.help = issue_help(issue.kind);
                    // A file included by several templates of the flow is reported once.
                    if !self.diags.contains(&d) {
                        self.diags.push(d);
                    }
                }
                None
            }
            Checked::Ok(t) => {
                if email && !t.source.starts_with("Subject:") {
                    self.diags.push(
                        Diagnostic::new(
                            Code::TemplateSyntax,
                            path,
                            Some(Span::point(1, 0)),
                            "an email template starts with a `Subject:` line",
                        )
                        .with_help("e.g. `Subject: Happy birthday, {{ customer.first_name }}`"),
                    );
                    return None;
                }
                self.used_templates.insert(t.file.clone(), t.clone());
                // What it includes is part of the version, and is restored with it.
                for name in t.includes.keys() {
                    if let Some(p) = self.templates.file(name)
                        && let Checked::Ok(inc) = &*self.templates.check(p)
                    {
                        self.used_templates.insert(name.clone(), inc.clone());
                    }
                }
                Some(t.file.clone())
            }
        }
    }

    pub(super) fn wait(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let w: &Spanned<RawWait> = raw.wait.as_ref()?;
        let modes: Vec<&str> = [
            w.for_.as_ref().map(|_| "for"),
            w.until.as_ref().map(|_| "until"),
            w.event.as_ref().map(|_| "event"),
            w.window.as_ref().map(|_| "window"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if modes.len() != 1 {
            let msg = if modes.is_empty() {
                "the wait says nothing to wait for".to_owned()
            } else {
                format!(
                    "the wait has {}; a wait waits for one thing",
                    quote_all(&modes)
                )
            };
            self.error(Code::Conflict, w.span, msg).help =
                Some("use one of `for: 3d`, `until: EXPR`, `event: NAME` (+ `timeout`) or `window:`; chain steps for more".to_owned());
            return None;
        }
        let is_event = w.event.is_some();
        self.misplaced(
            w.where_.as_ref(),
            "where",
            is_event,
            "`where` goes with `event`",
        );
        self.misplaced(
            w.timeout.as_ref(),
            "timeout",
            is_event,
            "`timeout` goes with `event`",
        );
        let wait = if let Some(d) = &w.for_ {
            Wait::For(self.duration(d)?)
        } else if let Some(u) = &w.until {
            Wait::Until(self.expr(u, Scope::STEP)?)
        } else if let Some(name) = &w.event {
            self.check_event_name(name);
            let condition = self.opt_expr(w.where_.as_ref(), Scope::STEP);
            let timeout = match &w.timeout {
                Some(t) => self.duration(t),
                None => {
                    self.error(Code::WaitTimeout, name.span, format!("waiting for `{}` without a `timeout`", name.value))
                        .help = Some("add `timeout: 7d` (and `on_timeout: STEP` to go on when it passes); a customer who never sends the event would wait forever".to_owned());
                    None
                }
            };
            let on_timeout = match &raw.on_timeout {
                Some(t) => Some(Some(NodeIndex::new(self.target(t, ids)?))),
                None => Some(None),
            };
            let on_timeout = on_timeout?;
            if let (Some(to), Some(Some(t))) = (on_timeout, timeout.map(Some)) {
                edges.push((pos, to.index(), Edge::Timeout(t)));
            }
            Wait::Event {
                name: name.value.clone(),
                condition: condition?,
                timeout: timeout?,
                on_timeout,
            }
        } else {
            let window = w.window.as_ref()?;
            let mut days = Vec::new();
            for d in window.days.iter().flatten() {
                if days.contains(&d.value) {
                    self.error(Code::Conflict, d.span, "this day is listed twice");
                    return None;
                }
                days.push(d.value);
            }
            if window.days.as_ref().is_some_and(Vec::is_empty) {
                self.error(
                    Code::TimeOfDay,
                    window.span,
                    "a window with no days never opens",
                )
                .help = Some(
                    "list days like `[mon, tue, wed, thu, fri]`, or leave `days` out for every day"
                        .to_owned(),
                );
                return None;
            }
            let between = match &window.between {
                None => None,
                Some(b) => Some(self.time_range(b)?),
            };
            Wait::Window { days, between }
        };
        let next = self.next(raw, ids, following, pos, edges)?;
        Some(StepKind::Wait { wait, next })
    }

    pub(super) fn time_range(&mut self, b: &Spanned<String>) -> Option<(TimeOfDay, TimeOfDay)> {
        let parsed = b
            .value
            .split_once('-')
            .and_then(|(a, z)| Some((TimeOfDay::parse(a)?, TimeOfDay::parse(z)?)));
        match parsed {
            Some((a, z)) if a != z => Some((a, z)),
            Some(_) => {
                self.error(
                    Code::TimeOfDay,
                    b.span,
                    format!("window `{}` is empty", b.value),
                )
                .help = Some("leave `between` out for the whole day".to_owned());
                None
            }
            None => {
                self.error(
                    Code::TimeOfDay,
                    b.span,
                    format!("`{}` is not a time range", b.value),
                )
                .help = Some(
                    "write local 24-hour times like `10:00-20:00` (`22:00-06:00` spans midnight)"
                        .to_owned(),
                );
                None
            }
        }
    }

    pub(super) fn branch(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let branch = raw.branch.as_ref()?;
        let mut arms = Vec::new();
        let mut otherwise = None;
        let mut ok = true;
        let count = branch.value.len();
        for (i, arm) in branch.value.iter().enumerate() {
            let a: &RawArm = &arm.value;
            match (&a.when, &a.next, &a.else_) {
                (Some(when), Some(next), None) => {
                    let cond = self.expr(when, Scope::STEP);
                    let to = self.target(next, ids);
                    match (cond, to) {
                        (Some(c), Some(to)) => {
                            edges.push((pos, to, Edge::When(c.source().to_owned())));
                            arms.push((c, NodeIndex::new(to)));
                        }
                        _ => ok = false,
                    }
                }
                (None, None, Some(target)) => {
                    if i + 1 != count {
                        self.error(Code::BranchElse, arm.span, "`else` must be the last arm")
                            .help = Some("arms after `else` would never be tried".to_owned());
                        ok = false;
                    }
                    match self.target(target, ids) {
                        Some(to) => {
                            edges.push((pos, to, Edge::Else));
                            otherwise = Some(NodeIndex::new(to));
                        }
                        None => ok = false,
                    }
                }
                (Some(_), None, None) => {
                    self.error(
                        Code::MissingKey,
                        arm.span,
                        "this arm has `when` but no `next`",
                    )
                    .help = Some(
                        "add `next: STEP`, the step to run when the condition holds".to_owned(),
                    );
                    ok = false;
                }
                (None, Some(_), None) => {
                    self.error(
                        Code::MissingKey,
                        arm.span,
                        "this arm has `next` but no `when`",
                    )
                    .help =
                        Some("add `when: EXPR`, or make it the final `- else: STEP`".to_owned());
                    ok = false;
                }
                _ => {
                    self.error(Code::Conflict, arm.span, "an arm is either `when` + `next`, or `else`")
                        .help = Some("e.g. `- when: has(customer.wechat_id)` + `next: wechat-gift`, last `- else: sms-gift`".to_owned());
                    ok = false;
                }
            }
        }
        if ok && otherwise.is_none() {
            self.error(
                Code::BranchElse,
                branch.span,
                format!("branch `{}` has no `else`", raw.id.value),
            )
            .help =
                Some("add a last arm `- else: STEP` for customers no condition matches".to_owned());
            return None;
        }
        if arms.is_empty() && ok {
            self.error(
                Code::MissingKey,
                branch.span,
                "a branch needs at least one `when` arm",
            )
            .help = Some("with only `else`, use `next:` on the previous step instead".to_owned());
            return None;
        }
        let otherwise = otherwise?;
        ok.then_some(StepKind::Branch { arms, otherwise })
    }

    pub(super) fn split(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let split = raw.split.as_ref()?;
        let mut arms = Vec::new();
        let mut total = 0.0;
        let mut ok = true;
        for (i, (name, share)) in split.value.0.iter().enumerate() {
            if split.value.0[..i]
                .iter()
                .any(|(n, _)| n.value == name.value)
            {
                self.error(
                    Code::Conflict,
                    name.span,
                    format!("`{}` is listed twice", name.value),
                );
                ok = false;
                continue;
            }
            if !(share.value.0 > 0.0 && share.value.0 <= 100.0) {
                self.error(
                    Code::SplitShares,
                    share.span,
                    format!("share {}% is out of range", share.value.0),
                )
                .help = Some("each share is more than 0% and at most 100%".to_owned());
                ok = false;
                continue;
            }
            total += share.value.0;
            if name.value == "control" {
                arms.push((SplitArm::Control, share.value.0));
                continue;
            }
            match self.target(name, ids) {
                Some(to) => {
                    edges.push((pos, to, Edge::Share(share.value.0)));
                    arms.push((SplitArm::Step(NodeIndex::new(to)), share.value.0));
                }
                None => ok = false,
            }
        }
        if ok && split.value.0.len() < 2 {
            self.error(
                Code::SplitShares,
                split.span,
                "a split needs at least two arms",
            )
            .help = Some("e.g. `{ offer-a: 45%, offer-b: 45%, control: 10% }`".to_owned());
            return None;
        }
        if ok && (total - 100.0).abs() > 1e-6 {
            self.error(
                Code::SplitShares,
                split.span,
                format!(
                    "split shares add up to {}%, not 100%",
                    (total * 1e6).round() / 1e6
                ),
            )
            .help = Some("adjust the shares; use a `control` arm for a holdout".to_owned());
            return None;
        }
        ok.then_some(StepKind::Split { arms })
    }

    pub(super) fn update(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let u = raw.update.as_ref()?;
        let mut ok = true;
        let mut attr = |cx: &mut Self, name: &Spanned<String>| {
            if !is_attribute(&name.value) {
                cx.error(
                    Code::BadId,
                    name.span,
                    format!("`{}` is not an attribute name", name.value),
                )
                .help = Some(
                    "attribute names use letters, digits and `_`, starting with a letter"
                        .to_owned(),
                );
                ok = false;
            }
        };
        let set: Vec<(String, serde_json::Value)> = u
            .set
            .iter()
            .flat_map(|s| s.value.0.iter())
            .map(|(k, v)| {
                attr(self, k);
                (k.value.clone(), v.clone())
            })
            .collect();
        let add: Vec<(String, f64)> = u
            .add
            .iter()
            .flat_map(|s| s.value.0.iter())
            .map(|(k, v)| {
                attr(self, k);
                (k.value.clone(), v.value)
            })
            .collect();
        let tags = |cx: &mut Self, list: &Option<Vec<Spanned<String>>>| -> Vec<String> {
            list.iter()
                .flatten()
                .map(|t| {
                    if t.value.trim().is_empty() {
                        cx.error(Code::WrongType, t.span, "a tag cannot be empty");
                    }
                    t.value.clone()
                })
                .collect()
        };
        let tag = tags(self, &u.tag);
        let untag = tags(self, &u.untag);
        if set.is_empty() && add.is_empty() && tag.is_empty() && untag.is_empty() {
            self.error(Code::MissingKey, u.span, "the update changes nothing")
                .help = Some("use `set`, `add`, `tag` or `untag`".to_owned());
            ok = false;
        }
        let next = self.next(raw, ids, following, pos, edges)?;
        ok.then_some(StepKind::Update {
            set,
            add,
            tag,
            untag,
            next,
        })
    }

    pub(super) fn call(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let c = raw.call.as_ref()?;
        let mut ok = self.check_id(&c.webhook, "webhook name");
        if let Some(body) = &c.body {
            ok &= self.inline_templates(&body.value, body.span);
        }
        let save_as = match &c.save_as {
            Some(s) if is_snake(&s.value) => s.value.clone(),
            Some(s) => {
                self.error(
                    Code::BadId,
                    s.span,
                    format!("`{}` is not a variable name", s.value),
                )
                .help = Some(format!(
                    "use snake_case, e.g. `{}`",
                    to_kebab(&s.value).replace('-', "_")
                ));
                ok = false;
                String::new()
            }
            None => raw.id.value.replace('-', "_"),
        };
        // The longest the run waits for the answer, retries included (zero is refused by
        // the duration parser).
        let timeout = match &c.timeout {
            Some(t) => {
                let d = self.duration(t);
                ok &= d.is_some();
                d
            }
            None => None,
        };
        let on_error = match &raw.on_error {
            Some(t) => {
                let to = self.target(t, ids).map(NodeIndex::new);
                match to {
                    Some(to) => edges.push((pos, to.index(), Edge::Error)),
                    None => ok = false,
                }
                to
            }
            None => None,
        };
        let next = self.next(raw, ids, following, pos, edges)?;
        ok.then(|| StepKind::Call {
            webhook: c.webhook.value.clone(),
            body: c.body.as_ref().map(|b| b.value.clone()),
            save_as,
            timeout,
            on_error,
            next,
        })
    }

    /// Check every string in a JSON value as a template.
    pub(super) fn inline_templates(&mut self, value: &serde_json::Value, span: Span) -> bool {
        match value {
            serde_json::Value::String(s) => self.inline_template(s, span),
            // Every string is checked, not only up to the first bad one.
            serde_json::Value::Array(items) => {
                let mut ok = true;
                for v in items {
                    ok &= self.inline_templates(v, span);
                }
                ok
            }
            serde_json::Value::Object(map) => {
                let mut ok = true;
                for v in map.values() {
                    ok &= self.inline_templates(v, span);
                }
                ok
            }
            _ => true,
        }
    }

    pub(super) fn inline_template(&mut self, text: &str, span: Span) -> bool {
        let issues = template::check_text("inline", text);
        for issue in &issues {
            let d = self.error(
                issue_code(issue.kind),
                span,
                format!("in template `{}`: {}", shorten(text), issue.message),
            );
            d.help = issue_help(issue.kind);
        }
        issues.is_empty()
    }

    pub(super) fn task(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let t = raw.task.as_ref()?;
        let assign = self.expr(&t.assign, Scope::STEP);
        let text_ok = self.inline_template(&t.text.value, t.text.span);
        let due = match &t.due {
            Some(d) => self.duration(d),
            None => Some(Duration::from_secs(DEFAULT_TASK_DUE)),
        };
        let next = self.next(raw, ids, following, pos, edges)?;
        if !text_ok {
            return None;
        }
        Some(StepKind::Task {
            assign: assign?,
            text: t.text.value.clone(),
            due: due?,
            next,
        })
    }

    pub(super) fn plugin(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<StepKind> {
        let name = raw.use_.as_ref()?;
        let Some(kind) = self.registry.kind(&name.value).cloned() else {
            let known: Vec<String> = self.registry.kinds().map(|k| k.name().to_owned()).collect();
            let help = match did_you_mean(&name.value, known.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`?"),
                None if known.is_empty() => "no plugin kinds are registered".to_owned(),
                None => format!("registered kinds: {}", quote_list(&known)),
            };
            self.error(
                Code::UnknownKind,
                name.span,
                format!("unknown node kind `{}`", name.value),
            )
            .help = Some(help);
            return None;
        };
        let with = raw
            .with
            .as_ref()
            .map_or(serde_json::Value::Null, |w| w.value.clone());
        let mut ok = true;
        if let Err(msg) = kind.check(&with) {
            let span = raw.with.as_ref().map_or(name.span, |w| w.span);
            let help = format!("`{}` {}", name.value, kind.description());
            self.error(Code::KindConfig, span, format!("`{}`: {msg}", name.value))
                .help = Some(help);
            ok = false;
        }
        let mut outputs: Vec<(String, Target)> = kind
            .outputs()
            .iter()
            .map(|o| ((*o).to_owned(), None))
            .collect();
        for (out, target) in raw.on.iter().flat_map(|o| o.value.0.iter()) {
            let Some(slot) = outputs.iter_mut().find(|(o, _)| *o == out.value) else {
                let help = if kind.outputs().is_empty() {
                    format!("`{}` has no outputs besides `next`", name.value)
                } else {
                    format!(
                        "outputs of `{}`: {}",
                        name.value,
                        quote_list(kind.outputs())
                    )
                };
                self.error(
                    Code::KindConfig,
                    out.span,
                    format!("`{}` has no output `{}`", name.value, out.value),
                )
                .help = Some(help);
                ok = false;
                continue;
            };
            match self.target(target, ids) {
                Some(to) => {
                    edges.push((pos, to, Edge::Output(out.value.clone())));
                    slot.1 = Some(NodeIndex::new(to));
                }
                None => ok = false,
            }
        }
        let next = self.next(raw, ids, following, pos, edges)?;
        ok.then(|| StepKind::Plugin {
            kind: name.value.clone(),
            with,
            outputs,
            next,
        })
    }
}
