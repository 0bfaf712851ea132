//! Who may see and do what in the UI.
//!
//! With API tokens configured, the UI asks for one once (`/ui/login`) and answers with a
//! session cookie `canvas_session=SCOPE.EXPIRY.MAC`, where MAC is
//! HMAC-SHA256(key = the token, "canvas-ui-session|SCOPE|EXPIRY") in hex. Nothing is kept
//! on the server: any daemon configured with the same token accepts the cookie, and
//! rotating the token ends every session made with it. Each POST form carries a CSRF token,
//! HMAC(token, "csrf|" + cookie value), and POSTs are refused (403) without it or when the
//! browser says the request came from another site (`Sec-Fetch-Site`, `Origin`).
//!
//! Without tokens (a loopback daemon, as the API allows) pages are open; the CSRF check
//! stays, keyed by a random key made when the process starts.

use std::sync::{Arc, LazyLock};

use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::{Form, extract::Query};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{Chrome, UiError, UiResult, render};
use crate::serve::App;
use crate::serve::config::Scope;

pub(crate) const COOKIE: &str = "canvas_session";
/// A session lasts this long; then the token is asked for again.
const SESSION_SECS: i64 = 12 * 3600;

type HmacSha256 = Hmac<Sha256>;

/// The key of an open (tokenless) daemon's CSRF tokens: random, made once per process.
static OPEN_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| {
    let mut key = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut key) {
        // Without OS randomness, fall back on what differs per process and start; the key
        // only guards an open loopback daemon's forms against other sites.
        tracing::warn!("ui: no OS randomness for the CSRF key ({e}); using a weaker one");
        let seed = format!(
            "{}|{:?}|{:?}",
            std::process::id(),
            std::time::SystemTime::now(),
            std::thread::current().id()
        );
        key.copy_from_slice(&<Sha256 as sha2::Digest>::digest(seed.as_bytes()));
    }
    key
});

fn mac(key: &[u8], message: &str) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(message.as_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
    }
}

/// The cookie value for a session of `scope` made with `token`, expiring at `expiry` (unix
/// seconds).
pub(crate) fn session_value(token: &str, scope: Scope, expiry: i64) -> String {
    let scope = scope_name(scope);
    let tag = mac(
        token.as_bytes(),
        &format!("canvas-ui-session|{scope}|{expiry}"),
    )
    .finalize()
    .into_bytes();
    format!("{scope}.{expiry}.{}", hex(&tag))
}

/// The CSRF token for forms of the session whose cookie is `cookie`, keyed by `key`.
fn csrf_for(key: &[u8], cookie: &str) -> String {
    hex(&mac(key, &format!("csrf|{cookie}")).finalize().into_bytes())
}

/// A request's standing.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub scope: Scope,
    /// The CSRF token its forms carry.
    pub csrf: String,
    /// A login session (rather than an open daemon).
    pub signed_in: bool,
}

impl Session {
    pub fn chrome(&self) -> Chrome {
        Chrome {
            csrf: self.csrf.clone(),
            can_write: self.scope >= Scope::Write,
            signed_in: self.signed_in,
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The session of this request: open when no token is configured, else the cookie's if it
/// is valid (signed by a configured token of at least its scope, not expired).
pub(crate) fn session(app: &App, headers: &HeaderMap) -> Option<Session> {
    if app.settings.tokens.is_empty() {
        return Some(Session {
            scope: Scope::Write,
            csrf: csrf_for(&*OPEN_KEY, "open"),
            signed_in: false,
        });
    }
    let value = cookie(headers, COOKIE)?;
    let (scope, expiry, tag) = {
        let mut parts = value.splitn(3, '.');
        (parts.next()?, parts.next()?, parts.next()?)
    };
    let scope = match scope {
        "read" => Scope::Read,
        "write" => Scope::Write,
        _ => return None,
    };
    let expiry: i64 = expiry.parse().ok()?;
    if expiry <= app.clock.now().timestamp() {
        return None;
    }
    let tag = unhex(tag)?;
    let message = format!("canvas-ui-session|{}|{expiry}", scope_name(scope));
    // Every configured token is tried (no early exit on the first match), each in constant
    // time (`verify_slice`).
    let mut signer = None;
    for (token, token_scope) in &app.settings.tokens {
        let ok = mac(token.as_bytes(), &message).verify_slice(&tag).is_ok();
        if ok && *token_scope >= scope && signer.is_none() {
            signer = Some(token.as_str());
        }
    }
    let token = signer?;
    Some(Session {
        scope,
        csrf: csrf_for(token.as_bytes(), value),
        signed_in: true,
    })
}

/// The session, or the way to the login form (back to `here` afterwards).
pub(crate) fn require(app: &App, headers: &HeaderMap, here: &str) -> Result<Session, Redirect> {
    session(app, headers)
        .ok_or_else(|| Redirect::to(&format!("/ui/login?next={}", super::seg(here))))
}

/// A POST's checks: a session of `need` scope, the browser's word that the request is from
/// this site, and the form's CSRF token.
pub(crate) fn check_post(
    app: &App,
    headers: &HeaderMap,
    csrf: Option<&str>,
    need: Scope,
) -> Result<Session, UiError> {
    check_origin(headers)?;
    let Some(session) = session(app, headers) else {
        return Err(UiError::new(
            StatusCode::UNAUTHORIZED,
            "not signed in (or the session expired): sign in at /ui/login",
        ));
    };
    let given = csrf.unwrap_or_default();
    let same = given.len() == session.csrf.len()
        && given
            .bytes()
            .zip(session.csrf.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(UiError::forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ));
    }
    if session.scope < need {
        return Err(UiError::forbidden(
            "this session may only read; acting needs a write token",
        ));
    }
    Ok(session)
}

/// Refuse a request a browser marks as cross-site: `Sec-Fetch-Site` other than
/// `same-origin` / `none`, or an `Origin` whose host is not the request's `Host`.
fn check_origin(headers: &HeaderMap) -> Result<(), UiError> {
    let refuse = || UiError::forbidden("refused: the request came from another site");
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("cross-site");
        if site != "same-origin" && site != "none" {
            return Err(refuse());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin
            .split_once("://")
            .map_or("", |(_, rest)| rest.trim_end_matches('/'));
        if origin == "null" || host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return Err(refuse());
        }
    }
    Ok(())
}

fn set_cookie(value: &str, max_age: i64) -> HeaderValue {
    // Plain HTTP is what the daemon serves: no `Secure` (a TLS proxy in front may add it).
    let text = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("canvas_session="))
}

// ---------------------------------------------------------------------------------------------
// Pages

#[derive(Debug, Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
}

/// Where to go after signing in: a UI page of this site, else the flows.
fn next_page(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui/flows".to_owned(),
    }
}

pub(crate) async fn login_form(
    State(app): State<Arc<App>>,
    query: Result<Query<NextQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let next = query.ok().and_then(|Query(q)| q.next);
    if app.settings.tokens.is_empty() {
        return Ok(Redirect::to(&next_page(next.as_deref())).into_response());
    }
    login_page(StatusCode::OK, next.as_deref(), None)
}

fn login_page(status: StatusCode, next: Option<&str>, error: Option<&str>) -> UiResult {
    let mut response = render(
        "login.html",
        minijinja::context! { next => next_page(next), error => error },
    )?;
    *response.status_mut() = status;
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    next: Option<String>,
}

pub(crate) async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> UiResult {
    check_origin(&headers)?;
    let Form(form) =
        form.map_err(|e| UiError::bad(format!("the login form: {}", e.body_text())))?;
    let next = form.next.as_deref();
    if app.settings.tokens.is_empty() {
        return Ok(Redirect::to(&next_page(next)).into_response());
    }
    let given = form.token.trim();
    let scope = app
        .settings
        .tokens
        .iter()
        .filter(|(t, _)| {
            t.len() == given.len()
                && t.bytes()
                    .zip(given.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
        .map(|(_, s)| *s)
        .max();
    let Some(scope) = scope else {
        tracing::info!("ui: a login with an unknown token");
        return login_page(
            StatusCode::UNAUTHORIZED,
            next,
            Some("unknown token: use a token of server.tokens (or CANVAS_API_TOKEN)"),
        );
    };
    let expiry = app.clock.now().timestamp() + SESSION_SECS;
    let value = session_value(given, scope, expiry);
    let mut response = Redirect::to(&next_page(next)).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&value, SESSION_SECS));
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    pub csrf: Option<String>,
}

pub(crate) async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> UiResult {
    let csrf = form.ok().and_then(|Form(f)| f.csrf);
    check_post(&app, &headers, csrf.as_deref(), Scope::Read)?;
    let mut response = Redirect::to("/ui/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", 0));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_values_are_bound_to_token_scope_and_expiry() {
        let a = session_value("t1", Scope::Write, 1000);
        assert!(a.starts_with("write.1000."), "{a}");
        assert_eq!(a, session_value("t1", Scope::Write, 1000), "stateless");
        assert_ne!(a, session_value("t2", Scope::Write, 1000));
        assert_ne!(a, session_value("t1", Scope::Read, 1000));
        assert_ne!(a, session_value("t1", Scope::Write, 1001));
    }

    #[test]
    fn mac_matches_rfc_4231_case_2() {
        let tag = mac(b"Jefe", "what do ya want for nothing?")
            .finalize()
            .into_bytes();
        assert_eq!(
            hex(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(unhex(&hex(&tag)).as_deref(), Some(&tag[..]));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn next_pages_stay_on_this_site() {
        assert_eq!(next_page(Some("/ui/flows/x")), "/ui/flows/x");
        for bad in [
            "https://evil.example/ui/",
            "//evil.example/ui/",
            "/v1/flows",
            "/ui\\x",
        ] {
            assert_eq!(next_page(Some(bad)), "/ui/flows", "{bad}");
        }
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(check_origin(&h(&[])).is_ok());
        assert!(check_origin(&h(&[("sec-fetch-site", "same-origin")])).is_ok());
        assert!(check_origin(&h(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(
            check_origin(&h(&[
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:8080")
            ]))
            .is_ok()
        );
        assert!(
            check_origin(&h(&[
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8080")
            ]))
            .is_err()
        );
    }
}
