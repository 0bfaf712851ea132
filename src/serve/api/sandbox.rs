//! The sandbox: what the channels configured as `type: sandbox` delivered. Such a channel
//! reaches no provider; the message stays in the database (its outbox row, marked sent) and
//! `GET /v1/sandbox` lists it like a mail catcher's inbox, newest first, filtered by
//! channel and customer.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use canvas_engine::state::{DeliveryState, SandboxFilter};
use canvas_engine::store::Store;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::request::{ApiError, ApiResult, authorize, list_limit};
use super::{MAX_ID, MAX_NAME, check_id};
use crate::serve::App;
use crate::serve::config::Scope;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    channel: Option<String>,
    customer_id: Option<String>,
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
    if let Some(channel) = &q.channel {
        check_id("channel", None, channel, MAX_NAME)?;
    }
    if let Some(customer) = &q.customer_id {
        check_id("customer_id", None, customer, MAX_ID)?;
    }
    let filter = SandboxFilter {
        channels: app.sandbox_channels.clone(),
        channel: q.channel,
        customer_id: q.customer_id,
        limit,
    };
    let sent = app.db.sandbox_messages(&filter).await?;
    let messages: Vec<Json> = sent.iter().map(message).collect();
    Ok(axum::Json(json!({
        "channels": app.sandbox_channels,
        "messages": messages,
    }))
    .into_response())
}

/// A sandbox delivery as the API shows it: what would have gone out, to whom, and when.
fn message(d: &DeliveryState) -> Json {
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
        "sent_at": d.sent_at,
    })
}
