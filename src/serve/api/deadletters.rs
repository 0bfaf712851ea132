//! Dead letters: the messages the dispatcher gave up on (a permanent failure, or retries
//! exhausted), to be seen and sent again. `GET /v1/deadletters` lists them, newest first,
//! filtered by flow, channel and reason; `POST /v1/deadletters/{key}/retry` sends one again
//! under the same idempotency key, so a receiver that did get it drops the repeat.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use canvas_engine::state::{DeadLetterFilter, DeliveryState};
use canvas_engine::store::{Store, redact};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::request::{ApiError, ApiResult, authorize, list_limit};
use super::{MAX_ID, MAX_NAME, check_id};
use crate::serve::App;
use crate::serve::actions;
use crate::serve::config::Scope;

/// Longest `reason` filter accepted.
const MAX_REASON: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    flow: Option<String>,
    channel: Option<String>,
    reason: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn list(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let limit = list_limit(q.limit)?;
    for (what, value, max) in [
        ("flow", &q.flow, MAX_ID),
        ("channel", &q.channel, MAX_NAME),
        ("reason", &q.reason, MAX_REASON),
    ] {
        if let Some(v) = value {
            check_id(what, None, v, max)?;
        }
    }
    let filter = DeadLetterFilter {
        flow: q.flow,
        channel: q.channel,
        reason: q.reason,
        limit,
    };
    let dead = app.db.dead_letters(&filter).await?;
    let letters: Vec<Json> = dead.iter().map(letter).collect();
    Ok(axum::Json(json!({ "deadletters": letters })).into_response())
}

/// `POST /v1/deadletters/{key}/retry`. Keys hold slashes (`RUN_ID/STEP_ID`), so the route
/// takes the rest of the path; `%2F` works as well as `/`.
pub(super) async fn retry(
    State(app): State<Arc<App>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&app, &headers, Scope::Write)?;
    let Some(key) = rest.strip_suffix("/retry") else {
        return Err(ApiError::not_found(
            "no such route: use POST /v1/deadletters/{key}/retry",
        ));
    };
    check_id("key", None, key, MAX_ID * 2)?;
    let now = actions::retry_dead_letter(&app, key).await?;
    Ok(
        axum::Json(json!({ "key": key, "status": "pending", "next_attempt_at": now }))
            .into_response(),
    )
}

/// A dead letter as the API shows it: what it was, what it said, and why it died.
pub(super) fn letter(d: &DeliveryState) -> Json {
    json!({
        "key": d.row.key,
        "kind": d.row.kind,
        "flow": d.row.flow,
        "customer_id": d.row.customer_id,
        "run_id": d.row.run_id,
        "step": d.row.step,
        "channel": d.row.channel,
        "address": d.row.address,
        "template": d.row.template,
        "content": d.row.payload,
        "created_at": d.row.created_at,
        "attempts": d.attempts,
        // Reasons recorded before they were redacted at the source.
        "last_error": d.last_error.as_deref().map(redact),
        "dead_at": d.dead_at,
    })
}
