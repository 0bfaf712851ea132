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

mod steps;

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
}

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

/// Walk a strongly connected component to spell one cycle through its first step.
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
