//! Secrets out of text. Database and channel URLs carry passwords
//! (`postgres://canvas:PASSWORD@db/canvas`, `?password=…`); every message, log line and API
//! answer that may hold one goes through [`redact`], the one place that knows how.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// What a hidden secret is replaced by.
const MASK: &str = "***";

/// `text` with the password of every URL in it masked: the `PASSWORD` of
/// `scheme://USER:PASSWORD@host`, and the value of query parameters whose name says it may be
/// a secret (`password=`, `sslpassword=`, `token=`, `apikey=`…). Works on a bare URL and on any
/// message that quotes one; text without `://` comes back borrowed, untouched.
///
/// It errs on the side of hiding: a password holding a raw `@` or `/` is masked whole, and a
/// `user:x@` in a path is masked too — a message may lose a detail, never leak a secret.
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = at + 3;
        out.push_str(&rest[..start]);
        // The URL runs to the first character that cannot be part of one in a message.
        let len = rest[start..]
            .find(|c: char| {
                c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '`' | '<' | '>')
            })
            .unwrap_or(rest.len() - start);
        redact_url_body(&rest[start..start + len], &mut out);
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Append `body` (a URL after its `scheme://`) with its secrets masked.
fn redact_url_body(body: &str, out: &mut String) {
    // The user info ends at the last `@` before the query: a raw `@` or `/` in a password
    // stays inside what is masked.
    let query_at = body.find(['?', '#']).unwrap_or(body.len());
    let (before_query, query) = body.split_at(query_at);
    match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&before_query[at..]);
        }
        None => out.push_str(before_query),
    }
    redact_query(query, out);
}

/// Append `query` (`?a=1&password=x#frag`, or empty) with secret-named values masked.
fn redact_query(query: &str, out: &mut String) {
    let mut piece = 0;
    for (i, c) in query.char_indices() {
        if matches!(c, '?' | '&' | ';' | '#') {
            redact_param(&query[piece..i], out);
            out.push(c);
            piece = i + 1;
        }
    }
    redact_param(&query[piece..], out);
}

/// Append one `name=value` with the value masked when the name says it is a secret.
fn redact_param(param: &str, out: &mut String) {
    match param.split_once('=') {
        Some((name, _)) if is_secret_name(name) => {
            out.push_str(name);
            out.push('=');
            out.push_str(MASK);
        }
        _ => out.push_str(param),
    }
}

/// `password`, `sslpassword`, `token`, `api_key`, `apikey`, `auth`, `X-Amz-Signature`…: a
/// name that might hold a secret (hiding an innocent value costs nothing).
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "sig",
        "credential",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// A database URL: shown (`Display`, `Debug`) only with its password masked, so a settings
/// struct or an error message that prints it cannot leak it. [`DatabaseUrl::expose`] gives
/// the real one, for connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> DatabaseUrl {
        DatabaseUrl(url.into())
    }

    /// The URL with its password, for [`crate::store::Database::connect`] only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", redact(&self.0))
    }
}

impl FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<DatabaseUrl, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl From<String> for DatabaseUrl {
    fn from(s: String) -> DatabaseUrl {
        DatabaseUrl(s)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(s: &str) -> DatabaseUrl {
        DatabaseUrl(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_and_keeps_the_rest() {
        for (input, want) in [
            (
                "postgres://canvas:s3cret@db:5432/canvas",
                "postgres://canvas:***@db:5432/canvas",
            ),
            (
                "error: opening postgres://u:p%40ss@h/db?sslmode=require: refused",
                "error: opening postgres://u:***@h/db?sslmode=require: refused",
            ),
            // A raw `@` or `/` in the password: masked whole.
            ("postgres://u:p@ss/x@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://h/db?user=u&password=s3cret&sslmode=disable",
                "postgresql://h/db?user=u&password=***&sslmode=disable",
            ),
            (
                "postgres://h/db?sslpassword=s3cret",
                "postgres://h/db?sslpassword=***",
            ),
            (
                "`url` rendered `https://sms.example/send?to=1&apikey=k3y&text=hi`",
                "`url` rendered `https://sms.example/send?to=1&apikey=***&text=hi`",
            ),
            (
                "two: sqlite://canvas.db and `https://a:b@hook.example/x?token=t`",
                "two: sqlite://canvas.db and `https://a:***@hook.example/x?token=***`",
            ),
            ("postgres://canvas@db/canvas", "postgres://canvas@db/canvas"),
            ("no url here", "no url here"),
            ("", ""),
            ("://", "://"),
            ("x://:@", "x://:***@"),
        ] {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn a_database_url_never_prints_its_password() {
        let url: DatabaseUrl = "postgres://u:s3cret@h/db".parse().expect("infallible");
        assert_eq!(url.expose(), "postgres://u:s3cret@h/db");
        assert!(!format!("{url} {url:?}").contains("s3cret"));
    }

    proptest::proptest! {
        /// Whatever surrounds it, a planted password never survives.
        #[test]
        fn a_planted_password_never_survives(
            before in "[ -~]{0,20}",
            user in "[a-z]{1,8}",
            after in "[ -~]{0,20}",
        ) {
            let text = format!("{before} postgres://{user}:PLANTEDpw@h:5432/db {after}");
            let out = redact(&text);
            proptest::prop_assert!(!out.contains("PLANTEDpw"), "{}", out);
        }
    }
}
