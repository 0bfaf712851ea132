//! E-mail against a real (minimal) SMTP server on 127.0.0.1.

mod common;

use canvas_channels::{DeliveryError, message_id};
use common::{
    Reply, SmtpServer, call, channels, closed_port, decoded, message, mime_parts, split_head,
};
use serde_json::json;

fn email_yaml(port: u16, extra: &str) -> String {
    format!(
        "email:\n  type: email\n  host: 127.0.0.1\n  port: {port}\n  tls: none\n  from: Shop <news@shop.example>\n  timeout: 5s\n{extra}"
    )
}

#[tokio::test]
async fn html_and_text_go_as_multipart_alternative_with_stable_ids() {
    let smtp = SmtpServer::start(Reply::Accept).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    let msg = message(
        Some("Ana <ana@example.com>"),
        json!({
            "subject": "Your birthday gift",
            "text": "Happy birthday, Ana! 20% off today.",
            "html": "<p>Happy birthday, <b>Ana</b>! 20% off today.</p>",
        }),
    );

    let d = ch.deliver("email", &msg).await.unwrap();
    assert_eq!(d.status, 250);
    assert!(d.detail.contains("queued as Q1"), "{}", d.detail);
    assert_eq!(d.response, None);

    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "<news@shop.example>");
    assert_eq!(mail.to, ["<ana@example.com>"]);
    // EHLO names the sender's domain by default.
    assert!(
        smtp.commands().iter().any(|c| c == "EHLO shop.example"),
        "{:?}",
        smtp.commands()
    );

    let (head, parts) = mime_parts(&mail.data);
    assert_eq!(head["subject"], "Your birthday gift");
    assert_eq!(head["from"], "Shop <news@shop.example>");
    assert_eq!(head["to"], "Ana <ana@example.com>");
    assert_eq!(
        head["message-id"],
        message_id("run-7/step-birthday", "shop.example")
    );
    assert_eq!(head["x-canvas-idempotency-key"], "run-7/step-birthday");
    assert!(
        head["date"].contains("02 Jan 2030 03:04:05"),
        "{}",
        head["date"]
    );
    assert!(
        head["content-type"].starts_with("multipart/alternative"),
        "{}",
        head["content-type"]
    );

    assert_eq!(parts.len(), 2, "{}", mail.data);
    let (text_head, text_body) = &parts[0];
    let (html_head, html_body) = &parts[1];
    assert!(
        text_head["content-type"].starts_with("text/plain"),
        "{text_head:?}"
    );
    assert_eq!(
        decoded(text_head, text_body),
        "Happy birthday, Ana! 20% off today."
    );
    assert!(
        html_head["content-type"].starts_with("text/html"),
        "{html_head:?}"
    );
    assert_eq!(
        decoded(html_head, html_body),
        "<p>Happy birthday, <b>Ana</b>! 20% off today.</p>"
    );

    // The same row sent again carries the same Message-ID (a repeat is recognisable).
    ch.deliver("email", &msg).await.unwrap();
    let again = split_head(&smtp.mails()[1].data).0;
    assert_eq!(again["message-id"], head["message-id"]);
}

#[tokio::test]
async fn html_only_gets_a_text_part_derived_from_it() {
    let smtp = SmtpServer::start(Reply::Accept).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    let html = "<h1>Hi Ana</h1><p>Your gift: <a href=\"https://shop.example/g\">open it</a></p>";
    ch.deliver(
        "email",
        &message(
            Some("ana@example.com"),
            json!({ "subject": "Gift", "html": html }),
        ),
    )
    .await
    .unwrap();
    let (_, parts) = mime_parts(&smtp.mails()[0].data);
    assert_eq!(parts.len(), 2);
    assert!(parts[0].0["content-type"].starts_with("text/plain"));
    assert_eq!(
        decoded(&parts[0].0, &parts[0].1),
        "Hi Ana\r\n\r\nYour gift: open it (https://shop.example/g)"
    );
    assert!(parts[1].0["content-type"].starts_with("text/html"));
    assert_eq!(decoded(&parts[1].0, &parts[1].1), html);
}

#[tokio::test]
async fn text_only_is_a_single_plain_part() {
    let smtp = SmtpServer::start(Reply::Accept).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    ch.deliver(
        "email",
        &message(
            Some("ana@example.com"),
            json!({ "subject": "Hi", "text": "Just text." }),
        ),
    )
    .await
    .unwrap();
    let (head, body) = split_head(&smtp.mails()[0].data);
    assert!(head["content-type"].starts_with("text/plain"), "{head:?}");
    assert_eq!(decoded(&head, &body).trim_end(), "Just text.");
    assert_eq!(head["subject"], "Hi");
}

#[tokio::test]
async fn smtp_4xx_is_retryable() {
    let smtp = SmtpServer::start(Reply::RejectRcpt("450 4.2.1 Mailbox busy, try later")).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    let e = ch
        .deliver(
            "email",
            &message(Some("ana@example.com"), json!({ "text": "x" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Smtp { code: 450, .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.reason().contains("Mailbox busy"), "{e}");
    assert!(smtp.mails().is_empty());
}

#[tokio::test]
async fn smtp_5xx_is_permanent() {
    let smtp = SmtpServer::start(Reply::RejectRcpt("550 5.1.1 No such user")).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    let e = ch
        .deliver(
            "email",
            &message(Some("ghost@example.com"), json!({ "text": "x" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Smtp { code: 550, .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.reason().contains("No such user"), "{e}");

    let smtp = SmtpServer::start(Reply::RejectData("554 5.7.1 Message rejected as spam")).await;
    let ch = channels(&email_yaml(smtp.addr.port(), ""), &[]);
    let e = ch
        .deliver(
            "email",
            &message(Some("ana@example.com"), json!({ "text": "x" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Smtp { code: 554, .. }), "{e:?}");
    assert!(!e.is_retryable());
}

#[tokio::test]
async fn credentials_come_from_the_environment() {
    let smtp = SmtpServer::start(Reply::Accept).await;
    let yaml = email_yaml(
        smtp.addr.port(),
        "  username: shop\n  password_env: SMTP_PASSWORD\n  hello_name: mta.shop.example\n",
    );
    let ch = channels(&yaml, &[("SMTP_PASSWORD", "s3cret")]);
    ch.deliver(
        "email",
        &message(Some("ana@example.com"), json!({ "text": "x" })),
    )
    .await
    .unwrap();
    let commands = smtp.commands();
    assert!(
        commands.iter().any(|c| c == "EHLO mta.shop.example"),
        "{commands:?}"
    );
    // base64("\0shop\0s3cret")
    assert!(
        commands.iter().any(|c| c == "AUTH PLAIN AHNob3AAczNjcmV0"),
        "{commands:?}"
    );
    assert_eq!(smtp.mails().len(), 1);
}

#[tokio::test]
async fn unusable_rows_and_unreachable_relays() {
    let port = closed_port().await;
    let ch = channels(&email_yaml(port, ""), &[]);

    let e = ch
        .deliver("email", &message(None, json!({ "text": "x" })))
        .await
        .unwrap_err();
    assert_eq!(e, DeliveryError::MissingAddress("email".into()));
    assert!(!e.is_retryable());

    let e = ch
        .deliver(
            "email",
            &message(Some("not an address"), json!({ "text": "x" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::InvalidAddress { .. }), "{e:?}");
    assert!(!e.is_retryable());

    let e = ch
        .deliver(
            "email",
            &message(Some("ana@example.com"), json!({ "subject": "empty" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Payload(_)), "{e:?}");
    assert!(!e.is_retryable());

    let e = ch
        .deliver("email", &call("email", json!({})))
        .await
        .unwrap_err();
    assert!(!e.is_retryable());

    let e = ch
        .deliver(
            "email",
            &message(Some("ana@example.com"), json!({ "text": "x" })),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Connect(_)), "{e:?}");
    assert!(e.is_retryable());
}
