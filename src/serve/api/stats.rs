//! `GET /v1/flows/{id}/stats?from=&to=&version=`: a flow's outcomes per step over a range of
//! days (see `crate::outcomes` and docs/api.md). Read from the counters the engine writes
//! with its transitions, never from the history: the answer costs the same with a billion
//! history rows as with ten.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use canvas_engine::store::Store;
use serde::Deserialize;

use super::request::{ApiError, ApiResult, authorize};
use super::{MAX_ID, check_id};
use crate::outcomes::{self, Range};
use crate::serve::App;
use crate::serve::config::Scope;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatsParams {
    from: Option<String>,
    to: Option<String>,
    version: Option<String>,
}

pub(super) async fn get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StatsParams>, QueryRejection>,
) -> ApiResult {
    authorize(&app, &headers, Scope::Read)?;
    let Query(q) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("flow", None, &id, MAX_ID)?;
    if let Some(v) = &q.version {
        check_id("version", None, v, MAX_ID)?;
    }
    let engine = app.engine();
    let tz = engine.policy.timezone;
    let today = outcomes::today(app.clock.now(), tz);
    let range = Range::parse(q.from.as_deref(), q.to.as_deref(), today).map_err(ApiError::bad)?;
    let flow = engine.flows.get(&id);
    // A flow no longer loaded still answers while the database knows it.
    if flow.is_none() && app.db.flow_versions(Some(&id)).await?.is_empty() {
        return Err(ApiError::not_found(format!("no flow `{id}`")));
    }
    // The graph drawn is the version asked for when this process has it loaded.
    let graph = q
        .version
        .as_deref()
        .and_then(|v| engine.flows.version(v))
        .filter(|f| f.id == id)
        .or(flow)
        .map(|f| &**f);
    let out = outcomes::read(&app.db, &id, graph, range, q.version.as_deref(), tz).await?;
    if let Some(v) = &q.version
        && !out.versions.iter().any(|x| x.version == *v)
    {
        return Err(ApiError::not_found(format!(
            "flow `{id}` has no version `{v}`"
        )));
    }
    Ok(axum::Json(out).into_response())
}
