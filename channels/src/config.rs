//! The `channels:` section of `canvas.yaml`: which provider each channel name reaches and
//! how hard the daemon may push it.
//!
//! Parsing ([`ChannelsConfig`]'s `Deserialize`), checking ([`ChannelsConfig::validate`]) and
//! reading secrets from the environment ([`ChannelsConfig::resolve`]) are separate steps so
//! that `canvas check` can validate a file on a machine that does not hold the secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;

/// The channel name flows text on; only it is billed by the segment.
pub const SMS: &str = "sms";

/// The whole `channels:` section: channel name → its configuration.
///
/// The name is what flows write: `sms`, `email`, `wechat` in a `send` step, or the webhook
/// name in a `call` step.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(transparent)]
pub struct ChannelsConfig {
    /// Channel name → configuration, sorted by name.
    pub channels: BTreeMap<String, ChannelConfig>,
}

/// One channel, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChannelConfig {
    /// An HTTP endpoint that gets a signed JSON body (messages and `call` steps).
    Webhook(WebhookConfig),
    /// An SMTP relay.
    Email(EmailConfig),
    /// An HTTP SMS gateway with a body template.
    Sms(GatewayConfig),
    /// An HTTP WeChat gateway (template messages) with a body template.
    Wechat(GatewayConfig),
    /// No provider: a delivery succeeds at once and the message stays in the database
    /// (the outbox row, marked sent), listed by `GET /v1/sandbox` like a mail catcher's
    /// inbox. For trying flows out before real gateways are configured.
    Sandbox(SandboxConfig),
}

/// `type: sandbox`: delivers to the database instead of a provider.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// What a `call` step on this channel gets back as its response (default `{}`), so a
    /// flow that saves a call's answer goes on; ignored for messages.
    #[serde(default)]
    pub response: Option<serde_json::Value>,
    /// For the `sms` channel: checked like a real gateway's (see [`GatewayConfig`]), so
    /// `canvas validate` flags SMS templates that would cost too much.
    #[serde(default)]
    pub max_segments: Option<u32>,
}

impl SandboxConfig {
    /// The concurrency a sandbox channel allows: it does no I/O, so only the dispatcher's
    /// own limit matters.
    pub const CONCURRENCY: u32 = 1024;
}

/// `type: webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the JSON body is POSTed (`http://` or `https://`).
    pub url: String,
    /// Environment variable holding the HMAC-SHA256 key for `X-Canvas-Signature`; unsigned
    /// without it.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Extra request headers, written in the file (nothing secret).
    #[serde(default, deserialize_with = "string_map")]
    pub headers: BTreeMap<String, String>,
    /// Extra request headers whose values are secret: header name → environment variable
    /// (an `Authorization: Bearer …` token, say).
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// Give up on one request after this long (default `10s`); a timeout is retried.
    #[serde(
        default = "default_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub timeout: Duration,
    /// At most this many requests per second (fractions allowed); unlimited when absent.
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// At most this many requests in flight at once (default 8).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How failures that may pass are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// For the `sms` channel: the most segments (160 GSM-7 / 70 UCS-2 characters, 153 / 67
    /// per part once split) a message may cost. `canvas validate` checks every SMS
    /// template's static text against it.
    #[serde(default)]
    pub max_segments: Option<u32>,
}

/// `type: email`: an SMTP relay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The relay's host name (also the name its TLS certificate must carry).
    pub host: String,
    /// The relay's port; default by `tls`: 25 for `none`, 587 for `starttls`, 465 for `tls`.
    #[serde(default)]
    pub port: Option<u16>,
    /// How the connection is secured (default `starttls`, which is required, not
    /// opportunistic).
    #[serde(default)]
    pub tls: Tls,
    /// SMTP AUTH user; no authentication when absent. Needs `password_env`.
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the SMTP AUTH password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The `From:` mailbox, e.g. `Shop <news@shop.example>`; its domain also names the
    /// Message-ID.
    pub from: String,
    /// The name given in EHLO (default: the domain of `from`).
    #[serde(default)]
    pub hello_name: Option<String>,
    /// Give up on one SMTP exchange after this long (default `10s`); a timeout is retried.
    #[serde(
        default = "default_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub timeout: Duration,
    /// At most this many messages per second; unlimited when absent.
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// At most this many SMTP sessions at once (default 8).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How failures that may pass are retried.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// Plain text; only for a relay on the same host or a test server.
    None,
    /// Connect in plain text, then upgrade with STARTTLS; refuses a relay that cannot.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

impl Tls {
    /// The conventional port for this mode.
    pub fn default_port(self) -> u16 {
        match self {
            Tls::None => 25,
            Tls::Starttls => 587,
            Tls::Tls => 465,
        }
    }
}

/// `type: sms` and `type: wechat`: an HTTP gateway whose request body is a template.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's address; may itself be a template (`https://gw.example/send?to={{ to }}`)
    /// that starts with a fixed `scheme://host[:port]/`. Every value rendered into it is
    /// percent-encoded.
    pub url: String,
    /// The HTTP method (default `POST`).
    #[serde(default)]
    pub method: Method,
    /// Extra request headers, written in the file (nothing secret). `Content-Type`
    /// defaults to `application/json`.
    #[serde(default, deserialize_with = "string_map")]
    pub headers: BTreeMap<String, String>,
    /// Secret request headers: header name → environment variable.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// A minijinja template for the request body, with `to`, `text`, `subject`, `html`,
    /// `template`, `key`, `customer_id`, `flow`, `step`, `channel` and `data` (the whole
    /// rendered payload). Default: the same JSON body a webhook gets. Not allowed with `GET`.
    #[serde(default)]
    pub body: Option<String>,
    /// Environment variable holding an HMAC-SHA256 key: the request is then signed like a
    /// webhook's (`X-Canvas-Signature`).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Give up on one request after this long (default `10s`); a timeout is retried.
    #[serde(
        default = "default_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub timeout: Duration,
    /// At most this many requests per second; unlimited when absent.
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// At most this many requests in flight at once (default 8).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How failures that may pass are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// For the `sms` channel: the most segments (160 GSM-7 / 70 UCS-2 characters, 153 / 67
    /// per part once split) a message may cost. `canvas validate` checks every SMS
    /// template's static text against it.
    #[serde(default)]
    pub max_segments: Option<u32>,
}

/// HTTP methods a gateway may use (written upper- or lower-case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Method {
    /// The default.
    #[default]
    #[serde(rename = "POST", alias = "post")]
    Post,
    /// For gateways that take the message in the query string (`url` template); no body.
    #[serde(rename = "GET", alias = "get")]
    Get,
    /// Some gateways create messages with PUT.
    #[serde(rename = "PUT", alias = "put")]
    Put,
    /// Rare, but cheap to allow.
    #[serde(rename = "PATCH", alias = "patch")]
    Patch,
}

impl Method {
    /// The method as `reqwest` wants it.
    pub(crate) fn to_reqwest(self) -> reqwest::Method {
        match self {
            Method::Post => reqwest::Method::POST,
            Method::Get => reqwest::Method::GET,
            Method::Put => reqwest::Method::PUT,
            Method::Patch => reqwest::Method::PATCH,
        }
    }
}

/// `retry:`: exponential backoff with full jitter; see [`crate::next_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included (default 5); after the last failure the row is
    /// dead-lettered. `1` means never retry.
    pub max_attempts: u32,
    /// The backoff ceiling after the first failure (default `1s`); it doubles with each
    /// further failure.
    #[serde(deserialize_with = "duration::deserialize")]
    pub base: Duration,
    /// The backoff ceiling never grows past this (default `10m`).
    #[serde(deserialize_with = "duration::deserialize")]
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
        }
    }
}

/// A map of strings where a value written as a number or boolean (`X-Api-Version: 2`)
/// reads as its text, as YAML authors expect for header values.
fn string_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct Text(String);
    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Text, E> {
                    Ok(Text(s.to_owned()))
                }
                fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
                fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
                fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Text, E> {
                    Ok(Text(n.to_string()))
                }
                fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Text, E> {
                    Ok(Text(b.to_string()))
                }
            }
            d.deserialize_any(Visitor)
        }
    }
    let map = BTreeMap::<String, Text>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, Text(v))| (k, v)).collect())
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_concurrency() -> u32 {
    8
}

/// The settings every channel type has, gathered for the limiter and the retry loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Common {
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests per second, if limited.
    pub rate_limit: Option<f64>,
    /// Requests in flight at once.
    pub concurrency: u32,
    /// Retry policy.
    pub retry: RetryConfig,
}

impl ChannelConfig {
    /// `webhook`, `email`, `sms`, `wechat` or `sandbox`, as written in `type:`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ChannelConfig::Webhook(_) => "webhook",
            ChannelConfig::Email(_) => "email",
            ChannelConfig::Sms(_) => "sms",
            ChannelConfig::Wechat(_) => "wechat",
            ChannelConfig::Sandbox(_) => "sandbox",
        }
    }

    /// Timeout, limits and retry policy, whatever the type.
    pub fn common(&self) -> Common {
        macro_rules! common {
            ($c:expr) => {
                Common {
                    timeout: $c.timeout,
                    rate_limit: $c.rate_limit,
                    concurrency: $c.concurrency,
                    retry: $c.retry,
                }
            };
        }
        match self {
            ChannelConfig::Webhook(c) => common!(c),
            ChannelConfig::Email(c) => common!(c),
            ChannelConfig::Sms(c) | ChannelConfig::Wechat(c) => common!(c),
            ChannelConfig::Sandbox(_) => Common {
                timeout: default_timeout(),
                rate_limit: None,
                concurrency: SandboxConfig::CONCURRENCY,
                retry: RetryConfig::default(),
            },
        }
    }

    /// The `max_segments` setting, on the types that have it (`webhook`, `sms`, `wechat`,
    /// `sandbox`).
    pub fn max_segments(&self) -> Option<u32> {
        match self {
            ChannelConfig::Webhook(c) => c.max_segments,
            ChannelConfig::Sms(c) | ChannelConfig::Wechat(c) => c.max_segments,
            ChannelConfig::Sandbox(c) => c.max_segments,
            ChannelConfig::Email(_) => None,
        }
    }

    /// Every environment variable this channel reads: (setting, variable).
    fn env_refs(&self) -> Vec<(String, &str)> {
        let mut refs = Vec::new();
        let (secret_env, headers_env) = match self {
            ChannelConfig::Webhook(c) => (&c.secret_env, Some(&c.headers_env)),
            ChannelConfig::Sms(c) | ChannelConfig::Wechat(c) => {
                (&c.secret_env, Some(&c.headers_env))
            }
            ChannelConfig::Email(c) => (&c.password_env, None),
            ChannelConfig::Sandbox(_) => return refs,
        };
        if let Some(var) = secret_env {
            let key = match self {
                ChannelConfig::Email(_) => "password_env",
                _ => "secret_env",
            };
            refs.push((key.to_owned(), var.as_str()));
        }
        for (header, var) in headers_env.into_iter().flatten() {
            refs.push((format!("headers_env.{header}"), var.as_str()));
        }
        refs
    }
}

/// A value read from the environment; `Debug` does not show it, so secrets stay out of
/// logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The secrets of one channel, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelSecrets {
    /// The HMAC key (`secret_env`) or SMTP password (`password_env`).
    pub secret: Option<Secret>,
    /// Header name → value (`headers_env`).
    pub headers: BTreeMap<String, Secret>,
}

/// A configuration with its secrets read: what [`crate::Channels::from_config`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The configuration as written.
    pub config: ChannelsConfig,
    /// Channel name → its secrets.
    pub secrets: BTreeMap<String, ChannelSecrets>,
}

/// An environment variable a channel names but the environment does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingEnv {
    /// The channel.
    pub channel: String,
    /// The setting that names it (`secret_env`, `password_env`, `headers_env.Authorization`).
    pub setting: String,
    /// The variable.
    pub var: String,
}

impl fmt::Display for MissingEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel `{}`: `{}` names environment variable `{}`, which is not set (or empty)",
            self.channel, self.setting, self.var
        )
    }
}

/// A `channels:` section that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that cannot work.
    #[error("channel `{channel}`: {problem}")]
    Invalid {
        /// The channel.
        channel: String,
        /// What is wrong, naming the setting.
        problem: String,
    },
    /// Secrets named in the file are missing from the environment (all of them listed).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    MissingEnv(Vec<MissingEnv>),
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl ChannelsConfig {
    /// Read every `secret_env`, `password_env` and `headers_env` variable through `env`
    /// (`|k| std::env::var(k).ok()` in the daemon, a map in tests). An empty value counts as
    /// missing: an empty HMAC key or password is always a mistake. Fails listing every
    /// missing variable, so an operator fixes them in one go.
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Resolved, ConfigError> {
        let mut missing = Vec::new();
        let mut secrets = BTreeMap::new();
        for (name, channel) in &self.channels {
            let mut s = ChannelSecrets::default();
            for (setting, var) in channel.env_refs() {
                match env(var).filter(|v| !v.is_empty()) {
                    Some(value) => match setting.strip_prefix("headers_env.") {
                        Some(header) => {
                            s.headers.insert(header.to_owned(), Secret(value));
                        }
                        None => s.secret = Some(Secret(value)),
                    },
                    None => missing.push(MissingEnv {
                        channel: name.clone(),
                        setting,
                        var: var.to_owned(),
                    }),
                }
            }
            secrets.insert(name.clone(), s);
        }
        if missing.is_empty() {
            Ok(Resolved {
                config: self.clone(),
                secrets,
            })
        } else {
            Err(ConfigError::MissingEnv(missing))
        }
    }

    /// Check what can be checked without the environment or the network: URLs, limits,
    /// templates, addresses, header names. `Channels::from_config` runs it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// What [`ChannelsConfig::validate`] checks, for every channel at once (the first
    /// problem of each): `canvas validate` reports them all in one pass.
    pub fn problems(&self) -> Vec<ConfigError> {
        self.channels
            .iter()
            .filter_map(|(name, channel)| {
                validate_channel(name, channel)
                    .err()
                    .map(|problem| ConfigError::Invalid {
                        channel: name.clone(),
                        problem,
                    })
            })
            .collect()
    }
}

fn validate_channel(name: &str, channel: &ChannelConfig) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("the channel name is empty".into());
    }
    let common = channel.common();
    if common.timeout.is_zero() {
        return Err("`timeout` must be more than 0".into());
    }
    if common.concurrency == 0 {
        return Err("`concurrency` must be at least 1".into());
    }
    if let Some(rate) = common.rate_limit
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!(
            "`rate_limit` must be a positive number of messages per second, not {rate}"
        ));
    }
    if common.retry.max_attempts == 0 {
        return Err("`retry.max_attempts` must be at least 1 (1 = never retry)".into());
    }
    if common.retry.base.is_zero() {
        return Err("`retry.base` must be more than 0".into());
    }
    if common.retry.max < common.retry.base {
        return Err("`retry.max` must not be shorter than `retry.base`".into());
    }
    match channel.max_segments() {
        Some(0) => return Err("`max_segments` must be at least 1".into()),
        Some(_) if name != SMS => {
            return Err(format!(
                "`max_segments` counts SMS segments: it goes under the `{SMS}` channel"
            ));
        }
        _ => {}
    }
    match channel {
        ChannelConfig::Webhook(c) => {
            check_url(&c.url)?;
            check_headers(&c.headers, &c.headers_env)?;
        }
        ChannelConfig::Sms(c) | ChannelConfig::Wechat(c) => {
            if crate::url_template::is_template(&c.url) {
                crate::url_template::UrlTemplate::new(&c.url)?;
            } else {
                check_url(&c.url)?;
            }
            if let Some(body) = &c.body {
                if c.method == Method::Get {
                    return Err(
                        "`body` cannot be sent with `method: GET`; put the values in \
                                the `url` template instead"
                            .into(),
                    );
                }
                crate::http::compile("body", body).map_err(|e| format!("`body`: {e}"))?;
            }
            check_headers(&c.headers, &c.headers_env)?;
        }
        ChannelConfig::Email(c) => {
            if c.host.trim().is_empty() {
                return Err("`host` is empty".into());
            }
            crate::email::parse_from(&c.from)?;
            if c.username.is_some() != c.password_env.is_some() {
                return Err(
                    "`username` and `password_env` go together: set both or neither".into(),
                );
            }
        }
        ChannelConfig::Sandbox(_) => {}
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "`url` `{url}` must be an http:// or https:// address with a host (got scheme `{}`)",
            u.scheme()
        )),
        Err(e) => Err(format!("`url` `{url}` is not a valid URL: {e}")),
    }
}

fn check_headers(
    headers: &BTreeMap<String, String>,
    headers_env: &BTreeMap<String, String>,
) -> Result<(), String> {
    for (name, value) in headers {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`headers`: `{name}` is not a valid header name"))?;
        reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| format!("`headers.{name}`: the value is not a valid header value"))?;
    }
    for name in headers_env.keys() {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`headers_env`: `{name}` is not a valid header name"))?;
        if headers.keys().any(|h| h.eq_ignore_ascii_case(name)) {
            return Err(format!(
                "header `{name}` is in both `headers` and `headers_env`"
            ));
        }
    }
    Ok(())
}
