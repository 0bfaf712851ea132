//! Segment / RudderStack ingestion: `track` → event, `identify` → profile upsert; `messageId`
//! deduplicates. Other message types (page, screen, group, alias) are acknowledged and
//! ignored, so SDKs do not retry them forever.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use canvas_engine::state::{Event, InboxItem, Time};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::super::App;
use super::request::{ApiError, ApiResult, authorize_write_key, parse};
use super::{MAX_ID, MAX_NAME, accept, check_batch, check_id, parse_time, profile_update};

#[derive(Debug, Deserialize)]
struct SegmentBatch {
    batch: Vec<Json>,
}

pub(super) async fn segment_batch(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize_write_key(&app, &headers)?;
    let body: SegmentBatch = parse(&headers, body)?;
    check_batch(&app, body.batch.len())?;
    segment_ingest(&app, body.batch, None).await
}

pub(super) async fn segment_track(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    segment_one(&app, &headers, body, "track").await
}

pub(super) async fn segment_identify(
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
    let msg: Json = parse(headers, body)?;
    segment_ingest(app, vec![msg], Some(kind)).await
}

async fn segment_ingest(app: &App, messages: Vec<Json>, kind: Option<&str>) -> ApiResult {
    let now = app.clock.now();
    let mut items = Vec::with_capacity(messages.len());
    let mut ignored = 0usize;
    for (i, msg) in messages.into_iter().enumerate() {
        match segment_item(&msg, kind, now).map_err(|e| e.prefixed(&format!("batch[{i}]: ")))? {
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
fn segment_item(msg: &Json, kind: Option<&str>, now: Time) -> Result<Option<InboxItem>, ApiError> {
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
    let check = |what: &str, v: &str, max: usize| check_id(what, None, v, max);
    check("userId", user, MAX_ID)?;
    let at = match str_field(msg, "timestamp").or_else(|| str_field(msg, "originalTimestamp")) {
        Some(t) => parse_time("timestamp", t)?,
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
            // The device's zone (`context.timezone`) unless the traits name the customer's
            // own (`traits.timezone`, the same attribute as `set: { timezone }`).
            let timezone = msg
                .get("context")
                .and_then(|c| c.get("timezone"))
                .and_then(Json::as_str)
                .filter(|_| !traits.contains_key(canvas_engine::state::ZONE_KEY))
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
        }
        "page" | "screen" | "group" | "alias" => Ok(None),
        other => Err(format!("unknown message type `{other}`").into()),
    }
}
