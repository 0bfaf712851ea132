//! The web UI of `canvas serve` (docs/ui.md): server-rendered HTML on the API's port, under
//! `/ui/`. Pages read the database through the same store calls as the API and run the
//! same actions (pause, resume, retry a dead letter); nothing is fetched by the browser but
//! the page and its one stylesheet.
//!
//! - `auth`: the login form, the stateless session cookie, CSRF tokens.
//! - `layout`: the canvas's layered graph layout (pure).
//! - `pages` / `canvas`: the handlers and their view models.
//! - `templates/*.html`: minijinja templates, HTML auto-escaped (every value a page shows
//!   passes through the escaper unless it is built here as markup from escaped parts).

mod auth;
mod canvas;
pub mod layout;
mod pages;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use serde::Serialize;

use crate::serve::App;
use crate::serve::actions::ActionError;

const CSS: &str = include_str!("assets/ui.css");

/// What every page answers with besides its body.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// The UI's routes, to be merged into the API's router (which adds its body limit and
/// database bound around them).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/flows") }))
        .route("/ui", get(|| async { Redirect::to("/ui/flows") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/flows") }))
        .route("/ui/assets/ui.css", get(css))
        .route("/ui/login", get(auth::login_form).post(auth::login))
        .route("/ui/logout", post(auth::logout))
        .route("/ui/flows", get(pages::flows))
        .route("/ui/flows/{id}", get(canvas::page))
        .route("/ui/flows/{id}/pause", post(canvas::pause))
        .route("/ui/flows/{id}/resume", post(canvas::resume))
        .route("/ui/flows/{id}/steps/{step}", get(canvas::waiting))
        .route("/ui/customers", get(pages::find_customer))
        .route("/ui/customers/{id}", get(pages::customer))
        .route("/ui/deadletters", get(pages::deadletters))
        .route("/ui/deadletters/retry", post(pages::retry))
        .route("/ui/sandbox", get(pages::sandbox))
        .layer(from_fn(security_headers))
}

/// The page for an address under `/ui/` that is no page (the API router's fallback).
pub fn not_found(path: &str) -> Response {
    let mut response =
        UiError::not_found(format!("no page at {path}; see docs/ui.md")).into_response();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

/// CSP, no sniffing, no framing, no caching of pages that hold customer data.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Templates

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // `.html` names get HTML auto-escaping (minijinja's default callback).
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("error.html", include_str!("templates/error.html")),
        ("login.html", include_str!("templates/login.html")),
        ("flows.html", include_str!("templates/flows.html")),
        ("canvas.html", include_str!("templates/canvas.html")),
        ("waiting.html", include_str!("templates/waiting.html")),
        ("customer.html", include_str!("templates/customer.html")),
        (
            "deadletters.html",
            include_str!("templates/deadletters.html"),
        ),
        ("sandbox.html", include_str!("templates/sandbox.html")),
        ("delivery.html", include_str!("templates/delivery.html")),
    ] {
        if let Err(e) = env.add_template(name, source) {
            // A committed template that does not parse is a build defect; the tests render
            // every page, so it never ships. The page then answers 500 with this reason.
            tracing::error!("ui template {name}: {e}");
        }
    }
    env
});

/// What the header of every page needs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Chrome {
    /// The CSRF token for this session's forms.
    pub csrf: String,
    /// May this session act (pause, resume, retry)?
    pub can_write: bool,
    /// A login session (a logout button), rather than an open loopback daemon.
    pub signed_in: bool,
}

/// Render `template` with `context` (which carries `chrome`), as a 200 HTML page.
pub(crate) fn render(template: &str, context: minijinja::Value) -> Result<Response, UiError> {
    render_status(StatusCode::OK, template, context)
}

fn render_status(
    status: StatusCode,
    template: &str,
    context: minijinja::Value,
) -> Result<Response, UiError> {
    let html = TEMPLATES
        .get_template(template)
        .and_then(|t| t.render(context))
        .map_err(|e| {
            tracing::error!("ui template {template}: {e:#}");
            UiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "this page could not be drawn",
            )
        })?;
    Ok((
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Errors: a page that says what is wrong, never a panic or a JSON body

#[derive(Debug)]
pub(crate) struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> UiError {
        UiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> UiError {
        UiError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<String>) -> UiError {
        UiError::new(StatusCode::FORBIDDEN, message)
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let context = minijinja::context! {
            status => self.status.as_u16(),
            reason => self.status.canonical_reason().unwrap_or(""),
            message => self.message,
        };
        match render_status(self.status, "error.html", context) {
            Ok(r) => r,
            Err(_) => (self.status, "error").into_response(),
        }
    }
}

impl From<canvas_engine::store::StoreError> for UiError {
    fn from(e: canvas_engine::store::StoreError) -> UiError {
        tracing::error!("database: {e}");
        UiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is not available; retry later",
        )
    }
}

impl From<ActionError> for UiError {
    fn from(e: ActionError) -> UiError {
        match e {
            ActionError::NotFound(m) => UiError::not_found(m),
            ActionError::Conflict(m) => UiError::new(StatusCode::CONFLICT, m),
            ActionError::Store(e) => e.into(),
            ActionError::Unavailable => UiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the daemon could not apply the change; retry later",
            ),
        }
    }
}

pub(crate) type UiResult = Result<Response, UiError>;

// ---------------------------------------------------------------------------------------------
// Small shared helpers

/// Longest id (flow, step, customer, key) a page accepts in its path or query.
pub(crate) const MAX_ID: usize = 512;

/// An id from the path or a form: not empty, not too long, no control characters.
pub(crate) fn check_id(what: &str, value: &str) -> Result<(), UiError> {
    if value.trim().is_empty() {
        return Err(UiError::bad(format!("the {what} is empty")));
    }
    if value.len() > MAX_ID {
        return Err(UiError::bad(format!(
            "the {what} is {} bytes; the limit is {MAX_ID}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(UiError::bad(format!(
            "the {what} contains control characters"
        )));
    }
    Ok(())
}

/// A time for a page: in `zone` as text, and in UTC for the hover title.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Shown {
    pub local: String,
    pub utc: String,
}

pub(crate) fn shown(t: canvas_engine::state::Time, zone: chrono_tz::Tz) -> Shown {
    Shown {
        local: canvas_engine::testing::show(t, canvas_engine::testing::ShowIn::Zone(zone)),
        utc: t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    }
}

/// A link for a template: `path` is a literal prefix plus [`seg`]-encoded parts, so it
/// holds no character HTML gives a meaning to and goes out as written (not with its `/`
/// escaped).
pub(crate) fn link(path: String) -> minijinja::Value {
    debug_assert!(!path.contains(['<', '>', '"', '\'', '&']), "{path}");
    minijinja::Value::from_safe_string(path)
}

/// A path segment, percent-encoded (ids hold `/`, spaces and any Unicode).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        for name in [
            "base.html",
            "error.html",
            "login.html",
            "flows.html",
            "canvas.html",
            "waiting.html",
            "customer.html",
            "deadletters.html",
            "sandbox.html",
            "delivery.html",
        ] {
            assert!(TEMPLATES.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn templates_escape_what_they_show() {
        let page = TEMPLATES
            .get_template("error.html")
            .and_then(|t| {
                t.render(minijinja::context! {
                    status => 400, reason => "Bad Request",
                    message => "<script>alert(1)</script> & \"x\"",
                })
            })
            .expect("renders");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }

    #[test]
    fn links_go_out_as_written() {
        #[derive(Serialize)]
        struct Node {
            href: minijinja::Value,
        }
        let mut env = Environment::new();
        env.add_template("t.html", r#"<a href="{{ a }}"><a href="{{ n.href }}">"#)
            .expect("parses");
        let page = env
            .get_template("t.html")
            .and_then(|t| {
                t.render(minijinja::context! {
                    a => link(format!("/ui/flows/{}", seg("a/b"))),
                    n => Node { href: link("/ui/x/y".to_owned()) },
                })
            })
            .expect("renders");
        assert_eq!(page, r#"<a href="/ui/flows/a%2Fb"><a href="/ui/x/y">"#);
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
        assert_eq!(seg("会员"), "%E4%BC%9A%E5%91%98");
        assert_eq!(seg("new-member_1.x~"), "new-member_1.x~");
    }
}
