//! Flow file → `CompiledFlow`, or every diagnostic the file deserves.
//!
//! Stages, each collecting all of its errors before the next one runs: YAML tree (spans,
//! limits) → structure (serde over the tree) → meaning (ids, targets, durations, cron, time
//! zones, expressions, channels, templates, plugin kinds) → graph (reachability, cycles).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use petgraph::graph::{DiGraph, NodeIndex};
use sha2::{Digest, Sha256};

use crate::de::{self, DecodeError, DecodeErrorKind, Lenient, Spanned};
use crate::diagnostic::{Code, Diagnostic, did_you_mean, quote_all, quote_list};
use crate::duration::{Duration, TimeOfDay};
use crate::expr::{self, Expr, Scope};
use crate::flow::{
    CompiledFlow, Edge, Entry, ExitRule, Fallback, FlowHash, Goal, Schedule, SplitArm, Step,
    StepKind, Target, Trigger, Wait,
};
use crate::model::{FallbackMode, Priority, RawArm, RawFlow, RawStep, RawWait};
use crate::registry::Registry;
use crate::template::{self, Checked, IssueKind, Resolution, TemplateDir, TemplateFile};
use crate::yaml::{self, Limits, Span, Value};

/// The diagnostic code of a template problem.
fn issue_code(kind: IssueKind) -> Code {
    match kind {
        IssueKind::Syntax => Code::TemplateSyntax,
        IssueKind::Reference => Code::TemplateReference,
        IssueKind::Limit => Code::TemplateLimit,
        IssueKind::Include => Code::TemplateInclude,
    }
}

/// What to do about a template problem, when there is more to say than the message.
fn issue_help(kind: IssueKind) -> Option<String> {
    match kind {
        IssueKind::Syntax | IssueKind::Reference => None,
        IssueKind::Limit => Some(format!(
            "one render may take {} steps and give {} bytes; loop over less, or split the \
             message (see the limits in docs/language.md)",
            template::TEMPLATE_FUEL,
            template::MAX_RENDERED_BYTES
        )),
        IssueKind::Include => Some(
            "`include`, `import` and `extends` take a quoted path under templates/, with its \
             extension, such as `partials/footer.txt`"
                .to_owned(),
        ),
    }
}

/// The keys that decide a step's kind.
pub const STEP_KINDS: &[&str] = &[
    "send", "wait", "branch", "split", "update", "call", "task", "exit", "use",
];

/// Default re-check period of segment triggers.
const DEFAULT_RECHECK: u64 = 86_400;
/// Default due time of tasks.
const DEFAULT_TASK_DUE: u64 = 86_400;

/// What compiling one file gave.
#[derive(Debug)]
pub struct Compiled {
    pub file: PathBuf,
    /// The flow id as written, when it could be read (also for broken files, so duplicate ids
    /// across files are still found).
    pub id: Option<(String, Span)>,
    pub flow: Option<CompiledFlow>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Compile one flow file's text.
pub fn compile(
    file: &Path,
    source: &str,
    registry: &Registry,
    templates: &TemplateDir,
) -> Compiled {
    let mut cx = Cx {
        file: file.to_path_buf(),
        source,
        diags: Vec::new(),
        registry,
        templates,
        used_templates: BTreeMap::new(),
    };
    let doc = match yaml::parse(source, &Limits::default()) {
        Ok(doc) => doc,
        Err(e) => {
            let code = match e {
                yaml::LoadError::Syntax { .. } => Code::Syntax,
                _ => Code::Limit,
            };
            let mut d = Diagnostic::new(code, file, e.span(), e.to_string());
            if let yaml::LoadError::Syntax { message, .. } = &e {
                d.message = format!("YAML syntax error: {message}");
                if source.contains('\t') && message.contains("tab") {
                    d = d.with_help("YAML indents with spaces; replace the tabs");
                }
            }
            cx.diags.push(d);
            return cx.finish(None, None);
        }
    };
    for dup in &doc.duplicate_keys {
        cx.diags.push(Diagnostic::duplicate_key(file, dup));
    }
    let id = doc
        .root
        .get("flow")
        .and_then(|n| n.as_str().map(|s| (s.to_owned(), n.span)));
    if !matches!(doc.root.value, Value::Map(_)) {
        cx.diags.push(
            Diagnostic::new(
                Code::WrongType,
                file,
                Some(doc.root.span),
                format!(
                    "a flow file holds a mapping, found {}",
                    doc.root.kind_name()
                ),
            )
            .with_help("start with `flow: my-flow`, then `trigger:` and `steps:`"),
        );
        return cx.finish(id, None);
    }
    let (raw, errors) = de::decode::<RawFlow>(&doc.root);
    for e in errors {
        cx.decode_error(&e);
    }
    let flow = raw.and_then(|raw| cx.flow(&raw));
    cx.finish(id, flow)
}

struct Cx<'a> {
    file: PathBuf,
    source: &'a str,
    diags: Vec<Diagnostic>,
    registry: &'a Registry,
    templates: &'a TemplateDir,
    used_templates: BTreeMap<String, TemplateFile>,
}

/// Step ids → their position in the list; targets resolve against it.
struct Ids<'r> {
    positions: HashMap<String, usize>,
    order: Vec<&'r str>,
}

impl<'a> Cx<'a> {
    fn finish(self, id: Option<(String, Span)>, flow: Option<CompiledFlow>) -> Compiled {
        let mut diagnostics = self.diags;
        diagnostics.sort_by(|a, b| (&a.file, a.location).cmp(&(&b.file, b.location)));
        diagnostics.dedup();
        Compiled {
            file: self.file,
            id,
            flow: if diagnostics.iter().any(Diagnostic::is_error) {
                None
            } else {
                flow
            },
            diagnostics,
        }
    }

    fn error(&mut self, code: Code, span: Span, message: impl Into<String>) -> &mut Diagnostic {
        self.diags
            .push(Diagnostic::new(code, &self.file, Some(span), message));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    fn decode_error(&mut self, e: &DecodeError) {
        let span = e.span;
        let (code, message, help) = match &e.kind {
            DecodeErrorKind::UnknownField { field, expected } => {
                let help = match did_you_mean(field, expected.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of {}", quote_list(expected)),
                };
                (
                    Code::UnknownKey,
                    format!("unknown key `{field}`"),
                    Some(help),
                )
            }
            DecodeErrorKind::MissingField(field) => (
                Code::MissingKey,
                format!("missing key `{field}`"),
                missing_help(field).map(str::to_owned),
            ),
            DecodeErrorKind::UnknownVariant { variant, expected } => {
                let help = did_you_mean(variant, expected.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"));
                (
                    Code::WrongType,
                    format!(
                        "unknown value `{variant}`, expected {}",
                        quote_list(expected)
                    ),
                    help,
                )
            }
            DecodeErrorKind::InvalidType { found, expected } => (
                Code::WrongType,
                format!("expected {}, found {found}", plain_expected(expected)),
                None,
            ),
            DecodeErrorKind::Custom(msg) => (Code::WrongType, msg.clone(), None),
        };
        let mut d = Diagnostic::new(code, &self.file, span, message);
        d.help = help;
        self.diags.push(d);
    }

    fn flow(&mut self, raw: &RawFlow) -> Option<CompiledFlow> {
        self.check_id(&raw.flow, "flow id");
        let timezone = match &raw.timezone {
            None => Some(chrono_tz::UTC),
            Some(tz) => self.timezone(tz),
        };
        let priority = self.flow_priority(raw);
        let trigger = self.trigger(raw);
        let entry = self.entry(raw);
        let exits = self.exits(raw);
        let goal = raw.goal.as_ref().and_then(|g| {
            let within = self.duration(&g.within);
            let condition = self.opt_expr(g.where_.as_ref(), Scope::EVENT);
            self.check_event_name(&g.event);
            Some(Goal {
                event: g.event.value.clone(),
                condition: condition?,
                within: within?,
                exit: g.exit.as_ref().is_some_and(|e| e.value),
            })
        });
        let graph = self.steps(&raw.steps);
        let hash = self.hash(raw);
        let (graph, start) = graph?;
        self.diags.extend(crate::scope::check(&crate::scope::Input {
            file: &self.file,
            source: self.source,
            graph: &graph,
            start,
            steps: &raw.steps.value,
            trigger_event: raw.trigger.value.event.is_some(),
            templates_root: &self.templates.root,
            templates: &self.used_templates,
        }));
        Some(CompiledFlow {
            id: raw.flow.value.clone(),
            name: raw
                .name
                .as_ref()
                .map_or_else(|| raw.flow.value.clone(), |n| n.value.clone()),
            description: raw.description.as_ref().map(|d| d.value.clone()),
            timezone: timezone?,
            priority: priority?,
            trigger: trigger?,
            entry: entry?,
            exits: exits?,
            goal,
            graph,
            start,
            templates: std::mem::take(&mut self.used_templates),
            hash,
            source: self.file.clone(),
            sites: sites(&raw.steps.value),
        })
    }

    /// The version: a hash of what the flow means (not its comments or layout) and of the
    /// template texts it sends.
    fn hash(&self, raw: &RawFlow) -> FlowHash {
        let mut h = Sha256::new();
        h.update(b"canvas/v1\0");
        h.update(serde_json::to_vec(raw).unwrap_or_default());
        for (file, t) in &self.used_templates {
            h.update(b"\0");
            h.update(file.as_bytes());
            h.update(b"\0");
            h.update(t.source.as_bytes());
        }
        let digest = h.finalize();
        FlowHash(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The flow's `priority`, checked against [`crate::flow::PRIORITY_RANGE`].
    fn flow_priority(&mut self, raw: &RawFlow) -> Option<i16> {
        let Some(p) = &raw.priority else {
            return Some(0);
        };
        let range = crate::flow::PRIORITY_RANGE;
        match i16::try_from(p.value) {
            Ok(v) if range.contains(&p.value) => Some(v),
            _ => {
                let d = self.error(
                    Code::WrongType,
                    p.span,
                    format!(
                        "`priority` is {}; it must be a whole number from {} to {}",
                        p.value,
                        range.start(),
                        range.end()
                    ),
                );
                d.help = Some(
                    "higher wins when flows compete for a capped moment (default 0); keep to a \
                     few values such as 10 for service flows and -10 for promotions"
                        .to_owned(),
                );
                None
            }
        }
    }

    fn check_id(&mut self, id: &Spanned<String>, what: &str) -> bool {
        if is_kebab(&id.value) {
            return true;
        }
        let suggestion = to_kebab(&id.value);
        let d = self.error(
            Code::BadId,
            id.span,
            format!("{what} `{}` is not kebab-case", id.value),
        );
        d.help = Some(if suggestion.is_empty() {
            "use lowercase letters, digits and `-`, starting with a letter".to_owned()
        } else {
            format!("use lowercase letters, digits and `-`, e.g. `{suggestion}`")
        });
        false
    }

    fn check_event_name(&mut self, name: &Spanned<String>) {
        let ok = name
            .value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
        if !ok {
            self.error(
                Code::BadId,
                name.span,
                format!("`{}` is not an event name", name.value),
            )
            .help = Some(
                "event names use letters, digits, `_`, `-`, `.` and `:`, e.g. `order_paid`"
                    .to_owned(),
            );
        }
    }

    fn timezone(&mut self, tz: &Spanned<String>) -> Option<chrono_tz::Tz> {
        match chrono_tz::Tz::from_str(&tz.value) {
            Ok(t) => Some(t),
            Err(_) => {
                let names = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name());
                let help = match did_you_mean(&tz.value, names) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "use an IANA name such as `Asia/Shanghai`, `Europe/Paris` or `UTC`"
                        .to_owned(),
                };
                self.error(
                    Code::TimeZone,
                    tz.span,
                    format!("unknown time zone `{}`", tz.value),
                )
                .help = Some(help);
                None
            }
        }
    }

    fn duration(&mut self, d: &Spanned<String>) -> Option<Duration> {
        match Duration::parse(&d.value) {
            Ok(v) => Some(v),
            Err(e) => {
                let help = e.help().to_owned();
                self.error(Code::Duration, d.span, e.to_string()).help = Some(help);
                None
            }
        }
    }

    fn expr(&mut self, e: &Spanned<String>, scope: Scope) -> Option<Expr> {
        match expr::compile(&e.value, scope) {
            Ok(x) => Some(x),
            Err(issues) => {
                for issue in issues {
                    let span = self.inner_span(e, issue.offset);
                    let code = if issue.syntax {
                        Code::ExprSyntax
                    } else {
                        Code::ExprReference
                    };
                    let d = self.error(code, span, issue.message);
                    d.help = issue.help;
                }
                None
            }
        }
    }

    /// `Some(None)` when absent, `Some(Some(_))` when valid, `None` when broken.
    fn opt_expr(&mut self, e: Option<&Spanned<String>>, scope: Scope) -> Option<Option<Expr>> {
        match e {
            None => Some(None),
            Some(e) => self.expr(e, scope).map(Some),
        }
    }

    fn inner_span(&self, value: &Spanned<String>, offset: Option<usize>) -> Span {
        inner_span(self.source, value, offset)
    }

    fn trigger(&mut self, raw: &RawFlow) -> Option<Trigger> {
        let t = &raw.trigger.value;
        let span = raw.trigger.span;
        let kinds: Vec<&str> = [
            t.event.as_ref().map(|_| "event"),
            t.schedule.as_ref().map(|_| "schedule"),
            t.segment.as_ref().map(|_| "segment"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if kinds.len() != 1 {
            let msg = if kinds.is_empty() {
                "the trigger names no way in".to_owned()
            } else {
                format!(
                    "the trigger has {}; a flow has exactly one trigger",
                    quote_all(&kinds)
                )
            };
            self.error(Code::Conflict, span, msg).help =
                Some("use one of `event: NAME`, `schedule: CRON` or `segment: EXPR`".to_owned());
            return None;
        }
        self.misplaced(
            t.where_.as_ref(),
            "where",
            t.event.is_some(),
            "`where` goes with `event`",
        );
        self.misplaced(
            t.audience.as_ref(),
            "audience",
            t.schedule.is_some(),
            "`audience` goes with `schedule`",
        );
        self.misplaced(
            t.recheck.as_ref(),
            "recheck",
            t.segment.is_some(),
            "`recheck` goes with `segment`",
        );
        if let Some(name) = &t.event {
            self.check_event_name(name);
            let condition = self.opt_expr(t.where_.as_ref(), Scope::EVENT)?;
            return Some(Trigger::Event {
                name: name.value.clone(),
                condition,
            });
        }
        if let Some(cron) = &t.schedule {
            let schedule = self.cron(cron);
            let audience = self.opt_expr(t.audience.as_ref(), Scope::PROFILE);
            return Some(Trigger::Schedule {
                cron: Box::new(schedule?),
                audience: audience?,
            });
        }
        let segment = t.segment.as_ref()?;
        let condition = self.expr(segment, Scope::PROFILE);
        let recheck = match &t.recheck {
            Some(r) => self.duration(r),
            None => Some(Duration::from_secs(DEFAULT_RECHECK)),
        };
        Some(Trigger::Segment {
            condition: condition?,
            recheck: recheck?,
        })
    }

    fn misplaced<T>(&mut self, value: Option<&Spanned<T>>, key: &str, allowed: bool, help: &str) {
        if let (Some(v), false) = (value, allowed) {
            self.error(
                Code::Misplaced,
                v.span,
                format!("`{key}` does not apply here"),
            )
            .help = Some(help.to_owned());
        }
    }

    fn cron(&mut self, cron: &Spanned<String>) -> Option<Schedule> {
        let text = cron.value.trim();
        let fields = text.split_whitespace().count();
        let help = "five fields: minute hour day-of-month month day-of-week, e.g. `0 9 1 * *` for 09:00 on the 1st (a sixth, leading field gives seconds)";
        if !(text.starts_with('@') || fields == 5 || fields == 6) {
            self.error(
                Code::Cron,
                cron.span,
                format!("cron `{text}` has {fields} fields"),
            )
            .help = Some(help.to_owned());
            return None;
        }
        match croner::Cron::from_str(text) {
            Ok(c) => Some(Schedule {
                source: text.to_owned(),
                cron: c,
            }),
            Err(e) => {
                self.error(Code::Cron, cron.span, format!("cron `{text}`: {e}"))
                    .help = Some(help.to_owned());
                None
            }
        }
    }

    fn entry(&mut self, raw: &RawFlow) -> Option<Entry> {
        let Some(e) = &raw.entry else {
            return Some(Entry::OneActive);
        };
        match (&e.once, &e.reenter_after) {
            (Some(_), Some(r)) => {
                self.error(
                    Code::Conflict,
                    r.span,
                    "`once` and `reenter_after` exclude each other",
                )
                .help = Some(
                    "keep `once: true` to enter once ever, or `reenter_after` to come back"
                        .to_owned(),
                );
                None
            }
            (Some(once), None) if once.value => Some(Entry::Once),
            (Some(_), None) | (None, None) => Some(Entry::OneActive),
            (None, Some(r)) => self.duration(r).map(Entry::ReenterAfter),
        }
    }

    fn exits(&mut self, raw: &RawFlow) -> Option<Vec<ExitRule>> {
        let mut out = Vec::new();
        let mut ok = true;
        for rule in &raw.exit {
            match (&rule.event, &rule.when) {
                (Some(name), None) => {
                    self.check_event_name(name);
                    match self.opt_expr(rule.where_.as_ref(), Scope::STEP) {
                        Some(condition) => out.push(ExitRule::Event {
                            name: name.value.clone(),
                            condition,
                        }),
                        None => ok = false,
                    }
                }
                (None, Some(when)) => {
                    self.misplaced(
                        rule.where_.as_ref(),
                        "where",
                        false,
                        "`where` goes with `event`",
                    );
                    match self.expr(when, Scope::RUN) {
                        Some(x) => out.push(ExitRule::When(x)),
                        None => ok = false,
                    }
                }
                _ => {
                    self.error(
                        Code::Conflict,
                        rule.span,
                        "an exit rule has exactly one of `event` or `when`",
                    )
                    .help = Some(
                        "e.g. `- event: unsubscribed` or `- when: customer.do_not_contact`"
                            .to_owned(),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn steps(
        &mut self,
        steps: &Spanned<Vec<Lenient<RawStep>>>,
    ) -> Option<(DiGraph<Step, Edge>, NodeIndex)> {
        if steps.value.is_empty() {
            self.error(Code::MissingKey, steps.span, "the flow has no steps")
                .help = Some(
                "add at least one step, e.g. `- id: hello` with `send: sms` and `template: hello`"
                    .to_owned(),
            );
            return None;
        }
        // Ids first, broken steps included, so a target naming a broken step is not also
        // reported as unknown.
        let mut ids = Ids {
            positions: HashMap::new(),
            order: Vec::new(),
        };
        let mut broken = false;
        for (pos, step) in steps.value.iter().enumerate() {
            let (id, span) = match step {
                Lenient::Ok(s) => (s.id.value.as_str(), s.id.span),
                Lenient::Broken(node) => {
                    broken = true;
                    match node.get("id") {
                        Some(n) => (n.as_str().unwrap_or(""), n.span),
                        None => ("", node.span),
                    }
                }
            };
            ids.order.push(id);
            if id.is_empty() {
                continue;
            }
            if let Some(&first) = ids.positions.get(id) {
                let first_span = match &steps.value[first] {
                    Lenient::Ok(s) => Some(s.id.span),
                    Lenient::Broken(n) => n.get("id").map(|n| n.span),
                };
                self.diags.push(
                    Diagnostic::new(
                        Code::DuplicateStep,
                        &self.file,
                        Some(span),
                        format!("step id `{id}` is used twice"),
                    )
                    .with_related(&self.file, first_span, "first used here")
                    .with_help("step ids must be unique within a flow"),
                );
                broken = true;
                continue;
            }
            if let Lenient::Ok(s) = step {
                if s.id.value == "control" {
                    self.error(
                        Code::BadId,
                        s.id.span,
                        "`control` is reserved for the holdout arm of a split",
                    )
                    .help = Some("name the step something else, e.g. `control-group`".to_owned());
                    broken = true;
                } else if !self.check_id(&s.id, "step id") {
                    broken = true;
                }
            }
            ids.positions.insert(id.to_owned(), pos);
        }

        let errors_before = self.diags.len();
        let mut graph: DiGraph<Step, Edge> =
            DiGraph::with_capacity(steps.value.len(), steps.value.len() + 4);
        let mut edges: Vec<(usize, usize, Edge)> = Vec::new();
        for (pos, step) in steps.value.iter().enumerate() {
            let Lenient::Ok(raw) = step else { continue };
            let following = (pos + 1 < steps.value.len()).then(|| NodeIndex::new(pos + 1));
            match self.step(raw, &ids, following, pos, &mut edges) {
                Some(kind) if !broken => {
                    graph.add_node(Step {
                        id: raw.id.value.clone(),
                        name: raw.name.as_ref().map(|n| n.value.clone()),
                        kind,
                    });
                }
                _ => broken = true,
            }
        }
        if broken || self.diags.len() > errors_before {
            return None;
        }
        for (from, to, label) in edges {
            graph.add_edge(NodeIndex::new(from), NodeIndex::new(to), label);
        }
        let start = NodeIndex::new(0);
        self.check_graph(&graph, steps, start);
        Some((graph, start))
    }

    fn check_graph(
        &mut self,
        graph: &DiGraph<Step, Edge>,
        steps: &Spanned<Vec<Lenient<RawStep>>>,
        start: NodeIndex,
    ) {
        let id_span = |i: NodeIndex| match &steps.value[i.index()] {
            Lenient::Ok(s) => s.id.span,
            Lenient::Broken(n) => n.span,
        };
        for scc in petgraph::algo::tarjan_scc(graph) {
            let looped = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
            if !looped {
                continue;
            }
            let path = cycle_path(graph, &scc);
            let names: Vec<&str> = path.iter().map(|&i| graph[i].id.as_str()).collect();
            let first = path[0];
            self.error(
                Code::Cycle,
                id_span(first),
                format!("steps form a cycle: {}", names.join(" → ")),
            )
            .help = Some("a flow is a DAG; journeys repeat by re-entry (`entry: { reenter_after: 30d }`), not by loops".to_owned());
        }
        let mut seen = vec![false; graph.node_count()];
        let mut dfs = petgraph::visit::Dfs::new(graph, start);
        while let Some(n) = dfs.next(graph) {
            seen[n.index()] = true;
        }
        for (i, reached) in seen.iter().enumerate() {
            if !reached {
                let n = NodeIndex::new(i);
                let prev_terminal = i > 0
                    && matches!(
                        graph[NodeIndex::new(i - 1)].kind,
                        StepKind::Branch { .. } | StepKind::Split { .. } | StepKind::Exit { .. }
                    );
                let mut help = format!(
                    "no step leads to `{}`: name it in a `next`, a branch or a split, or remove it",
                    graph[n].id
                );
                if prev_terminal {
                    help.push_str(&format!(
                        "; the step before it (`{}`) does not continue to the following step",
                        graph[NodeIndex::new(i - 1)].id
                    ));
                }
                self.error(
                    Code::Unreachable,
                    id_span(n),
                    format!("step `{}` is never reached", graph[n].id),
                )
                .help = Some(help);
            }
        }
    }

    fn target(&mut self, name: &Spanned<String>, ids: &Ids<'_>) -> Option<usize> {
        if let Some(&pos) = ids.positions.get(&name.value) {
            return Some(pos);
        }
        let help = match did_you_mean(
            &name.value,
            ids.order.iter().copied().filter(|s| !s.is_empty()),
        ) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("steps of this flow: {}", quote_list(&ids.order)),
        };
        let d = self.error(
            Code::UnknownStep,
            name.span,
            format!("unknown step `{}`", name.value),
        );
        d.help = Some(help);
        d.label = Some("no step has this id".to_owned());
        None
    }

    /// Resolve an optional explicit `next`, else the following step.
    fn next(
        &mut self,
        raw: &RawStep,
        ids: &Ids<'_>,
        following: Target,
        pos: usize,
        edges: &mut Vec<(usize, usize, Edge)>,
    ) -> Option<Target> {
        let to = match &raw.next {
            Some(n) => Some(NodeIndex::new(self.target(n, ids)?)),
            None => following,
        };
        if let Some(to) = to {
            edges.push((pos, to.index(), Edge::Next));
        }
        Some(to)
    }

    fn step(
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

    fn send(
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

    fn resolve_templates(
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
    fn template_file(&mut self, path: &Path, email: bool) -> Option<String> {
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

    fn wait(
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

    fn time_range(&mut self, b: &Spanned<String>) -> Option<(TimeOfDay, TimeOfDay)> {
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

    fn branch(
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

    fn split(
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

    fn update(
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

    fn call(
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
    fn inline_templates(&mut self, value: &serde_json::Value, span: Span) -> bool {
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

    fn inline_template(&mut self, text: &str, span: Span) -> bool {
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

    fn task(
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

    fn plugin(
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

/// Walk a strongly connected component to spell one cycle through its first step.
/// The span of a character inside a scalar of `source`, when the scalar sits on one line
/// as written; otherwise the scalar itself.
pub(crate) fn inner_span(source: &str, value: &Spanned<String>, offset: Option<usize>) -> Span {
    let Some(offset) = offset else {
        return value.span;
    };
    let s = value.span;
    if s.start.line != s.end.line {
        return s;
    }
    let line = source
        .lines()
        .nth((s.start.line as usize).saturating_sub(1))
        .unwrap_or("");
    let text: String = line.chars().skip(s.start.col as usize).collect();
    let skip = if text.starts_with(&value.value) {
        0
    } else if text
        .chars()
        .skip(1)
        .collect::<String>()
        .starts_with(&value.value)
    {
        1 // quoted
    } else {
        return s;
    };
    let col = s.start.col + skip + offset as u32;
    Span::point(s.start.line, col)
}

/// Step id → the span of what it uses (see [`CompiledFlow::sites`]).
fn sites(steps: &[Lenient<RawStep>]) -> BTreeMap<String, Span> {
    steps
        .iter()
        .filter_map(|s| match s {
            Lenient::Ok(s) => Some(s),
            Lenient::Broken(_) => None,
        })
        .map(|s| {
            let span = s
                .send
                .as_ref()
                .map(|v| v.span)
                .or_else(|| s.call.as_ref().map(|c| c.value.webhook.span))
                .or_else(|| s.task.as_ref().map(|t| t.span))
                .unwrap_or(s.id.span);
            (s.id.value.clone(), span)
        })
        .collect()
}

fn cycle_path(graph: &DiGraph<Step, Edge>, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    let start = scc.iter().copied().min().unwrap_or(scc[0]);
    if graph.contains_edge(start, start) {
        return vec![start, start];
    }
    // Breadth-first inside the component, back to `start`.
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for m in graph.neighbors(n) {
            if !scc.contains(&m) {
                continue;
            }
            if m == start {
                let mut path = vec![start];
                let mut cur = n;
                while cur != start {
                    path.push(cur);
                    cur = prev[&cur];
                }
                path.push(start);
                let last = path.len() - 1;
                path[1..last].reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    scc.to_vec()
}

fn missing_help(field: &str) -> Option<&'static str> {
    Some(match field {
        "flow" => "every flow starts with `flow: its-id` (kebab-case, unique across the folder)",
        "trigger" => {
            "add `trigger:` with one of `event: NAME`, `schedule: CRON` or `segment: EXPR`"
        }
        "steps" => "add `steps:`, a list of steps",
        "id" => "every step has an `id:` (kebab-case, unique in the flow)",
        "within" => "how long after entry a conversion counts, e.g. `within: 14d`",
        "event" => "the event name, e.g. `event: order_paid`",
        _ => return None,
    })
}

fn plain_expected(expected: &str) -> String {
    if expected.starts_with("struct ") {
        return "a mapping".to_owned();
    }
    match expected {
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        "u32" | "u64" | "u16" | "u8" | "i64" | "i32" => "a whole number".to_owned(),
        "f64" | "f32" => "a number".to_owned(),
        "a boolean" | "`true` or `false`" => "`true` or `false`".to_owned(),
        other => other.to_owned(),
    }
}

pub fn is_kebab(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn is_snake(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_attribute(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn to_kebab(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 && !out.ends_with('-') {
            out.push('-');
        }
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() > 40 {
        format!("{}…", one_line.chars().take(40).collect::<String>())
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_ids() {
        assert!(is_kebab("wait-birthday"));
        assert!(is_kebab("step2"));
        assert!(!is_kebab("Wait"));
        assert!(!is_kebab("wait_birthday"));
        assert!(!is_kebab("-a"));
        assert_eq!(to_kebab("waitBirthday"), "wait-birthday");
        assert_eq!(to_kebab("wait_birthday"), "wait-birthday");
    }
}
