//! Delivery channels: how an outbox row reaches a provider.
//!
//! The daemon claims rows from the transactional outbox, turns each into a [`Message`],
//! takes a [`Permit`] from [`Channels::acquire`] and calls [`Channels::deliver`]. A
//! [`DeliveryError`] says whether trying again may help; [`next_attempt`] says when. This
//! crate never reads the wall clock and never retries by itself: the daemon owns time,
//! randomness and the outbox, so delivery stays testable and a crash loses nothing.
//!
//! ```no_run
//! # async fn run(yaml_section: canvas_channels::ChannelsConfig, msg: canvas_channels::Message)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use canvas_channels::{Channels, next_attempt};
//! let resolved = yaml_section.resolve(|var| std::env::var(var).ok())?;
//! let channels = Channels::from_config(resolved)?;
//! let permit = channels.acquire("sms").await?;
//! match channels.deliver("sms", &msg).await {
//!     Ok(delivered) => { /* mark the row sent; store delivered.response for a call */ }
//!     Err(e) if e.is_retryable() => {
//!         let retry = channels.retry_config("sms").copied().unwrap_or_default();
//!         match next_attempt(1, &retry, 0.42) {
//!             Some(wait) => { /* reschedule after max(wait, e.retry_after()) */ }
//!             None => { /* dead-letter with e.reason() */ }
//!         }
//!     }
//!     Err(e) => { /* dead-letter with e.reason() */ }
//! }
//! drop(permit);
//! # Ok(()) }
//! ```

mod config;
mod duration;
mod email;
mod http;
mod limit;
mod message;
mod retry;
pub mod signature;
mod url_template;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use config::{
    ChannelConfig, ChannelSecrets, ChannelsConfig, Common, ConfigError, EmailConfig, GatewayConfig,
    Method, MissingEnv, Resolved, RetryConfig, SMS, SandboxConfig, Secret, Tls, WebhookConfig,
};
pub use duration::{DurationError, parse_duration};
pub use email::{html_to_text, message_id};
pub use http::envelope;
pub use limit::{Closed, Limiter, Permit};
pub use message::{Delivered, DeliveryError, Message, MessageKind};
pub use retry::{ceiling, next_attempt};

/// The adapter behind one channel name.
#[derive(Debug)]
enum Adapter {
    Webhook(http::Webhook),
    // Boxed: a gateway carries its template environment, much larger than the others.
    Gateway(Box<http::Gateway>),
    Email(email::Email),
    /// Nothing to reach: the message stays in the database; a call gets `response`.
    Sandbox(serde_json::Value),
}

#[derive(Debug)]
struct Channel {
    adapter: Adapter,
    limiter: Limiter,
    common: Common,
    type_name: &'static str,
}

/// Every configured channel, ready to deliver. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Channels {
    http: reqwest::Client,
    channels: BTreeMap<String, Arc<Channel>>,
}

impl Channels {
    /// Build every adapter from a configuration whose secrets were resolved
    /// ([`ChannelsConfig::resolve`]). Validates first ([`ChannelsConfig::validate`]); nothing
    /// touches the network here.
    pub fn from_config(resolved: Resolved) -> Result<Channels, ConfigError> {
        resolved.config.validate()?;
        // One client for all HTTP channels: one connection pool, one TLS set-up. Redirects
        // are not followed: a POST silently turned into a GET would lose the message.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("canvas/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Client(e.to_string()))?;
        let empty = ChannelSecrets::default();
        let mut channels = BTreeMap::new();
        for (name, config) in &resolved.config.channels {
            let secrets = resolved.secrets.get(name).unwrap_or(&empty);
            let invalid = |problem: String| ConfigError::Invalid {
                channel: name.clone(),
                problem,
            };
            let adapter = match config {
                ChannelConfig::Webhook(c) => {
                    Adapter::Webhook(http::Webhook::new(name, c, secrets).map_err(invalid)?)
                }
                ChannelConfig::Sms(c) => Adapter::Gateway(Box::new(
                    http::Gateway::new(name, "sms", c, secrets).map_err(invalid)?,
                )),
                ChannelConfig::Wechat(c) => Adapter::Gateway(Box::new(
                    http::Gateway::new(name, "wechat", c, secrets).map_err(invalid)?,
                )),
                ChannelConfig::Email(c) => {
                    Adapter::Email(email::Email::new(name, c, secrets).map_err(invalid)?)
                }
                ChannelConfig::Sandbox(c) => Adapter::Sandbox(
                    c.response
                        .clone()
                        .unwrap_or_else(|| serde_json::Value::Object(Default::default())),
                ),
            };
            let common = config.common();
            channels.insert(
                name.clone(),
                Arc::new(Channel {
                    adapter,
                    limiter: Limiter::new(common.concurrency, common.rate_limit),
                    common,
                    type_name: config.type_name(),
                }),
            );
            tracing::info!(channel = %name, r#type = config.type_name(), "channel ready");
        }
        Ok(Channels { http, channels })
    }

    fn channel(&self, name: &str) -> Result<&Arc<Channel>, DeliveryError> {
        self.channels
            .get(name)
            .ok_or_else(|| DeliveryError::UnknownChannel(name.to_owned()))
    }

    /// Deliver one attempt of `msg` on `channel`. Does not wait for the limiter (take a
    /// [`Permit`] from [`Channels::acquire`] first, or use [`Channels::send`]) and does not
    /// retry: the daemon decides that from the error and [`next_attempt`].
    pub async fn deliver(&self, channel: &str, msg: &Message) -> Result<Delivered, DeliveryError> {
        let ch = self.channel(channel)?;
        let result = match &ch.adapter {
            Adapter::Webhook(w) => w.deliver(&self.http, msg).await,
            Adapter::Gateway(g) => g.deliver(&self.http, msg).await,
            Adapter::Email(e) => e.deliver(msg).await,
            Adapter::Sandbox(response) => Ok(sandbox(msg, response)),
        };
        match &result {
            Ok(d) => tracing::debug!(channel, key = %msg.key, status = d.status, "delivered"),
            Err(e) => tracing::debug!(
                channel,
                key = %msg.key,
                retryable = e.is_retryable(),
                error = %e,
                "delivery failed"
            ),
        }
        result
    }

    /// Wait until `channel` has a free concurrency slot and a rate token. Hold the permit
    /// while the request is in flight.
    pub async fn acquire(&self, channel: &str) -> Result<Permit, DeliveryError> {
        let ch = self.channel(channel)?;
        ch.limiter
            .acquire()
            .await
            .map_err(|Closed| DeliveryError::Closed)
    }

    /// [`Channels::acquire`] then [`Channels::deliver`], for callers that do not need to
    /// hold the permit across anything else.
    pub async fn send(&self, channel: &str, msg: &Message) -> Result<Delivered, DeliveryError> {
        let _permit = self.acquire(channel).await?;
        self.deliver(channel, msg).await
    }

    /// Refuse further permits on every channel (waiting callers get
    /// [`DeliveryError::Closed`]); requests in flight finish. For shutdown.
    pub fn close(&self) {
        for ch in self.channels.values() {
            ch.limiter.close();
        }
    }

    /// The retry policy of `channel`, for [`next_attempt`].
    pub fn retry_config(&self, channel: &str) -> Option<&RetryConfig> {
        self.channels.get(channel).map(|c| &c.common.retry)
    }

    /// The requests per second `channel` may make, when it is rate-limited (so the daemon
    /// claims no more of its rows than it can send within their lease).
    pub fn rate_limit(&self, channel: &str) -> Option<f64> {
        self.channels.get(channel).and_then(|c| c.common.rate_limit)
    }

    /// The per-request timeout of `channel` (so the daemon can size its claim lease).
    pub fn timeout(&self, channel: &str) -> Option<Duration> {
        self.channels.get(channel).map(|c| c.common.timeout)
    }

    /// The configured channel names with their type (`webhook`, `email`, `sms`, `wechat`,
    /// `sandbox`).
    pub fn names(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.channels.iter().map(|(n, c)| (n.as_str(), c.type_name))
    }

    /// Whether `channel` is configured.
    pub fn contains(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }
}

/// A sandbox delivery: accepted at once, nothing sent. A call answers with the channel's
/// configured `response`; a message with none (its content is the outbox row itself).
fn sandbox(msg: &Message, response: &serde_json::Value) -> Delivered {
    Delivered {
        status: 200,
        detail: "kept in the sandbox".to_owned(),
        response: match msg.kind {
            MessageKind::Call => Some(response.clone()),
            MessageKind::Message => None,
        },
    }
}
