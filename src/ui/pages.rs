//! The list pages: flows, a customer's story, dead letters (with retry), the sandbox inbox.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use canvas_engine::state::{DeadLetterFilter, DeliveryState, OutboxRow, RunStatus, SandboxFilter};
use canvas_engine::store::{Store as _, redact};
use canvas_engine::testing::ShowIn;
use serde::Deserialize;

use super::auth::{check_post, require};
use super::{UiError, UiResult, check_id, link, render, seg, shown};
use crate::explain::Story;
use crate::outcomes::{self, Range};
use crate::serve::App;
use crate::serve::actions;
use crate::serve::config::Scope;

/// Dead letters read to count them per flow on the flows page (more show as "≥ N").
const DEAD_COUNT_LIMIT: usize = 1000;
/// Rows of the dead-letter and sandbox pages.
const LIST_LIMIT: usize = 200;

macro_rules! session_or_login {
    ($app:expr, $headers:expr, $here:expr) => {
        match require($app, $headers, $here) {
            Ok(s) => s,
            Err(to_login) => return Ok(to_login.into_response()),
        }
    };
}

/// `/ui/flows`: every loaded flow, and the flows with runs that are no longer loaded.
pub(crate) async fn flows(State(app): State<Arc<App>>, headers: HeaderMap) -> UiResult {
    let session = session_or_login!(&app, &headers, "/ui/flows");
    let engine = app.engine();
    let failures = app.db.failure_counts(None).await?;
    let dead = app
        .db
        .dead_letters(&DeadLetterFilter {
            limit: DEAD_COUNT_LIMIT,
            ..DeadLetterFilter::default()
        })
        .await?;
    let dead_capped = dead.len() == DEAD_COUNT_LIMIT;
    let mut dead_by_flow: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &dead {
        *dead_by_flow.entry(d.row.flow.as_str()).or_default() += 1;
    }
    let mut failed_by_flow: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &failures {
        *failed_by_flow.entry(f.flow.as_str()).or_default() += f.count;
    }
    // Every flow the database has a version of: the loaded ones, then the removed ones.
    let tz = engine.policy.timezone;
    let today = outcomes::today(app.clock.now(), tz);
    let week = Range::last(outcomes::DEFAULT_DAYS, today);
    let mut ids: Vec<(String, Option<Arc<canvas_engine::flow::CompiledFlow>>)> = engine
        .flows
        .current()
        .map(|f| (f.id.clone(), Some(f.clone())))
        .collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    let known: BTreeSet<String> = app
        .db
        .flow_versions(None)
        .await?
        .into_iter()
        .map(|v| v.flow)
        .collect();
    for id in known {
        if !ids.iter().any(|(f, _)| *f == id) {
            ids.push((id, None));
        }
    }
    let mut rows = Vec::new();
    for (id, flow) in &ids {
        let o = outcomes::read(&app.db, id, flow.as_deref(), week, None, tz).await?;
        let total = |k: &str| o.totals.get(k).copied().unwrap_or(0);
        let entered_today = o
            .days
            .iter()
            .find(|d| d.date == Some(today))
            .and_then(|d| d.counts.get("entered").copied())
            .unwrap_or(0);
        let waiting: u64 = o.steps.iter().filter_map(|s| s.counts.get("waiting")).sum();
        let (entered, converted) = (total("entered"), total("converted"));
        rows.push(minijinja::context! {
            id => id,
            name => flow.as_ref().map(|f| f.name.clone()),
            href => flow.as_ref().map(|_| link(format!("/ui/flows/{}", seg(id)))),
            state => match flow {
                None => "removed",
                Some(_) if engine.paused.contains(id) => "paused",
                Some(_) => "live",
            },
            version => flow.as_ref().map(|f| f.hash.short().to_owned()),
            waiting => waiting,
            entered_today => entered_today,
            entered => entered,
            completed => total("ended:completed"),
            converted => converted,
            conversion => if entered > 0 {
                format!("{:.1}%", 100.0 * converted as f64 / entered as f64)
            } else {
                "–".to_owned()
            },
            errored => total("ended:error"),
            failed => failed_by_flow.get(id.as_str()).copied().unwrap_or(0),
            dead => dead_by_flow.get(id.as_str()).copied().unwrap_or(0),
            dead_href => link(format!("/ui/deadletters?flow={}", seg(id))),
        });
    }
    render(
        "flows.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => "Flows",
            rows => rows,
            dead_capped => dead_capped,
            dead_limit => DEAD_COUNT_LIMIT,
            from => week.from.to_string(),
            to => week.to.to_string(),
            zone => tz.name(),
        },
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct FindQuery {
    id: Option<String>,
}

/// The search box: `/ui/customers?id=…` goes to that customer's page.
pub(crate) async fn find_customer(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<FindQuery>, QueryRejection>,
) -> UiResult {
    let _session = session_or_login!(&app, &headers, "/ui/flows");
    let Query(q) = query.map_err(|e| UiError::bad(e.body_text()))?;
    let id = q.id.unwrap_or_default();
    let id = id.trim();
    check_id("customer id", id)?;
    Ok(Redirect::to(&format!("/ui/customers/{}", seg(id))).into_response())
}

/// What a delivery shows: status, attempts, error and the rendered content.
fn delivery_view(d: &DeliveryState, zone: chrono_tz::Tz) -> minijinja::Value {
    let text = |k: &str| {
        d.row
            .payload
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let other = match (text("subject"), text("text"), text("html")) {
        (None, None, None) => serde_json::to_string_pretty(&d.row.payload).ok(),
        _ => None,
    };
    minijinja::context! {
        key => d.row.key,
        kind => d.row.kind.as_str(),
        flow => d.row.flow,
        customer => d.row.customer_id,
        customer_href => link(format!("/ui/customers/{}", seg(&d.row.customer_id))),
        step => d.row.step,
        channel => d.row.channel,
        address => d.row.address,
        template => d.row.template,
        transactional => d.row.transactional,
        status => d.status.as_str(),
        attempts => d.attempts,
        error => d.last_error.as_deref().map(redact),
        created => shown(d.row.created_at, zone),
        sent => d.sent_at.map(|t| shown(t, zone)),
        dead => d.dead_at.map(|t| shown(t, zone)),
        next_attempt => d.next_attempt_at.map(|t| shown(t, zone)),
        subject => text("subject"),
        text => text("text"),
        html => text("html"),
        other => other,
    }
}

/// `/ui/customers/{id}`: every run with its version and outcome, its steps and why in the
/// customer's own time zone, deliveries, vars, failures. The same reads and wording as
/// `canvas explain` (one customer's rows only).
pub(crate) async fn customer(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> UiResult {
    let session = session_or_login!(&app, &headers, &format!("/ui/customers/{}", seg(&id)));
    check_id("customer id", &id)?;
    let Some(story) = Story::read(&app.db, &id, None).await? else {
        return Err(UiError::not_found(format!(
            "no customer `{id}` in the database"
        )));
    };
    let zone = app.settings.policy.customer_zone(story.zone.as_deref());
    let outbox: Vec<OutboxRow> = story.deliveries.iter().map(|d| d.row.clone()).collect();
    let runs: Vec<_> = story
        .runs
        .iter()
        .rev()
        .map(|r| {
            let state = match (&r.status, &r.outcome) {
                (RunStatus::Ended, Some(o)) => format!("ended: {o}"),
                (RunStatus::Ended, None) => "ended".to_owned(),
                (RunStatus::Waiting, _) => match (&r.step, &r.waiting_for) {
                    (Some(s), Some(e)) => format!("waiting at {s} for {e}"),
                    (Some(s), None) => format!("waiting at {s}"),
                    _ => "waiting".to_owned(),
                },
            };
            let steps: Vec<_> = story
                .history
                .iter()
                .filter(|h| h.run_id == r.id)
                .map(|h| {
                    minijinja::context! {
                        at => shown(h.at, zone),
                        step => h.step,
                        action => h.action,
                        why => crate::play::describe(h, &outbox, ShowIn::Zone(zone)),
                    }
                })
                .collect();
            let deliveries: Vec<_> = story
                .deliveries
                .iter()
                .filter(|d| d.row.run_id == r.id)
                .map(|d| delivery_view(d, zone))
                .collect();
            minijinja::context! {
                id => r.id,
                flow => r.flow,
                flow_href => link(format!("/ui/flows/{}", seg(&r.flow))),
                version => r.version.get(..12).unwrap_or(&r.version),
                state => state,
                arm => match r.arm { canvas_engine::state::Arm::Treated => "treated", canvas_engine::state::Arm::Control => "control" },
                entered => shown(r.entered_at, zone),
                wake => r.wake_at.map(|t| shown(t, zone)),
                converted => r.converted_at.map(|t| shown(t, zone)),
                last_touch => r.last_touch,
                vars => (!r.vars.is_empty()).then(|| serde_json::to_string_pretty(&r.vars).unwrap_or_default()),
                steps => steps,
                deliveries => deliveries,
            }
        })
        .collect();
    let failures: Vec<_> = story
        .failures
        .iter()
        .map(|f| {
            minijinja::context! {
                flow => f.flow, step => f.step, count => f.count,
                at => shown(f.at, zone), error => redact(&f.error),
            }
        })
        .collect();
    render(
        "customer.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => format!("Customer {id}"),
            customer => id,
            zone => zone.name(),
            runs => runs,
            failures => failures,
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadQuery {
    flow: Option<String>,
    channel: Option<String>,
    reason: Option<String>,
}

fn nonempty(v: Option<String>, what: &str) -> Result<Option<String>, UiError> {
    match v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) {
        Some(s) => {
            check_id(what, &s)?;
            Ok(Some(s))
        }
        None => Ok(None),
    }
}

/// `/ui/deadletters`: newest first, filtered like `GET /v1/deadletters`, a retry button each.
pub(crate) async fn deadletters(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<DeadQuery>, QueryRejection>,
) -> UiResult {
    let session = session_or_login!(&app, &headers, "/ui/deadletters");
    let Query(q) = query.map_err(|e| UiError::bad(e.body_text()))?;
    let filter = DeadLetterFilter {
        flow: nonempty(q.flow, "flow")?,
        channel: nonempty(q.channel, "channel")?,
        reason: nonempty(q.reason, "reason")?,
        limit: LIST_LIMIT,
    };
    let dead = app.db.dead_letters(&filter).await?;
    let zone = app.settings.policy.customer_zone(None);
    let rows: Vec<_> = dead.iter().map(|d| delivery_view(d, zone)).collect();
    render(
        "deadletters.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => "Dead letters",
            rows => rows,
            full => dead.len() == LIST_LIMIT,
            limit => LIST_LIMIT,
            zone => zone.name(),
            filter => minijinja::context! { flow => filter.flow, channel => filter.channel, reason => filter.reason },
        },
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct RetryForm {
    key: String,
    csrf: Option<String>,
}

/// The retry button: the same action as `POST /v1/deadletters/{key}/retry`.
pub(crate) async fn retry(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<RetryForm>, FormRejection>,
) -> UiResult {
    let Form(form) =
        form.map_err(|e| UiError::bad(format!("the retry form: {}", e.body_text())))?;
    check_post(&app, &headers, form.csrf.as_deref(), Scope::Write)?;
    check_id("key", &form.key)?;
    actions::retry_dead_letter(&app, &form.key).await?;
    Ok(Redirect::to("/ui/deadletters").into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SandboxQuery {
    channel: Option<String>,
    customer_id: Option<String>,
}

/// `/ui/sandbox`: what the sandbox channels delivered, newest first, like a mail catcher.
pub(crate) async fn sandbox(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<SandboxQuery>, QueryRejection>,
) -> UiResult {
    let session = session_or_login!(&app, &headers, "/ui/sandbox");
    let Query(q) = query.map_err(|e| UiError::bad(e.body_text()))?;
    let filter = SandboxFilter {
        channels: app.sandbox_channels.clone(),
        channel: nonempty(q.channel, "channel")?,
        customer_id: nonempty(q.customer_id, "customer id")?,
        limit: LIST_LIMIT,
    };
    let sent = app.db.sandbox_messages(&filter).await?;
    let zone = app.settings.policy.customer_zone(None);
    let rows: Vec<_> = sent.iter().map(|d| delivery_view(d, zone)).collect();
    render(
        "sandbox.html",
        minijinja::context! {
            chrome => session.chrome(),
            title => "Sandbox",
            channels => app.sandbox_channels,
            rows => rows,
            full => sent.len() == LIST_LIMIT,
            limit => LIST_LIMIT,
            zone => zone.name(),
            filter => minijinja::context! { channel => filter.channel, customer_id => filter.customer_id },
        },
    )
}
