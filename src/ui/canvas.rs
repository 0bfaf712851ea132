//! A flow's canvas: the compiled DAG drawn as an SVG graph with numbers on its nodes and
//! edges, the trigger, entry, goal and exit rules beside it, a date range and a version
//! selector, pause / resume, and per node the customers waiting there.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use canvas_engine::flow::{CompiledFlow, Edge, Entry, ExitRule, SplitArm, StepKind, Trigger, Wait};
use canvas_engine::model::Priority;
use canvas_engine::store::Store as _;
use serde::{Deserialize, Serialize};

use super::auth::{self, CsrfForm, check_post, require};
use super::layout::{Size, layout};
use super::{UiError, UiResult, check_id, link, render, seg, shown};
use crate::outcomes::{self, Outcomes, Range};
use crate::serve::App;
use crate::serve::actions;
use crate::serve::config::Scope;

/// Customers listed at a node.
const WAITING_LIMIT: usize = 200;

/// The numbers drawn on a canvas: per step (the [outcome counters] of the range, `waiting`
/// now, and `failed` run-time failures), per edge (runs that took it) and per flow.
///
/// [outcome counters]: canvas_engine::stats
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CanvasNumbers {
    pub steps: BTreeMap<String, BTreeMap<String, u64>>,
    /// Runs that took each edge, and their share of the runs that arrived at its source.
    pub edges: BTreeMap<(String, String), (u64, Option<f64>)>,
    pub totals: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
    version: Option<String>,
}

/// A version as asked for: the full hash, or a prefix of at least 8 characters of one the
/// flow has (or had).
fn version_of(asked: Option<&str>, versions: &[String]) -> Result<Option<String>, UiError> {
    match asked.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => versions
            .iter()
            .find(|known| known.as_str() == v || (v.len() >= 8 && known.starts_with(v)))
            .map(|known| Some(known.clone()))
            .ok_or_else(|| {
                UiError::bad(format!(
                    "`version` is `{v}`, which this flow has no record of"
                ))
            }),
    }
}

/// The canvas's numbers from the outcome counters and the run-time failures.
fn fill_numbers(o: &Outcomes, failures: &[canvas_engine::state::FailureCount]) -> CanvasNumbers {
    let mut numbers = CanvasNumbers {
        totals: o.totals.clone(),
        ..CanvasNumbers::default()
    };
    for s in &o.steps {
        numbers.steps.insert(s.step.clone(), s.counts.clone());
    }
    for e in &o.edges {
        numbers
            .edges
            .insert((e.from.clone(), e.to.clone()), (e.n, e.share));
    }
    for f in failures {
        numbers
            .steps
            .entry(f.step.clone())
            .or_default()
            .insert("failed runs".to_owned(), f.count);
    }
    numbers
}

/// A step's counters as a few short lines for its box: arrivals and waiting, sends per
/// channel, what held sends back, failures, conversions.
fn stat_lines(m: &BTreeMap<String, u64>) -> Vec<String> {
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    let by = |prefix: &str| -> Vec<String> {
        m.iter()
            .filter_map(|(k, n)| {
                let q = k.strip_prefix(prefix)?.strip_prefix(':')?;
                (*n > 0).then(|| format!("{q} {n}"))
            })
            .collect()
    };
    let mut lines = Vec::new();
    let mut first = vec![format!("in {}", get("entered"))];
    if get("waiting") > 0 {
        first.push(format!("waiting {}", get("waiting")));
    }
    if get("converted") > 0 {
        first.push(format!("converted {}", get("converted")));
    }
    lines.push(first.join(" · "));
    for (what, label) in [
        ("sent", "sent"),
        ("skipped", "skipped"),
        ("delayed", "delayed"),
    ] {
        if get(what) > 0 {
            lines.push(clip(&format!(
                "{label} {} ({})",
                get(what),
                by(what).join(", ")
            )));
        }
    }
    let mut bad = Vec::new();
    for (what, label) in [
        ("failed", "failed"),
        ("fell_back", "fell back"),
        ("error", "errors"),
        ("timeout", "timed out"),
        ("exited", "exited"),
    ] {
        if get(what) > 0 {
            bad.push(format!("{label} {}", get(what)));
        }
    }
    if !bad.is_empty() {
        lines.push(clip(&bad.join(" · ")));
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// The drawing's view model

#[derive(Debug, Serialize)]
struct NodeView {
    id: String,
    href: minijinja::Value,
    kind: &'static str,
    title: String,
    /// Lines under the title: what the step does (template, channels, wait…).
    lines: Vec<String>,
    transactional: bool,
    /// The counters in a few lines, and all of them for the tooltip.
    numbers: Vec<String>,
    tooltip: String,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    /// Text baselines, one per line after the title.
    rows: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct EdgeView {
    /// The step ids it joins (`data-from`, `data-to` in the SVG).
    from: String,
    to: String,
    points: String,
    label: String,
    /// Share of the customers who left the source and took this edge, when counted.
    share: Option<String>,
    lx: f64,
    ly: f64,
    /// `start`, or `end` for an edge that leaves its source to the left (so the labels of
    /// a branch's arms run away from each other instead of across).
    anchor: &'static str,
}

const NODE_W: f64 = 240.0;
const LINE_H: f64 = 16.0;
/// What fits on a line of a node, in widths of a Latin letter of the 12 px text (a CJK
/// character is two); a title is bold and larger.
const MAX_CHARS: usize = 31;
const MAX_TITLE: usize = 27;

fn clip(s: &str) -> String {
    clip_to(s, MAX_CHARS)
}

/// `s`, cut with `…` to at most `max` widths (a wide character counts two).
fn clip_to(s: &str, max: usize) -> String {
    let width = |c: char| if is_wide(c) { 2 } else { 1 };
    if s.chars().map(width).sum::<usize>() <= max {
        return s.to_owned();
    }
    let mut t = String::new();
    let mut used = 1; // the `…`
    for c in s.chars() {
        used += width(c);
        if used > max {
            break;
        }
        t.push(c);
    }
    t.push('…');
    t
}

/// CJK ideographs, kana, hangul and full-width forms: about twice a Latin letter's width.
fn is_wide(c: char) -> bool {
    matches!(u32::from(c),
        0x1100..=0x115F | 0x2E80..=0x303E | 0x3041..=0x33FF | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF | 0xA000..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F | 0xFF00..=0xFF60 | 0xFFE0..=0xFFE6 | 0x20000..=0x3FFFD)
}

/// A step's kind and what it does, in a few lines.
fn describe(kind: &StepKind) -> (&'static str, Vec<String>, bool) {
    match kind {
        StepKind::Send {
            channels,
            template,
            priority,
            ..
        } => (
            "send",
            vec![
                format!("template {template}"),
                format!("via {}", channels.join(" → ")),
            ],
            *priority == Priority::Transactional,
        ),
        StepKind::Wait { wait, .. } => {
            let what = match wait {
                Wait::For(d) => format!("for {d}"),
                Wait::Until(e) => format!("until {}", e.source()),
                Wait::Event { name, timeout, .. } => format!("for {name}, up to {timeout}"),
                Wait::Window { .. } => "for the send window".to_owned(),
            };
            ("wait", vec![what], false)
        }
        StepKind::Branch { arms, .. } => (
            "branch",
            vec![match arms.len() {
                1 => "1 condition".to_owned(),
                n => format!("{n} conditions"),
            }],
            false,
        ),
        StepKind::Split { arms } => {
            let control = arms
                .iter()
                .find(|(a, _)| *a == SplitArm::Control)
                .map(|(_, s)| format!(", control {s}%"))
                .unwrap_or_default();
            (
                "split",
                vec![format!("{} arms{control}", arms.len())],
                false,
            )
        }
        StepKind::Update { .. } => ("update", vec!["profile update".to_owned()], false),
        StepKind::Call {
            webhook, save_as, ..
        } => ("call", vec![format!("{webhook} → vars.{save_as}")], false),
        StepKind::Task { due, .. } => ("task", vec![format!("due in {due}")], false),
        StepKind::Exit { outcome } => ("exit", vec![format!("outcome {outcome}")], false),
        StepKind::Plugin { kind, .. } => ("plugin", vec![format!("use {kind}")], false),
    }
}

fn edge_label(e: &Edge) -> String {
    match e {
        Edge::Next => String::new(),
        other => clip(&other.to_string()),
    }
}

/// Nodes and edges of `flow`, laid out, with `numbers` on them.
fn drawing(
    flow: &CompiledFlow,
    numbers: &CanvasNumbers,
) -> (Vec<NodeView>, Vec<EdgeView>, f64, f64) {
    let ids: Vec<_> = flow.graph.node_indices().collect();
    let position: BTreeMap<_, usize> = ids.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut nodes: Vec<NodeView> = ids
        .iter()
        .map(|&n| {
            let step = &flow.graph[n];
            let (kind, lines, transactional) = describe(&step.kind);
            let mut lines: Vec<String> = lines.iter().map(|l| clip(l)).collect();
            if step.name.is_some() {
                lines.insert(0, clip(&format!("id {}", step.id)));
            }
            let counts = numbers.steps.get(&step.id).cloned().unwrap_or_default();
            let tooltip = counts
                .iter()
                .filter(|(k, _)| !k.starts_with("to:"))
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let numbers = stat_lines(&counts);
            NodeView {
                id: step.id.clone(),
                href: link(format!(
                    "/ui/flows/{}/steps/{}",
                    seg(&flow.id),
                    seg(&step.id)
                )),
                kind,
                title: clip_to(step.name.as_deref().unwrap_or(&step.id), MAX_TITLE),
                lines,
                transactional,
                numbers,
                tooltip,
                x: 0.0,
                y: 0.0,
                w: NODE_W,
                h: 0.0,
                rows: Vec::new(),
            }
        })
        .collect();
    for v in &mut nodes {
        // Kind + title, the lines, the numbers.
        let count = 2 + v.lines.len() + v.numbers.len();
        v.h = 12.0 + LINE_H * count as f64;
    }
    let sizes: Vec<Size> = nodes.iter().map(|v| Size { w: v.w, h: v.h }).collect();
    let links: Vec<_> = flow
        .graph
        .edge_indices()
        .filter_map(|e| {
            let (a, b) = flow.graph.edge_endpoints(e)?;
            Some((a, b, &flow.graph[e]))
        })
        .collect();
    let pairs: Vec<(usize, usize)> = links
        .iter()
        .map(|(a, b, _)| (position[a], position[b]))
        .collect();
    let placed = layout(&sizes, &pairs);
    for (v, r) in nodes.iter_mut().zip(&placed.nodes) {
        v.x = r.x;
        v.y = r.y;
        v.rows = (0..2 + v.lines.len() + v.numbers.len())
            .map(|i| r.y + 18.0 + LINE_H * i as f64)
            .collect();
    }
    let edges = links
        .iter()
        .zip(&placed.edges)
        .map(|((a, b, weight), points)| {
            let from = &flow.graph[*a].id;
            let to = &flow.graph[*b].id;
            let share =
                numbers
                    .edges
                    .get(&(from.clone(), to.clone()))
                    .map(|(n, share)| match share {
                        Some(p) => format!("{n} ({:.0}%)", 100.0 * p),
                        None => n.to_string(),
                    });
            let (lx, ly, anchor) = match points.as_slice() {
                [a, b, ..] if b.0 < a.0 - 1.0 => {
                    ((a.0 + b.0) / 2.0 - 4.0, (a.1 + b.1) / 2.0, "end")
                }
                [a, b, ..] => ((a.0 + b.0) / 2.0 + 4.0, (a.1 + b.1) / 2.0, "start"),
                _ => (0.0, 0.0, "start"),
            };
            EdgeView {
                from: from.clone(),
                to: to.clone(),
                points: points
                    .iter()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                label: edge_label(weight),
                share,
                lx,
                ly,
                anchor,
            }
        })
        .collect();
    (nodes, edges, placed.width.max(NODE_W + 40.0), placed.height)
}

/// The trigger, entry, goal and exit rules, in words.
fn rules(flow: &CompiledFlow) -> Vec<(&'static str, String)> {
    let mut r = Vec::new();
    r.push((
        "trigger",
        match &flow.trigger {
            Trigger::Event { name, condition } => match condition {
                Some(c) => format!("event {name} where {}", c.source()),
                None => format!("event {name}"),
            },
            Trigger::Schedule { cron, audience } => match audience {
                Some(a) => format!(
                    "schedule {} ({}), audience {}",
                    cron.source,
                    flow.timezone,
                    a.source()
                ),
                None => format!("schedule {} ({})", cron.source, flow.timezone),
            },
            Trigger::Segment { condition, recheck } => {
                format!("segment {}, rechecked every {recheck}", condition.source())
            }
        },
    ));
    r.push((
        "entry",
        match flow.entry {
            Entry::OneActive => "one active run per customer".to_owned(),
            Entry::Once => "once per customer".to_owned(),
            Entry::ReenterAfter(d) => format!("again {d} after the previous entry"),
        },
    ));
    if let Some(g) = &flow.goal {
        let mut text = format!("{} within {}", g.event, g.within);
        if let Some(c) = &g.condition {
            text.push_str(&format!(" where {}", c.source()));
        }
        if g.exit {
            text.push_str("; the run ends when it is reached");
        }
        r.push(("goal", text));
    }
    for e in &flow.exits {
        r.push((
            "exit",
            match e {
                ExitRule::Event { name, condition } => match condition {
                    Some(c) => format!("on event {name} where {}", c.source()),
                    None => format!("on event {name}"),
                },
                ExitRule::When(c) => format!("when {}", c.source()),
            },
        ));
    }
    r
}

/// A split arm as the canvas lists it.
#[derive(Debug, Serialize)]
struct ArmView {
    arm: String,
    share: String,
    entered: u64,
    converted: u64,
    rate: String,
    /// Against the split's control arm: the difference in points with its 95% interval.
    lift: Option<String>,
}

fn arm_views(split: &canvas_engine::stats::SplitStats) -> Vec<ArmView> {
    split
        .arms
        .iter()
        .map(|a| ArmView {
            arm: a.arm.clone(),
            share: format!("{}%", a.share),
            entered: a.entered,
            converted: a.converted,
            rate: if a.entered == 0 {
                "–".to_owned()
            } else {
                format!("{:.1}%", 100.0 * a.converted as f64 / a.entered as f64)
            },
            lift: a.lift.map(|l| {
                format!(
                    "{:+.1} points (95% CI {:+.1} to {:+.1})",
                    100.0 * l.difference,
                    100.0 * l.low,
                    100.0 * l.high
                )
            }),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn page(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<WindowQuery>, QueryRejection>,
) -> UiResult {
    let session = match require(&app, &headers, &format!("/ui/flows/{}", seg(&id))) {
        Ok(s) => s,
        Err(to_login) => return Ok(to_login.into_response()),
    };
    check_id("flow id", &id)?;
    let Query(q) = query.map_err(|e| UiError::bad(e.body_text()))?;
    let engine = app.engine();
    let Some(current) = engine.flows.get(&id).cloned() else {
        return Err(UiError::not_found(format!("no flow `{id}` is loaded")));
    };
    let versions: Vec<_> = app.db.flow_versions(Some(&id)).await?;
    let hashes: Vec<String> = versions.iter().map(|v| v.version.clone()).collect();
    let version = version_of(q.version.as_deref(), &hashes)?;
    let tz = engine.policy.timezone;
    let today = outcomes::today(app.clock.now(), tz);
    let range = Range::parse(q.from.as_deref(), q.to.as_deref(), today).map_err(UiError::bad)?;
    // The selected version's graph when this daemon still knows it; else the current one.
    let flow = version
        .as_deref()
        .and_then(|v| engine.flows.version(v).cloned())
        .unwrap_or_else(|| current.clone());
    let o = outcomes::read(&app.db, &id, Some(&flow), range, version.as_deref(), tz).await?;
    let failures = app.db.failure_counts(Some(&id)).await?;
    let numbers = fill_numbers(&o, &failures);
    let (nodes, edges, width, height) = drawing(&flow, &numbers);
    let splits: Vec<_> = o
        .splits
        .iter()
        .map(|s| minijinja::context! { step => s.step, arms => arm_views(s) })
        .collect();
    let entered = o.totals.get("entered").copied().unwrap_or(0);
    let control = o.totals.get("ended:control").copied().unwrap_or(0);
    let zone = flow.timezone;
    let version_views: Vec<_> = versions
        .iter()
        .map(|v| {
            minijinja::context! {
                hash => v.version,
                short => v.version.get(..12).unwrap_or(&v.version),
                created => shown(v.created_at, zone),
                current => v.version == current.hash.0,
                selected => version.as_deref() == Some(v.version.as_str()),
                waiting => o.versions.iter().find(|x| x.version == v.version).map_or(0, |x| x.waiting),
            }
        })
        .collect();
    render(
        "canvas.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => format!("{} — canvas", current.name),
            flow => minijinja::context! {
                id => current.id,
                name => current.name,
                description => current.description,
                version => current.hash.short(),
                paused => engine.paused.contains(&id),
                shown_version => flow.hash.short(),
                selected => version.is_some(),
                href => link(format!("/ui/flows/{}", seg(&current.id))),
            },
            rules => rules(&flow),
            totals => numbers.totals.iter().filter(|(k, _)| !k.starts_with("to:")).collect::<Vec<_>>(),
            holdout => minijinja::context! {
                treated => entered.saturating_sub(control),
                control => control,
                converted_treated => o.totals.get("converted:treated").copied().unwrap_or(0),
                converted_control => o.totals.get("converted:control").copied().unwrap_or(0),
            },
            splits => splits,
            versions => version_views,
            from => range.from.to_string(),
            to => range.to.to_string(),
            zone => tz.name(),
            nodes => nodes,
            edges => edges,
            width => width,
            height => height,
        },
    )
}

pub(crate) async fn pause(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> UiResult {
    set_paused(app, id, headers, form, true).await
}

pub(crate) async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> UiResult {
    set_paused(app, id, headers, form, false).await
}

async fn set_paused(
    app: Arc<App>,
    id: String,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
    paused: bool,
) -> UiResult {
    let csrf = form.ok().and_then(|Form(f)| f.csrf);
    check_post(&app, &headers, csrf.as_deref(), Scope::Write)?;
    check_id("flow id", &id)?;
    actions::set_paused(&app, &id, paused).await?;
    tracing::info!(flow = %id, paused, "flow paused or resumed from the web UI");
    Ok(Redirect::to(&format!("/ui/flows/{}", seg(&id))).into_response())
}

/// The customers waiting at a step now, longest waiting first.
pub(crate) async fn waiting(
    State(app): State<Arc<App>>,
    Path((id, step)): Path<(String, String)>,
    headers: HeaderMap,
) -> UiResult {
    let here = format!("/ui/flows/{}/steps/{}", seg(&id), seg(&step));
    let session = match auth::require(&app, &headers, &here) {
        Ok(s) => s,
        Err(to_login) => return Ok(to_login.into_response()),
    };
    check_id("flow id", &id)?;
    check_id("step id", &step)?;
    let engine = app.engine();
    let Some(flow) = engine.flows.get(&id).cloned() else {
        return Err(UiError::not_found(format!("no flow `{id}` is loaded")));
    };
    if flow.step(&step).is_none() {
        return Err(UiError::not_found(format!(
            "flow `{id}` has no step `{step}`"
        )));
    }
    let runs = app.db.waiting_at(&id, &step, WAITING_LIMIT).await?;
    let zone = flow.timezone;
    let rows: Vec<_> = runs
        .iter()
        .map(|r| {
            minijinja::context! {
                customer => r.customer_id,
                href => link(format!("/ui/customers/{}", seg(&r.customer_id))),
                run => r.id,
                version => r.version.get(..12).unwrap_or(&r.version),
                entered => shown(r.entered_at, zone),
                wake => r.wake_at.map(|t| shown(t, zone)),
                waiting_for => r.waiting_for,
            }
        })
        .collect();
    render(
        "waiting.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => format!("Waiting at {step}"),
            flow => minijinja::context! { id => flow.id, name => flow.name, href => link(format!("/ui/flows/{}", seg(&flow.id))) },
            step => step,
            limit => WAITING_LIMIT,
            full => rows.len() == WAITING_LIMIT,
            rows => rows,
            zone => zone.name(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked() {
        let versions = vec!["abcdef0123456789".to_owned()];
        assert_eq!(
            version_of(Some("abcdef01"), &versions).expect("a prefix of 8"),
            Some("abcdef0123456789".to_owned())
        );
        assert_eq!(version_of(Some(""), &versions).expect("empty is all"), None);
        assert!(
            version_of(Some("abc"), &versions).is_err(),
            "too short a prefix"
        );
        assert!(version_of(Some("nope"), &versions).is_err());
    }

    #[test]
    fn long_lines_are_cut_to_the_box_wide_characters_counting_two() {
        assert_eq!(clip_to("short", 10), "short");
        assert_eq!(clip_to("0123456789", 10), "0123456789");
        assert_eq!(clip_to("0123456789a", 10), "012345678…");
        assert_eq!(clip_to("新会员欢迎礼券两张", 10), "新会员欢…");
        assert_eq!(clip_to("新会员欢迎", 10), "新会员欢迎");
    }

    #[test]
    fn boxes_show_the_counters_in_a_few_lines() {
        let m: BTreeMap<String, u64> = [
            ("entered", 120),
            ("waiting", 4),
            ("sent", 100),
            ("sent:wechat", 80),
            ("sent:sms", 20),
            ("skipped", 20),
            ("skipped:cap", 20),
            ("to:next", 116),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(
            stat_lines(&m),
            vec![
                "in 120 · waiting 4".to_owned(),
                "sent 100 (sms 20, wechat 80)".to_owned(),
                "skipped 20 (cap 20)".to_owned(),
            ]
        );
        assert_eq!(stat_lines(&BTreeMap::new()), vec!["in 0".to_owned()]);
    }
}
