//! Durations as operators write them: `90m`, `12h`, `3d`, `2w`, or compounds like `1d12h`.

use std::fmt;

use serde::Serialize;

/// The longest duration a flow may name: ten years. Longer is almost surely a typo.
pub const MAX_SECONDS: u64 = 10 * 366 * 24 * 3600;

/// A whole number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Duration(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration")]
    Malformed(String),
    #[error("`{text}`: unknown unit `{unit}`")]
    UnknownUnit { text: String, unit: char },
    #[error("`{0}` is zero; a duration must be positive")]
    Zero(String),
    #[error("`{0}` is longer than ten years")]
    TooLong(String),
}

impl DurationError {
    pub fn help(&self) -> &'static str {
        match self {
            DurationError::Zero(_) => "remove the step or give it a positive duration",
            DurationError::TooLong(_) => "durations are limited to ten years",
            _ => {
                "write a number and a unit: `90m`, `12h`, `3d`, `2w` (or `s`); compounds like `1d12h` work too"
            }
        }
    }
}

impl Duration {
    pub fn from_secs(secs: u64) -> Self {
        Duration(secs)
    }

    pub fn as_secs(self) -> u64 {
        self.0
    }

    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(DurationError::Malformed(text.to_owned()));
        }
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                c if c.is_alphabetic() && !digits.is_empty() => {
                    return Err(DurationError::UnknownUnit {
                        text: text.to_owned(),
                        unit: c,
                    });
                }
                _ => return Err(DurationError::Malformed(text.to_owned())),
            };
            let n: u64 = digits
                .parse()
                .map_err(|_| DurationError::Malformed(text.to_owned()))?;
            digits.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| DurationError::TooLong(text.to_owned()))?;
        }
        if !digits.is_empty() {
            return Err(DurationError::Malformed(text.to_owned()));
        }
        if total == 0 {
            return Err(DurationError::Zero(text.to_owned()));
        }
        if total > MAX_SECONDS {
            return Err(DurationError::TooLong(text.to_owned()));
        }
        Ok(Duration(total))
    }
}

impl fmt::Display for Duration {
    /// The way an operator would write it: the largest unit that divides it (`2w`, `300d`,
    /// `36h`), else a compound (`1d12h30m`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, secs) in [("w", 604_800), ("d", 86_400), ("h", 3600)] {
            if self.0 >= secs && self.0.is_multiple_of(secs) {
                return write!(f, "{}{unit}", self.0 / secs);
            }
        }
        if self.0 < 86_400 && self.0.is_multiple_of(60) {
            return write!(f, "{}m", self.0 / 60);
        }
        let mut rest = self.0;
        let mut wrote = false;
        for (unit, secs) in [
            ("w", 604_800),
            ("d", 86_400),
            ("h", 3600),
            ("m", 60),
            ("s", 1),
        ] {
            if rest >= secs {
                write!(f, "{}{unit}", rest / secs)?;
                rest %= secs;
                wrote = true;
            }
        }
        if !wrote {
            f.write_str("0s")?;
        }
        Ok(())
    }
}

/// A wall-clock time of day, minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TimeOfDay(pub u16);

impl TimeOfDay {
    /// `HH:MM`, 24-hour.
    pub fn parse(text: &str) -> Option<TimeOfDay> {
        let (h, m) = text.trim().split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let h: u16 = h.parse().ok()?;
        let m: u16 = m.parse().ok()?;
        (h < 24 && m < 60).then_some(TimeOfDay(h * 60 + m))
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_units_operators_write() {
        for (text, secs) in [
            ("90m", 5400),
            ("12h", 43_200),
            ("3d", 259_200),
            ("2w", 1_209_600),
            ("1d12h", 129_600),
            ("30s", 30),
        ] {
            assert_eq!(
                Duration::parse(text).map(Duration::as_secs),
                Ok(secs),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        assert!(matches!(
            Duration::parse("3"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            Duration::parse("3x"),
            Err(DurationError::UnknownUnit { unit: 'x', .. })
        ));
        assert!(matches!(Duration::parse("0d"), Err(DurationError::Zero(_))));
        assert!(matches!(
            Duration::parse("99999w"),
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            Duration::parse("d"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            Duration::parse("-3d"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            Duration::parse("99999999999999999999d"),
            Err(DurationError::Malformed(_) | DurationError::TooLong(_))
        ));
    }

    #[test]
    fn writes_back_compactly() {
        assert_eq!(
            Duration::parse("36h").map(|d| d.to_string()),
            Ok("36h".to_owned())
        );
        assert_eq!(
            Duration::parse("300d").map(|d| d.to_string()),
            Ok("300d".to_owned())
        );
        assert_eq!(
            Duration::parse("1d12h30m").map(|d| d.to_string()),
            Ok("1d12h30m".to_owned())
        );
        assert_eq!(
            Duration::parse("14d").map(|d| d.to_string()),
            Ok("2w".to_owned())
        );
    }

    #[test]
    fn times_of_day() {
        assert_eq!(TimeOfDay::parse("09:30"), Some(TimeOfDay(570)));
        assert_eq!(TimeOfDay::parse("24:00"), None);
        assert_eq!(TimeOfDay::parse("9:30"), None);
    }
}
