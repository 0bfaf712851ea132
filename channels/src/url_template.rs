//! A gateway `url:` written as a template (`https://gw.example/send?to={{ to }}`).
//!
//! Customer data reaches the template (`to` is a profile attribute, which outsiders can set
//! through the public Segment write key), so it must not choose where the request goes:
//!
//! - the scheme, host and port are fixed when the configuration loads: the template must
//!   start with a literal `scheme://host[:port]/`, with no template syntax before that `/`;
//! - every value rendered into the URL is percent-encoded, so `?to={{ to }}` with
//!   `to = "1&admin=true#frag"` is the one query value `1%26admin%3Dtrue%23frag`;
//! - after rendering, the URL's scheme, host and port are compared with the fixed ones, and
//!   a path segment that is `.` or `..` is refused, so a request never leaves the fixed
//!   origin or climbs out of the fixed path (defence in depth: the encoding already rules
//!   both out).

use minijinja::{Environment, ErrorKind, Value};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use serde_json::Value as Json;

use crate::message::DeliveryError;

/// What a rendered value may keep as is: RFC 3986's unreserved characters. Everything else
/// (`/ ? # & = + %`, spaces, non-ASCII) is encoded, so a value stays one path segment or one
/// query value.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Whether a `url:` setting is a template rather than a fixed address.
pub(crate) fn is_template(url: &str) -> bool {
    url.contains("{{") || url.contains("{%") || url.contains("{#")
}

/// Where every request of one gateway goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn of(url: &Url) -> Origin {
        Origin {
            scheme: url.scheme().to_owned(),
            host: url.host_str().unwrap_or_default().to_owned(),
            port: url.port_or_known_default(),
        }
    }
}

/// A checked `url:` template, ready to render per message.
#[derive(Debug)]
pub(crate) struct UrlTemplate {
    /// The literal `scheme://host[:port]/` the template starts with.
    fixed: String,
    origin: Origin,
    env: Environment<'static>,
}

impl UrlTemplate {
    /// Check and compile a `url:` template; the error names the setting.
    pub(crate) fn new(url: &str) -> Result<UrlTemplate, String> {
        let fixed = fixed_prefix(url)?;
        let parsed = Url::parse(fixed).map_err(|e| format!("`url` `{fixed}`: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "`url` must start with an http:// or https:// address with a host, not `{fixed}`"
            ));
        }
        let mut env = crate::http::environment();
        // Every `{{ … }}` is encoded whatever it holds: `safe`, `tojson` and macros give
        // values minijinja would write raw, and none of them may bypass the encoding.
        env.set_formatter(|out, _state, value| {
            if value.is_undefined() {
                return Ok(());
            }
            let text = value.to_string();
            write!(out, "{}", utf8_percent_encode(&text, COMPONENT))
                .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write"))
        });
        // `| urlencode` was the way to encode before encoding was automatic: it now keeps the
        // value, which is then encoded once. A map (minijinja's query-string form) cannot
        // be encoded as one value, so it is refused rather than garbled.
        env.add_filter("urlencode", |value: Value| {
            if value
                .as_object()
                .is_some_and(|o| o.try_iter_pairs().is_some())
            {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "`urlencode` of a map is not supported in `url`: write each value, \
                     `?to={{ to }}&msg={{ text }}`",
                ));
            }
            Ok(value)
        });
        env.add_template_owned("url", url.to_owned())
            .map_err(|e| format!("`url`: {e}"))?;
        let tmpl = env.get_template("url").map_err(|e| format!("`url`: {e}"))?;
        crate::http::check_names(&env, &tmpl.undeclared_variables(false))
            .map_err(|e| format!("`url`: {e}"))?;
        Ok(UrlTemplate {
            fixed: fixed.to_owned(),
            origin: Origin::of(&parsed),
            env,
        })
    }

    /// Render the URL for one message; any failure is permanent (the same row renders the
    /// same way next time).
    pub(crate) fn render(&self, ctx: &Json) -> Result<Url, DeliveryError> {
        let rendered = self
            .env
            .get_template("url")
            .and_then(|t| t.render(ctx))
            .map_err(|e| crate::http::template_failure("url", &e))?;
        let rendered = rendered.trim();
        let url = Url::parse(rendered)
            .map_err(|e| DeliveryError::Template(format!("`url` rendered `{rendered}`: {e}")))?;
        if Origin::of(&url) != self.origin {
            return Err(DeliveryError::Template(format!(
                "`url` rendered `{rendered}`, which leaves `{}`",
                self.fixed
            )));
        }
        if let Some(seg) = dot_segment(rendered, self.fixed.len()) {
            return Err(DeliveryError::Template(format!(
                "`url` rendered `{rendered}`, whose path has a `{seg}` segment"
            )));
        }
        Ok(url)
    }
}

/// The literal `scheme://host[:port]/` a template must start with: everything up to the
/// first `/` after the host, which must come before any template syntax.
fn fixed_prefix(url: &str) -> Result<&str, String> {
    let syntax = ["{{", "{%", "{#"]
        .iter()
        .filter_map(|s| url.find(s))
        .min()
        .unwrap_or(url.len());
    let literal = &url[..syntax];
    let fixed = literal.find("://").and_then(|start| {
        let host_start = start + 3;
        let host_end = literal[host_start..]
            .find(['/', '?', '#', '\\'])
            .map(|i| host_start + i)?;
        (literal.as_bytes()[host_end] == b'/' && host_end > host_start)
            .then(|| &literal[..=host_end])
    });
    fixed.ok_or_else(|| {
        format!(
            "`url` is a template, so it must start with a fixed `scheme://host[:port]/` that \
             has no `{{{{ }}}}` or `{{% %}}` before the `/` after the host (e.g. \
             `https://gw.example/send?to={{{{ to }}}}`): the host of a request cannot come \
             from a message; got `{url}`"
        )
    })
}

/// The first `.` or `..` segment (also written `%2e`) in the path of `rendered`, whose
/// path starts at byte `path_start - 1` (the `/` ending the fixed prefix).
fn dot_segment(rendered: &str, path_start: usize) -> Option<String> {
    let rest = rendered.get(path_start.saturating_sub(1)..)?;
    let path = rest.split(['?', '#']).next().unwrap_or("");
    path.split('/')
        .map(|s| s.to_ascii_lowercase().replace("%2e", "."))
        .find(|s| s == "." || s == "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_host_must_be_fixed() {
        for bad in [
            "{{ base }}/send",
            "https://{{ host }}/send",
            "https://gw.example{{ path }}",
            "https://gw.example:{{ port }}/send",
            "https://gw.example?to={{ to }}",
            "https://user{{ x }}@gw.example/send",
            "https:{{ x }}",
        ] {
            let e = UrlTemplate::new(bad).expect_err(bad);
            assert!(e.contains("must start with a fixed"), "{bad}: {e}");
        }
        let e = UrlTemplate::new("ftp://gw.example/{{ to }}").expect_err("ftp");
        assert!(e.contains("http:// or https://"), "{e}");
        for good in [
            "https://gw.example/{{ to }}",
            "http://127.0.0.1:8080/send?to={{ to }}",
            "https://gw.example/v1/{% if to %}send{% endif %}",
        ] {
            UrlTemplate::new(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn values_are_encoded_whatever_the_filters() {
        let t = UrlTemplate::new(
            "https://gw.example/m/{{ to }}?a={{ to | safe }}&b={{ to | urlencode }}\
             &c={{ to | tojson }}",
        )
        .expect("template");
        let url = t.render(&json!({"to": "1&x=2#f/../?"})).expect("renders");
        assert_eq!(
            url.as_str(),
            "https://gw.example/m/1%26x%3D2%23f%2F..%2F%3F?a=1%26x%3D2%23f%2F..%2F%3F\
             &b=1%26x%3D2%23f%2F..%2F%3F&c=%221%5Cu0026x%3D2%23f%2F..%2F%3F%22"
        );
        let e = UrlTemplate::new("https://gw.example/?{{ {'a': to} | urlencode }}")
            .expect("template")
            .render(&json!({"to": "x"}))
            .expect_err("a map");
        assert!(e.to_string().contains("write each value"), "{e}");
    }

    #[test]
    fn a_value_cannot_climb_the_path() {
        let t = UrlTemplate::new("https://gw.example/api/{{ to }}/send").expect("template");
        for to in ["..", ".", "%2e%2e", ".%2E"] {
            let r = t.render(&json!({ "to": to }));
            // `%` is encoded, so `%2e` arrives as `%252e`: harmless.
            if to.contains('%') {
                let url = r.expect("an encoded percent is no dot");
                assert!(url.path().starts_with("/api/"), "{url}");
            } else {
                let e = r.expect_err(to);
                assert!(!e.is_retryable());
                assert!(e.to_string().contains("segment"), "{to}: {e}");
            }
        }
    }
}
