//! `canvas serve`, the real binary on a SQLite file, driven over HTTP: auth and scopes,
//! bad requests answered with a JSON 4xx, ingestion committed before the answer and
//! deduplicated by id, journeys and flow counts, pause and resume, metrics, and a graceful
//! exit on SIGTERM.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::time::Duration;

use common::{Daemon, READ, WRITE, call, client, error_code, raw, until};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_end_to_end_on_sqlite() {
    let d = Daemon::start(&format!(
        "server:\n  limits: {{ max_batch: 3, max_body_bytes: 20000 }}\n{}",
        common::SINK_SMS
    ));
    let b = &d.base;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // Health needs no token; readiness checks the database.
    assert_eq!(
        call(get.clone(), &format!("{b}/healthz"), None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        call(get.clone(), &format!("{b}/readyz"), None, None)
            .await
            .0,
        200
    );

    // Auth: none, unknown, read-only on a write endpoint.
    let events = format!("{b}/v1/events");
    let one = json!({"events":[{"id":"e1","customer_id":"c1","name":"signed_up"}]});
    let (s, body) = call(post.clone(), &events, None, Some(one.clone())).await;
    assert_eq!((s, error_code(&body)), (401, "unauthorized"), "{body}");
    let (s, body) = call(post.clone(), &events, Some("nope"), Some(one.clone())).await;
    assert_eq!((s, error_code(&body)), (401, "unauthorized"), "{body}");
    let (s, body) = call(post.clone(), &events, Some(READ), Some(one.clone())).await;
    assert_eq!((s, error_code(&body)), (403, "forbidden"), "{body}");

    // Bad requests: a JSON 4xx that says what is wrong.
    let (s, body) = raw(&events, WRITE, "{\"events\": [").await;
    assert_eq!(s, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON"),
        "{body}"
    );
    let (s, body) = raw(
        &events,
        WRITE,
        "{\"events\": [{\"id\":\"\",\"customer_id\":\"c\",\"name\":\"n\"}]}",
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("events[0].id"),
        "{body}"
    );
    let (s, body) = raw(&events, WRITE, "{\"events\": [{\"id\":\"x\",\"customer_id\":\"c\",\"name\":\"n\",\"occurred_at\":\"yesterday\"}]}").await;
    assert_eq!(s, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("RFC 3339"),
        "{body}"
    );
    let (s, body) = raw(&events, WRITE, "{\"evnts\": []}").await;
    assert_eq!(s, 400, "{body}");
    let four = json!({"events":[
        {"id":"a","customer_id":"c","name":"n"},{"id":"b","customer_id":"c","name":"n"},
        {"id":"c","customer_id":"c","name":"n"},{"id":"d","customer_id":"c","name":"n"}]});
    let (s, body) = call(post.clone(), &events, Some(WRITE), Some(four)).await;
    assert_eq!((s, error_code(&body)), (413, "batch_too_long"), "{body}");
    let huge = json!({"events":[{"id":"big","customer_id":"c","name":"n","data":{"x":"y".repeat(30_000)}}]});
    let (s, body) = call(post.clone(), &events, Some(WRITE), Some(huge)).await;
    assert_eq!((s, error_code(&body)), (413, "too_large"), "{body}");
    let (s, body) = call(get.clone(), &format!("{b}/v1/nowhere"), Some(READ), None).await;
    assert_eq!((s, error_code(&body)), (404, "not_found"), "{body}");
    let (s, body) = call(get.clone(), &events, Some(READ), None).await;
    assert_eq!(
        (s, error_code(&body)),
        (405, "method_not_allowed"),
        "{body}"
    );
    let (s, body) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/c1"),
        Some(WRITE),
        Some(json!({"attributes":{}, "timezone":"Mars/Olympus"})),
    )
    .await;
    assert_eq!(s, 400, "{body}");

    // A customer, then their sign-up: committed before the answer, deduplicated by id.
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{b}/v1/customers/c1"),
        Some(WRITE),
        Some(json!({"attributes":{"first_name":"Ada","phone":"+8613800000001"},"timezone":"Asia/Shanghai"})),
    )
    .await;
    assert_eq!(s, 202);
    let (s, body) = call(post.clone(), &events, Some(WRITE), Some(one.clone())).await;
    assert_eq!((s, &body), (200, &json!({"accepted":1,"duplicates":0})));
    let (s, body) = call(post.clone(), &events, Some(WRITE), Some(one.clone())).await;
    assert_eq!((s, &body), (200, &json!({"accepted":0,"duplicates":1})));

    // The journey: sent the welcome, waits for an order.
    let journeys = format!("{b}/v1/customers/c1/journeys");
    let body = until(&journeys, |j| {
        j["journeys"][0]["where"]["for_event"] == json!("order_paid")
    })
    .await;
    let run = &body["journeys"][0];
    assert_eq!(run["flow"], json!("welcome"));
    assert_eq!(run["status"], json!("waiting"));
    assert_eq!(run["where"]["step"], json!("wait-order"));
    let actions: Vec<&str> = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.first(), Some(&"sent"), "{run}");
    let delivery = &run["deliveries"][0];
    assert_eq!(
        delivery["key"],
        json!(format!("{}/hello", run["run_id"].as_str().unwrap()))
    );
    assert_eq!(delivery["channel"], json!("sms"));
    assert_eq!(delivery["address"], json!("+8613800000001"));

    // The order arrives: thanks is sent and the run ends.
    let paid = json!({"events":[{"id":"e2","customer_id":"c1","name":"order_paid","data":{"order_id":"O-7"},"occurred_at":"2026-11-22T10:00:00+08:00"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(paid)).await.0,
        200
    );
    let body = until(&journeys, |j| j["journeys"][0]["status"] == json!("ended")).await;
    assert_eq!(body["journeys"][0]["where"]["outcome"], json!("finished"));
    assert_eq!(
        body["journeys"][0]["deliveries"].as_array().unwrap().len(),
        2
    );

    // Flows: counts and per-step waiting.
    let (s, body) = call(get.clone(), &format!("{b}/v1/flows"), Some(READ), None).await;
    assert_eq!(s, 200);
    assert_eq!(body["flows"][0]["id"], json!("welcome"));
    let (s, body) = call(
        get.clone(),
        &format!("{b}/v1/flows/welcome"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["counts"]["entered"], json!(1));
    assert_eq!(body["counts"]["completed"], json!(1));
    assert_eq!(body["versions"].as_array().unwrap().len(), 1);
    let (s, _) = call(get.clone(), &format!("{b}/v1/flows/nope"), Some(READ), None).await;
    assert_eq!(s, 404);

    // Paused: nobody enters; resumed: they do again.
    let (s, body) = call(
        post.clone(),
        &format!("{b}/v1/flows/welcome/pause"),
        Some(WRITE),
        None,
    )
    .await;
    assert_eq!((s, &body["paused"]), (200, &json!(true)), "{body}");
    let c2 = json!({"events":[{"id":"e3","customer_id":"c2","name":"signed_up"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(c2)).await.0,
        200
    );
    // Wait until the inbox item is applied (the metric counts it), then check no run began.
    until(&format!("{b}/v1/flows"), |f| {
        f["flows"][0]["paused"] == json!(true)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (s, body) = call(
        get.clone(),
        &format!("{b}/v1/customers/c2/journeys"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["journeys"], json!([]), "{body}");
    let (s, _) = call(
        post.clone(),
        &format!("{b}/v1/flows/welcome/resume"),
        Some(WRITE),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let c3 = json!({"events":[{"id":"e4","customer_id":"c3","name":"signed_up"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(c3)).await.0,
        200
    );
    until(&format!("{b}/v1/customers/c3/journeys"), |j| {
        j["journeys"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    // Metrics: Prometheus text with the engine's counters.
    let resp = client()
        .get(format!("{b}/metrics"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    for name in [
        "canvas_events_received_total{source=\"api\"} 5",
        "canvas_inbox_accepted_total{source=\"api\"} 5",
        "canvas_inbox_duplicates_total{source=\"api\"} 1",
        "canvas_transitions_total",
        "canvas_batch_commit_seconds_bucket",
        "canvas_outbox_depth{status=\"pending\"}",
        "canvas_due_timer_lag_seconds",
    ] {
        assert!(text.contains(name), "metrics lack `{name}`:\n{text}");
    }

    // SIGTERM: readiness goes, the process exits 0.
    let status = d.terminate();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_publishes_valid_changes_and_keeps_runs_on_their_version() {
    // The folder and database outlive the first daemon: it is restarted midway.
    let dir = tempfile::tempdir().unwrap();
    let flow_dir = dir.path().join("flows");
    common::write_flows(&flow_dir, common::SINK_SMS);
    let db = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let d = Daemon::spawn(flow_dir.clone(), &db, &[], None);
    let b = &d.base.clone();
    let post = reqwest::Method::POST;
    let events = format!("{b}/v1/events");
    let version =
        |body: &serde_json::Value| body["flows"][0]["version"].as_str().unwrap().to_owned();

    let (_, flows) = call(
        reqwest::Method::GET,
        &format!("{b}/v1/flows"),
        Some(READ),
        None,
    )
    .await;
    let v1 = version(&flows);
    for c in ["c1", "c2"] {
        let (s, _) = call(
            reqwest::Method::PUT,
            &format!("{b}/v1/customers/{c}"),
            Some(WRITE),
            Some(json!({"attributes":{"first_name":"Ada","phone":"+8613800000001"}})),
        )
        .await;
        assert_eq!(s, 202);
    }
    let e1 = json!({"events":[{"id":"e1","customer_id":"c1","name":"signed_up"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(e1)).await.0,
        200
    );
    until(&format!("{b}/v1/customers/c1/journeys"), |j| {
        j["journeys"][0]["where"]["step"] == json!("wait-order")
    })
    .await;

    // A valid change: a new version is published; c1's run stays on v1.
    let changed = common::FLOW.replace("template: w/thanks", "template: w/thanks-v2");
    std::fs::write(
        d.flows.join("templates/w/thanks-v2.txt"),
        "Order {{ event.data.order_id }}: thank you!\n",
    )
    .unwrap();
    std::fs::write(d.flows.join("welcome.yaml"), changed).unwrap();
    let flows = until(&format!("{b}/v1/flows"), |f| {
        f["flows"][0]["version"] != json!(v1)
    })
    .await;
    let v2 = version(&flows);
    let e2 = json!({"events":[{"id":"e2","customer_id":"c2","name":"signed_up"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(e2)).await.0,
        200
    );
    let j2 = until(&format!("{b}/v1/customers/c2/journeys"), |j| {
        j["journeys"][0]["where"]["step"] == json!("wait-order")
    })
    .await;
    assert_eq!(j2["journeys"][0]["version"], json!(v2));

    // A restart: c1's run is pinned to v1, which is no longer in the folder; the daemon
    // rebuilds it from the recorded source.
    assert!(d.terminate().success());
    let d = Daemon::spawn(flow_dir.clone(), &db, &[], None);
    let b = &d.base.clone();
    let events = format!("{b}/v1/events");
    let paid = |c: &str, id: &str| json!({"events":[{"id":id,"customer_id":c,"name":"order_paid","data":{"order_id":"O-1"}}]});
    for (c, id) in [("c1", "p1"), ("c2", "p2")] {
        assert_eq!(
            call(post.clone(), &events, Some(WRITE), Some(paid(c, id)))
                .await
                .0,
            200
        );
    }
    let j1 = until(&format!("{b}/v1/customers/c1/journeys"), |j| {
        j["journeys"][0]["status"] == json!("ended")
    })
    .await;
    let j2 = until(&format!("{b}/v1/customers/c2/journeys"), |j| {
        j["journeys"][0]["status"] == json!("ended")
    })
    .await;
    assert_eq!(j1["journeys"][0]["version"], json!(v1));
    assert_eq!(
        j1["journeys"][0]["deliveries"][1]["template"],
        json!("w/thanks"),
        "{j1}"
    );
    assert_eq!(
        j2["journeys"][0]["deliveries"][1]["template"],
        json!("w/thanks-v2"),
        "{j2}"
    );
    let (_, detail) = call(
        reqwest::Method::GET,
        &format!("{b}/v1/flows/welcome"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(detail["versions"].as_array().unwrap().len(), 2, "{detail}");

    // An invalid change is rejected with its diagnostics; v2 keeps running.
    std::fs::write(
        d.flows.join("welcome.yaml"),
        common::FLOW
            .replace("next: done", "next: nowhere")
            .replace("on_timeout: done", "on_timeout: nowhere"),
    )
    .unwrap();
    let line = d.wait_log("flow change rejected");
    assert!(line.contains("flow change rejected"), "{line}");
    d.wait_log("nowhere");
    let (_, flows) = call(
        reqwest::Method::GET,
        &format!("{b}/v1/flows"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(version(&flows), v2);
    let e3 = json!({"events":[{"id":"e3","customer_id":"c1","name":"signed_up"}]});
    assert_eq!(
        call(post.clone(), &events, Some(WRITE), Some(e3)).await.0,
        200
    );
    let j = until(&format!("{b}/v1/customers/c1/journeys"), |j| {
        j["journeys"].as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    assert_eq!(j["journeys"][1]["version"], json!(v2));
    assert!(d.terminate().success());
}

/// Defect: a trigger `where` that read a missing attribute (`customer.orders_count` without
/// `has()`) failed at `debug` only: nobody entered, and neither the API, the metrics, the
/// log nor `canvas status` said why. Now every failure is counted per flow step and logged
/// at `warn` with the customer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_where_is_counted_in_the_api_metrics_status_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    common::write_flows(&flows, common::SINK_SMS);
    std::fs::write(
        flows.join("vip.yaml"),
        "flow: vip\nname: VIP\ntimezone: UTC\ntrigger:\n  event: order_paid\n  where: customer.orders_count > 3\nsteps:\n  - { id: done, exit: vip }\n",
    )
    .unwrap();
    let db = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let d = Daemon::spawn(flows, &db, &[], None);
    let b = d.base.clone();
    let paid = |id: &str| json!({"events":[{"id":id,"customer_id":"c1","name":"order_paid"}]});
    for id in ["p1", "p2"] {
        let (s, body) = call(
            reqwest::Method::POST,
            &format!("{b}/v1/events"),
            Some(WRITE),
            Some(paid(id)),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    let flow = until(&format!("{b}/v1/flows/vip"), |f| {
        f["failures"][0]["count"] == json!(2)
    })
    .await;
    let f = &flow["failures"][0];
    assert_eq!(f["step"], json!("trigger"), "{flow}");
    assert_eq!(f["last_customer"], json!("c1"), "{flow}");
    assert!(
        f["last_error"].as_str().unwrap().contains("orders_count"),
        "{flow}"
    );
    let line = d.wait_log("orders_count");
    assert!(
        line.contains("WARN") && line.contains("customer=c1") && line.contains("flow=vip"),
        "{line}"
    );
    let metrics = client()
        .get(format!("{b}/metrics"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("canvas_run_failures{flow=\"vip\",step=\"trigger\"} 2"),
        "{metrics}"
    );
    assert!(d.terminate().success());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(["status", "--flow", "vip", "--database", &db])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("failed   trigger 2 times for 1 customer;") && text.contains("orders_count"),
        "{text}"
    );
}
