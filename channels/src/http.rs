//! HTTP channels: webhooks (signed JSON) and SMS/WeChat gateways (templated requests).
//! Both share one request path so that idempotency, signing, timeouts and the
//! retryable/permanent split behave the same everywhere.

use std::error::Error as _;
use std::time::Duration;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Value as Json, json};

use crate::config::{ChannelSecrets, GatewayConfig, Method, Secret, WebhookConfig};
use crate::message::{Delivered, DeliveryError, Message, MessageKind};
use crate::signature::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, http_key, sign};

/// Responses larger than this are not read whole: a provider's answer is small, and an
/// unbounded read would let a broken endpoint exhaust the daemon's memory.
const MAX_RESPONSE: usize = 1 << 20;
/// How much of an error body goes into the reason (it ends up in the dead-letter list).
const REASON_CHARS: usize = 200;

/// The JSON body a webhook gets for a message (and a gateway without `body:`): everything
/// a receiver needs to act on it without another lookup. `key` is the `Idempotency-Key`
/// header's value ([`http_key`]), so a receiver may dedupe on either.
pub fn envelope(channel: &str, msg: &Message) -> Json {
    json!({
        "key": http_key(&msg.key),
        "flow": msg.flow,
        "step": msg.step,
        "customer_id": msg.customer_id,
        "channel": channel,
        "address": msg.address,
        "template": msg.template,
        "content": msg.payload,
    })
}

/// A webhook: messages get the [`envelope`], calls get the payload's `body`.
#[derive(Debug)]
pub(crate) struct Webhook {
    name: String,
    url: Url,
    headers: HeaderMap,
    secret: Option<Secret>,
    timeout: Duration,
}

impl Webhook {
    pub(crate) fn new(
        name: &str,
        c: &WebhookConfig,
        secrets: &ChannelSecrets,
    ) -> Result<Webhook, String> {
        Ok(Webhook {
            name: name.to_owned(),
            url: Url::parse(&c.url).map_err(|e| format!("`url`: {e}"))?,
            headers: header_map(&c.headers, &secrets.headers, true)?,
            secret: secrets.secret.clone(),
            timeout: c.timeout,
        })
    }

    pub(crate) async fn deliver(
        &self,
        client: &reqwest::Client,
        msg: &Message,
    ) -> Result<Delivered, DeliveryError> {
        let body = match msg.kind {
            MessageKind::Message => envelope(&self.name, msg),
            // A call without `body:` still sends a JSON object, which every receiver parses.
            MessageKind::Call => match msg.payload.get("body") {
                None | Some(Json::Null) => json!({}),
                Some(b) => b.clone(),
            },
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| DeliveryError::Payload(format!("cannot encode the body: {e}")))?;
        let request = Request {
            method: reqwest::Method::POST,
            url: self.url.clone(),
            headers: &self.headers,
            body: Some(body),
            secret: self.secret.as_ref(),
            timeout: self.timeout,
        };
        request.send(client, msg).await
    }
}

/// An SMS or WeChat gateway: `url` and `body` are minijinja templates over the message.
#[derive(Debug)]
pub(crate) struct Gateway {
    name: String,
    kind: &'static str,
    url: GatewayUrl,
    method: Method,
    headers: HeaderMap,
    /// `body:` given (template `body` in `env`).
    has_body: bool,
    /// The body must be JSON (Content-Type is JSON), so it is checked before sending.
    json_body: bool,
    env: Environment<'static>,
    secret: Option<Secret>,
    timeout: Duration,
}

/// Where a gateway's requests go.
#[derive(Debug)]
enum GatewayUrl {
    Fixed(Url),
    /// Rendered per message; its scheme, host and port are fixed all the same.
    Template(Box<crate::url_template::UrlTemplate>),
}

/// The work one gateway template render may do (minijinja fuel, about one unit per
/// instruction): far more than a request body needs, and a loop that would hold a delivery
/// worker fails the row instead.
const TEMPLATE_FUEL: u64 = 100_000;

/// A template environment for gateway requests: no auto-escaping (bodies are JSON or form
/// data, not HTML; values go through `| tojson` or `| urlencode`), and a misspelt variable
/// is an error rather than an empty string, so a typo cannot silently send blank messages.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env
}

/// The names a gateway's `url` and `body` templates are rendered with.
pub const GATEWAY_VARIABLES: &[&str] = &[
    "to",
    "text",
    "subject",
    "html",
    "template",
    "key",
    "customer_id",
    "flow",
    "step",
    "channel",
    "data",
];

/// Compile a template once to report, before the first send, a syntax error or a name
/// the gateway does not render it with (`{{ too }}` for `{{ to }}`).
pub(crate) fn compile(name: &str, source: &str) -> Result<(), String> {
    let mut env = environment();
    env.add_template_owned(name.to_owned(), source.to_owned())
        .map_err(|e| e.to_string())?;
    let tmpl = env.get_template(name).map_err(|e| e.to_string())?;
    check_names(&env, &tmpl.undeclared_variables(false))
}

/// Every name in `used` must be one of [`GATEWAY_VARIABLES`] or a global of `env` (a
/// function such as `range` or `dict`).
pub(crate) fn check_names(
    env: &Environment<'_>,
    used: &std::collections::HashSet<String>,
) -> Result<(), String> {
    let mut unknown: Vec<&str> = used
        .iter()
        .map(String::as_str)
        .filter(|v| !GATEWAY_VARIABLES.contains(v) && !env.globals().any(|(g, _)| g == *v))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "unknown name `{first}`{}; a gateway template can use {}",
            if unknown.len() > 1 {
                format!(" (and {})", unknown[1..].join(", "))
            } else {
                String::new()
            },
            GATEWAY_VARIABLES
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

impl Gateway {
    pub(crate) fn new(
        name: &str,
        kind: &'static str,
        c: &GatewayConfig,
        secrets: &ChannelSecrets,
    ) -> Result<Gateway, String> {
        let mut env = environment();
        let url = if crate::url_template::is_template(&c.url) {
            GatewayUrl::Template(Box::new(crate::url_template::UrlTemplate::new(&c.url)?))
        } else {
            GatewayUrl::Fixed(Url::parse(&c.url).map_err(|e| format!("`url`: {e}"))?)
        };
        if let Some(body) = &c.body {
            env.add_template_owned("body", body.clone())
                .map_err(|e| format!("`body`: {e}"))?;
        }
        let get = c.method == Method::Get;
        let headers = header_map(&c.headers, &secrets.headers, !get)?;
        let json_body = !get
            && headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
        Ok(Gateway {
            name: name.to_owned(),
            kind,
            url,
            method: c.method,
            headers,
            has_body: c.body.is_some(),
            json_body,
            env,
            secret: secrets.secret.clone(),
            timeout: c.timeout,
        })
    }

    pub(crate) async fn deliver(
        &self,
        client: &reqwest::Client,
        msg: &Message,
    ) -> Result<Delivered, DeliveryError> {
        if msg.kind == MessageKind::Call {
            return Err(DeliveryError::Unsupported {
                channel: self.name.clone(),
                reason: format!(
                    "it is a {} gateway; `call` steps need a `type: webhook` channel",
                    self.kind
                ),
            });
        }
        let to = msg
            .address
            .as_deref()
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| DeliveryError::MissingAddress(self.name.clone()))?;
        let ctx = json!({
            "to": to,
            "text": msg.payload.get("text"),
            "subject": msg.payload.get("subject"),
            "html": msg.payload.get("html"),
            "template": msg.template,
            "key": http_key(&msg.key),
            "customer_id": msg.customer_id,
            "flow": msg.flow,
            "step": msg.step,
            "channel": self.name,
            "data": msg.payload,
        });
        let url = match &self.url {
            GatewayUrl::Fixed(u) => u.clone(),
            GatewayUrl::Template(t) => t.render(&ctx)?,
        };
        let body = if self.method == Method::Get {
            None
        } else if self.has_body {
            let body = self.render("body", &ctx)?;
            if self.json_body
                && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&body)
            {
                return Err(DeliveryError::Template(format!(
                    "`body` is not valid JSON ({e}); write values as `{{{{ text | tojson }}}}`"
                )));
            }
            Some(body.into_bytes())
        } else {
            Some(
                serde_json::to_vec(&envelope(&self.name, msg))
                    .map_err(|e| DeliveryError::Payload(format!("cannot encode the body: {e}")))?,
            )
        };
        let request = Request {
            method: self.method.to_reqwest(),
            url,
            headers: &self.headers,
            body,
            secret: self.secret.as_ref(),
            timeout: self.timeout,
        };
        request.send(client, msg).await
    }

    fn render(&self, name: &str, ctx: &Json) -> Result<String, DeliveryError> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|e| template_failure(name, &e))
    }
}

/// A gateway template (`url` or `body`) that failed to render, for the dead-letter list.
pub(crate) fn template_failure(name: &str, e: &minijinja::Error) -> DeliveryError {
    if e.kind() == minijinja::ErrorKind::OutOfFuel {
        return DeliveryError::Template(format!(
            "`{name}` needs more than {TEMPLATE_FUEL} steps to render (the template limit)"
        ));
    }
    DeliveryError::Template(format!("`{name}`: {e}"))
}

/// The channel's fixed headers: `Content-Type: application/json` unless overridden (when
/// the request has a body), then `headers`, then `headers_env`.
fn header_map(
    plain: &std::collections::BTreeMap<String, String>,
    secret: &std::collections::BTreeMap<String, Secret>,
    json_default: bool,
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    if json_default {
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let secret = secret.iter().map(|(k, v)| (k, v.expose(), true));
    for (name, value, sensitive) in plain
        .iter()
        .map(|(k, v)| (k, v.as_str(), false))
        .chain(secret)
    {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| format!("header `{name}` has a value a header cannot carry"))?;
        value.set_sensitive(sensitive);
        map.insert(name, value);
    }
    Ok(map)
}

/// One HTTP attempt.
struct Request<'a> {
    method: reqwest::Method,
    url: Url,
    headers: &'a HeaderMap,
    body: Option<Vec<u8>>,
    secret: Option<&'a Secret>,
    timeout: Duration,
}

impl Request<'_> {
    async fn send(
        self,
        client: &reqwest::Client,
        msg: &Message,
    ) -> Result<Delivered, DeliveryError> {
        let mut headers = self.headers.clone();
        // Printable ASCII by construction, whatever the customer id.
        let key = HeaderValue::from_str(&http_key(&msg.key)).map_err(|_| {
            DeliveryError::Payload(format!(
                "the idempotency key `{}` has characters an HTTP header cannot carry",
                msg.key
            ))
        })?;
        headers.insert(IDEMPOTENCY_HEADER, key);
        if let Some(secret) = self.secret {
            let signed = self.body.as_deref().unwrap_or_default();
            let signature = sign(secret.expose().as_bytes(), msg.now.timestamp(), signed);
            if let Ok(v) = HeaderValue::from_str(&signature) {
                headers.insert(SIGNATURE_HEADER, v);
            }
        }
        tracing::debug!(key = %msg.key, method = %self.method, url = %self.url, "HTTP delivery");
        let timeout = self.timeout;
        let response = async {
            let mut request = client.request(self.method, self.url).headers(headers);
            if let Some(body) = self.body {
                request = request.body(body);
            }
            let mut response = request.send().await?;
            let status = response.status();
            let retry_after = retry_after(response.headers(), msg);
            let mut bytes = Vec::new();
            let mut truncated = false;
            while let Some(chunk) = response.chunk().await? {
                if bytes.len() + chunk.len() > MAX_RESPONSE {
                    truncated = true;
                    break;
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, retry_after, bytes, truncated))
        };
        // One bound on the whole exchange (connect, request, response body), so a provider
        // that trickles its answer cannot hold a concurrency slot forever.
        let (status, retry_after, bytes, truncated) =
            match tokio::time::timeout(timeout, response).await {
                Err(_) => return Err(DeliveryError::Timeout(timeout)),
                Ok(Err(e)) => return Err(classify(e, timeout)),
                Ok(Ok(r)) => r,
            };
        outcome(status, retry_after, &bytes, truncated, msg.kind)
    }
}

/// Turn an HTTP answer into a delivery or a classed error.
fn outcome(
    status: StatusCode,
    retry_after: Option<Duration>,
    bytes: &[u8],
    truncated: bool,
    kind: MessageKind,
) -> Result<Delivered, DeliveryError> {
    let phrase = status.canonical_reason().unwrap_or("").to_owned();
    if status.is_success() {
        let parsed = if truncated || bytes.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(
                serde_json::from_slice::<Json>(bytes)
                    .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(bytes).into_owned())),
            )
        };
        let response = match kind {
            MessageKind::Call if truncated => {
                return Err(DeliveryError::Payload(format!(
                    "the response is larger than {MAX_RESPONSE} bytes"
                )));
            }
            MessageKind::Call => Some(parsed.unwrap_or_else(|| json!({}))),
            MessageKind::Message => parsed.filter(|v| !v.is_string()),
        };
        return Ok(Delivered {
            status: status.as_u16(),
            detail: phrase,
            response,
        });
    }
    let snippet = snippet(bytes);
    let mut reason = if phrase.is_empty() {
        "no reason given".to_owned()
    } else {
        phrase
    };
    if status.is_redirection() {
        reason.push_str(" (redirects are not followed: point `url` at the final address)");
    }
    if !snippet.is_empty() {
        reason = format!("{reason}: {snippet}");
    }
    Err(DeliveryError::Http {
        status: status.as_u16(),
        reason,
        retry_after,
    })
}

/// The start of a body, on one line, for a reason string.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(REASON_CHARS) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// `Retry-After` as seconds or as an HTTP date (measured from the attempt's `now`).
fn retry_after(headers: &HeaderMap, msg: &Message) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - msg.now).to_std().ok()
}

/// Class a transport failure: no answer in time, no connection, or a broken exchange.
fn classify(e: reqwest::Error, timeout: Duration) -> DeliveryError {
    if e.is_timeout() {
        return DeliveryError::Timeout(timeout);
    }
    // The reason is stored and shown by the API: without the URL, which may carry a
    // gateway's key or a webhook's credentials (the row names its channel anyway).
    let e = e.without_url();
    let reason = cause(&e);
    if e.is_connect() {
        DeliveryError::Connect(reason)
    } else if e.is_builder() {
        DeliveryError::Payload(format!("cannot build the request: {reason}"))
    } else {
        DeliveryError::Transport(reason)
    }
}

/// The innermost two causes ("tcp connect error: Connection refused (os error 111)"):
/// reqwest's outer messages repeat the URL and say little.
fn cause(e: &reqwest::Error) -> String {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let start = chain.len().saturating_sub(2);
    chain[start..].join(": ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn gateway_templates_may_use_their_variables_and_builtins_only() {
        assert_eq!(
            super::compile(
                "body",
                "{% for i in range(2) %}{{ to }}{% endfor %}{{ dict(a=text) | tojson }}"
            ),
            Ok(())
        );
        let e = super::compile("body", "{{ too }}").expect_err("a typo");
        assert!(e.starts_with("unknown name `too`"), "{e}");
    }

    use super::*;

    #[test]
    fn snippet_is_short_and_one_line() {
        assert_eq!(snippet(b"  a\n b  "), "a b");
        let long = "x".repeat(500);
        let s = snippet(long.as_bytes());
        assert_eq!(s.chars().count(), REASON_CHARS + 1);
        assert!(s.ends_with('…'));
    }

    #[test]
    fn call_responses_always_have_json() {
        let ok = StatusCode::OK;
        let d = outcome(ok, None, b"", false, MessageKind::Call).unwrap();
        assert_eq!(d.response, Some(json!({})));
        let d = outcome(ok, None, b"plain", false, MessageKind::Call).unwrap();
        assert_eq!(d.response, Some(json!("plain")));
        let d = outcome(ok, None, b"plain", false, MessageKind::Message).unwrap();
        assert_eq!(d.response, None);
        let e = outcome(ok, None, b"", true, MessageKind::Call).unwrap_err();
        assert!(!e.is_retryable());
        let e = outcome(StatusCode::FOUND, None, b"", false, MessageKind::Message).unwrap_err();
        assert!(e.to_string().contains("redirects are not followed"), "{e}");
        assert!(!e.is_retryable());
    }
}
