//! Webhooks and SMS/WeChat gateways against a real HTTP server on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use canvas_channels::DeliveryError;
use canvas_channels::signature::{SignatureError, verify};
use common::{HttpServer, call, channels, closed_port, message, now};
use serde_json::json;

const TOLERANCE: Duration = Duration::from_secs(300);

#[tokio::test]
async fn webhook_message_is_signed_and_carries_the_idempotency_key() {
    let server = HttpServer::start().await;
    let yaml = format!(
        "crm:\n  type: webhook\n  url: {}\n  secret_env: CRM_SECRET\n  headers:\n    X-Tenant: acme\n  headers_env:\n    Authorization: CRM_TOKEN\n",
        server.url("/ok")
    );
    let ch = channels(
        &yaml,
        &[("CRM_SECRET", "whsec_1"), ("CRM_TOKEN", "Bearer t0k")],
    );
    let msg = message(Some("+8613800000000"), json!({ "text": "Happy birthday!" }));

    let delivered = ch.deliver("crm", &msg).await.unwrap();
    assert_eq!(delivered.status, 200);
    assert_eq!(delivered.detail, "OK");
    assert_eq!(delivered.response.as_ref().unwrap()["id"], "prov-123");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/ok");
    assert_eq!(r.header("idempotency-key"), Some("run-7/step-birthday"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-tenant"), Some("acme"));
    assert_eq!(r.header("authorization"), Some("Bearer t0k"));
    assert!(r.header("user-agent").unwrap().starts_with("canvas/"));
    assert_eq!(
        r.json(),
        json!({
            "key": "run-7/step-birthday",
            "flow": "birthday",
            "step": "step-birthday",
            "customer_id": "c-42",
            "channel": "crm",
            "address": "+8613800000000",
            "template": "birthday_gift",
            "content": { "text": "Happy birthday!" },
        })
    );

    // The receiving side checks the signature over the raw body.
    let sig = r.header("x-canvas-signature").unwrap();
    let t = now().timestamp();
    assert!(sig.starts_with(&format!("t={t},v1=")), "{sig}");
    assert_eq!(verify(sig, b"whsec_1", &r.body, t + 5, TOLERANCE), Ok(()));
    assert_eq!(
        verify(sig, b"wrong", &r.body, t, TOLERANCE),
        Err(SignatureError::Mismatch)
    );
    let mut tampered = r.body.clone();
    tampered.push(b' ');
    assert_eq!(
        verify(sig, b"whsec_1", &tampered, t, TOLERANCE),
        Err(SignatureError::Mismatch)
    );
    assert!(matches!(
        verify(sig, b"whsec_1", &r.body, t + 3600, TOLERANCE),
        Err(SignatureError::Stale(3600))
    ));
}

#[tokio::test]
async fn webhook_call_sends_the_body_and_returns_the_json_response() {
    let server = HttpServer::start().await;
    let yaml = format!(
        "loyalty:\n  type: webhook\n  url: {}\n  secret_env: S\nempty:\n  type: webhook\n  url: {}\ntext:\n  type: webhook\n  url: {}\n",
        server.url("/ok"),
        server.url("/empty"),
        server.url("/text"),
    );
    let ch = channels(&yaml, &[("S", "k")]);
    let body = json!({ "customer": "c-42", "points": 20 });

    let delivered = ch
        .deliver("loyalty", &call("loyalty", body.clone()))
        .await
        .unwrap();
    assert_eq!(delivered.status, 200);
    let response = delivered.response.unwrap();
    assert_eq!(response["ok"], true);
    assert_eq!(response["received"], body);

    let r = &server.requests()[0];
    assert_eq!(r.json(), body, "a call sends exactly the payload's body");
    assert_eq!(r.header("idempotency-key"), Some("run-7/step-crm"));
    let sig = r.header("x-canvas-signature").unwrap();
    assert_eq!(
        verify(sig, b"k", &r.body, now().timestamp(), TOLERANCE),
        Ok(())
    );

    // No body → `{}`; 204 → `{}` so the run still stores something.
    let d = ch
        .deliver("empty", &call("empty", json!(null)))
        .await
        .unwrap();
    assert_eq!(d.status, 204);
    assert_eq!(d.response, Some(json!({})));
    assert_eq!(server.requests()[1].body, b"{}");
    assert_eq!(server.requests()[1].header("x-canvas-signature"), None);

    // A body that is not JSON is kept as a string.
    let d = ch.deliver("text", &call("text", json!({}))).await.unwrap();
    assert_eq!(d.response, Some(json!("accepted")));
}

#[tokio::test]
async fn http_failures_are_classed_retryable_or_permanent() {
    let server = HttpServer::start().await;
    let refused = closed_port().await;
    let yaml = format!(
        "fail: {{ type: webhook, url: '{}' }}\n\
         busy: {{ type: webhook, url: '{}' }}\n\
         bad:  {{ type: webhook, url: '{}' }}\n\
         hang: {{ type: webhook, url: '{}', timeout: 300ms }}\n\
         down: {{ type: webhook, url: 'http://127.0.0.1:{refused}/x', timeout: 2s }}\n",
        server.url("/fail"),
        server.url("/busy"),
        server.url("/bad"),
        server.url("/hang"),
    );
    let ch = channels(&yaml, &[]);
    let msg = message(None, json!({ "text": "hi" }));

    let e = ch.deliver("fail", &msg).await.unwrap_err();
    assert!(
        matches!(e, DeliveryError::Http { status: 500, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert!(e.reason().contains("upstream exploded"), "{e}");

    let e = ch.deliver("busy", &msg).await.unwrap_err();
    assert!(
        matches!(e, DeliveryError::Http { status: 429, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    let e = ch.deliver("bad", &msg).await.unwrap_err();
    assert!(
        matches!(e, DeliveryError::Http { status: 400, .. }),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    assert!(e.reason().contains("invalid mobile number"), "{e}");

    let started = Instant::now();
    let e = ch.deliver("hang", &msg).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e, DeliveryError::Timeout(Duration::from_millis(300)));
    assert!(e.is_retryable());
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(5),
        "{took:?}"
    );

    let e = ch.deliver("down", &msg).await.unwrap_err();
    assert!(matches!(e, DeliveryError::Connect(_)), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.reason().to_lowercase().contains("refused"), "{e}");

    // A retry is the same request: same idempotency key every time.
    ch.deliver("fail", &msg).await.unwrap_err();
    let keys: Vec<_> = server
        .requests()
        .iter()
        .filter(|r| r.path == "/fail")
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["run-7/step-birthday", "run-7/step-birthday"]);
}

#[tokio::test]
async fn rows_a_channel_cannot_carry_fail_permanently_without_a_request() {
    let server = HttpServer::start().await;
    let yaml = format!(
        "sms: {{ type: sms, url: '{}' }}\nemail: {{ type: email, host: 127.0.0.1, tls: none, from: a@b.example }}\n",
        server.url("/ok")
    );
    let ch = channels(&yaml, &[]);

    let e = ch
        .deliver("fax", &message(Some("1"), json!({})))
        .await
        .unwrap_err();
    assert_eq!(e, DeliveryError::UnknownChannel("fax".into()));
    assert!(!e.is_retryable());
    assert!(ch.acquire("fax").await.is_err());

    let e = ch
        .deliver("sms", &call("sms", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Unsupported { .. }), "{e:?}");
    assert!(!e.is_retryable());
    let e = ch
        .deliver("email", &call("email", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Unsupported { .. }), "{e:?}");

    let e = ch
        .deliver("sms", &message(None, json!({ "text": "x" })))
        .await
        .unwrap_err();
    assert_eq!(e, DeliveryError::MissingAddress("sms".into()));
    assert!(!e.is_retryable());
    let e = ch
        .deliver("sms", &message(Some("  "), json!({ "text": "x" })))
        .await
        .unwrap_err();
    assert_eq!(e, DeliveryError::MissingAddress("sms".into()));

    assert!(server.requests().is_empty());
    let mut names: Vec<_> = ch.names().collect();
    names.sort();
    assert_eq!(names, [("email", "email"), ("sms", "sms")]);
}

#[tokio::test]
async fn sms_body_template_renders_json_and_is_signed() {
    let server = HttpServer::start().await;
    let yaml = format!(
        r#"sms:
  type: sms
  url: {}
  secret_env: SMS_SECRET
  headers: {{ X-Account: shop-1 }}
  body: |
    {{"mobile": {{{{ to | tojson }}}}, "content": {{{{ text | tojson }}}}, "sign": "Shop",
     "ref": {{{{ key | tojson }}}}, "customer": {{{{ customer_id | tojson }}}},
     "subject": {{{{ subject | tojson }}}}}}
"#,
        server.url("/ok")
    );
    let ch = channels(&yaml, &[("SMS_SECRET", "gw-secret")]);
    let text = "Say \"hi\" to 20% off\n你好";
    let msg = message(Some("+8613800000000"), json!({ "text": text }));

    let d = ch.deliver("sms", &msg).await.unwrap();
    assert_eq!(d.status, 200);
    assert_eq!(d.response.unwrap()["id"], "prov-123");

    let r = &server.requests()[0];
    assert_eq!(
        r.json(),
        json!({
            "mobile": "+8613800000000",
            "content": text,
            "sign": "Shop",
            "ref": "run-7/step-birthday",
            "customer": "c-42",
            "subject": null,
        })
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-account"), Some("shop-1"));
    assert_eq!(r.header("idempotency-key"), Some("run-7/step-birthday"));
    let sig = r.header("x-canvas-signature").unwrap();
    assert_eq!(
        verify(sig, b"gw-secret", &r.body, now().timestamp(), TOLERANCE),
        Ok(())
    );
}

/// Regression: an outbox key holds the customer id, and a non-ASCII id went out as raw UTF-8
/// bytes in the `Idempotency-Key` header (obs-text: opaque to receivers, refused by some
/// proxies and frameworks). The key travels percent-encoded, the same in the header, the
/// webhook envelope and gateway templates, and decodes back to the outbox key.
#[tokio::test]
async fn idempotency_key_is_ascii_for_any_customer_id() {
    let server = HttpServer::start().await;
    let yaml = format!(
        "crm: {{ type: webhook, url: '{}' }}\nsms:\n  type: sms\n  url: '{}'\n  body: '{{\"ref\": {{{{ key | tojson }}}}}}'\n",
        server.url("/ok"),
        server.url("/ok")
    );
    let ch = channels(&yaml, &[]);
    let key = "birthday/李雷 50%/1/step-birthday";
    let mut msg = message(Some("+8613800000000"), json!({ "text": "hi" }));
    msg.key = key.into();
    msg.customer_id = "李雷 50%".into();
    ch.deliver("crm", &msg).await.unwrap();
    ch.deliver("sms", &msg).await.unwrap();
    let mut c = call("crm", json!({ "a": 1 }));
    c.key = key.into();
    ch.deliver("crm", &c).await.unwrap();

    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    let wire = "birthday/%E6%9D%8E%E9%9B%B7%2050%25/1/step-birthday";
    for r in &reqs {
        assert_eq!(r.header("idempotency-key"), Some(wire));
    }
    assert_eq!(
        reqs[0].json()["key"],
        wire,
        "the envelope's key matches the header"
    );
    assert_eq!(reqs[0].json()["customer_id"], "李雷 50%");
    assert_eq!(reqs[1].json()["ref"], wire, "so does a gateway template's");
    let decoded = percent_encoding::percent_decode_str(wire)
        .decode_utf8()
        .unwrap();
    assert_eq!(decoded, key);
    // A key of plain ASCII goes unchanged.
    assert_eq!(
        canvas_channels::signature::http_key("welcome/c-1@shop/1/hello"),
        "welcome/c-1@shop/1/hello"
    );
}

#[tokio::test]
async fn wechat_template_message_gets_the_whole_payload_as_data() {
    let server = HttpServer::start().await;
    let yaml = format!(
        r#"wechat:
  type: wechat
  url: {}
  body: '{{"touser": {{{{ to | tojson }}}}, "template_id": {{{{ template | tojson }}}}, "data": {{{{ data | tojson }}}}, "url": "https://shop.example/c/{{{{ customer_id }}}}"}}'
"#,
        server.url("/ok")
    );
    let ch = channels(&yaml, &[]);
    let payload = json!({ "subject": "Gift", "text": "A gift for you" });
    ch.deliver(
        "wechat",
        &message(Some("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"), payload.clone()),
    )
    .await
    .unwrap();
    let r = &server.requests()[0];
    assert_eq!(
        r.json(),
        json!({
            "touser": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
            "template_id": "birthday_gift",
            "data": payload,
            "url": "https://shop.example/c/c-42",
        })
    );
    assert_eq!(
        r.header("x-canvas-signature"),
        None,
        "no secret_env, no signature"
    );
}

#[tokio::test]
async fn form_encoded_and_get_gateways_use_url_templates() {
    let server = HttpServer::start().await;
    let base = server.url("");
    let yaml = format!(
        r#"sms:
  type: sms
  method: post
  url: "{base}/ok?channel={{{{ channel }}}}"
  headers: {{ Content-Type: application/x-www-form-urlencoded }}
  body: "to={{{{ to | urlencode }}}}&text={{{{ text | urlencode }}}}"
legacy:
  type: sms
  method: GET
  url: "{base}/ok?to={{{{ to | urlencode }}}}&msg={{{{ text | urlencode }}}}"
"#
    );
    let ch = channels(&yaml, &[]);
    let msg = message(Some("+86 138"), json!({ "text": "Hi Ana & co" }));

    ch.deliver("sms", &msg).await.unwrap();
    ch.deliver("legacy", &msg).await.unwrap();
    let reqs = server.requests();

    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].query.as_deref(), Some("channel=sms"));
    assert_eq!(
        reqs[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        String::from_utf8(reqs[0].body.clone()).unwrap(),
        "to=%2B86%20138&text=Hi%20Ana%20%26%20co"
    );

    assert_eq!(reqs[1].method, "GET");
    assert_eq!(
        reqs[1].query.as_deref(),
        Some("to=%2B86%20138&msg=Hi%20Ana%20%26%20co")
    );
    assert!(reqs[1].body.is_empty());
    assert_eq!(reqs[1].header("content-type"), None);
    assert_eq!(
        reqs[1].header("idempotency-key"),
        Some("run-7/step-birthday")
    );
}

/// Regression: a gateway `url:` template rendered values as they were, so a customer
/// attribute (outsiders can set them through the public Segment write key) chose the
/// request's path and query: `?to={{ to }}` with `1&admin=true#frag` went out as
/// `/gw?to=1&admin=true`.
#[tokio::test]
async fn gateway_url_values_cannot_steer_the_request() {
    let server = HttpServer::start().await;
    let base = server.url("");
    let yaml = format!(
        r#"query:
  type: sms
  method: GET
  url: "{base}/gw?to={{{{ to }}}}&ref={{{{ key }}}}"
path:
  type: sms
  method: GET
  url: "{base}/gw/{{{{ to }}}}/send"
"#
    );
    let ch = channels(&yaml, &[]);

    let msg = message(Some("1&admin=true#frag"), json!({ "text": "hi" }));
    ch.deliver("query", &msg).await.unwrap_err(); // `/gw` is a 404 on the test server
    ch.deliver("path", &message(Some("../ok?x=1"), json!({})))
        .await
        .unwrap_err();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].path, "/gw");
    assert_eq!(
        reqs[0].query.as_deref(),
        Some("to=1%26admin%3Dtrue%23frag&ref=run-7%2Fstep-birthday")
    );
    // One path segment, whatever it holds: the request did not climb to `/ok`.
    assert_eq!(reqs[1].path, "/gw/..%2Fok%3Fx%3D1/send");
    assert_eq!(reqs[1].query, None);

    // A value that is a whole `..` segment is refused without a request, for good.
    let e = ch
        .deliver("path", &message(Some(".."), json!({})))
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Template(_)), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.reason().contains("`..` segment"), "{e}");
    assert_eq!(server.requests().len(), 2);
}

/// Regression: a gateway template had no bound on its work, so a loop over the message
/// held a delivery worker for as long as it ran.
#[test]
fn gateway_templates_cannot_hold_a_delivery_worker() {
    // The delivery runs on a thread of its own: a render without a bound would never give
    // the runtime back, so only a watchdog outside it can tell.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(async {
            let server = HttpServer::start().await;
            let yaml = format!(
                "sms:\n  type: sms\n  url: {}\n  body: \"{{% for a in text * 100000 %}}{{% for b in text * 100000 %}}.{{% endfor %}}{{% endfor %}}\"\n",
                server.url("/ok")
            );
            let ch = channels(&yaml, &[]);
            let e = ch
                .deliver("sms", &message(Some("+1555"), json!({ "text": "x" })))
                .await
                .unwrap_err();
            (e, server.requests().len())
        });
        let _ = tx.send(result);
    });
    let (e, requests) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the delivery still renders after 20 s");
    assert!(matches!(e, DeliveryError::Template(_)), "{e:?}");
    assert!(e.reason().contains("needs more than 100000 steps"), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(requests, 0);
}

#[tokio::test]
async fn gateway_without_body_sends_the_webhook_envelope() {
    let server = HttpServer::start().await;
    let yaml = format!("sms: {{ type: sms, url: '{}' }}\n", server.url("/ok"));
    let ch = channels(&yaml, &[]);
    let msg = message(Some("+1555"), json!({ "text": "hello" }));
    ch.deliver("sms", &msg).await.unwrap();
    let body = server.requests()[0].json();
    assert_eq!(body, canvas_channels::envelope("sms", &msg));
    assert_eq!(body["address"], "+1555");
    assert_eq!(body["content"]["text"], "hello");
}

#[tokio::test]
async fn template_errors_are_permanent_and_send_nothing() {
    let server = HttpServer::start().await;
    // A misspelt variable is refused when the channels are built, before any send.
    let typo = format!(
        r#"typo:
  type: sms
  url: {url}
  body: '{{"to": {{{{ to | tojson }}}}, "text": {{{{ txt.body | tojson }}}}}}'
"#,
        url = server.url("/ok")
    );
    let config: canvas_channels::ChannelsConfig =
        serde_yaml_ng::from_str(&typo).expect("valid channels yaml");
    let e = config.validate().unwrap_err().to_string();
    assert!(
        e.contains("channel `typo`: `body`: unknown name `txt`"),
        "{e}"
    );

    let yaml = format!(
        r#"unquoted:
  type: sms
  url: {url}
  body: '{{"to": "{{{{ to }}}}", "text": "{{{{ text }}}}"}}'
"#,
        url = server.url("/ok")
    );
    let ch = channels(&yaml, &[]);
    let msg = message(Some("+1555"), json!({ "text": "He said \"no\"" }));

    let e = ch.deliver("unquoted", &msg).await.unwrap_err();
    assert!(matches!(e, DeliveryError::Template(_)), "{e:?}");
    assert!(e.reason().contains("tojson"), "{e}");
    assert!(!e.is_retryable());

    // The same template works for a text without quotes: the check is on the output.
    let ok = message(Some("+1555"), json!({ "text": "fine" }));
    ch.deliver("unquoted", &ok).await.unwrap();
    assert_eq!(server.requests().len(), 1);
    assert_eq!(server.requests()[0].json()["text"], "fine");
}

#[tokio::test]
async fn send_waits_for_a_slot_on_the_channel() {
    let server = HttpServer::start().await;
    let yaml = format!(
        "crm: {{ type: webhook, url: '{}', concurrency: 1 }}\n",
        server.url("/ok")
    );
    let ch = channels(&yaml, &[]);
    let held = ch.acquire("crm").await.unwrap();
    let msg = message(None, json!({}));
    let blocked = tokio::time::timeout(Duration::from_millis(100), ch.send("crm", &msg)).await;
    assert!(
        blocked.is_err(),
        "send must wait while the only slot is held"
    );
    assert!(server.requests().is_empty());
    drop(held);
    let d = ch.send("crm", &msg).await.unwrap();
    assert_eq!(d.status, 200);
    assert_eq!(server.requests().len(), 1);

    ch.close();
    let e = ch.acquire("crm").await.unwrap_err();
    assert_eq!(e, DeliveryError::Closed);
    assert!(e.is_retryable());
}
