//! The HTTP API (see docs/api.md). Every answer is JSON; every failure is a 4xx with
//! `{"error":{"code","message"}}` saying what is wrong — never a 500 for bad input.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine as _;
use canvas_engine::state::{Event, InboxItem, ProfileUpdate, RunStatus, Time};
use canvas_engine::store::Store;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::App;
use super::config::Scope;
use super::metrics::{Metrics, StatusLabel};

/// Longest id (event, customer, message) accepted.
pub const MAX_ID: usize = 256;
/// Longest event name accepted.
pub const MAX_NAME: usize = 128;

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
        .route("/v1/flows/{id}/pause", post(pause))
        .route("/v1/flows/{id}/resume", post(resume))
        .route("/v1/batch", post(segment_batch))
        .route("/v1/track", post(segment_track))
        .route("/v1/identify", post(segment_identify))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({ "error": { "code": self.code, "message": self.message } })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// A database failure: the request was fine, the daemon could not serve it now.
impl From<canvas_engine::store::StoreError> for ApiError {
    fn from(e: canvas_engine::store::StoreError) -> ApiError {
        tracing::error!("database: {e}");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is not available; retry later",
        )
    }
}

type ApiResult = Result<Response, ApiError>;

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see docs/api.md")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see docs/api.md",
    )
}

/// The body as JSON of type `T`, or a 4xx that says why not.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the request body is larger than the limit (server.limits.max_body_bytes)",
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {r}"))
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad("the request body is empty; send JSON"));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Auth

/// Bearer-token check; with no token configured (loopback only) everything is allowed.
fn authorize(app: &App, headers: &HeaderMap, need: Scope) -> Result<(), ApiError> {
    if app.settings.tokens.is_empty() {
        return Ok(());
    }
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>`"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let scope = app
        .settings
        .tokens
        .iter()
        .filter(|(t, _)| same(t.as_bytes(), token.trim().as_bytes()))
        .map(|(_, s)| *s)
        .max()
        .ok_or_else(|| unauthorized("unknown token"))?;
    if scope < need {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read; writing needs a write token",
        ));
    }
    Ok(())
}

/// Segment-style auth: the write key as the HTTP basic-auth user.
fn authorize_write_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    if app.settings.write_keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "Segment ingestion is off: set CANVAS_WRITE_KEY or `server.segment` in canvas.yaml",
        ));
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(|| unauthorized("missing basic auth with the write key as the user"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| unauthorized("the basic-auth value is not base64"))?;
    let user = decoded.split(|b| *b == b':').next().unwrap_or_default();
    if app
        .settings
        .write_keys
        .iter()
        .any(|k| same(k.as_bytes(), user))
    {
        Ok(())
    } else {
        Err(unauthorized("unknown write key"))
    }
}

/// Compare secrets in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    // A small table: the probe must stay cheap however large the outbox grows.
    match app.db.paused_flows().await {
        Ok(_) => axum::Json(json!({ "status": "ready" })).into_response(),
        Err(e) => {
            tracing::warn!("readyz: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "database unavailable" })),
            )
                .into_response()
        }
    }
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
    let body: EventsBody = parse(body)?;
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
    let body: CustomerBody = parse(body)?;
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
    if let Some(tz) = &timezone
        && tz.parse::<chrono_tz::Tz>().is_err()
    {
        return Err(ApiError::bad(format!(
            "`timezone`: `{tz}` is not an IANA time zone such as Asia/Shanghai"
        )));
    }
    Ok(ProfileUpdate {
        id,
        customer_id,
        set: attributes,
        timezone,
        at,
    })
}

// ---------------------------------------------------------------------------------------------
// Segment / RudderStack ingestion: `track` → event, `identify` → profile upsert; `messageId`
// deduplicates. Other message types (page, screen, group, alias) are acknowledged and
// ignored, so SDKs do not retry them forever.

#[derive(Debug, Deserialize)]
struct SegmentBatch {
    batch: Vec<Json>,
}

async fn segment_batch(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize_write_key(&app, &headers)?;
    let body: SegmentBatch = parse(body)?;
    check_batch(&app, body.batch.len())?;
    segment_ingest(&app, body.batch, None).await
}

async fn segment_track(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    segment_one(&app, &headers, body, "track").await
}

async fn segment_identify(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    segment_one(&app, &headers, body, "identify").await
}

/// `/v1/track` and `/v1/identify`: one message of the kind the path names.
async fn segment_one(
    app: &App,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: &str,
) -> ApiResult {
    authorize_write_key(app, headers)?;
    let msg: Json = parse(body)?;
    segment_ingest(app, vec![msg], Some(kind)).await
}

async fn segment_ingest(app: &App, messages: Vec<Json>, kind: Option<&str>) -> ApiResult {
    let now = app.clock.now();
    let mut items = Vec::with_capacity(messages.len());
    let mut ignored = 0usize;
    for (i, msg) in messages.into_iter().enumerate() {
        match segment_item(&msg, kind, now)
            .map_err(|m| ApiError::bad(format!("batch[{i}]: {m}")))?
        {
            Some(item) => items.push(item),
            None => ignored += 1,
        }
    }
    let (accepted, duplicates) = if items.is_empty() {
        (0, 0)
    } else {
        accept(app, &items, "segment").await?
    };
    Ok(axum::Json(json!({
        "success": true,
        "accepted": accepted,
        "duplicates": duplicates,
        "ignored": ignored,
    }))
    .into_response())
}

fn str_field<'a>(msg: &'a Json, key: &str) -> Option<&'a str> {
    msg.get(key)
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
}

/// One Segment message as an inbox item; `None` for a type Canvas does not use or a
/// message without a `userId` (Canvas journeys are per known customer).
fn segment_item(msg: &Json, kind: Option<&str>, now: Time) -> Result<Option<InboxItem>, String> {
    if !msg.is_object() {
        return Err("a message must be a JSON object".into());
    }
    let kind = match (kind, str_field(msg, "type")) {
        (Some(k), _) => k,
        (None, Some(t)) => t,
        (None, None) => return Err("`type` is missing".into()),
    };
    let Some(user) = str_field(msg, "userId") else {
        return Ok(None);
    };
    let check =
        |what: &str, v: &str, max: usize| check_id(what, None, v, max).map_err(|e| e.message);
    check("userId", user, MAX_ID)?;
    let at = match str_field(msg, "timestamp").or_else(|| str_field(msg, "originalTimestamp")) {
        Some(t) => parse_time("timestamp", t).map_err(|e| e.message)?,
        None => now,
    };
    let message_id = str_field(msg, "messageId");
    match kind {
        "track" => {
            let name = str_field(msg, "event").ok_or("a track message needs `event`")?;
            check("event", name, MAX_NAME)?;
            let id = message_id.ok_or("a track message needs `messageId`")?;
            check("messageId", id, MAX_ID)?;
            let data = match msg.get("properties") {
                None | Some(Json::Null) => Json::Object(Map::new()),
                Some(p @ Json::Object(_)) => p.clone(),
                Some(_) => return Err("`properties` must be an object".into()),
            };
            Ok(Some(InboxItem::Event(Event {
                id: id.to_owned(),
                customer_id: user.to_owned(),
                name: name.to_owned(),
                data,
                occurred_at: at,
            })))
        }
        "identify" => {
            let traits = match msg.get("traits") {
                None | Some(Json::Null) => Map::new(),
                Some(Json::Object(t)) => t.clone(),
                Some(_) => return Err("`traits` must be an object".into()),
            };
            let timezone = msg
                .get("context")
                .and_then(|c| c.get("timezone"))
                .and_then(Json::as_str)
                .map(str::to_owned);
            if let Some(id) = message_id {
                check("messageId", id, MAX_ID)?;
            }
            profile_update(
                message_id.map(str::to_owned),
                user.to_owned(),
                traits,
                timezone,
                at,
            )
            .map(|u| Some(InboxItem::Profile(u)))
            .map_err(|e| e.message)
        }
        "page" | "screen" | "group" | "alias" => Ok(None),
        other => Err(format!("unknown message type `{other}`")),
    }
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
    let runs = app.db.runs(&id).await?;
    let history = app.db.history(Some(&id)).await?;
    let deliveries = app.db.deliveries(&id).await?;
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
                        "created_at": d.row.created_at,
                        "status": d.status.as_str(),
                        "attempts": d.attempts,
                        "next_attempt_at": d.next_attempt_at,
                        "last_error": d.last_error,
                        "sent_at": d.sent_at,
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
                "history": steps,
                "deliveries": sends,
            })
        })
        .collect();
    if journeys.is_empty()
        && app
            .db
            .load(std::slice::from_ref(&id), app.clock.now())
            .await?
            .is_empty()
    {
        return Err(ApiError::not_found(format!("no customer `{id}`")));
    }
    Ok(axum::Json(json!({ "customer_id": id, "journeys": journeys })).into_response())
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
    let steps: Vec<Json> = flow
        .steps()
        .map(|(_, s)| {
            let n = waiting
                .iter()
                .find(|w| w.step == s.id)
                .map_or(0, |w| w.waiting);
            json!({ "step": s.id, "waiting": n })
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
    if app.engine().flows.get(&id).is_none() {
        return Err(ApiError::not_found(format!("no flow `{id}`")));
    }
    app.db.set_paused(&id, paused, app.clock.now()).await?;
    app.refresh_paused().await.map_err(|e| {
        tracing::error!("refreshing paused flows: {e:#}");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is not available; retry later",
        )
    })?;
    app.wake.notify_one();
    Ok(axum::Json(json!({ "id": id, "paused": paused })).into_response())
}
