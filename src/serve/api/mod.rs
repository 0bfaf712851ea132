//! The HTTP API (see docs/api.md). Every answer is JSON; every failure is a 4xx with
//! `{"error":{"code","message"}}` saying what is wrong — never a 500 for bad input.

mod deadletters;
mod request;
mod sandbox;
mod segment;
mod stats;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use canvas_engine::state::{Event, InboxItem, ProfileUpdate, RunStatus, Time};
use canvas_engine::store::{Store, redact};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::App;
use super::actions;
use super::config::Scope;
use super::metrics::{FailureLabels, Metrics, StatusLabel, WaitingLabels};
use crate::explain::Story;
use request::{ApiError, ApiResult, authorize, parse};
use segment::{segment_batch, segment_identify, segment_track};

/// Longest id (event, customer, message) accepted.
pub const MAX_ID: usize = 256;
/// Longest event name accepted.
pub const MAX_NAME: usize = 128;
/// `/readyz` answers within this, whatever the database does: a probe that hangs is taken
/// for a dead process, and probes time out after a second or so.
const READY_TIMEOUT: Duration = Duration::from_millis(800);

pub fn router(app: Arc<App>) -> Router {
    let max_body = app.settings.max_body;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/events", post(post_events))
        .route("/v1/customers/{id}", put(put_customer))
        .route("/v1/customers/{id}/journeys", get(journeys))
        .route("/v1/flows", get(list_flows))
        .route("/v1/flows/{id}", get(get_flow))
        .route("/v1/flows/{id}/stats", get(stats::get))
        .route("/v1/flows/{id}/pause", post(pause))
        .route("/v1/flows/{id}/resume", post(resume))
        .route("/v1/deadletters", get(deadletters::list))
        .route("/v1/deadletters/{*rest}", post(deadletters::retry))
        .route("/v1/sandbox", get(sandbox::list))
        .route("/v1/batch", post(segment_batch))
        .route("/v1/track", post(segment_track))
        .route("/v1/identify", post(segment_identify))
        // The web UI (docs/ui.md), on the same port and behind the same limits.
        .merge(crate::ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside out: the handler's work is bounded once the body is read whole.
        .layer(from_fn_with_state(app.clone(), request::bound))
        .layer(from_fn_with_state(app.clone(), request::limit_body))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/ui/") {
        return crate::ui::not_found(uri.path());
    }
    ApiError::not_found("no such endpoint; see docs/api.md").into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see docs/api.md",
    )
}

// ---------------------------------------------------------------------------------------------
// Health and metrics

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.stopping.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "stopping" })),
        )
            .into_response();
    }
    // A small table: the probe must stay cheap however large the outbox grows. Within the
    // request bound too, so the probe always answers in its own words.
    let limit = READY_TIMEOUT.min(app.settings.database_timeout);
    let problem = match tokio::time::timeout(limit, app.db.paused_flows()).await {
        Ok(Ok(_)) => return axum::Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {limit:?}"),
    };
    tracing::warn!("readyz: database: {problem}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "status": "database unavailable" })),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    let now = app.clock.now();
    let m = &app.metrics;
    let depth = app.db.outbox_depth(now).await?;
    for (status, n) in [
        ("pending", depth.pending),
        ("due", depth.due),
        ("dead", depth.dead),
    ] {
        m.outbox_depth
            .get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    m.outbox_lag_seconds.set(lag(depth.oldest_due, now));
    for f in app.db.failure_counts(None).await? {
        m.failures
            .get_or_create(&FailureLabels {
                flow: f.flow,
                step: f.step,
            })
            .set(i64::try_from(f.count).unwrap_or(i64::MAX));
    }
    // Waiting runs per step of each loaded flow: a small read of the gauge table.
    let engine = app.engine();
    for flow in engine.flows.current() {
        let q = canvas_engine::stats::StatsQuery {
            flow: flow.id.clone(),
            version: None,
            from: 0,
            to: -1,
        };
        let waiting = app.db.flow_stats(&q).await?.table(None);
        for (_, step) in flow.steps() {
            m.step_waiting
                .get_or_create(&WaitingLabels {
                    flow: flow.id.clone(),
                    step: step.id.clone(),
                })
                .set(i64::try_from(waiting.get(&step.id, "waiting")).unwrap_or(i64::MAX));
        }
    }
    let earliest = app.db.next_wake(Time::MIN_UTC).await?;
    m.timer_lag_seconds.set(lag(earliest, now));
    let text = m.encode().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "metrics could not be encoded",
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Seconds `t` lies in the past; 0 when it is in the future or absent.
fn lag(t: Option<Time>, now: Time) -> f64 {
    t.map_or(0.0, |t| {
        ((now - t).num_milliseconds().max(0) as f64) / 1000.0
    })
}

// ---------------------------------------------------------------------------------------------
// Ingestion

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    events: Vec<EventIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    id: String,
    customer_id: String,
    name: String,
    #[serde(default)]
    data: Option<Json>,
    occurred_at: Option<String>,
}

fn check_id(what: &str, index: Option<usize>, value: &str, max: usize) -> Result<(), ApiError> {
    let at = index.map(|i| format!("events[{i}].")).unwrap_or_default();
    if value.trim().is_empty() {
        return Err(ApiError::bad(format!("`{at}{what}` is empty")));
    }
    if value.len() > max {
        return Err(ApiError::bad(format!(
            "`{at}{what}` is {} bytes; the limit is {max}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "`{at}{what}` contains control characters"
        )));
    }
    Ok(())
}

fn parse_time(what: &str, text: &str) -> Result<Time, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .map_err(|e| {
            ApiError::bad(format!(
                "`{what}`: `{text}` is not an RFC 3339 time such as 2026-03-14T09:00:00+08:00 ({e})"
            ))
        })
}

fn check_batch(app: &App, len: usize) -> Result<(), ApiError> {
    if len == 0 {
        return Err(ApiError::bad("the batch is empty"));
    }
    if len > app.settings.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_long",
            format!(
                "the batch has {len} items; the limit is {} (server.limits.max_batch)",
                app.settings.max_batch
            ),
        ));
    }
    Ok(())
}

/// Put items in the inbox (committed before this returns) and wake the engine.
async fn accept(app: &App, items: &[InboxItem], source: &str) -> Result<(usize, usize), ApiError> {
    let accepted = app.db.enqueue(items).await?;
    let events = items
        .iter()
        .filter(|i| matches!(i, InboxItem::Event(_)))
        .count();
    let profiles = items.len() - events;
    let label = Metrics::source(source);
    let duplicates = items.len().saturating_sub(accepted);
    let m = &app.metrics;
    m.events_in.get_or_create(&label).inc_by(events as u64);
    m.profiles_in.get_or_create(&label).inc_by(profiles as u64);
    m.inbox_accepted
        .get_or_create(&label)
        .inc_by(accepted as u64);
    m.inbox_duplicates
        .get_or_create(&label)
        .inc_by(duplicates as u64);
    app.wake.notify_one();
    Ok((accepted, duplicates))
}

async fn post_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers, Scope::Write)?;
    let body: EventsBody = parse(&headers, body)?;
    check_batch(&app, body.events.len())?;
    let now = app.clock.now();
    let mut items = Vec::with_capacity(body.events.len());
    for (i, e) in body.events.into_iter().enumerate() {
        check_id("id", Some(i), &e.id, MAX_ID)?;
        check_id("customer_id", Some(i), &e.customer_id, MAX_ID)?;
        check_id("name", Some(i), &e.name, MAX_NAME)?;
        let data = match e.data {
            None | Some(Json::Null) => Json::Object(Map::new()),
            Some(d @ Json::Object(_)) => d,
            Some(_) => {
                return Err(ApiError::bad(format!(
                    "`events[{i}].data` must be an object"
                )));
            }
        };
        let occurred_at = match &e.occurred_at {
            Some(t) => parse_time(&format!("events[{i}].occurred_at"), t)?,
            None => now,
        };
        items.push(InboxItem::Event(Event {
            id: e.id,
            customer_id: e.customer_id,
            name: e.name,
            data,
            occurred_at,
        }));
    }
    let (accepted, duplicates) = accept(&app, &items, "api").await?;
    Ok(axum::Json(json!({ "accepted": accepted, "duplicates": duplicates })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerBody {
    #[serde(default)]
    attributes: Map<String, Json>,
    timezone: Option<String>,
}

async fn put_customer(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers, Scope::Write)?;
    check_id("id", None, &id, MAX_ID)?;
    let body: CustomerBody = parse(&headers, body)?;
    let update = profile_update(None, id, body.attributes, body.timezone, app.clock.now())?;
    accept(&app, &[InboxItem::Profile(update)], "api").await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "accepted": 1 }))).into_response())
}

fn profile_update(
    id: Option<String>,
    customer_id: String,
    attributes: Map<String, Json>,
    timezone: Option<String>,
    at: Time,
) -> Result<ProfileUpdate, ApiError> {
    let update = ProfileUpdate {
        id,
        customer_id,
        set: attributes,
        timezone,
        at,
    };
    // Both spellings (`timezone`, `attributes.timezone`) are the one zone; a bad one is
    // refused here, never ignored later.
    update.zone().map_err(ApiError::zone)?;
    Ok(update)
}

// ---------------------------------------------------------------------------------------------
// Reading

async fn journeys(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    check_id("id", None, &id, MAX_ID)?;
    let Some(story) = crate::explain::Story::read(&app.db, &id, None).await? else {
        return Err(ApiError::not_found(format!("no customer `{id}`")));
    };
    let Story {
        runs,
        history,
        deliveries,
        failures,
        ..
    } = story;
    let journeys: Vec<Json> = runs
        .iter()
        .map(|run| {
            let steps: Vec<&_> = history.iter().filter(|h| h.run_id == run.id).collect();
            let sends: Vec<Json> = deliveries
                .iter()
                .filter(|d| d.row.run_id == run.id)
                .map(|d| {
                    json!({
                        "key": d.row.key,
                        "kind": d.row.kind,
                        "step": d.row.step,
                        "channel": d.row.channel,
                        "address": d.row.address,
                        "template": d.row.template,
                        // What the customer received (or was to receive): the rendered
                        // subject/text/html of a message, a call's request body, a task.
                        "content": d.row.payload,
                        "created_at": d.row.created_at,
                        "status": d.status.as_str(),
                        "attempts": d.attempts,
                        "next_attempt_at": d.next_attempt_at,
                        // Reasons recorded before they were redacted at the source.
                        "last_error": d.last_error.as_deref().map(redact),
                        "sent_at": d.sent_at,
                        "dead_at": d.dead_at,
                    })
                })
                .collect();
            let why = match run.status {
                RunStatus::Waiting => json!({
                    "step": run.step,
                    "until": run.wake_at,
                    "for_event": run.waiting_for,
                }),
                RunStatus::Ended => json!({ "outcome": run.outcome }),
            };
            json!({
                "run_id": run.id,
                "flow": run.flow,
                "version": run.version,
                "status": run.status,
                "arm": run.arm,
                "entered_at": run.entered_at,
                "updated_at": run.updated_at,
                "converted_at": run.converted_at,
                "where": why,
                "vars": run.vars,
                "history": steps,
                "deliveries": sends,
            })
        })
        .collect();
    Ok(
        axum::Json(json!({ "customer_id": id, "journeys": journeys, "failures": failures }))
            .into_response(),
    )
}

async fn list_flows(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    let engine = app.engine();
    let counts = app.db.flow_counts(None).await?;
    let flows: Vec<Json> = engine
        .flows
        .current()
        .map(|f| {
            let c = counts.iter().find(|c| c.flow == f.id);
            json!({
                "id": f.id,
                "name": f.name,
                "version": f.hash.0,
                "trigger": trigger_kind(&f.trigger),
                "paused": engine.paused.contains(&f.id),
                "counts": c,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "flows": flows })).into_response())
}

fn trigger_kind(t: &canvas_engine::flow::Trigger) -> &'static str {
    match t {
        canvas_engine::flow::Trigger::Event { .. } => "event",
        canvas_engine::flow::Trigger::Schedule { .. } => "schedule",
        canvas_engine::flow::Trigger::Segment { .. } => "segment",
    }
}

async fn get_flow(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    let engine = app.engine();
    let flow = engine
        .flows
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no flow `{id}`")))?;
    // The recorded sources (flow and template texts) stay out of the answer.
    let versions: Vec<Json> = app
        .db
        .flow_versions(Some(&id))
        .await?
        .iter()
        .map(|v| json!({ "version": v.version, "created_at": v.created_at }))
        .collect();
    let waiting = app.db.node_counts(Some(&id)).await?;
    let counts = app.db.flow_counts(Some(&id)).await?;
    let arms = app.db.goal_report(Some(&id)).await?;
    let failures = app.db.failure_counts(Some(&id)).await?;
    let steps: Vec<Json> = flow
        .steps()
        .map(|(_, s)| {
            let n = waiting
                .iter()
                .find(|w| w.step == s.id)
                .map_or(0, |w| w.waiting);
            let failed = failures
                .iter()
                .find(|f| f.step == s.id)
                .map_or(0, |f| f.count);
            json!({ "step": s.id, "waiting": n, "failed": failed })
        })
        .collect();
    let arms: Vec<Json> = arms
        .iter()
        .map(
            |a| json!({ "arm": a.arm, "runs": a.runs, "converted": a.converted, "rate": a.rate() }),
        )
        .collect();
    Ok(axum::Json(json!({
        "id": flow.id,
        "name": flow.name,
        "description": flow.description,
        "trigger": trigger_kind(&flow.trigger),
        "version": flow.hash.0,
        "paused": engine.paused.contains(&id),
        "versions": versions,
        "steps": steps,
        "counts": counts.first(),
        "arms": arms,
        "failures": failures,
    }))
    .into_response())
}

async fn pause(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    set_paused(app, id, headers, true).await
}

async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    set_paused(app, id, headers, false).await
}

async fn set_paused(app: Arc<App>, id: String, headers: HeaderMap, paused: bool) -> ApiResult {
    authorize(&app, &headers, Scope::Write)?;
    actions::set_paused(&app, &id, paused).await?;
    Ok(axum::Json(json!({ "id": id, "paused": paused })).into_response())
}
