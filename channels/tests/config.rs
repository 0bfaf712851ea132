//! The `channels:` section: parsing, defaults, validation, secrets.

use std::collections::HashMap;
use std::time::Duration;

use canvas_channels::{
    ChannelConfig, Channels, ChannelsConfig, ConfigError, Method, RetryConfig, Tls,
};

fn parse(yaml: &str) -> Result<ChannelsConfig, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

const FULL: &str = r#"
sms:
  type: sms
  url: https://sms.example.com/v1/send
  secret_env: SMS_SECRET
  body: '{"to": {{ to | tojson }}, "text": {{ text | tojson }}}'
  rate_limit: 20
  retry: { max_attempts: 3, base: 500ms, max: 2m }
email:
  type: email
  host: smtp.example.com
  port: 2525
  username: shop
  password_env: SMTP_PASSWORD
  from: Shop <news@shop.example>
wechat:
  type: wechat
  url: https://wx.example.com/message/template/send
  method: PUT
  headers_env: { Authorization: WX_TOKEN }
  timeout: 3s
  concurrency: 2
crm:
  type: webhook
  url: https://crm.internal/hooks/canvas
  headers: { X-Source: canvas, X-Api-Version: 2, X-Beta: true }
"#;

#[test]
fn every_type_parses_with_defaults_filled_in() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.channels.len(), 4);

    let ChannelConfig::Sms(sms) = &config.channels["sms"] else {
        panic!("sms is an sms channel");
    };
    assert_eq!(sms.method, Method::Post);
    assert_eq!(sms.timeout, Duration::from_secs(10));
    assert_eq!(sms.rate_limit, Some(20.0));
    assert_eq!(sms.concurrency, 8);
    assert_eq!(
        sms.retry,
        RetryConfig {
            max_attempts: 3,
            base: Duration::from_millis(500),
            max: Duration::from_secs(120),
        }
    );

    let ChannelConfig::Email(email) = &config.channels["email"] else {
        panic!("email is an email channel");
    };
    assert_eq!(email.tls, Tls::Starttls);
    assert_eq!(email.port, Some(2525));
    assert_eq!(email.password_env.as_deref(), Some("SMTP_PASSWORD"));
    assert_eq!(email.retry, RetryConfig::default());
    assert_eq!(RetryConfig::default().max_attempts, 5);
    assert_eq!(RetryConfig::default().base, Duration::from_secs(1));
    assert_eq!(RetryConfig::default().max, Duration::from_secs(600));

    let ChannelConfig::Wechat(wx) = &config.channels["wechat"] else {
        panic!("wechat is a wechat channel");
    };
    assert_eq!(wx.method, Method::Put);
    assert_eq!(wx.timeout, Duration::from_secs(3));
    assert_eq!(wx.concurrency, 2);
    assert_eq!(wx.rate_limit, None);

    let ChannelConfig::Webhook(crm) = &config.channels["crm"] else {
        panic!("crm is a webhook");
    };
    assert_eq!(crm.headers["X-Source"], "canvas");
    assert_eq!(
        crm.headers["X-Api-Version"], "2",
        "numbers read as header text"
    );
    assert_eq!(crm.headers["X-Beta"], "true");
    assert_eq!(crm.secret_env, None);

    config.validate().unwrap();
    let resolved = config
        .resolve(env(&[
            ("SMS_SECRET", "a"),
            ("SMTP_PASSWORD", "b"),
            ("WX_TOKEN", "Bearer c"),
        ]))
        .unwrap();
    assert_eq!(
        resolved.secrets["sms"].secret.as_ref().unwrap().expose(),
        "a"
    );
    assert_eq!(
        resolved.secrets["wechat"].headers["Authorization"].expose(),
        "Bearer c"
    );
    let channels = Channels::from_config(resolved).unwrap();
    assert_eq!(channels.timeout("wechat"), Some(Duration::from_secs(3)));
    assert_eq!(channels.retry_config("sms").unwrap().max_attempts, 3);
    assert!(channels.contains("crm") && !channels.contains("fax"));
}

#[test]
fn unknown_fields_and_types_are_refused_by_name() {
    let e =
        parse("crm:\n  type: webhook\n  url: https://x.example\n  secret: hunter2\n").unwrap_err();
    assert!(e.contains("unknown field `secret`"), "{e}");

    let e = parse("crm:\n  type: webhook\n  url: https://x.example\n  retry: { attempts: 3 }\n")
        .unwrap_err();
    assert!(e.contains("unknown field `attempts`"), "{e}");

    let e = parse("fax:\n  type: fax\n  url: https://x.example\n").unwrap_err();
    assert!(e.contains("unknown variant `fax`"), "{e}");

    let e = parse("crm:\n  url: https://x.example\n").unwrap_err();
    assert!(e.contains("missing field `type`"), "{e}");

    let e =
        parse("mail:\n  type: email\n  host: h\n  from: a@b.example\n  tls: ssl\n").unwrap_err();
    assert!(e.contains("unknown variant `ssl`"), "{e}");
}

#[test]
fn bad_durations_say_what_is_accepted() {
    let e = parse("crm:\n  type: webhook\n  url: https://x.example\n  timeout: 10\n").unwrap_err();
    assert!(e.contains("invalid duration `10`"), "{e}");
    assert!(e.contains("`500ms`, `10s`, `2m`"), "{e}");

    let e = parse("crm:\n  type: webhook\n  url: https://x.example\n  retry: { base: 1 sec }\n")
        .unwrap_err();
    assert!(e.contains("invalid duration `1 sec`"), "{e}");

    let e = parse("crm:\n  type: webhook\n  url: https://x.example\n  timeout: 5w\n").unwrap_err();
    assert!(e.contains("unknown unit `w`"), "{e}");
}

#[test]
fn missing_secrets_are_all_named() {
    let config = parse(FULL).unwrap();
    let err = config
        .resolve(env(&[("SMTP_PASSWORD", "b"), ("WX_TOKEN", "")]))
        .unwrap_err();
    let ConfigError::MissingEnv(missing) = &err else {
        panic!("expected MissingEnv, got {err:?}");
    };
    let vars: Vec<_> = missing.iter().map(|m| m.var.as_str()).collect();
    assert_eq!(
        vars,
        ["SMS_SECRET", "WX_TOKEN"],
        "an empty value counts as missing"
    );
    let text = err.to_string();
    assert!(
        text.contains(
            "channel `sms`: `secret_env` names environment variable `SMS_SECRET`, which is not set"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "channel `wechat`: `headers_env.Authorization` names environment variable `WX_TOKEN`"
        ),
        "{text}"
    );
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let config = parse(FULL).unwrap();
    let resolved = config
        .resolve(env(&[
            ("SMS_SECRET", "very-secret-hmac"),
            ("SMTP_PASSWORD", "very-secret-pass"),
            ("WX_TOKEN", "very-secret-token"),
        ]))
        .unwrap();
    let debug = format!("{resolved:?}");
    assert!(!debug.contains("very-secret"), "{debug}");
    assert!(debug.contains("Secret(***)"));
}

#[test]
fn values_that_cannot_work_are_refused_before_start() {
    let cases = [
        (
            "crm: { type: webhook, url: 'ftp://x.example' }",
            "must be an http:// or https:// address",
        ),
        (
            "crm: { type: webhook, url: 'not a url' }",
            "is not a valid URL",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', concurrency: 0 }",
            "`concurrency` must be at least 1",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', rate_limit: -1 }",
            "`rate_limit` must be a positive number",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', timeout: 0s }",
            "`timeout` must be more than 0",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', retry: { max_attempts: 0 } }",
            "`retry.max_attempts` must be at least 1",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', retry: { base: 1m, max: 10s } }",
            "`retry.max` must not be shorter than `retry.base`",
        ),
        (
            "crm: { type: webhook, url: 'https://x.example', headers: { 'Bad Header': x } }",
            "not a valid header name",
        ),
        (
            "sms: { type: sms, url: 'https://x.example', body: '{{ to ' }",
            "`body`:",
        ),
        (
            "sms: { type: sms, method: GET, url: 'https://x.example', body: 'x' }",
            "cannot be sent with `method: GET`",
        ),
        (
            "mail: { type: email, host: h, from: 'not-a-mailbox' }",
            "`from` `not-a-mailbox` is not a mailbox",
        ),
        (
            "mail: { type: email, host: h, from: a@b.example, username: u }",
            "`username` and `password_env` go together",
        ),
    ];
    for (yaml, expected) in cases {
        let config = parse(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let err = config.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::Invalid { .. }),
            "{yaml}: {err:?}"
        );
        assert!(err.to_string().contains(expected), "{yaml}: {err}");
        // from_config refuses the same configuration.
        let resolved = config.resolve(|_| Some("x".into())).unwrap();
        assert!(Channels::from_config(resolved).is_err(), "{yaml}");
    }
}

/// The examples in the operator's reference must stay valid.
#[test]
fn docs_examples_parse_and_validate() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/channels.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let mut checked = 0;
    for block in doc.split("```yaml").skip(1) {
        let block = block.split("```").next().unwrap();
        let Some(section) = block.split_once("channels:\n") else {
            continue;
        };
        // Un-indent the section under `channels:`.
        let body: String = section
            .1
            .lines()
            .map(|l| l.strip_prefix("  ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        config.validate().unwrap_or_else(|e| panic!("{e}\n{body}"));
        checked += config.channels.len();
    }
    assert!(
        checked >= 4,
        "the reference has an example per type ({checked} channels)"
    );
}

/// Regression: a gateway `url:` template could put a message value before the path, so
/// customer data chose the host the request went to.
#[test]
fn gateway_url_templates_must_fix_the_scheme_and_host() {
    for url in [
        "{{ to }}",
        "https://{{ to }}/send",
        "https://sms.example{{ to }}",
        "https://sms.example:{{ to }}/send",
        "https://sms.example?to={{ to }}",
        "{% if to %}https://a.example/{% else %}https://b.example/{% endif %}",
    ] {
        let config = parse(&format!("sms: {{ type: sms, url: '{url}' }}"))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let err = config.validate().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{url}: {err:?}");
        assert!(
            err.to_string()
                .contains("must start with a fixed `scheme://host[:port]/`"),
            "{url}: {err}"
        );
        let resolved = config.resolve(|_| None).unwrap();
        assert!(Channels::from_config(resolved).is_err(), "{url}");
    }
    let ok = parse("sms: { type: sms, method: GET, url: 'https://sms.example/send?to={{ to }}' }")
        .unwrap();
    ok.validate().unwrap();
}
