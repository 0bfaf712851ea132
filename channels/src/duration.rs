//! Durations as operators write them in `canvas.yaml`: `500ms`, `10s`, `2m`, `1h`, `1d`, or
//! a sum such as `1m30s`. A bare number is refused, because `10` could mean seconds or
//! milliseconds and a wrong guess is silent.

use std::time::Duration;

use serde::Deserializer;

/// A duration string that does not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration `{input}`: {problem}; write a whole number and a unit (ms, s, m, h, d), \
     e.g. `500ms`, `10s`, `2m`"
)]
pub struct DurationError {
    /// What was written.
    pub input: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Parse `500ms`, `10s`, `2m`, `1h`, `1d` or a sum of those (`1m30s`).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |problem: &str| DurationError {
        input: input.to_owned(),
        problem: problem.to_owned(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(err("the number has no unit"));
        }
        let part = match &rest[..unit_len] {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3_600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            other => return Err(err(&format!("unknown unit `{other}`"))),
        };
        rest = &rest[unit_len..];
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| err("it is too long"))?;
    }
    Ok(total)
}

/// `deserialize_with` helper: a duration string through [`parse_duration`]. A bare number
/// (`timeout: 10`) gets the same clear message as any other bad duration instead of serde's
/// "expected a string".
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as `500ms`, `10s` or `2m`")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Duration, E> {
            self.visit_str(&n.to_string())
        }
    }
    d.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_sums() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_duration("10").unwrap_err();
        assert!(e.to_string().contains("no unit"), "{e}");
        let e = parse_duration("10x").unwrap_err();
        assert!(e.to_string().contains("unknown unit `x`"), "{e}");
        let e = parse_duration("s").unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
        let e = parse_duration("1.5s").unwrap_err();
        assert!(e.to_string().contains("`1.5s`"), "{e}");
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("999999999999999999d").is_err());
    }
}
