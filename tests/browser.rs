//! The web UI in a real browser: Debian's `chromium`, headless, driven over the Chrome
//! DevTools Protocol (tests/common/cdp.rs), against a daemon running the repository's own
//! `flows/` and `canvas.yaml` with API tokens and a scripted load of 30 members. It signs in
//! with the write token through the login form, checks that the numbers on the canvas are the
//! API's and the database's, pauses and resumes a flow with its button, reads a customer's
//! story, the dead letters and the sandbox inbox, and saves a PNG screenshot of each page
//! under `target/ui-screenshots/{sqlite,postgres}/`.
//!
//! The browser is `CANVAS_TEST_CHROMIUM`, else `chromium` on `PATH` (`.ci/run` installs it);
//! without one the tests fail, they never pass unrun.

#![allow(clippy::unwrap_used)]

#[path = "common/cdp.rs"]
mod cdp;
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use canvas_engine::store::{Database, Store};
use cdp::{Cdp, Chromium, find_chromium};
use common::{Daemon, FreshDb, READ, WRITE, call, pg_base, shipped, until, zone_at};
use serde_json::{Value, json};

const WELCOME: &str = "new-member-welcome";
const CARE: &str = "post-purchase-care";
/// Members, the first `AFTERNOON` of them in a zone where it is about 15:00 (the welcome goes
/// out now), the others where it is about 03:00 (they wait for the 10:00-20:00 window).
const MEMBERS: usize = 30;
const AFTERNOON: usize = 20;
/// Of the afternoon members, the first `BUYERS` pay an order with a welcome voucher (the
/// welcome's goal; it starts post-purchase care), the first `ONLINE` of those online, and
/// the first `DELIVERED` of those get their parcel.
const BUYERS: usize = 8;
const ONLINE: usize = 4;
const DELIVERED: usize = 2;
/// The last `UNSUBSCRIBED` night members opt out while waiting for the window.
const UNSUBSCRIBED: usize = 2;

const NAMES: [&str; 10] = [
    "王小明",
    "李娜",
    "张伟",
    "刘洋",
    "陈静",
    "Ada",
    "杨帆",
    "Grace",
    "赵雪",
    "黄磊",
];

fn member(i: usize) -> String {
    format!("m-{:02}", i + 1)
}

/// Where the screenshots go: `target/ui-screenshots/BACKEND/` (the target dir of this build).
fn screenshot_dir(backend: &str) -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp
        .parent()
        .unwrap_or(tmp)
        .join("ui-screenshots")
        .join(backend);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn api(method: reqwest::Method, url: &str, token: &str, body: Option<Value>) -> Value {
    let (status, body) = call(method, url, Some(token), body).await;
    assert!((200..300).contains(&status), "{url}: {status} {body}");
    body
}

async fn post_events(base: &str, events: Vec<Value>) {
    api(
        reqwest::Method::POST,
        &format!("{base}/v1/events"),
        WRITE,
        Some(json!({ "events": events })),
    )
    .await;
}

/// A step's counter in a stats answer (0 when absent).
fn counter(stats: &Value, step: &str, key: &str) -> u64 {
    stats["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == step))
        .and_then(|s| s["counts"][key].as_u64())
        .unwrap_or(0)
}

fn total(stats: &Value, key: &str) -> u64 {
    stats["totals"][key].as_u64().unwrap_or(0)
}

/// Poll a flow's stats until `done` holds.
async fn settle(base: &str, flow: &str, done: impl Fn(&Value) -> bool) -> Value {
    until(&format!("{base}/v1/flows/{flow}/stats"), done).await
}

/// The scripted load: 30 members registered, 8 orders with a welcome voucher (half of them
/// online, two delivered), two opt-outs.
async fn load(base: &str) {
    let afternoon = zone_at(15);
    let night = zone_at(3);
    for i in 0..MEMBERS {
        let mut attributes = json!({
            "first_name": NAMES[i % NAMES.len()],
            "phone": format!("+86138000000{:02}", i + 1),
        });
        if i % 2 == 0 {
            // The welcome goes on WeChat to those who have it, on SMS to the others.
            attributes["wechat_id"] = json!(format!("oWx-member-{:02}", i + 1));
        }
        if i % 3 == 0 {
            attributes["email"] = json!(format!("member{}@example.com", i + 1));
        }
        let zone = if i < AFTERNOON { &afternoon } else { &night };
        api(
            reqwest::Method::PUT,
            &format!("{base}/v1/customers/{}", member(i)),
            WRITE,
            Some(json!({ "attributes": attributes, "timezone": zone })),
        )
        .await;
    }
    post_events(
        base,
        (0..MEMBERS)
            .map(|i| {
                json!({ "id": format!("reg-{i}"), "customer_id": member(i),
                        "name": "member_registered", "data": { "store": "SH-01" } })
            })
            .collect(),
    )
    .await;
    // The afternoon members get their welcome and wait 18 days; the others wait for 10:00.
    let night_count = (MEMBERS - AFTERNOON) as u64;
    settle(base, WELCOME, |s| {
        counter(s, "wait-before-expiry", "waiting") == AFTERNOON as u64
            && counter(s, "welcome-window", "waiting") == night_count
    })
    .await;

    let mut events: Vec<Value> = (0..BUYERS)
        .map(|i| {
            json!({ "id": format!("order-{i}"), "customer_id": member(i), "name": "order_paid",
                    "data": { "order_id": format!("SO-{}", 1000 + i), "amount": 199 + i,
                              "coupon_campaign": WELCOME,
                              "channel": if i < ONLINE { "online" } else { "store" } } })
        })
        .collect();
    events.extend((MEMBERS - UNSUBSCRIBED..MEMBERS).map(|i| {
        json!({ "id": format!("unsub-{i}"), "customer_id": member(i), "name": "unsubscribed",
                "data": {} })
    }));
    post_events(base, events).await;
    settle(base, CARE, |s| {
        counter(s, "wait-for-delivery", "waiting") == ONLINE as u64
            && counter(s, "let-it-be-worn", "waiting") == (BUYERS - ONLINE) as u64
    })
    .await;
    post_events(
        base,
        (0..DELIVERED)
            .map(|i| {
                json!({ "id": format!("delivered-{i}"), "customer_id": member(i),
                        "name": "order_delivered", "data": { "order_id": format!("SO-{}", 1000 + i) } })
            })
            .collect(),
    )
    .await;
    settle(base, CARE, |s| {
        counter(s, "wait-for-delivery", "waiting") == (ONLINE - DELIVERED) as u64
            && counter(s, "let-it-be-worn", "waiting") == (BUYERS - ONLINE + DELIVERED) as u64
    })
    .await;
    settle(base, WELCOME, |s| {
        total(s, "converted") == BUYERS as u64
            && counter(s, "welcome-window", "waiting") == night_count - UNSUBSCRIBED as u64
    })
    .await;
}

/// A JS string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The numbers drawn on a node: `in N · waiting N · …` and the lines below, by label.
async fn node_numbers(page: &mut Cdp, step: &str) -> BTreeMap<String, u64> {
    let selector = js(&format!("[data-step=\"{step}\"] text.numbers"));
    let lines = page
        .text(&format!(
            "Array.from(document.querySelectorAll({selector})).map(t => t.textContent).join('\\n')"
        ))
        .await
        .unwrap();
    let mut numbers = BTreeMap::new();
    for part in lines.lines().flat_map(|l| l.split(" · ")) {
        // `in 30`, `waiting 20`, `sent 20 (wechat 20)`: a label and the number after it.
        let mut label = Vec::new();
        for w in part.split_whitespace() {
            if let Ok(n) = w.parse::<u64>() {
                numbers.insert(label.join(" "), n);
                break;
            }
            label.push(w);
        }
    }
    assert!(
        numbers.contains_key("in"),
        "node {step} shows no `in`: {lines:?}"
    );
    numbers
}

async fn paused(base: &str, flow: &str) -> bool {
    api(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/{flow}"),
        READ,
        None,
    )
    .await["paused"]
        .as_bool()
        .unwrap()
}

/// A PNG of the page (its top 3,000 pixels) in `dir`, checked.
async fn screenshot(page: &mut Cdp, dir: &Path, name: &str) {
    let path = dir.join(name);
    let bytes = page.screenshot(&path, 3000.0).await.unwrap();
    let png = std::fs::read(&path).unwrap();
    assert_eq!(png.len(), bytes);
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        path.display()
    );
    assert!(
        png.len() > 10_000,
        "{} is only {} bytes: a blank page?",
        path.display(),
        png.len()
    );
}

/// The page's visible text.
async fn body_text(page: &mut Cdp) -> String {
    page.text("document.body.innerText").await.unwrap()
}

async fn in_a_browser(daemon: &Daemon, database: &str, backend: &str) {
    let base = &daemon.base;
    let binary = find_chromium().unwrap_or_else(|| {
        panic!(
            "no chromium: set CANVAS_TEST_CHROMIUM or put `chromium` on PATH (Debian: apt-get \
             install chromium fonts-wqy-microhei; .ci/run installs it). This test does not pass \
             unrun{}",
            if std::env::var("CI").as_deref() == Ok("true") {
                " (CI=true)"
            } else {
                ""
            }
        )
    });
    let shots = screenshot_dir(backend);
    load(base).await;
    let stats = api(
        reqwest::Method::GET,
        &format!("{base}/v1/flows/{WELCOME}/stats"),
        READ,
        None,
    )
    .await;

    let browser = Chromium::start(&binary).unwrap();
    let mut page = browser.page().await.unwrap();
    page.setup(1400, 1000).await.unwrap();

    // No session: the flows page sends the browser to the login form.
    page.navigate(&format!("{base}/ui/flows")).await.unwrap();
    assert_eq!(page.text("location.pathname").await.unwrap(), "/ui/login");
    assert_eq!(
        page.text("location.search").await.unwrap(),
        "?next=%2Fui%2Fflows"
    );
    assert!(body_text(&mut page).await.contains("Sign in"));
    screenshot(&mut page, &shots, "login.png").await;

    // Sign in with the write token, as a person would: type it, press the button.
    page.eval(&format!(
        "document.querySelector('input[name=token]').value = {}",
        js(WRITE)
    ))
    .await
    .unwrap();
    page.and_wait("document.querySelector('form.login button[type=submit]').click()")
        .await
        .unwrap();
    assert_eq!(page.text("location.pathname").await.unwrap(), "/ui/flows");
    let cookie = page.text("document.cookie").await.unwrap();
    assert!(
        !cookie.contains("canvas_session"),
        "the session cookie is HttpOnly: {cookie:?}"
    );
    let cookies = page
        .call("Network.getCookies", json!({ "urls": [base] }))
        .await
        .unwrap();
    let session = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "canvas_session")
        .unwrap_or_else(|| panic!("the browser keeps the session cookie: {cookies}"))
        .clone();
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");

    // The flows page: every loaded flow, with the counters' numbers.
    let flows = api(
        reqwest::Method::GET,
        &format!("{base}/v1/flows"),
        READ,
        None,
    )
    .await;
    let flows = flows["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("{flows}"));
    assert!(flows.len() >= 8, "the shipped flows: {flows:?}");
    for flow in flows {
        let id = flow["id"].as_str().unwrap();
        let found = page
            .eval(&format!(
                "document.querySelector({}) !== null",
                js(&format!("[data-flow=\"{id}\"] a"))
            ))
            .await
            .unwrap();
        assert_eq!(found, true, "flow {id} on the flows page");
    }
    let cell = |k: &str| {
        format!(
            "document.querySelector({}).closest('tr').querySelector({}).textContent.trim()",
            js(&format!("[data-flow=\"{WELCOME}\"]")),
            js(&format!("[data-k=\"{k}\"]"))
        )
    };
    assert_eq!(
        page.text(&cell("entered")).await.unwrap(),
        total(&stats, "entered").to_string()
    );
    assert_eq!(
        page.text(&cell("converted")).await.unwrap(),
        BUYERS.to_string()
    );
    let waiting: u64 = stats["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["counts"]["waiting"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        page.text(&cell("waiting")).await.unwrap(),
        waiting.to_string()
    );
    assert!(body_text(&mut page).await.contains("New member welcome"));
    screenshot(&mut page, &shots, "flows.png").await;

    // The welcome's canvas: each node's numbers are the API's counters.
    page.navigate(&format!("{base}/ui/flows/{WELCOME}"))
        .await
        .unwrap();
    let steps = stats["steps"].as_array().unwrap();
    assert!(steps.len() >= 9, "{stats}");
    let mut moved = 0;
    for step in steps {
        let id = step["step"].as_str().unwrap();
        let shown = node_numbers(&mut page, id).await;
        let entered = step["counts"]["entered"].as_u64().unwrap_or(0);
        assert_eq!(shown["in"], entered, "node {id}: {shown:?} vs {step}");
        let waiting = step["counts"]["waiting"].as_u64().unwrap_or(0);
        assert_eq!(
            shown.get("waiting").copied().unwrap_or(0),
            waiting,
            "node {id}: {shown:?} vs {step}"
        );
        if let Some(converted) = step["counts"]["converted"].as_u64() {
            assert_eq!(shown.get("converted"), Some(&converted), "node {id}");
        }
        if entered > 0 {
            moved += 1;
        }
    }
    assert!(moved >= 4, "the load moves several steps: {stats}");
    assert_eq!(counter(&stats, "issue-vouchers", "entered"), MEMBERS as u64);
    assert_eq!(counter(&stats, "welcome", "entered"), AFTERNOON as u64);
    assert_eq!(counter(&stats, "welcome", "converted"), BUYERS as u64);
    // Each edge's label: the runs that took it and their share, as the API says.
    let mut labelled = 0;
    for edge in stats["edges"].as_array().unwrap() {
        let n = edge["n"].as_u64().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let (from, to) = (edge["from"].as_str().unwrap(), edge["to"].as_str().unwrap());
        let label = page
            .text(&format!(
                "document.querySelector({}).textContent",
                js(&format!(
                    "g.edge[data-from=\"{from}\"][data-to=\"{to}\"] text"
                ))
            ))
            .await
            .unwrap();
        let expected = match edge["share"].as_f64() {
            Some(p) => format!("{n} ({:.0}%)", 100.0 * p),
            None => n.to_string(),
        };
        assert!(
            label.contains(&expected),
            "edge {from} → {to}: {label:?}, the API says {edge}"
        );
        labelled += 1;
    }
    assert!(labelled >= 3, "{stats}");
    // The totals table is the API's totals.
    let totals = page
        .eval(
            "Object.fromEntries(Array.from(document.querySelectorAll('aside.rules table.grid:not(.split) tr'))\
             .filter(r => r.querySelector('th') && r.querySelector('td'))\
             .map(r => [r.querySelector('th').textContent.trim(), r.querySelector('td').textContent.trim()]))",
        )
        .await
        .unwrap();
    assert_eq!(
        totals["entered"],
        total(&stats, "entered").to_string(),
        "{totals}"
    );
    for (k, v) in stats["totals"].as_object().unwrap() {
        if !k.starts_with("to:") {
            assert_eq!(totals[k], v.to_string(), "totals {k}: {totals}");
        }
    }
    // … and the database's: its runs of the flow, and every counter recomputed from history.
    let db = Database::open_existing(database, Duration::from_secs(5))
        .await
        .unwrap();
    let mut runs = 0;
    for i in 0..MEMBERS {
        runs += db
            .runs(&member(i))
            .await
            .unwrap()
            .iter()
            .filter(|r| r.flow == WELCOME)
            .count();
    }
    assert_eq!(runs as u64, total(&stats, "entered"));
    assert_eq!(runs, MEMBERS);
    for flow in [WELCOME, CARE] {
        let wrong = canvas_engine::stats::audit(&db, flow).await.unwrap();
        assert!(wrong.is_empty(), "{flow}: {wrong:#?}");
    }
    let text = body_text(&mut page).await;
    assert!(text.contains("welcome/hello"), "the template");
    assert!(text.contains("order_paid within 3w"), "the goal");
    // The graph scrolls inside 80% of the window's height: a window tall enough to show it
    // whole, for the picture.
    let graph = page
        .eval("document.querySelector('.graph svg').getBoundingClientRect().height")
        .await
        .unwrap()
        .as_f64()
        .unwrap();
    let tall = ((graph + 40.0) / 0.8).ceil().max(1000.0) as u32;
    page.viewport(1400, tall).await.unwrap();
    screenshot(&mut page, &shots, "canvas.png").await;
    page.viewport(1400, 1000).await.unwrap();

    // Pause with the button, then resume.
    let badge = "document.querySelector('.titlebar .badge').textContent.trim()";
    let button = "document.querySelector('.titlebar form button[type=submit]')";
    assert_eq!(page.text(badge).await.unwrap(), "live");
    assert!(!paused(base, WELCOME).await);
    assert_eq!(
        page.text(&format!("{button}.textContent.trim()"))
            .await
            .unwrap(),
        "Pause"
    );
    page.and_wait(&format!("{button}.click()")).await.unwrap();
    assert_eq!(
        page.text("location.pathname").await.unwrap(),
        format!("/ui/flows/{WELCOME}")
    );
    assert_eq!(page.text(badge).await.unwrap(), "paused");
    assert!(paused(base, WELCOME).await, "paused through the browser");
    assert_eq!(
        page.text(&format!("{button}.textContent.trim()"))
            .await
            .unwrap(),
        "Resume"
    );
    page.and_wait(&format!("{button}.click()")).await.unwrap();
    assert_eq!(page.text(badge).await.unwrap(), "live");
    assert!(!paused(base, WELCOME).await, "resumed through the browser");

    // A member's story: 王小明 got the welcome on WeChat and bought with a voucher.
    page.navigate(&format!("{base}/ui/customers/{}", member(0)))
        .await
        .unwrap();
    let text = body_text(&mut page).await;
    assert!(
        text.contains("Welcome to Linen Lane, 王小明!"),
        "the rendered WeChat text: {text}"
    );
    assert!(text.contains(WELCOME) && text.contains(CARE), "both runs");
    assert!(text.contains("last touch welcome"), "the goal's last touch");
    assert!(text.contains(&zone_at(15)), "times in the member's zone");
    screenshot(&mut page, &shots, "customer.png").await;

    // The sandbox inbox: what the sandbox channels delivered.
    page.navigate(&format!("{base}/ui/sandbox")).await.unwrap();
    let text = body_text(&mut page).await;
    for i in [0, 2, 4] {
        let name = NAMES[i];
        assert!(
            text.contains(&format!("Welcome to Linen Lane, {name}!")),
            "{name}'s welcome in the sandbox: {text}"
        );
    }
    assert!(text.contains("wechat") && text.contains("sms"));
    assert!(text.contains("【Linen Lane】Welcome!"), "an SMS welcome");
    screenshot(&mut page, &shots, "sandbox.png").await;

    // Dead letters: sandbox channels never give up, so there are none.
    page.navigate(&format!("{base}/ui/deadletters"))
        .await
        .unwrap();
    assert!(body_text(&mut page).await.contains("No dead letters."));
    screenshot(&mut page, &shots, "deadletters.png").await;

    drop(page);
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canvas_pages_in_a_real_browser_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let database = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let daemon = Daemon::spawn(flows, &database, &[], None);
    in_a_browser(&daemon, &database, "sqlite").await;
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canvas_pages_in_a_real_browser_postgres() {
    let db = FreshDb::create(&pg_base(), "canvas_browser").await;
    let dir = tempfile::tempdir().unwrap();
    let flows = shipped(dir.path());
    let daemon = Daemon::spawn(flows, &db.url, &[], None);
    in_a_browser(&daemon, &db.url, "postgres").await;
    assert!(daemon.terminate().success());
    db.drop_it().await;
}
