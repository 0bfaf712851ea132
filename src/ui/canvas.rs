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
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::auth::{self, CsrfForm, check_post, require};
use super::layout::{Size, layout};
use super::{UiError, UiResult, check_id, link, render, seg, shown};
use crate::serve::App;
use crate::serve::actions;
use crate::serve::config::Scope;

/// The longest date range a page may ask for.
const MAX_DAYS: i64 = 366;
/// Customers listed at a node.
const WAITING_LIMIT: usize = 200;

/// The numbers drawn on a canvas: per step (`waiting`, `failed`, and the counters of
/// `Store::flow_stats` once they exist: `entered`, `sent:sms`, `skipped:cap`…), per edge
/// (customers who took it), and per flow (`entered`, `completed`, `converted`…).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CanvasNumbers {
    pub steps: BTreeMap<String, BTreeMap<String, u64>>,
    pub edges: BTreeMap<(String, String), u64>,
    pub totals: BTreeMap<String, u64>,
}

/// What the canvas's numbers are asked for: a date range (days, inclusive, UTC) and a
/// version (`None`: every version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
    version: Option<String>,
}

/// The query, checked: dates are `YYYY-MM-DD`, `from` ≤ `to`, at most [`MAX_DAYS`] apart,
/// and the version one the flow has (or had).
fn window(q: WindowQuery, versions: &[String]) -> Result<Window, UiError> {
    let date = |what: &str, v: Option<String>| -> Result<Option<NaiveDate>, UiError> {
        match v.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| {
                    UiError::bad(format!(
                        "`{what}` is `{text}`; give a date as YYYY-MM-DD, such as 2026-03-14"
                    ))
                }),
        }
    };
    let from = date("from", q.from)?;
    let to = date("to", q.to)?;
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            return Err(UiError::bad(format!("`from` ({f}) is after `to` ({t})")));
        }
        if (t - f).num_days() >= MAX_DAYS {
            return Err(UiError::bad(format!(
                "the range {f} to {t} is longer than {MAX_DAYS} days"
            )));
        }
    }
    let version = match q.version.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => {
            let found = versions
                .iter()
                .find(|known| known.as_str() == v || (v.len() >= 8 && known.starts_with(v)));
            match found {
                Some(known) => Some(known.clone()),
                None => {
                    return Err(UiError::bad(format!(
                        "`version` is `{v}`, which this flow has no record of"
                    )));
                }
            }
        }
    };
    Ok(Window { from, to, version })
}

/// Fill the canvas's numbers from the store. Today: runs waiting at each step now, failures
/// per step, and the flow's totals — all time and all versions, whatever the window says.
/// The per-day, per-version counters (`Store::flow_stats`) are to be read here.
async fn fill_numbers(
    app: &App,
    flow: &CompiledFlow,
    _window: &Window,
) -> canvas_engine::store::Result<CanvasNumbers> {
    let mut numbers = CanvasNumbers::default();
    for w in app.db.node_counts(Some(&flow.id)).await? {
        numbers
            .steps
            .entry(w.step)
            .or_default()
            .insert("waiting".to_owned(), w.waiting);
    }
    for f in app.db.failure_counts(Some(&flow.id)).await? {
        numbers
            .steps
            .entry(f.step)
            .or_default()
            .insert("failed".to_owned(), f.count);
    }
    if let Some(c) = app.db.flow_counts(Some(&flow.id)).await?.first() {
        for (k, v) in [
            ("entered", c.entered),
            ("waiting", c.waiting),
            ("completed", c.completed),
            ("exited", c.exited),
            ("errored", c.errored),
            ("converted", c.converted),
        ] {
            numbers.totals.insert(k.to_owned(), v);
        }
    }
    Ok(numbers)
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
    numbers: Vec<(String, u64)>,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    /// Text baselines, one per line after the title.
    rows: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct EdgeView {
    points: String,
    label: String,
    /// Share of the customers who left the source and took this edge, when counted.
    share: Option<String>,
    lx: f64,
    ly: f64,
}

const NODE_W: f64 = 240.0;
const LINE_H: f64 = 16.0;
const MAX_CHARS: usize = 34;

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_CHARS {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX_CHARS - 1).collect();
        t.push('…');
        t
    }
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
        StepKind::Branch { arms, .. } => {
            ("branch", vec![format!("{} conditions", arms.len())], false)
        }
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
            let numbers: Vec<(String, u64)> = numbers
                .steps
                .get(&step.id)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default();
            NodeView {
                id: step.id.clone(),
                href: link(format!(
                    "/ui/flows/{}/steps/{}",
                    seg(&flow.id),
                    seg(&step.id)
                )),
                kind,
                title: clip(step.name.as_deref().unwrap_or(&step.id)),
                lines,
                transactional,
                numbers,
                x: 0.0,
                y: 0.0,
                w: NODE_W,
                h: 0.0,
                rows: Vec::new(),
            }
        })
        .collect();
    for v in &mut nodes {
        // Kind + title, the lines, one line of numbers.
        let count = 2 + v.lines.len() + 1;
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
        v.rows = (0..2 + v.lines.len() + 1)
            .map(|i| r.y + 18.0 + LINE_H * i as f64)
            .collect();
    }
    // How many left each step along each edge, when counted.
    let mut out_of: BTreeMap<&str, u64> = BTreeMap::new();
    for ((from, _), n) in &numbers.edges {
        *out_of.entry(from.as_str()).or_default() += n;
    }
    let edges = links
        .iter()
        .zip(&placed.edges)
        .map(|((a, b, weight), points)| {
            let from = &flow.graph[*a].id;
            let to = &flow.graph[*b].id;
            let share = numbers
                .edges
                .get(&(from.clone(), to.clone()))
                .zip(out_of.get(from.as_str()))
                .map(|(n, all)| {
                    let pct = if *all == 0 {
                        0.0
                    } else {
                        100.0 * *n as f64 / *all as f64
                    };
                    format!("{n} ({pct:.0}%)")
                });
            let (lx, ly) = match points.as_slice() {
                [a, b, ..] => ((a.0 + b.0) / 2.0 + 4.0, (a.1 + b.1) / 2.0),
                _ => (0.0, 0.0),
            };
            EdgeView {
                points: points
                    .iter()
                    .map(|(x, y)| format!("{x:.1},{y:.1}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                label: edge_label(weight),
                share,
                lx,
                ly,
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

/// Conversion per arm, and the treated arm's lift over control with a 95% confidence
/// interval (normal approximation of the difference of two proportions).
#[derive(Debug, Serialize)]
struct ArmView {
    arm: String,
    runs: u64,
    converted: u64,
    rate: String,
}

fn lift(arms: &[canvas_engine::store::ArmCount]) -> Option<String> {
    use canvas_engine::state::Arm;
    let find = |arm: Arm| arms.iter().find(|a| a.arm == arm);
    let (t, c) = (find(Arm::Treated)?, find(Arm::Control)?);
    if t.runs == 0 || c.runs == 0 {
        return None;
    }
    let (pt, pc) = (t.rate(), c.rate());
    let se = (pt * (1.0 - pt) / t.runs as f64 + pc * (1.0 - pc) / c.runs as f64).sqrt();
    let d = pt - pc;
    Some(format!(
        "lift {:+.1} points (95% CI {:+.1} to {:+.1})",
        100.0 * d,
        100.0 * (d - 1.96 * se),
        100.0 * (d + 1.96 * se)
    ))
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
    let window = window(q, &hashes)?;
    // The selected version's graph when this daemon still knows it; else the current one.
    let flow = window
        .version
        .as_deref()
        .and_then(|v| engine.flows.version(v).cloned())
        .unwrap_or_else(|| current.clone());
    let numbers = fill_numbers(&app, &flow, &window).await?;
    let (nodes, edges, width, height) = drawing(&flow, &numbers);
    let arms = app.db.goal_report(Some(&id)).await?;
    let arm_views: Vec<ArmView> = arms
        .iter()
        .map(|a| ArmView {
            arm: match a.arm {
                canvas_engine::state::Arm::Treated => "treated".to_owned(),
                canvas_engine::state::Arm::Control => "control (holdout)".to_owned(),
            },
            runs: a.runs,
            converted: a.converted,
            rate: format!("{:.1}%", 100.0 * a.rate()),
        })
        .collect();
    let zone = flow.timezone;
    let version_views: Vec<_> = versions
        .iter()
        .map(|v| {
            minijinja::context! {
                hash => v.version,
                short => v.version.get(..12).unwrap_or(&v.version),
                created => shown(v.created_at, zone),
                current => v.version == current.hash.0,
                selected => window.version.as_deref() == Some(v.version.as_str()),
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
                href => link(format!("/ui/flows/{}", seg(&current.id))),
            },
            rules => rules(&flow),
            totals => numbers.totals.iter().collect::<Vec<_>>(),
            arms => arm_views,
            lift => lift(&arms),
            versions => version_views,
            from => window.from.map(|d| d.to_string()),
            to => window.to.map(|d| d.to_string()),
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

    fn q(from: &str, to: &str, version: &str) -> WindowQuery {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        WindowQuery {
            from: opt(from),
            to: opt(to),
            version: opt(version),
        }
    }

    #[test]
    fn windows_are_checked() {
        let versions = vec!["abcdef0123456789".to_owned()];
        let w = window(q("2026-03-01", "2026-03-14", "abcdef01"), &versions).expect("valid");
        assert_eq!(w.from, NaiveDate::from_ymd_opt(2026, 3, 1));
        assert_eq!(w.version.as_deref(), Some("abcdef0123456789"));
        assert_eq!(
            window(q("", "", ""), &versions)
                .expect("empty is all")
                .version,
            None
        );
        for (from, to, version) in [
            ("2026-13-01", "", ""),
            ("yesterday", "", ""),
            ("2026-03-14", "2026-03-01", ""),
            ("2024-01-01", "2026-01-01", ""),
            ("", "", "nope"),
            ("", "", "abc"),
        ] {
            assert!(
                window(q(from, to, version), &versions).is_err(),
                "{from} {to} {version}"
            );
        }
    }

    #[test]
    fn lift_needs_both_arms() {
        use canvas_engine::state::Arm;
        use canvas_engine::store::ArmCount;
        let arm = |arm, runs, converted| ArmCount {
            flow: "f".into(),
            arm,
            runs,
            converted,
        };
        assert_eq!(lift(&[arm(Arm::Treated, 100, 10)]), None);
        let text = lift(&[arm(Arm::Treated, 100, 20), arm(Arm::Control, 100, 10)]).expect("lift");
        assert!(text.starts_with("lift +10.0 points"), "{text}");
    }
}
