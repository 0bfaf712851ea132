//! E-mail over SMTP (lettre, rustls): one SMTP session per message.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use sha2::{Digest, Sha256};

use crate::config::{ChannelSecrets, EmailConfig, Tls};
use crate::message::{Delivered, DeliveryError, Message, MessageKind};
use crate::signature::EMAIL_IDEMPOTENCY_HEADER;

/// The `Message-ID` for an outbox key: the same on every attempt, so a relay or a mailbox
/// that saw the first attempt can recognise a repeat. Hashed because keys may contain
/// characters a Message-ID cannot.
pub fn message_id(key: &str, domain: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("<canvas.{}@{domain}>", &hex::encode(digest)[..32])
}

/// Parse `from:`; its domain names the Message-IDs.
pub(crate) fn parse_from(from: &str) -> Result<Mailbox, String> {
    from.parse::<Mailbox>()
        .map_err(|e| format!("`from` `{from}` is not a mailbox (`Name <user@domain>`): {e}"))
}

/// An SMTP channel.
pub(crate) struct Email {
    name: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    domain: String,
    timeout: Duration,
}

impl std::fmt::Debug for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email")
            .field("name", &self.name)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl Email {
    pub(crate) fn new(
        name: &str,
        c: &EmailConfig,
        secrets: &ChannelSecrets,
    ) -> Result<Email, String> {
        let from = parse_from(&c.from)?;
        let domain = from.email.domain().to_owned();
        let builder = match c.tls {
            Tls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(c.host.as_str()),
            Tls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&c.host)
                .map_err(|e| format!("`host` `{}`: {e}", c.host))?,
            Tls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&c.host)
                .map_err(|e| format!("`host` `{}`: {e}", c.host))?,
        };
        let hello = c.hello_name.clone().unwrap_or_else(|| domain.clone());
        let mut builder = builder
            .port(c.port.unwrap_or(c.tls.default_port()))
            .timeout(Some(c.timeout))
            .hello_name(ClientId::Domain(hello));
        if let Some(user) = &c.username {
            let password = secrets
                .secret
                .as_ref()
                .ok_or("`username` is set but the `password_env` secret was not resolved")?;
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(Email {
            name: name.to_owned(),
            transport: builder.build(),
            from,
            domain,
            timeout: c.timeout,
        })
    }

    /// The e-mail for a message: multipart/alternative when there is HTML (the text part
    /// derived from it when the payload has none), plain text otherwise.
    pub(crate) fn build(&self, msg: &Message) -> Result<lettre::Message, DeliveryError> {
        let address = msg
            .address
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| DeliveryError::MissingAddress(self.name.clone()))?;
        let to = address
            .parse::<Mailbox>()
            .map_err(|e| DeliveryError::InvalidAddress {
                address: address.to_owned(),
                reason: e.to_string(),
            })?;
        let non_empty = |f: &str| msg.payload_str(f).filter(|s| !s.trim().is_empty());
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(message_id(&msg.key, &self.domain)))
            // Set from `now` so lettre does not read the wall clock.
            .date(SystemTime::from(msg.now))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(EMAIL_IDEMPOTENCY_HEADER),
                msg.key.clone(),
            ));
        if let Some(subject) = msg.payload_str("subject") {
            builder = builder.subject(subject);
        }
        let built = match (non_empty("text"), non_empty("html")) {
            (text, Some(html)) => {
                let text = text.map_or_else(|| html_to_text(html), str::to_owned);
                builder.multipart(MultiPart::alternative_plain_html(text, html.to_owned()))
            }
            (Some(text), None) => builder.singlepart(SinglePart::plain(text.to_owned())),
            (None, None) => {
                return Err(DeliveryError::Payload(
                    "an e-mail needs `text` or `html` in its content".into(),
                ));
            }
        };
        built.map_err(|e| DeliveryError::Payload(format!("cannot build the e-mail: {e}")))
    }

    pub(crate) async fn deliver(&self, msg: &Message) -> Result<Delivered, DeliveryError> {
        if msg.kind == MessageKind::Call {
            return Err(DeliveryError::Unsupported {
                channel: self.name.clone(),
                reason: "it is an e-mail channel; `call` steps need a `type: webhook` channel"
                    .into(),
            });
        }
        let email = self.build(msg)?;
        tracing::debug!(key = %msg.key, channel = %self.name, "SMTP delivery");
        match tokio::time::timeout(self.timeout, self.transport.send(email)).await {
            Err(_) => Err(DeliveryError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(classify(&e, self.timeout)),
            Ok(Ok(response)) => Ok(Delivered {
                status: u16::from(response.code()),
                detail: response.message().collect::<Vec<_>>().join(" "),
                response: None,
            }),
        }
    }
}

/// 4xx → retryable, 5xx → permanent (by [`DeliveryError::is_retryable`]); no connection or
/// a broken session → retryable; a message lettre cannot send → permanent.
fn classify(e: &lettre::transport::smtp::Error, timeout: Duration) -> DeliveryError {
    let source = e.source().map(ToString::to_string).unwrap_or_default();
    if let Some(code) = e.status() {
        return DeliveryError::Smtp {
            code: u16::from(code),
            reason: source.split_whitespace().collect::<Vec<_>>().join(" "),
        };
    }
    if e.is_timeout() {
        return DeliveryError::Timeout(timeout);
    }
    if e.is_client() {
        return DeliveryError::Payload(e.to_string());
    }
    let mut refused = false;
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            refused = matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            );
        }
        cause = c.source();
    }
    if refused || e.is_tls() {
        DeliveryError::Connect(e.to_string())
    } else {
        DeliveryError::Transport(e.to_string())
    }
}

/// A plain-text rendering of an HTML body for the text/plain part: block elements become
/// line breaks, links keep their address, scripts and styles vanish, entities decode.
/// Not a full HTML parser; good enough for the alternative part of marketing mail.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut href: Option<String> = None;
    while let Some(lt) = rest.find('<') {
        push_text(&mut out, &rest[..lt]);
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            // A lone `<` is text.
            push_text(&mut out, rest);
            rest = "";
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if tag.starts_with("!--") {
            // Comments may contain `>`; skip to their end.
            if !tag.ends_with("--")
                && let Some(end) = rest.find("-->")
            {
                rest = &rest[end + 3..];
            }
            continue;
        }
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase();
        match name.as_str() {
            "script" | "style" | "head" | "title" if !closing => {
                let end = format!("</{name}");
                match find_ascii_ci(rest, &end) {
                    Some(i) => {
                        rest = &rest[i..];
                        if let Some(gt) = rest.find('>') {
                            rest = &rest[gt + 1..];
                        }
                    }
                    None => rest = "",
                }
            }
            "br" => out.push('\n'),
            "li" if !closing => out.push_str("\n- "),
            "p" | "div" | "tr" | "table" | "ul" | "ol" | "h1" | "h2" | "h3" | "h4" | "h5"
            | "h6" | "blockquote" | "section" | "article" | "header" | "footer" => {
                out.push('\n');
            }
            "td" | "th" if closing => out.push(' '),
            "hr" => out.push_str("\n----\n"),
            "a" if !closing => href = attribute(tag, "href"),
            "a" => {
                if let Some(h) = href.take()
                    && (h.starts_with("http://") || h.starts_with("https://"))
                    && !out.ends_with(h.as_str())
                {
                    out.push_str(" (");
                    out.push_str(&h);
                    out.push(')');
                }
            }
            _ => {}
        }
    }
    push_text(&mut out, rest);
    tidy(&out)
}

/// Append text with entities decoded and whitespace runs as one space (HTML rendering).
fn push_text(out: &mut String, text: &str) {
    let decoded = decode_entities(text);
    for (i, word) in decoded
        .split(|c: char| c.is_whitespace() && c != '\u{a0}')
        .enumerate()
    {
        if i > 0 && !out.ends_with([' ', '\n']) && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&word.replace('\u{a0}', " "));
    }
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').filter(|&semi| semi <= 10).and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Trim each line and keep at most one blank line between paragraphs.
fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines().map(str::trim) {
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

fn find_ascii_ci(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// An attribute's value from a tag's inside (`a href="…" class=x`).
fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = at == 0 || lower.as_bytes()[at - 1].is_ascii_whitespace();
        let after = tag[from..].trim_start();
        if !before_ok || !after.starts_with('=') {
            continue;
        }
        let value = after[1..].trim_start();
        let (quote, body) = match value.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), &value[1..]),
            _ => (None, value),
        };
        let end = match quote {
            Some(q) => body.find(q).unwrap_or(body.len()),
            None => body.find(char::is_whitespace).unwrap_or(body.len()),
        };
        return Some(decode_entities(&body[..end]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_becomes_readable_text() {
        let html = "<html><head><title>T</title><style>p{color:red}</style></head><body>\
                    <h1>Happy&nbsp;birthday, Ana!</h1><p>Your   gift:\n <b>20%</b> off &amp; \
                    free shipping.</p><p>Use it <a href=\"https://shop.example/b?x=1&amp;y=2\">\
                    here</a>.</p><ul><li>one</li><li>two</li></ul><!-- a > b --><br>Bye</body></html>";
        assert_eq!(
            html_to_text(html),
            "Happy birthday, Ana!\n\nYour gift: 20% off & free shipping.\n\nUse it here \
             (https://shop.example/b?x=1&y=2).\n\n- one\n- two\n\nBye"
        );
    }

    #[test]
    fn odd_input_does_not_panic() {
        assert_eq!(html_to_text("a < b"), "a < b");
        assert_eq!(html_to_text("x &bogus; &#65; &#x42;"), "x &bogus; A B");
        assert_eq!(html_to_text("<script>alert(1)"), "");
        assert_eq!(html_to_text("<p>é</p>"), "é");
    }

    #[test]
    fn message_ids_are_stable_and_distinct() {
        let a = message_id("run-1/step-a", "shop.example");
        assert_eq!(a, message_id("run-1/step-a", "shop.example"));
        assert_ne!(a, message_id("run-1/step-b", "shop.example"));
        assert!(
            a.starts_with("<canvas.") && a.ends_with("@shop.example>"),
            "{a}"
        );
    }
}
