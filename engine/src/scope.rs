//! What each step can see, checked against what it reads.
//!
//! Expressions and templates of a step read `customer.*`, `event.*`, `vars.*`, `flow.*` and
//! `now`. Two of these depend on the way a run came:
//!
//! - `vars.NAME` is set by a `call` step (`save_as: NAME`) when its answer comes back, so
//!   it exists at a step only if a call on the way there saved it. Reading a name that no
//!   path sets is an error; one that only some paths set is a warning, unless the reader
//!   guards it (`has(vars.NAME)` in an expression; `| default(…)` or `is defined` in a
//!   template).
//! - `event` is the trigger's event, or the event a `wait: { event }` woke on. A flow that
//!   starts on a schedule or a segment has none until such a wait: reading `event` where no
//!   path has one is an error, where only some do a warning.
//!
//! Both are one dataflow over the DAG: facts flow along edges, and [`successors`] says
//! which edge adds which fact (a call's `next`, an event wait's `next`; never a timeout).
//! "Must" facts hold on every path to a step (intersection), "may" facts on some path
//! (union).
//!
//! Templates are checked like expressions, and more: `event.FIELD` must be a field of an
//! event, `flow.FIELD` is `id` or `name`, `now` has no fields. `customer.*` is open: a
//! profile holds whatever attributes the shop sends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::de::{Lenient, Spanned};
use crate::diagnostic::{Code, Diagnostic, did_you_mean, quote_list};
use crate::expr::{self, EVENT_FIELDS};
use crate::flow::{Edge, SplitArm, Step, StepKind, Wait};
use crate::model::RawStep;
use crate::template::{self, TemplateFile};
use crate::yaml::Span;

/// The template name of a `call` body string or a `task` text, for messages.
const INLINE: &str = "inline";

/// Fields a template may read of `flow`.
const FLOW_FIELDS: &[&str] = &["id", "name"];

/// What a run may carry when it reaches a step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fact {
    /// `vars.NAME` is set.
    Var(String),
    /// There is an event.
    Event,
}

/// Where the run goes from a step, and what taking that edge adds. The one place that
/// knows which edges set what: an edge that fails (a call's `on_error`, a wait's timeout)
/// adds nothing.
fn successors(kind: &StepKind) -> Vec<(NodeIndex, Option<Fact>)> {
    let plain = |t: &Option<NodeIndex>| t.iter().map(|&n| (n, None)).collect::<Vec<_>>();
    match kind {
        StepKind::Send { next, .. }
        | StepKind::Update { next, .. }
        | StepKind::Task { next, .. } => plain(next),
        StepKind::Wait {
            wait: Wait::Event { on_timeout, .. },
            next,
        } => {
            let mut out: Vec<_> = next.iter().map(|&n| (n, Some(Fact::Event))).collect();
            out.extend(plain(on_timeout));
            out
        }
        StepKind::Wait { next, .. } => plain(next),
        // The answer sets `vars.<save_as>`; a failed call's `on_error` path has none.
        StepKind::Call {
            next,
            save_as,
            on_error,
            ..
        } => next
            .iter()
            .map(|&n| (n, Some(Fact::Var(save_as.clone()))))
            .chain(on_error.iter().map(|&n| (n, None)))
            .collect(),
        StepKind::Branch { arms, otherwise } => arms
            .iter()
            .map(|(_, n)| (*n, None))
            .chain([(*otherwise, None)])
            .collect(),
        StepKind::Split { arms } => arms
            .iter()
            .filter_map(|(arm, _)| match arm {
                SplitArm::Step(n) => Some((*n, None)),
                SplitArm::Control => None,
            })
            .collect(),
        StepKind::Exit { .. } => Vec::new(),
        StepKind::Plugin { outputs, next, .. } => outputs
            .iter()
            .filter_map(|(_, t)| *t)
            .chain(*next)
            .map(|n| (n, None))
            .collect(),
    }
}

/// Facts on every path (`must`) and on some path (`may`) to each step; `None` for a step
/// no path reaches.
type Reaching = Vec<Option<(BTreeSet<Fact>, BTreeSet<Fact>)>>;

fn reaching(graph: &DiGraph<Step, Edge>, start: NodeIndex, initial: BTreeSet<Fact>) -> Reaching {
    let mut at: Reaching = vec![None; graph.node_count()];
    at[start.index()] = Some((initial.clone(), initial));
    // The graph is a DAG (checked before), so one pass in topological order settles it.
    let Ok(order) = petgraph::algo::toposort(graph, None) else {
        return at;
    };
    for node in order {
        let Some((must, may)) = at[node.index()].clone() else {
            continue;
        };
        for (to, fact) in successors(&graph[node].kind) {
            let mut must_out = must.clone();
            let mut may_out = may.clone();
            if let Some(f) = fact {
                must_out.insert(f.clone());
                may_out.insert(f);
            }
            let slot = &mut at[to.index()];
            *slot = Some(match slot.take() {
                None => (must_out, may_out),
                Some((m, y)) => (
                    m.intersection(&must_out).cloned().collect(),
                    y.union(&may_out).cloned().collect(),
                ),
            });
        }
    }
    at
}

/// Where a read is written.
#[derive(Debug, Clone)]
enum Place {
    /// In the flow file.
    Flow(Span),
    /// In a template file, at 1-based line and column.
    Template(PathBuf, Option<(u32, u32)>),
}

/// One name a step reads.
#[derive(Debug)]
struct Read {
    path: Vec<String>,
    place: Place,
    guarded: bool,
    /// A template (whose names the expression checker has not seen), and which.
    template: Option<String>,
    /// A `wait: { event }` condition, which reads the event it is offered.
    own_event: bool,
}

/// What the checks need of the flow being compiled.
pub(crate) struct Input<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    pub graph: &'a DiGraph<Step, Edge>,
    pub start: NodeIndex,
    pub steps: &'a [Lenient<RawStep>],
    /// The trigger is an event: runs start with one.
    pub trigger_event: bool,
    pub templates_root: &'a Path,
    pub templates: &'a BTreeMap<String, TemplateFile>,
}

/// Every read of every step the runs reaching it cannot satisfy.
pub(crate) fn check(input: &Input<'_>) -> Vec<Diagnostic> {
    let initial: BTreeSet<Fact> = if input.trigger_event {
        [Fact::Event].into()
    } else {
        BTreeSet::new()
    };
    let at = reaching(input.graph, input.start, initial);
    let saved: Vec<&str> = input
        .graph
        .node_weights()
        .filter_map(|s| match &s.kind {
            StepKind::Call { save_as, .. } => Some(save_as.as_str()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for node in input.graph.node_indices() {
        let Some((must, may)) = &at[node.index()] else {
            continue;
        };
        let Some(Lenient::Ok(raw)) = input.steps.get(node.index()) else {
            continue;
        };
        let step = &input.graph[node];
        for read in reads(input, raw, step) {
            if let Some(d) = judge(input, step, &read, must, may, &saved) {
                out.push(d);
            }
        }
    }
    out
}

fn diagnostic(input: &Input<'_>, code: Code, place: &Place, message: String) -> Diagnostic {
    match place {
        Place::Flow(span) => Diagnostic::new(code, input.file, Some(*span), message),
        Place::Template(path, at) => Diagnostic::new(
            code,
            path,
            at.map(|(line, col)| Span::point(line, col.saturating_sub(1))),
            message,
        ),
    }
}

/// What is wrong with one read, if anything.
fn judge(
    input: &Input<'_>,
    step: &Step,
    read: &Read,
    must: &BTreeSet<Fact>,
    may: &BTreeSet<Fact>,
    saved: &[&str],
) -> Option<Diagnostic> {
    let name = read.path.join(".");
    let used = match read.template.as_deref() {
        Some(INLINE) => format!("a template in step `{}`", step.id),
        Some(t) => format!("template `{t}` of step `{}`", step.id),
        None => format!("step `{}`", step.id),
    };
    let related = |d: Diagnostic| match (
        &read.place,
        input.steps.iter().find_map(|s| match s {
            Lenient::Ok(s) if s.id.value == step.id => Some(s.id.span),
            _ => None,
        }),
    ) {
        (Place::Template(..), Some(span)) => d.with_related(
            input.file,
            Some(span),
            format!("used by step `{}`", step.id),
        ),
        _ => d,
    };
    let field = read.path.get(1).map(String::as_str);
    match (read.path[0].as_str(), field) {
        ("vars", Some(var)) => {
            let fact = Fact::Var(var.to_owned());
            if must.contains(&fact) || (may.contains(&fact) && read.guarded) {
                return None;
            }
            if may.contains(&fact) {
                return Some(related(
                    diagnostic(
                        input,
                        Code::UnsetVar,
                        &read.place,
                        format!(
                            "`{name}` in {used} is set on some paths to it but not all: \
                             `vars.{var}` is only there after the `call` that saves it answers"
                        ),
                    )
                    .warning()
                    .with_help(format!(
                        "guard it (`has(vars.{var})` in an expression, `| default(…)` or \
                         `is defined` in a template), or make every path pass the call"
                    )),
                ));
            }
            let help = match did_you_mean(var, saved.iter().copied()) {
                Some(s) => format!("did you mean `vars.{s}`?"),
                None if saved.is_empty() => {
                    "`vars.NAME` holds the answer of a `call` step with `save_as: NAME`, \
                     and this flow has none"
                        .to_owned()
                }
                None => format!("calls of this flow save {}", quote_list(saved)),
            };
            Some(related(
                diagnostic(
                    input,
                    Code::UnsetVar,
                    &read.place,
                    format!(
                        "`{name}` in {used} is never set: no `call` with `save_as: {var}` \
                         comes before it"
                    ),
                )
                .with_help(help),
            ))
        }
        ("event", _) if !read.own_event && !must.contains(&Fact::Event) => {
            let some = may.contains(&Fact::Event);
            if some && read.guarded {
                return None;
            }
            let d = diagnostic(
                input,
                Code::NoEvent,
                &read.place,
                if some {
                    format!(
                        "`{name}` in {used}: only some paths to it wait for an event, and \
                         this flow does not start on one"
                    )
                } else {
                    format!(
                        "`{name}` in {used}: there is no event here; the flow starts on a \
                         schedule or a segment and no `wait: {{ event }}` comes before it"
                    )
                },
            )
            .with_help(
                "read the profile (`customer.*`) instead, or wait for the event first \
                 (`wait: { event: NAME, timeout: 7d }`)",
            );
            Some(related(if some { d.warning() } else { d }))
        }
        _ if read.template.is_none() => None,
        ("event", Some(f)) if !EVENT_FIELDS.contains(&f) => {
            let hint = did_you_mean(f, EVENT_FIELDS.iter().copied())
                .map(|s| format!("did you mean `event.{s}`?"))
                .unwrap_or_else(|| {
                    format!(
                        "an event has {}; its payload is under `event.data`",
                        quote_list(EVENT_FIELDS)
                    )
                });
            Some(related(
                diagnostic(
                    input,
                    Code::TemplateReference,
                    &read.place,
                    format!("`{name}` in {used}: `event` has no field `{f}`"),
                )
                .with_help(hint),
            ))
        }
        ("flow", Some(f)) if !FLOW_FIELDS.contains(&f) => Some(related(
            diagnostic(
                input,
                Code::TemplateReference,
                &read.place,
                format!("`{name}` in {used}: `flow` has no field `{f}`"),
            )
            .with_help(format!("`flow` has {}", quote_list(FLOW_FIELDS))),
        )),
        ("now", Some(_)) => Some(related(
            diagnostic(
                input,
                Code::TemplateReference,
                &read.place,
                format!("`{name}` in {used}: `now` is the time as text and has no fields"),
            )
            .with_help("write `{{ now }}`; compute dates in a `wait: { until }` or a branch"),
        )),
        _ => None,
    }
}

/// Everything `raw` (compiled as `step`) reads: its expressions, the template files it
/// sends (and the files they include), its inline templates.
fn reads(input: &Input<'_>, raw: &RawStep, step: &Step) -> Vec<Read> {
    let mut out = Vec::new();
    let mut exprs: Vec<(&Spanned<String>, bool)> = Vec::new();
    if let Some(arms) = &raw.branch {
        exprs.extend(
            arms.value
                .iter()
                .filter_map(|a| a.value.when.as_ref())
                .map(|w| (w, false)),
        );
    }
    if let Some(w) = &raw.wait {
        exprs.extend(w.value.until.iter().map(|u| (u, false)));
        exprs.extend(w.value.where_.iter().map(|u| (u, true)));
    }
    if let Some(t) = &raw.task {
        exprs.push((&t.value.assign, false));
    }
    for (e, own_event) in exprs {
        let reads = expr::reads(&e.value);
        // `has(vars.coupon) && vars.coupon.amount > 10`: the test guards the whole
        // expression's uses of `vars.coupon`, as `is defined` does in a template.
        let guards: Vec<&[String]> = reads
            .iter()
            .filter(|r| r.guarded && r.path.len() >= 2)
            .map(|r| &r.path[..2])
            .collect();
        for r in &reads {
            out.push(Read {
                path: r.path.clone(),
                place: Place::Flow(crate::compile::inner_span(input.source, e, r.offset)),
                guarded: r.guarded || guards.iter().any(|g| r.path.starts_with(g)),
                template: None,
                own_event,
            });
        }
    }
    if let StepKind::Send {
        files, template, ..
    } = &step.kind
    {
        let mut seen = BTreeSet::new();
        for file in files.values().flatten() {
            let Some(t) = input.templates.get(file) else {
                continue;
            };
            let sources = std::iter::once((file.as_str(), &t.source))
                .chain(t.includes.iter().map(|(name, src)| (name.as_str(), src)));
            for (name, src) in sources {
                if !seen.insert(name.to_owned()) {
                    continue;
                }
                let path = input.templates_root.join(name);
                out.extend(template::reads(src).into_iter().map(|r| Read {
                    path: r.path,
                    place: Place::Template(path.clone(), r.at),
                    guarded: r.guarded,
                    template: Some(template.clone()),
                    own_event: false,
                }));
            }
        }
    }
    let mut inline: Vec<(&str, Span)> = Vec::new();
    if let Some(c) = &raw.call
        && let Some(body) = &c.value.body
    {
        strings(&body.value, &mut |s| inline.push((s, body.span)));
    }
    if let Some(t) = &raw.task {
        inline.push((&t.value.text.value, t.value.text.span));
    }
    for (text, span) in inline {
        out.extend(template::reads(text).into_iter().map(|r| Read {
            path: r.path,
            place: Place::Flow(span),
            guarded: r.guarded,
            template: Some(INLINE.to_owned()),
            own_event: false,
        }));
    }
    out
}

/// Every string inside a JSON value.
fn strings<'v>(value: &'v serde_json::Value, f: &mut impl FnMut(&'v str)) {
    match value {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, f)),
        serde_json::Value::Object(map) => map.values().for_each(|v| strings(v, f)),
        _ => {}
    }
}
