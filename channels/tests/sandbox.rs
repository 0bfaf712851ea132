//! `type: sandbox`: parsed and checked like the other types, delivered without a provider.

#![allow(clippy::unwrap_used)]

mod common;

use canvas_channels::{ChannelConfig, ChannelsConfig, ConfigError, SandboxConfig};
use common::{call, channels, message};
use serde_json::json;

fn parse(yaml: &str) -> Result<ChannelsConfig, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

#[test]
fn sandbox_config_parses_with_its_defaults() {
    let c = parse(
        "sms: { type: sandbox }\ncoupons:\n  type: sandbox\n  response: { code: SANDBOX, unused: [] }\n",
    )
    .unwrap();
    assert_eq!(
        c.channels["sms"],
        ChannelConfig::Sandbox(SandboxConfig::default())
    );
    let ChannelConfig::Sandbox(coupons) = &c.channels["coupons"] else {
        panic!("{:?}", c.channels["coupons"]);
    };
    assert_eq!(
        coupons.response,
        Some(json!({ "code": "SANDBOX", "unused": [] }))
    );
    assert_eq!(c.channels["sms"].type_name(), "sandbox");
    assert!(c.validate().is_ok());
    // Nothing to read from the environment.
    let resolved = c.resolve(|_| None).unwrap();
    assert!(resolved.secrets.values().all(|s| s.secret.is_none()));
}

#[test]
fn sandbox_config_refuses_what_it_does_not_know() {
    // A gateway's settings are not a sandbox's: a half-edited channel fails, by name.
    let e = parse("sms:\n  type: sandbox\n  url: https://sms.example\n").unwrap_err();
    assert!(e.contains("unknown field `url`"), "{e}");
    let e = parse("sms:\n  type: sandbox\n  rate_limit: 5\n").unwrap_err();
    assert!(e.contains("unknown field `rate_limit`"), "{e}");
    // `max_segments` is checked as for a real SMS gateway.
    let c = parse("wechat: { type: sandbox, max_segments: 2 }\n").unwrap();
    match c.validate() {
        Err(ConfigError::Invalid { channel, problem }) => {
            assert_eq!(channel, "wechat");
            assert!(problem.contains("`max_segments`"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
    let c = parse("sms: { type: sandbox, max_segments: 0 }\n").unwrap();
    assert!(c.validate().is_err());
    let c = parse("sms: { type: sandbox, max_segments: 2 }\n").unwrap();
    assert_eq!(c.channels["sms"].max_segments(), Some(2));
    assert!(c.validate().is_ok());
}

#[tokio::test]
async fn sandbox_delivers_at_once_and_answers_calls() {
    let ch = channels(
        "sms: { type: sandbox }\ncrm: { type: sandbox }\ncoupons:\n  type: sandbox\n  response: { code: X1 }\n",
        &[],
    );
    assert_eq!(
        ch.names().collect::<Vec<_>>(),
        vec![
            ("coupons", "sandbox"),
            ("crm", "sandbox"),
            ("sms", "sandbox")
        ]
    );
    // A message, with or without an address: accepted, nothing to answer.
    let d = ch
        .send(
            "sms",
            &message(Some("+8613800000001"), json!({ "text": "hi" })),
        )
        .await
        .unwrap();
    assert_eq!(d.status, 200);
    assert_eq!(d.response, None);
    assert!(ch.send("sms", &message(None, json!({}))).await.is_ok());
    // A call: `{}` by default, else the configured response.
    let d = ch.send("crm", &call("crm", json!({}))).await.unwrap();
    assert_eq!(d.response, Some(json!({})));
    let d = ch
        .send("coupons", &call("coupons", json!({})))
        .await
        .unwrap();
    assert_eq!(d.response, Some(json!({ "code": "X1" })));
}
