//! The web UI as an operator uses it, against a real daemon: the shipped flows and
//! `canvas.yaml` (sandbox channels), a customer whose id needs escaping, the login, every
//! page's HTML (escaped, the canvas's node ids in its SVG), pause / resume and CSRF, the
//! sandbox inbox — on SQLite and on Postgres — and a dead letter retried from its page.

#![allow(clippy::unwrap_used)]

mod common;

use common::{
    Daemon, FreshDb, READ, SINK_SMS, WRITE, afternoon_zone, call, pg_base, shipped, until,
};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;

/// A customer id a page must escape (and a path must percent-encode).
const CUSTOMER: &str = "会员<b>&\"1\"";
const CUSTOMER_HTML: &str = "会员&lt;b&gt;&amp;&quot;1&quot;";
const FLOW: &str = "new-member-welcome";

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A browser without cookies of its own and without following redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A page as the browser got it. The templates escape `/` too (`&#x2f;`, minijinja's HTML
/// escaper); the checks below read ids with their slashes, so `body` has them back.
struct Page {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(url: &str, cookie: Option<&str>) -> Page {
    let mut request = browser().get(url);
    if let Some(c) = cookie {
        request = request.header(COOKIE, c);
    }
    let r = request.send().await.unwrap();
    Page {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap().replace("&#x2f;", "/"),
    }
}

async fn post(url: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Page {
    let mut request = browser().post(url).form(form);
    if let Some(c) = cookie {
        request = request.header(COOKIE, c);
    }
    let r = request.send().await.unwrap();
    Page {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap().replace("&#x2f;", "/"),
    }
}

/// Sign in with `token`; the cookie to send back (`canvas_session=…`).
async fn login(base: &str, token: &str) -> String {
    let page = post(
        &format!("{base}/ui/login"),
        None,
        &[("token", token), ("next", "/ui/flows")],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(page.headers[LOCATION], "/ui/flows");
    let set = page.headers[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    set.split(';').next().unwrap().to_owned()
}

/// The CSRF token of the page's first form.
fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

async fn paused(base: &str) -> bool {
    let (s, body) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/{FLOW}"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body["paused"].as_bool().unwrap()
}

async fn ui_pages(daemon: &Daemon) {
    let base = &daemon.base;
    // A customer enters the welcome flow; the welcome lands in the sandbox.
    let (s, body) = call(
        reqwest::Method::PUT,
        &format!("{base}/v1/customers/{}", enc(CUSTOMER)),
        Some(WRITE),
        Some(json!({
            "attributes": { "first_name": "<i>Ada</i> 小明", "phone": "+8613800000001" },
            "timezone": afternoon_zone(),
        })),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": [
            { "id": "e1", "customer_id": CUSTOMER, "name": "member_registered", "data": {} }
        ] })),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    until(
        &format!("{base}/v1/sandbox?customer_id={}", enc(CUSTOMER)),
        |b| {
            b["messages"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["step"] == "welcome"))
        },
    )
    .await;

    // No session: to the login form, which says where to come back to.
    let page = get(&format!("{base}/ui/flows/{FLOW}"), None).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(
        page.headers[LOCATION],
        format!("/ui/login?next=%2Fui%2Fflows%2F{FLOW}")
    );
    let page = get(&format!("{base}/"), None).await;
    assert_eq!(page.headers[LOCATION], "/ui/flows");
    let page = get(&format!("{base}/ui/login"), None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("name=\"token\""));
    // A wrong token is refused in words; a forged or expired cookie is no session.
    let page = post(&format!("{base}/ui/login"), None, &[("token", "nope")]).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert!(page.body.contains("unknown token"), "{}", page.body);
    assert!(!page.headers.contains_key(SET_COOKIE));
    for forged in [
        "canvas_session=write.99999999999.00",
        "canvas_session=write.1.abc",
        "canvas_session=junk",
    ] {
        let page = get(&format!("{base}/ui/flows"), Some(forged)).await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{forged}");
    }

    // A read session sees every page.
    let reader = login(base, READ).await;
    let page = get(&format!("{base}/ui/flows"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.headers[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert!(page.body.contains("<meta charset=\"utf-8\">"));
    assert!(page.body.contains(&format!("href=\"/ui/flows/{FLOW}\"")));
    assert!(page.body.contains("New member welcome - two vouchers"));
    assert!(page.body.contains(">live<"), "{}", page.body);
    let css = get(&format!("{base}/ui/assets/ui.css"), Some(&reader)).await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.body.contains("\"PingFang SC\""));

    // The canvas: every step of the flow is a node of the SVG, with its numbers.
    let (_, flow) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/{FLOW}"),
        Some(READ),
        None,
    )
    .await;
    let canvas = get(&format!("{base}/ui/flows/{FLOW}"), Some(&reader)).await;
    assert_eq!(canvas.status, StatusCode::OK, "{}", canvas.body);
    assert!(canvas.body.contains("<svg"));
    for step in flow["steps"].as_array().unwrap() {
        let id = step["step"].as_str().unwrap();
        assert!(
            canvas.body.contains(&format!("data-step=\"{id}\"")),
            "node {id} in the SVG"
        );
        if step["waiting"].as_u64().unwrap() > 0 {
            let n = step["waiting"].as_u64().unwrap();
            assert!(canvas.body.contains(&format!("waiting {n}")), "{id}");
        }
    }
    // The numbers on the nodes are the API's counters.
    let (_, stats) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/{FLOW}/stats"),
        Some(READ),
        None,
    )
    .await;
    for step in stats["steps"].as_array().unwrap() {
        let entered = step["counts"]["entered"].as_u64().unwrap_or(0);
        let id = step["step"].as_str().unwrap();
        let node = canvas
            .body
            .split(&format!("data-step=\"{id}\""))
            .nth(1)
            .and_then(|rest| rest.split("</a>").next())
            .unwrap_or_default();
        assert!(node.contains(&format!("in {entered}")), "{id}: {node}");
    }
    assert_eq!(stats["totals"]["entered"], 1, "{stats}");
    assert!(canvas.body.contains("template welcome/hello"));
    assert!(
        canvas.body.contains("event member_registered"),
        "the trigger"
    );
    assert!(canvas.body.contains("order_paid within 3w"), "the goal");
    assert!(canvas.body.contains("on event unsubscribed"), "the exit");
    assert!(
        canvas
            .body
            .contains("disabled title=\"needs a write token\""),
        "a reader's pause button is disabled"
    );
    let version = flow["version"].as_str().unwrap();
    let page = get(
        &format!("{base}/ui/flows/{FLOW}?from=2026-01-01&to=2026-01-31&version={version}"),
        Some(&reader),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    for (bad, says) in [
        ("from=2026-13-01", "YYYY-MM-DD"),
        ("from=2026-02-01&to=2026-01-01", "after"),
        ("version=nope", "no record"),
        ("color=red", "unknown field"),
    ] {
        let page = get(&format!("{base}/ui/flows/{FLOW}?{bad}"), Some(&reader)).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(page.body.contains(says), "{bad}: {}", page.body);
    }
    let page = get(&format!("{base}/ui/flows/no-such-flow"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(
        page.body.contains("no flow `no-such-flow`"),
        "{}",
        page.body
    );
    let page = get(&format!("{base}/ui/nothing/here"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(page.body.contains("<h1>404"), "an HTML page: {}", page.body);

    // A node lists who waits there; the customer's id is escaped and linked.
    let waiting = get(
        &format!("{base}/ui/flows/{FLOW}/steps/wait-before-expiry"),
        Some(&reader),
    )
    .await;
    assert_eq!(waiting.status, StatusCode::OK, "{}", waiting.body);
    assert!(waiting.body.contains(CUSTOMER_HTML), "{}", waiting.body);
    assert!(
        waiting
            .body
            .contains(&format!("/ui/customers/{}", enc(CUSTOMER)))
    );
    assert!(!waiting.body.contains("<b>&"), "never unescaped");

    // The customer's story: runs, the timeline with times in their zone, the delivery.
    let story = get(
        &format!("{base}/ui/customers/{}", enc(CUSTOMER)),
        Some(&reader),
    )
    .await;
    assert_eq!(story.status, StatusCode::OK, "{}", story.body);
    assert!(story.body.contains(CUSTOMER_HTML));
    assert!(story.body.contains(&format!("{FLOW}/")), "the run id");
    assert!(
        story.body.contains(&afternoon_zone()),
        "the customer's zone"
    );
    assert!(story.body.contains("title=\"20"), "UTC on hover");
    assert!(story.body.contains("welcome/hello"));
    assert!(story.body.contains("Welcome!"), "the rendered text");
    assert!(story.body.contains("welcome_vouchers"), "the run's vars");
    assert!(
        story.body.contains("【Linen Lane】Welcome!"),
        "CJK text as it was sent"
    );
    assert!(!story.body.contains("<b>&"), "the id never unescaped");
    let search = get(
        &format!("{base}/ui/customers?id={}", enc(CUSTOMER)),
        Some(&reader),
    )
    .await;
    assert_eq!(
        search.headers[LOCATION],
        format!("/ui/customers/{}", enc(CUSTOMER))
    );
    let page = get(&format!("{base}/ui/customers/nobody"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);

    // The sandbox inbox, newest first, filtered.
    let inbox = get(&format!("{base}/ui/sandbox?channel=sms"), Some(&reader)).await;
    assert_eq!(inbox.status, StatusCode::OK, "{}", inbox.body);
    assert!(inbox.body.contains("Welcome!"));
    assert!(inbox.body.contains(CUSTOMER_HTML));
    let page = get(&format!("{base}/ui/sandbox?limit=x"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    let page = get(&format!("{base}/ui/deadletters"), Some(&reader)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("No dead letters."));

    // Pausing needs write scope and the form's CSRF token.
    let reader_csrf = csrf(&canvas.body);
    let page = post(
        &format!("{base}/ui/flows/{FLOW}/pause"),
        Some(&reader),
        &[("csrf", &reader_csrf)],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "a reader cannot pause");
    let writer = login(base, WRITE).await;
    let canvas = get(&format!("{base}/ui/flows/{FLOW}"), Some(&writer)).await;
    assert!(
        canvas
            .body
            .contains(&format!("action=\"/ui/flows/{FLOW}/pause\""))
    );
    let token = csrf(&canvas.body);
    assert_ne!(token, reader_csrf, "a token per session");
    for form in [
        vec![],
        vec![("csrf", "0000")],
        vec![("csrf", reader_csrf.as_str())],
    ] {
        let page = post(
            &format!("{base}/ui/flows/{FLOW}/pause"),
            Some(&writer),
            &form,
        )
        .await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{form:?}");
        assert!(page.body.contains("CSRF"), "{}", page.body);
    }
    let cross = browser()
        .post(format!("{base}/ui/flows/{FLOW}/pause"))
        .header(COOKIE, &writer)
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN, "another site's form");
    assert!(!paused(base).await);
    let page = post(
        &format!("{base}/ui/flows/{FLOW}/pause"),
        Some(&writer),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert!(paused(base).await, "paused through the UI");
    let canvas = get(&format!("{base}/ui/flows/{FLOW}"), Some(&writer)).await;
    assert!(canvas.body.contains(">paused<"));
    let page = post(
        &format!("{base}/ui/flows/{FLOW}/resume"),
        Some(&writer),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(!paused(base).await, "resumed through the UI");

    // Logging out clears the cookie.
    let page = post(
        &format!("{base}/ui/logout"),
        Some(&writer),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(
        page.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn ui_pages_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let daemon = Daemon::spawn(flows, &database, &[], None);
    ui_pages(&daemon).await;
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn ui_pages_on_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_ui").await;
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let daemon = Daemon::spawn(flows, &db.url, &[], None);
    ui_pages(&daemon).await;
    assert!(daemon.terminate().success());
    db.drop_it().await;
}

#[tokio::test]
async fn a_dead_letter_is_retried_from_its_page() {
    let daemon = Daemon::start(SINK_SMS);
    let base = &daemon.base;
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{base}/v1/customers/c1"),
        Some(WRITE),
        Some(json!({ "attributes": { "phone": "+8613800000002" } })),
    )
    .await;
    assert_eq!(s, 202);
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        Some(WRITE),
        Some(json!({ "events": [{ "id": "s1", "customer_id": "c1", "name": "signed_up" }] })),
    )
    .await;
    assert_eq!(s, 200);
    let before = until(&format!("{base}/v1/deadletters"), |b| {
        b["deadletters"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    let dead_at = before["deadletters"][0]["dead_at"].clone();
    let writer = login(base, WRITE).await;
    let page = get(&format!("{base}/ui/deadletters"), Some(&writer)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("welcome/c1/1/hello"), "{}", page.body);
    assert!(page.body.contains("1 attempt"));
    let token = csrf(&page.body);
    let page = post(
        &format!("{base}/ui/deadletters/retry"),
        Some(&writer),
        &[("key", "welcome/c1/1/hello")],
    )
    .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "no CSRF token");
    let page = post(
        &format!("{base}/ui/deadletters/retry"),
        Some(&writer),
        &[("key", "welcome/c1/1/hello"), ("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    // Sent again (to the same closed port, with a fresh set of attempts): dead again, later.
    until(&format!("{base}/v1/deadletters"), |b| {
        b["deadletters"][0]["dead_at"] != dead_at && b["deadletters"][0]["dead_at"].is_string()
    })
    .await;
    let page = post(
        &format!("{base}/ui/deadletters/retry"),
        Some(&writer),
        &[("key", "no/such/key"), ("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn sessions_are_stateless_across_daemons_and_end_with_their_token() {
    // Two daemons with the same tokens (two SQLite files, as two daemons behind one address
    // would be with one Postgres): a session made by one is taken by the other.
    let a = Daemon::start(SINK_SMS);
    let b = Daemon::start(SINK_SMS);
    let cookie = login(&a.base, WRITE).await;
    let page = get(&format!("{}/ui/flows", b.base), Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let token = csrf(&page.body);
    let page = post(
        &format!("{}/ui/flows/welcome/pause", b.base),
        Some(&cookie),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    // A daemon whose write token was rotated: the old session is no session.
    let rotated = Daemon::start_with(SINK_SMS, &[("CANVAS_API_TOKEN", "rotated-token")]);
    let page = get(&format!("{}/ui/flows", rotated.base), Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(
        page.headers[LOCATION]
            .to_str()
            .unwrap()
            .starts_with("/ui/login")
    );
    for d in [a, b, rotated] {
        assert!(d.terminate().success());
    }
}

#[tokio::test]
async fn without_tokens_the_pages_are_open_and_posts_still_need_the_csrf_token() {
    let daemon = Daemon::start_with(
        SINK_SMS,
        &[("CANVAS_API_TOKEN", ""), ("CANVAS_API_READ_TOKEN", "")],
    );
    let base = &daemon.base;
    let page = get(&format!("{base}/ui/flows"), None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(!page.body.contains("Log out"), "no session to end");
    let page = get(&format!("{base}/ui/login"), None).await;
    assert_eq!(page.headers[LOCATION], "/ui/flows");
    let canvas = get(&format!("{base}/ui/flows/welcome"), None).await;
    assert_eq!(canvas.status, StatusCode::OK);
    assert!(canvas.body.contains("data-step=\"hello\""));
    assert!(
        canvas.body.contains("transactional"),
        "the mark on a transactional send"
    );
    let token = csrf(&canvas.body);
    let page = post(&format!("{base}/ui/flows/welcome/pause"), None, &[]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    let cross = browser()
        .post(format!("{base}/ui/flows/welcome/pause"))
        .header("origin", "http://evil.example")
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN, "another site's form");
    let page = post(
        &format!("{base}/ui/flows/welcome/pause"),
        None,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let (s, flow) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/welcome"),
        None,
        None,
    )
    .await;
    assert_eq!((s, &flow["paused"]), (200, &json!(true)), "{flow}");
    assert!(daemon.terminate().success());
}
