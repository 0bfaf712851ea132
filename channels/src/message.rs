//! What the daemon hands a channel, what comes back, and how a failure is classed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

/// Whether a row is a message to a customer or a `call` to an internal system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A `send` step: `payload` is `{ "subject"?, "text"?, "html"? }`.
    Message,
    /// A `call` step: `payload` is `{ "webhook", "body", "save_as" }`; the response body is
    /// returned for the run to store.
    Call,
}

/// One outbox row, as a channel needs it. Built by the daemon from its own row type so
/// this crate does not depend on the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `RUN_ID/STEP_ID`: the idempotency key sent with every attempt, so a provider can drop
    /// a repeat of a request whose answer was lost.
    pub key: String,
    /// Message or call.
    pub kind: MessageKind,
    /// The flow that produced it.
    pub flow: String,
    /// The step that produced it.
    pub step: String,
    /// The customer it concerns.
    pub customer_id: String,
    /// Phone number, e-mail address or openid; required by `sms`, `email` and `wechat`.
    pub address: Option<String>,
    /// The template name, when the step used one.
    pub template: Option<String>,
    /// The rendered content (message) or `{ webhook, body, save_as }` (call).
    pub payload: Json,
    /// The time of this attempt: signatures and the e-mail `Date:` come from it, since this
    /// crate never reads the wall clock itself (deterministic tests, one clock in the
    /// daemon).
    pub now: DateTime<Utc>,
}

impl Message {
    /// A string field of the payload (`subject`, `text`, `html`), when present.
    pub fn payload_str(&self, field: &str) -> Option<&str> {
        self.payload.get(field).and_then(Json::as_str)
    }
}

/// A delivery the provider accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The provider's status: the HTTP status, or the SMTP reply code (`250`).
    pub status: u16,
    /// The provider's short answer: the HTTP reason phrase, or the SMTP reply text (often
    /// with the provider's queue id).
    pub detail: String,
    /// The response body as JSON. Always set for a call (`{}` for an empty body, a JSON
    /// string for a body that is not JSON), so the run has something to store; for a
    /// message, set when the body was JSON (a gateway's message id, say).
    pub response: Option<Json>,
}

/// Why a delivery failed, and whether trying again may help ([`DeliveryError::is_retryable`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// The channel is not configured. Permanent.
    #[error("unknown channel `{0}`: it is not configured under `channels:` in canvas.yaml")]
    UnknownChannel(String),
    /// The channel cannot carry this kind of row (a call to an SMS gateway). Permanent.
    #[error("channel `{channel}` cannot deliver this: {reason}")]
    Unsupported {
        /// The channel.
        channel: String,
        /// Why.
        reason: String,
    },
    /// The row has no address and the channel needs one. Permanent.
    #[error("no address: channel `{0}` needs the customer's address")]
    MissingAddress(String),
    /// The address cannot be used (not an e-mail address, a character a header cannot
    /// carry). Permanent.
    #[error("invalid address `{address}`: {reason}")]
    InvalidAddress {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The payload lacks what the channel needs (an e-mail with neither text nor html).
    /// Permanent.
    #[error("invalid payload: {0}")]
    Payload(String),
    /// The gateway's `url` or `body` template failed to render, or rendered something that
    /// is not a valid request. Permanent: the same row renders the same way next time.
    #[error("template: {0}")]
    Template(String),
    /// No answer within the channel's `timeout`. Retryable.
    #[error("timed out after {}ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection could not be made (refused, DNS, TLS handshake). Retryable.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The connection broke during the exchange (reset, closed early). Retryable.
    #[error("transport error: {0}")]
    Transport(String),
    /// The HTTP provider answered with a non-2xx status. Retryable for 5xx and 429.
    #[error("HTTP {status}: {reason}")]
    Http {
        /// The status.
        status: u16,
        /// The reason phrase and the start of the body.
        reason: String,
        /// `Retry-After`, when the provider sent one (a 429 or 503 usually).
        retry_after: Option<Duration>,
    },
    /// The SMTP relay refused. Retryable for 4xx replies, permanent for 5xx.
    #[error("SMTP {code}: {reason}")]
    Smtp {
        /// The reply code.
        code: u16,
        /// The reply text.
        reason: String,
    },
    /// The limiter was closed because the daemon is shutting down. Retryable (by the next
    /// daemon).
    #[error("channels are shutting down")]
    Closed,
}

impl DeliveryError {
    /// Whether the same request may succeed later: timeouts, connection failures, HTTP 5xx
    /// and 429, SMTP 4xx. Everything else is permanent and goes to the dead letters at once.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeliveryError::Timeout(_)
            | DeliveryError::Connect(_)
            | DeliveryError::Transport(_)
            | DeliveryError::Closed => true,
            DeliveryError::Http { status, .. } => *status >= 500 || *status == 429,
            DeliveryError::Smtp { code, .. } => (400..500).contains(code),
            DeliveryError::UnknownChannel(_)
            | DeliveryError::Unsupported { .. }
            | DeliveryError::MissingAddress(_)
            | DeliveryError::InvalidAddress { .. }
            | DeliveryError::Payload(_)
            | DeliveryError::Template(_) => false,
        }
    }

    /// The provider's own `Retry-After`, which the daemon should wait at least.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The short human reason, for the outbox row and the dead-letter list.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}
