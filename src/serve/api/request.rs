//! What every request goes through before and around its handler: the body limit (a JSON
//! 413, never a dropped connection), the bound on its database work (a 503 after
//! `database_timeout`), its `Content-Type` (415), its credentials, and the JSON error shape.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use super::super::App;
use super::super::config::Scope;

/// An over-limit body is read and thrown away up to this many bytes before the 413 goes out:
/// a client still sending when the server closes gets a reset instead of the answer. Larger
/// bodies are not worth reading; the answer goes out at once and the connection closes.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;
/// The longest the rest of an over-limit body is read for (a slow sender is cut off).
const DRAIN_TIME: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(super) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A time zone that is not one: 400 `invalid_timezone`.
    pub(super) fn zone(e: canvas_engine::state::ZoneError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_timezone", e.to_string())
    }

    /// The same error, its message after `prefix` (`batch[3]: `).
    pub(super) fn prefixed(mut self, prefix: &str) -> ApiError {
        self.message = format!("{prefix}{}", self.message);
        self
    }

    pub(super) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(super) fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is not available; retry later",
        )
    }

    fn too_large() -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the request body is larger than the limit (server.limits.max_body_bytes)",
        )
    }
}

/// A plain message is a bad request.
impl From<String> for ApiError {
    fn from(message: String) -> ApiError {
        ApiError::bad(message)
    }
}

impl From<&str> for ApiError {
    fn from(message: &str) -> ApiError {
        ApiError::bad(message)
    }
}

/// Rows in one answer of a listing (dead letters, sandbox messages) when `limit` is not
/// given, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A listing's `limit` query parameter, checked.
pub(super) fn list_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad(format!(
            "`limit` is {limit}; it must be 1 to {MAX_LIMIT}"
        )));
    }
    Ok(limit)
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
        ApiError::unavailable()
    }
}

/// An operator's action refused or failed, in the API's words.
impl From<crate::serve::actions::ActionError> for ApiError {
    fn from(e: crate::serve::actions::ActionError) -> ApiError {
        use crate::serve::actions::ActionError;
        match e {
            ActionError::NotFound(m) => ApiError::not_found(m),
            ActionError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ActionError::Store(e) => e.into(),
            ActionError::Unavailable => ApiError::unavailable(),
        }
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// The body as JSON of type `T`, or a 4xx that says why not: 415 for a `Content-Type` that
/// is not JSON (none at all is taken as JSON), 413 over the limit, 400 for anything else.
pub fn parse<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    check_json_type(headers)?;
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large()
        } else {
            ApiError::bad(format!("cannot read the request body: {r}"))
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad("the request body is empty; send JSON"));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON: {e}")))
}

/// `application/json` or any `application/*+json`, parameters (`; charset=utf-8`) aside. A
/// request without `Content-Type` passes: its body must still parse as the endpoint's JSON,
/// and some clients leave the header out.
fn check_json_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"));
    if json {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "the body must be JSON, sent as `Content-Type: application/json`; this request says `{}`",
            String::from_utf8_lossy(value.as_bytes())
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Body limit and the database bound

/// Read the whole body before the handler runs, up to `max_body_bytes`. Over the limit (the
/// `Content-Length` says so, or a chunked body grows past it) the answer is a JSON 413, and
/// the rest of the body is read and dropped first (up to [`DRAIN_MAX`], for [`DRAIN_TIME`]),
/// so the client, still sending, reads the answer rather than a reset connection.
pub async fn limit_body(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = app.settings.max_body as u64;
    let (parts, mut body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = declared.filter(|n| *n > limit) {
        // A client waiting for `100 Continue` has sent nothing yet: answer now and it sends
        // nothing at all. So does a body too large to be worth reading.
        let expects = parts.headers.contains_key(header::EXPECT);
        let complete = !expects && length <= DRAIN_MAX && drain(&mut body, 0).await;
        return over_limit(!complete);
    }
    let mut buf = Vec::new();
    loop {
        match next_frame(&mut body).await {
            None => break,
            Some(Err(e)) => {
                return ApiError::bad(format!("cannot read the request body: {e}")).into_response();
            }
            Some(Ok(chunk)) => {
                if (buf.len() + chunk.len()) as u64 > limit {
                    let complete = drain(&mut body, (buf.len() + chunk.len()) as u64).await;
                    return over_limit(!complete);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(buf))).await
}

/// The 413; `close` when part of the body is still unread.
fn over_limit(close: bool) -> Response {
    let mut response = ApiError::too_large().into_response();
    if close {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The next data chunk of `body` (trailers skipped); `None` at its end.
async fn next_frame(body: &mut Body) -> Option<Result<Bytes, axum::Error>> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        match frame {
            Err(e) => return Some(Err(e)),
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
        }
    }
}

/// Read and drop the rest of `body` (`read` bytes of it are read already) within the drain
/// bounds; true when it was read to its end.
async fn drain(body: &mut Body, mut read: u64) -> bool {
    let rest = async {
        while let Some(chunk) = next_frame(body).await {
            let Ok(chunk) = chunk else { return false };
            read += chunk.len() as u64;
            if read > DRAIN_MAX {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, rest)
        .await
        .unwrap_or(false)
}

/// The handler's work — its database calls, once the body is in — within `database_timeout`:
/// a database that hangs or is gone gets the client a 503 after that long, never a wait on
/// sqlx's own timeouts.
pub async fn bound(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = app.settings.database_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!("database: no answer within {limit:?} (server.database_timeout)");
            ApiError::unavailable().into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Auth

/// The credentials of `Authorization: SCHEME CREDENTIALS`; the scheme is compared without
/// regard to case (RFC 9110 §11.1), so `bearer` and `BEARER` work like `Bearer`.
fn credentials<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (given, rest) = value.split_once([' ', '\t'])?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim())
        .filter(|c| !c.is_empty())
}

/// Bearer-token check; with no token configured (loopback only) everything is allowed.
pub fn authorize(app: &App, headers: &HeaderMap, need: Scope) -> Result<(), ApiError> {
    if app.settings.tokens.is_empty() {
        return Ok(());
    }
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(unauthorized("missing `Authorization: Bearer <token>`"));
    }
    let token = credentials(headers, "Bearer")
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    let scope = app
        .settings
        .tokens
        .iter()
        .filter(|(t, _)| same(t.as_bytes(), token.as_bytes()))
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
pub fn authorize_write_key(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    if app.settings.write_keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "Segment ingestion is off: set CANVAS_WRITE_KEY or `server.segment` in canvas.yaml",
        ));
    }
    let value = credentials(headers, "Basic")
        .ok_or_else(|| unauthorized("missing basic auth with the write key as the user"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                name.clone(),
                header::HeaderValue::from_str(value).expect("a header value"),
            );
        }
        map
    }

    #[test]
    fn auth_schemes_are_case_insensitive() {
        for value in ["Bearer t1", "bearer t1", "BEARER   t1 ", "Bearer\tt1"] {
            let h = headers(&[(header::AUTHORIZATION, value)]);
            assert_eq!(credentials(&h, "Bearer"), Some("t1"), "{value:?}");
        }
        for value in ["Bearer", "Bearer ", "Basic t1", "Bearert1"] {
            let h = headers(&[(header::AUTHORIZATION, value)]);
            assert_eq!(credentials(&h, "Bearer"), None, "{value:?}");
        }
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.segment+json",
        ] {
            let h = headers(&[(header::CONTENT_TYPE, ok)]);
            assert!(check_json_type(&h).is_ok(), "{ok}");
        }
        assert!(check_json_type(&HeaderMap::new()).is_ok(), "none is JSON");
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "",
        ] {
            let h = headers(&[(header::CONTENT_TYPE, bad)]);
            let e = check_json_type(&h).expect_err(bad);
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
    }
}
