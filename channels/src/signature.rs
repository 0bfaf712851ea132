//! `X-Canvas-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//!
//! The timestamp is inside the signed text so a receiver can refuse replays older than a
//! few minutes; `v1` names the scheme so it can change without breaking receivers (several
//! `v1=` entries are accepted, for key rotation).

use std::borrow::Cow;
use std::time::Duration;

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use sha2::Sha256;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Canvas-Signature";
/// The HTTP idempotency header: the outbox key, identical on every attempt (in the form of
/// [`http_key`]).
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// The e-mail header carrying the outbox key (the `Message-ID` is derived from it too).
pub const EMAIL_IDEMPOTENCY_HEADER: &str = "X-Canvas-Idempotency-Key";

type HmacSha256 = Hmac<Sha256>;

/// What [`http_key`] escapes, besides every byte outside ASCII: controls, space, and `%`
/// itself, so the escaping can be undone without doubt.
const KEY_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// An outbox key as HTTP carries it, in the `Idempotency-Key` header and the `key` of the
/// body alike: keys hold customer ids, which may be any text, and a header value is
/// printable ASCII. Bytes outside printable ASCII, space and `%` are percent-encoded (UTF-8),
/// so a key of printable ASCII without `%` goes unchanged; percent-decoding gives the key as
/// the API shows it.
pub fn http_key(key: &str) -> Cow<'_, str> {
    utf8_percent_encode(key, KEY_ESCAPES).into()
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value for `body` signed with `secret` at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=…,v1=…`.
    #[error("malformed signature header")]
    Malformed,
    /// The timestamp is further from `now` than the tolerance (a replay, or a skewed clock).
    #[error("signature timestamp is {0}s away from now")]
    Stale(i64),
    /// No `v1` matches the body and secret.
    #[error("signature does not match")]
    Mismatch,
}

/// Check a received `X-Canvas-Signature` against the raw body: the receiving side of
/// [`sign`], for Rust receivers and for tests. `now` is the receiver's unix time.
pub fn verify(
    header: &str,
    secret: &[u8],
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => {
                candidates.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let skew = now.saturating_sub(timestamp);
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(SignatureError::Stale(skew));
    }
    let expected = mac(secret, timestamp, body);
    if candidates
        .iter()
        .any(|c| expected.clone().verify_slice(c).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let h = sign(b"k", 1_700_000_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1700000000,v1="));
        assert_eq!(h.len(), "t=1700000000,v1=".len() + 64);
        let tol = Duration::from_secs(300);
        assert_eq!(verify(&h, b"k", b"{\"a\":1}", 1_700_000_010, tol), Ok(()));
        assert_eq!(
            verify(&h, b"other", b"{\"a\":1}", 1_700_000_010, tol),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, b"k", b"{\"a\":2}", 1_700_000_010, tol),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, b"k", b"{\"a\":1}", 1_700_001_000, tol),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify("v1=00", b"k", b"", 0, tol),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn known_vector() {
        // Computed independently with Python's hmac module:
        // hmac.new(b"whsec_test", b'1700000000.{"hello":"world"}', sha256).hexdigest()
        assert_eq!(
            sign(b"whsec_test", 1_700_000_000, br#"{"hello":"world"}"#),
            "t=1700000000,v1=f592bbf3951cfc94e560eecfb5d9dd4da6b0fff2e626235f8ab4b54860925d0b"
        );
    }
}
