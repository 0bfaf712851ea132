//! Engine policies from `canvas.yaml`: per-customer frequency caps across all flows and quiet
//! hours in the customer's own time zone (see `docs/config.md`).
//!
//! Everything here is pure: [`Policy::decide`] is given the customer's recent marketing sends,
//! the current instant and the customer's time zone, and answers send, delay or skip. It reads
//! no clock and touches no store; the executor records sends and skip reasons.
//!
//! The rules, in the order they are applied:
//!
//! 1. A `transactional` send (a reward earned, an order confirmation) bypasses caps and quiet
//!    hours: it is a service the customer expects, not a marketing touch. It is not recorded
//!    as a [`SentMark`] either, so it never uses up a cap.
//! 2. Quiet hours are checked first. A marketing message due in quiet hours is skipped
//!    (`when_quiet: skip`) or held to the end of the quiet period (`when_quiet: delay`, the
//!    default); the caps are judged when it is about to go out, because a rolling window may
//!    have freed up by the morning. Skipping at 23:00 a message the caps would allow at 09:00
//!    would lose it for nothing.
//! 3. Caps: the message is capped when any cap that applies to its channel already counts
//!    `max` sends within its window. It is skipped (`when_capped: skip`, the default) or
//!    delayed (`when_capped: delay`) to the first instant at which every cap has room again
//!    *and* the customer is outside quiet hours.
//!
//! Caps are **rolling** windows: a send counts against `per` for exactly that long after it
//! was sent; at `sent + per` it no longer counts. Calendar days would let two messages go at
//! 23:50 and two more at 00:10, four within twenty minutes, which is exactly what a cap is
//! meant to prevent; they would also need a time zone to say where a day starts, and move with
//! daylight-saving changes. A rolling window is the same for every customer and matches what
//! the customer feels ("two messages in the last 24 hours").

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{
    DateTime, MappedLocalTime, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::de::{self, DecodeError, DecodeErrorKind, Lenient, Spanned};
use crate::diagnostic::{Code, Diagnostic, did_you_mean, quote_list};
use crate::duration::{Duration, TimeOfDay};
use crate::registry::Registry;
use crate::yaml::{self, Limits, LoadError, Node, Span, Value};

/// The name of the policy file, looked for at the root of a project.
pub const FILE_NAME: &str = "canvas.yaml";

/// How many rounds of "wait for the caps, then step out of quiet hours" a delay may take.
/// Caps only free up as time passes, so two rounds settle it; the bound is a safety net.
const MAX_ROUNDS: usize = 16;

/// What to do with a marketing message that a cap or quiet hours hold back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handling {
    /// Send it later, at the first moment it is allowed.
    Delay,
    /// Drop it; the executor records the skip and its reason.
    Skip,
}

/// One frequency cap: at most `max` marketing messages per customer within any rolling
/// window of length `per`, on one channel or (without `channel`) on all channels together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    /// The channel this cap counts, e.g. `sms`; `None` counts every channel.
    pub channel: Option<String>,
    /// The most messages allowed in the window; `canvas.yaml` refuses 0.
    pub max: u32,
    /// The length of the rolling window.
    pub per: Duration,
}

impl Cap {
    /// Whether a send on `channel` is limited by this cap.
    fn applies_to(&self, channel: &str) -> bool {
        self.channel.as_deref().is_none_or(|c| c == channel)
    }

    fn reason(&self) -> Reason {
        Reason::Cap {
            channel: self.channel.clone(),
            max: self.max,
            per: self.per,
        }
    }

    /// The earliest instant at or after `t` at which this cap has room for one more send,
    /// or `None` when it never will (a cap of 0, or sends that count past the end of time).
    fn room_from(&self, history: &[SentMark], t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        if max == 0 {
            return None;
        }
        let mut expiries: Vec<DateTime<Utc>> = history
            .iter()
            .filter(|m| self.applies_to(&m.channel))
            .map(|m| expiry(m.at, self.per))
            .filter(|e| *e > t)
            .collect();
        if expiries.len() < max {
            return Some(t);
        }
        expiries.sort_unstable();
        // Room for one more once all but `max - 1` of the counted sends have expired.
        let free = expiries[expiries.len() - max];
        (free < DateTime::<Utc>::MAX_UTC).then_some(free)
    }
}

/// The instant a send at `at` stops counting against a window of `per`.
fn expiry(at: DateTime<Utc>, per: Duration) -> DateTime<Utc> {
    i64::try_from(per.as_secs())
        .ok()
        .and_then(TimeDelta::try_seconds)
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Quiet hours: a customer-local clock range in which no marketing message goes out.
/// `start` is inclusive, `end` exclusive; when `start > end` the range wraps midnight.
/// A range with `start == end` is empty (`canvas.yaml` refuses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Local time the quiet period starts, e.g. 21:00.
    pub start: TimeOfDay,
    /// Local time the quiet period ends, e.g. 09:00.
    pub end: TimeOfDay,
}

impl QuietHours {
    /// Whether `t` falls in quiet hours for a customer in `tz`.
    pub fn contains(&self, t: DateTime<Utc>, tz: Tz) -> bool {
        let local = t.with_timezone(&tz);
        let minute = u16::try_from(local.hour() * 60 + local.minute()).unwrap_or(u16::MAX);
        let (s, e) = (self.start.0, self.end.0);
        if s < e {
            s <= minute && minute < e
        } else if s > e {
            minute >= s || minute < e
        } else {
            false
        }
    }

    /// The next instant after `t` at which the customer's clock reads `end`: the end of the
    /// quiet period `t` is in. On a daylight-saving day where `end` does not exist (the clock
    /// jumps over it) this is the instant of the jump; where it exists twice, the first one
    /// after `t`. `None` only for an `end` that is not a clock time.
    pub fn next_end(&self, t: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let end =
            NaiveTime::from_hms_opt(u32::from(self.end.0 / 60), u32::from(self.end.0 % 60), 0)?;
        let today = t.with_timezone(&tz).date_naive();
        let mut date = today;
        for _ in 0..3 {
            if let Some(at) = first_instant_after(tz, date.and_time(end), t) {
                return Some(at);
            }
            date = date.succ_opt()?;
        }
        None
    }

    fn reason(&self) -> Reason {
        Reason::QuietHours {
            between: self.to_string(),
        }
    }
}

impl fmt::Display for QuietHours {
    /// `21:00-09:00`, the way `canvas.yaml` writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The earliest instant after `after` at which the clock in `tz` reads `naive`, or the first
/// instant after the gap when a daylight-saving jump skips it.
fn first_instant_after(
    tz: Tz,
    naive: NaiveDateTime,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let pick = |r: MappedLocalTime<DateTime<Tz>>| -> Option<DateTime<Utc>> {
        match r {
            MappedLocalTime::Single(a) => Some(a.with_timezone(&Utc)).filter(|a| *a > after),
            MappedLocalTime::Ambiguous(a, b) => [a, b]
                .into_iter()
                .map(|x| x.with_timezone(&Utc))
                .filter(|x| *x > after)
                .min(),
            MappedLocalTime::None => None,
        }
    };
    match tz.from_local_datetime(&naive) {
        MappedLocalTime::None => {
            // In a gap: walk to the first local minute that exists, which is the jump itself.
            // Gaps are whole minutes and at most a day long.
            let mut n = naive;
            for _ in 0..(25 * 60) {
                n = n.checked_add_signed(TimeDelta::minutes(1))?;
                match tz.from_local_datetime(&n) {
                    MappedLocalTime::None => continue,
                    found => return pick(found),
                }
            }
            None
        }
        found => pick(found),
    }
}

/// A past marketing send to one customer, on any flow: what the caps count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMark {
    /// When it was sent.
    #[serde(with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// The channel it went out on, e.g. `sms`.
    pub channel: String,
}

/// `DateTime<Utc>` as an RFC 3339 string, independent of chrono's own serde feature.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not an RFC 3339 time: {e}")))
    }
}

/// Why a marketing message does not go out now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A frequency cap has no room.
    Cap {
        /// The channel the cap counts; `None` for all channels.
        channel: Option<String>,
        /// The cap's maximum.
        max: u32,
        /// The cap's rolling window.
        per: Duration,
    },
    /// The customer is in quiet hours.
    QuietHours {
        /// The quiet range as configured, e.g. `21:00-09:00`.
        between: String,
    },
}

impl fmt::Display for Reason {
    /// A sentence for logs, skip records and the API.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Cap { channel, max, per } => {
                let noun = if *max == 1 { "message" } else { "messages" };
                match channel {
                    None => write!(f, "frequency cap: at most {max} marketing {noun} per {per}"),
                    Some(c) => write!(
                        f,
                        "frequency cap: at most {max} marketing {noun} on {c} per {per}"
                    ),
                }
            }
            Reason::QuietHours { between } => write!(f, "quiet hours {between} (customer-local)"),
        }
    }
}

/// What to do with one message now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send it now.
    Send,
    /// Ask again at `until`; `reason` names the rule that sets that time.
    Delay {
        /// The first instant the message is allowed (given the same history).
        until: DateTime<Utc>,
        /// The rule that holds it back until then.
        reason: Reason,
    },
    /// Drop it, for `reason`.
    Skip {
        /// The rule that drops it.
        reason: Reason,
    },
}

/// The engine's per-customer policies, from `canvas.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The time zone of customers whose profile has none.
    pub timezone: Tz,
    /// Frequency caps, all of which must have room; empty for none.
    pub caps: Vec<Cap>,
    /// Quiet hours, or `None` when turned off.
    pub quiet_hours: Option<QuietHours>,
    /// What happens to a capped message (default: skip).
    pub when_capped: Handling,
    /// What happens to a message due in quiet hours (default: delay).
    pub when_quiet: Handling,
    /// The opt-out events (default `unsubscribed` / `resubscribed`); `None` when turned off.
    pub unsubscribe: Option<Unsubscribe>,
    /// Sections the engine does not read itself ([`SECTIONS`]: the daemon's `server:` and
    /// `channels:`), kept as written so their owners decode them with file:line:col
    /// diagnostics through [`Policy::section`].
    pub sections: Sections,
}

/// Top-level keys of `canvas.yaml` that belong to the daemon, not to the engine's policies.
pub const SECTIONS: [&str; 2] = ["server", "channels"];

/// The daemon's sections of `canvas.yaml`, as written, and the file they came from.
#[derive(Debug, Clone, Default)]
pub struct Sections {
    file: PathBuf,
    nodes: Vec<(String, Node)>,
}

/// Sections carry no meaning for the engine's policies, so two policies compare by those.
impl PartialEq for Sections {
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes
    }
}

impl Eq for Sections {}

impl Default for Policy {
    /// UTC; at most 2 marketing messages per 1d and 5 per 7d; quiet 21:00-09:00; capped
    /// messages skipped, quiet ones delayed.
    fn default() -> Self {
        Policy {
            timezone: Tz::UTC,
            caps: vec![
                Cap {
                    channel: None,
                    max: 2,
                    per: Duration::from_secs(86_400),
                },
                Cap {
                    channel: None,
                    max: 5,
                    per: Duration::from_secs(7 * 86_400),
                },
            ],
            quiet_hours: Some(QuietHours {
                start: TimeOfDay(21 * 60),
                end: TimeOfDay(9 * 60),
            }),
            when_capped: Handling::Skip,
            when_quiet: Handling::Delay,
            unsubscribe: Some(Unsubscribe::default()),
            sections: Sections::default(),
        }
    }
}

impl Policy {
    /// Read and check a policy file. Every problem is reported at once, with file:line:col.
    pub fn load(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let io = |e: std::io::Error| {
            PolicyError::one(Diagnostic::new(
                Code::Io,
                path,
                None,
                format!("cannot read the file: {e}"),
            ))
        };
        let limit = Limits::default().max_bytes;
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > u64::try_from(limit).unwrap_or(u64::MAX) {
            return Err(PolicyError::one(Diagnostic::new(
                Code::Limit,
                path,
                None,
                format!("the file is {size} bytes; {FILE_NAME} is limited to {limit} bytes"),
            )));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            PolicyError::one(
                Diagnostic::new(Code::Io, path, None, "the file is not UTF-8 text")
                    .with_help("save it as UTF-8"),
            )
        })?;
        Policy::from_str(path, &text)
    }

    /// `dir/canvas.yaml` when it exists, else [`Policy::default`].
    pub fn load_or_default(dir: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = dir.as_ref().join(FILE_NAME);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
            _ => Policy::load(&path),
        }
    }

    /// Parse and check policy text; `file_name` is only used in diagnostics. A key left out
    /// keeps its default; an empty file (or only comments) is the default policy.
    pub fn from_str(file_name: impl AsRef<Path>, text: &str) -> Result<Policy, PolicyError> {
        let file = file_name.as_ref();
        let doc = match yaml::parse(text, &Limits::default()) {
            Ok(doc) => doc,
            Err(LoadError::Empty) => return Ok(Policy::default()),
            Err(e) => return Err(PolicyError::one(load_error(file, &e))),
        };
        let mut cx = Check {
            file: file.to_path_buf(),
            diags: Vec::new(),
        };
        for dup in &doc.duplicate_keys {
            cx.diags.push(Diagnostic::duplicate_key(file, dup));
        }
        if !matches!(doc.root.value, Value::Map(_)) {
            cx.diags.push(
                Diagnostic::new(
                    Code::WrongType,
                    file,
                    Some(doc.root.span),
                    format!(
                        "{FILE_NAME} holds a mapping, found {}",
                        doc.root.kind_name()
                    ),
                )
                .with_help("write keys such as `timezone:`, `caps:` and `quiet_hours:`"),
            );
            return Err(cx.into_error());
        }
        let mut root = doc.root;
        let mut sections = Sections {
            file: file.to_path_buf(),
            nodes: Vec::new(),
        };
        if let Value::Map(entries) = &mut root.value {
            entries.retain(|(key, value)| match &key.value {
                Value::Scalar { text, .. } if SECTIONS.contains(&text.as_str()) => {
                    sections.nodes.push((text.clone(), value.clone()));
                    false
                }
                _ => true,
            });
        }
        let (raw, errors) = de::decode::<RawPolicy>(&root);
        for e in &errors {
            cx.decode_error(e);
        }
        let policy = raw.and_then(|raw| cx.policy(&raw)).map(|mut p| {
            p.sections = sections;
            p
        });
        match policy {
            Some(p) if cx.diags.is_empty() => Ok(p),
            _ => Err(cx.into_error()),
        }
    }

    /// Decode one of the daemon's [`SECTIONS`] into its owner's type; `None` when the file
    /// does not have it. Problems come back as diagnostics with file:line:col, like the
    /// engine's own keys.
    pub fn section<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, PolicyError> {
        let Some((_, node)) = self.sections.nodes.iter().find(|(k, _)| k == key) else {
            return Ok(None);
        };
        let mut cx = Check {
            file: self.sections.file.clone(),
            diags: Vec::new(),
        };
        let (value, errors) = de::decode::<T>(node);
        for e in &errors {
            cx.decode_error(e);
        }
        match value {
            Some(v) if cx.diags.is_empty() => Ok(Some(v)),
            _ => Err(cx.into_error()),
        }
    }

    /// Where `path` (`["channels", "sms", "max_segments"]`) is written in the daemon's
    /// sections, for diagnostics about a value that decoded but does not fit the flows.
    pub fn section_span(&self, path: &[&str]) -> Option<Span> {
        let (first, rest) = path.split_first()?;
        let (_, node) = self.sections.nodes.iter().find(|(k, _)| k == first)?;
        rest.iter()
            .try_fold(node, |n, key| n.get(key))
            .map(|n| n.span)
    }

    /// The file the daemon's sections were read from.
    pub fn sections_file(&self) -> &Path {
        &self.sections.file
    }

    /// The time zone to judge quiet hours in: the customer's own IANA zone when they have a
    /// valid one, else [`Policy::timezone`].
    pub fn customer_zone(&self, customer_tz: Option<&str>) -> Tz {
        customer_tz
            .and_then(|name| Tz::from_str(name.trim()).ok())
            .unwrap_or(self.timezone)
    }

    /// Cap channels that `registry` does not know: such a cap never applies, which is
    /// almost surely a typo. For the caller to report.
    pub fn unknown_channels<'a>(&'a self, registry: &Registry) -> Vec<&'a str> {
        self.caps
            .iter()
            .filter_map(|c| c.channel.as_deref())
            .filter(|c| registry.channel(c).is_none())
            .collect()
    }

    /// Decide what to do with one message to one customer now.
    ///
    /// `channel` is the channel the message would go out on; `transactional` is the send's
    /// `priority: transactional`; `history` holds the customer's past marketing sends on every
    /// flow (order does not matter; sends stamped after `now` count as recent); `tz` is the
    /// customer's zone (see [`Policy::customer_zone`]). A [`Decision::Delay`] is the first
    /// instant at which the same question, with the same history, gets [`Decision::Send`].
    pub fn decide(
        &self,
        channel: &str,
        transactional: bool,
        history: &[SentMark],
        now: DateTime<Utc>,
        tz: Tz,
    ) -> Decision {
        if transactional {
            return Decision::Send;
        }
        if let Some(quiet) = self.quiet_hours.filter(|q| q.contains(now, tz)) {
            return match (self.when_quiet, self.when_capped) {
                (Handling::Skip, _) => Decision::Skip {
                    reason: quiet.reason(),
                },
                // The caps are judged in the morning, when the message is about to go out.
                (Handling::Delay, Handling::Skip) => match quiet.next_end(now, tz) {
                    Some(until) => Decision::Delay {
                        until,
                        reason: quiet.reason(),
                    },
                    None => Decision::Skip {
                        reason: quiet.reason(),
                    },
                },
                (Handling::Delay, Handling::Delay) => self.delay(channel, history, now, tz),
            };
        }
        let blocking = self
            .caps
            .iter()
            .filter(|c| c.applies_to(channel))
            .find(|c| c.room_from(history, now) != Some(now));
        match (blocking, self.when_capped) {
            (None, _) => Decision::Send,
            (Some(cap), Handling::Skip) => Decision::Skip {
                reason: cap.reason(),
            },
            (Some(_), Handling::Delay) => self.delay(channel, history, now, tz),
        }
    }

    /// Delay to the first instant at which every cap has room and quiet hours are over; skip
    /// when there is none.
    fn delay(&self, channel: &str, history: &[SentMark], now: DateTime<Utc>, tz: Tz) -> Decision {
        let mut t = now;
        let mut why: Option<Reason> = None;
        for _ in 0..MAX_ROUNDS {
            let mut moved = false;
            for cap in self.caps.iter().filter(|c| c.applies_to(channel)) {
                match cap.room_from(history, t) {
                    None => {
                        return Decision::Skip {
                            reason: cap.reason(),
                        };
                    }
                    Some(free) if free > t => {
                        t = free;
                        why = Some(cap.reason());
                        moved = true;
                    }
                    Some(_) => {}
                }
            }
            if let Some(quiet) = self.quiet_hours.filter(|q| q.contains(t, tz)) {
                match quiet.next_end(t, tz) {
                    Some(end) if end > t => {
                        t = end;
                        why = Some(quiet.reason());
                        moved = true;
                    }
                    _ => {
                        return Decision::Skip {
                            reason: quiet.reason(),
                        };
                    }
                }
            }
            if !moved {
                return match why {
                    Some(reason) => Decision::Delay { until: t, reason },
                    None => Decision::Send,
                };
            }
        }
        // Not settled within the bound: never loop on, drop the message instead.
        match why {
            Some(reason) => Decision::Skip { reason },
            None => Decision::Send,
        }
    }

    /// Drop the marks that no cap counts any more: those older than [`Policy::longest_window`]
    /// (a mark exactly that old no longer counts). With no caps, every past mark goes.
    pub fn prune(&self, history: &mut Vec<SentMark>, now: DateTime<Utc>) {
        let longest = self.longest_window();
        history.retain(|m| expiry(m.at, longest) > now);
    }

    /// The longest cap window: how much history [`Policy::decide`] needs. Zero with no caps.
    pub fn longest_window(&self) -> Duration {
        self.caps
            .iter()
            .map(|c| c.per)
            .max()
            .unwrap_or(Duration::from_secs(0))
    }
}

/// Why `canvas.yaml` was refused: every problem found, each with file:line:col and a hint.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", headlines(.diagnostics))]
pub struct PolicyError {
    /// The problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    fn one(d: Diagnostic) -> Self {
        PolicyError {
            diagnostics: vec![d],
        }
    }
}

fn headlines(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(Diagnostic::headline)
        .collect::<Vec<_>>()
        .join("\n")
}

fn load_error(file: &Path, e: &LoadError) -> Diagnostic {
    match e {
        LoadError::Syntax { message, at } => Diagnostic::new(
            Code::Syntax,
            file,
            Some(*at),
            format!("YAML syntax error: {message}"),
        ),
        LoadError::TooLarge { size, limit } => Diagnostic::new(
            Code::Limit,
            file,
            None,
            format!("the file is {size} bytes; {FILE_NAME} is limited to {limit} bytes"),
        ),
        LoadError::TooManyNodes { limit, at } => Diagnostic::new(
            Code::Limit,
            file,
            Some(*at),
            format!("the document expands to more than {limit} nodes"),
        ),
        LoadError::Empty => Diagnostic::new(Code::Limit, file, None, e.to_string()),
        other => Diagnostic::new(Code::Limit, file, other.span(), other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

/// `canvas.yaml` as written, before meaning is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    timezone: Option<Spanned<String>>,
    caps: Option<Vec<Lenient<Spanned<RawCap>>>>,
    quiet_hours: Option<OffOr<RawQuietMap>>,
    when_capped: Option<Handling>,
    when_quiet: Option<Handling>,
    unsubscribe: Option<OffOr<Unsubscribe>>,
}

/// The events that take a customer out of every flow, and back in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    /// Ends every run of the customer at once and keeps them out of every flow.
    #[serde(default = "default_unsubscribe")]
    pub event: String,
    /// Lets the customer enter flows again.
    #[serde(default = "default_resubscribe")]
    pub resubscribe: String,
}

fn default_unsubscribe() -> String {
    "unsubscribed".to_owned()
}

fn default_resubscribe() -> String {
    "resubscribed".to_owned()
}

impl Default for Unsubscribe {
    fn default() -> Self {
        Unsubscribe {
            event: default_unsubscribe(),
            resubscribe: default_resubscribe(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCap {
    channel: Option<Spanned<String>>,
    max: Spanned<u32>,
    per: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuietMap {
    between: Spanned<String>,
}

/// A setting written as its mapping, or as `off` (or `false`) to turn it off:
/// `quiet_hours: off`, `unsubscribe: off`.
#[derive(Debug)]
enum OffOr<T> {
    Off,
    On(T),
}

/// How a setting that can be turned off reads and explains itself.
trait Switchable: Sized + for<'de> Deserialize<'de> {
    /// The key, for messages.
    const KEY: &'static str;
    /// A mapping to show in messages.
    const EXAMPLE: &'static str;
    /// What `KEY: true` means, or why it means nothing.
    fn when_true() -> Result<Self, String>;
}

impl Switchable for RawQuietMap {
    const KEY: &'static str = "quiet_hours";
    const EXAMPLE: &'static str = "{ between: \"21:00-09:00\" }";
    fn when_true() -> Result<Self, String> {
        Err(format!(
            "`quiet_hours: true` says no range; write `quiet_hours: {}`",
            Self::EXAMPLE
        ))
    }
}

impl Switchable for Unsubscribe {
    const KEY: &'static str = "unsubscribe";
    const EXAMPLE: &'static str = "{ event: unsubscribed, resubscribe: resubscribed }";
    fn when_true() -> Result<Self, String> {
        Ok(Unsubscribe::default())
    }
}

impl<'de, T: Switchable> Deserialize<'de> for OffOr<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Switchable> serde::de::Visitor<'de> for V<T> {
            type Value = OffOr<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "`off` or a mapping such as `{}`", T::EXAMPLE)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OffOr<T>, E> {
                if v == "off" {
                    Ok(OffOr::Off)
                } else {
                    Err(E::custom(format!(
                        "`{key}: {v}` cannot be read; write `{key}: off` or `{key}: {}`",
                        T::EXAMPLE,
                        key = T::KEY
                    )))
                }
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OffOr<T>, E> {
                if v {
                    T::when_true().map(OffOr::On).map_err(E::custom)
                } else {
                    Ok(OffOr::Off)
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<OffOr<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(OffOr::On)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Turns the raw file into a [`Policy`], collecting every problem.
struct Check {
    file: PathBuf,
    diags: Vec<Diagnostic>,
}

impl Check {
    fn into_error(mut self) -> PolicyError {
        self.diags
            .sort_by(|a, b| (&a.file, a.location).cmp(&(&b.file, b.location)));
        self.diags.dedup();
        PolicyError {
            diagnostics: self.diags,
        }
    }

    fn error(
        &mut self,
        code: Code,
        span: Span,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags
            .push(Diagnostic::new(code, &self.file, Some(span), message).with_help(help));
    }

    fn decode_error(&mut self, e: &DecodeError) {
        let (code, message, help) = match &e.kind {
            DecodeErrorKind::UnknownField { field, expected } => {
                let help = match did_you_mean(field, expected.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of {}", quote_list(expected)),
                };
                (Code::UnknownKey, format!("unknown key `{field}`"), Some(help))
            }
            DecodeErrorKind::MissingField(field) => (
                Code::MissingKey,
                format!("missing key `{field}`"),
                Some(
                    match *field {
                        "max" => "a cap needs `max`, the most messages allowed, e.g. `{ max: 2, per: 1d }`",
                        "per" => "a cap needs `per`, the window length, e.g. `{ max: 2, per: 1d }`",
                        "between" => "write `between: \"21:00-09:00\"` (customer-local)",
                        _ => "see docs/config.md",
                    }
                    .to_owned(),
                ),
            ),
            DecodeErrorKind::UnknownVariant { variant, expected } => {
                let help = did_you_mean(variant, expected.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"));
                (
                    Code::WrongType,
                    format!("unknown value `{variant}`, expected {}", quote_list(expected)),
                    help,
                )
            }
            DecodeErrorKind::InvalidType { found, expected } => (
                Code::WrongType,
                format!("expected {}, found {found}", plain_expected(expected)),
                None,
            ),
            DecodeErrorKind::Custom(msg) => (Code::WrongType, msg.clone(), None),
        };
        let mut d = Diagnostic::new(code, &self.file, e.span, message);
        d.help = help;
        self.diags.push(d);
    }

    fn policy(&mut self, raw: &RawPolicy) -> Option<Policy> {
        let defaults = Policy::default();
        let timezone = match &raw.timezone {
            None => Some(defaults.timezone),
            Some(tz) => self.timezone(tz),
        };
        let caps = match &raw.caps {
            None => Some(defaults.caps),
            Some(items) => self.caps(items),
        };
        let quiet_hours = match &raw.quiet_hours {
            None => Some(defaults.quiet_hours),
            Some(OffOr::Off) => Some(None),
            Some(OffOr::On(q)) => self.between(&q.between).map(Some),
        };
        Some(Policy {
            timezone: timezone?,
            caps: caps?,
            quiet_hours: quiet_hours?,
            when_capped: raw.when_capped.unwrap_or(defaults.when_capped),
            when_quiet: raw.when_quiet.unwrap_or(defaults.when_quiet),
            unsubscribe: match &raw.unsubscribe {
                None => defaults.unsubscribe,
                Some(OffOr::Off) => None,
                Some(OffOr::On(u)) => Some(u.clone()),
            },
            sections: Sections::default(),
        })
    }

    fn timezone(&mut self, tz: &Spanned<String>) -> Option<Tz> {
        if let Ok(t) = Tz::from_str(&tz.value) {
            return Some(t);
        }
        let names = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name());
        let help = match did_you_mean(&tz.value, names) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "use an IANA name such as `Asia/Shanghai`, `Europe/Paris` or `UTC`".to_owned(),
        };
        self.error(
            Code::TimeZone,
            tz.span,
            format!("unknown time zone `{}`", tz.value),
            help,
        );
        None
    }

    fn caps(&mut self, items: &[Lenient<Spanned<RawCap>>]) -> Option<Vec<Cap>> {
        let mut caps: Vec<(Cap, Span)> = Vec::new();
        let mut ok = true;
        for item in items {
            let Lenient::Ok(raw) = item else {
                // Its errors are already reported.
                ok = false;
                continue;
            };
            match self.cap(raw) {
                Some(cap) => {
                    if let Some((_, first)) = caps
                        .iter()
                        .find(|(c, _)| c.channel == cap.channel && c.per == cap.per)
                    {
                        let first = *first;
                        self.diags.push(
                            Diagnostic::new(
                                Code::Conflict,
                                &self.file,
                                Some(raw.span),
                                format!(
                                    "two caps on the same window ({} per {})",
                                    cap.channel.as_deref().unwrap_or("all channels"),
                                    cap.per
                                ),
                            )
                            .with_related(&self.file, Some(first), "the other one")
                            .with_help("keep one; only the stricter would ever apply"),
                        );
                        ok = false;
                    }
                    caps.push((cap, raw.span));
                }
                None => ok = false,
            }
        }
        ok.then(|| caps.into_iter().map(|(c, _)| c).collect())
    }

    fn cap(&mut self, raw: &Spanned<RawCap>) -> Option<Cap> {
        let mut ok = true;
        if raw.max.value == 0 {
            self.error(
                Code::WrongType,
                raw.max.span,
                "`max: 0` would block every marketing message",
                "give a positive number; to stop marketing sends, end the flows instead",
            );
            ok = false;
        }
        let per = match Duration::parse(&raw.per.value) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(Code::Duration, raw.per.span, e.to_string(), e.help());
                None
            }
        };
        let channel = match &raw.channel {
            Some(c) if c.value.trim().is_empty() => {
                self.error(
                    Code::WrongType,
                    c.span,
                    "`channel` is empty",
                    "name a channel such as `sms`, or leave `channel` out to count every channel",
                );
                ok = false;
                None
            }
            Some(c) => Some(c.value.trim().to_owned()),
            None => None,
        };
        let per = per?;
        ok.then_some(Cap {
            channel,
            max: raw.max.value,
            per,
        })
    }

    fn between(&mut self, b: &Spanned<String>) -> Option<QuietHours> {
        let parsed = b
            .value
            .split_once('-')
            .and_then(|(a, z)| Some((TimeOfDay::parse(a)?, TimeOfDay::parse(z)?)));
        match parsed {
            Some((start, end)) if start != end => Some(QuietHours { start, end }),
            Some(_) => {
                self.error(
                    Code::TimeOfDay,
                    b.span,
                    format!("quiet hours `{}` are empty", b.value),
                    "give two different times, or write `quiet_hours: off` to turn them off",
                );
                None
            }
            None => {
                self.error(
                    Code::TimeOfDay,
                    b.span,
                    format!("`{}` is not a time range", b.value),
                    "write customer-local 24-hour times like `21:00-09:00` (it may span midnight)",
                );
                None
            }
        }
    }
}

fn plain_expected(expected: &str) -> String {
    if expected.starts_with("struct ") {
        return "a mapping".to_owned();
    }
    match expected {
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        "u32" | "u64" | "u16" | "u8" | "i64" | "i32" => "a whole number".to_owned(),
        "a boolean" | "`true` or `false`" => "`true` or `false`".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc)
    }

    fn mark(s: &str, channel: &str) -> SentMark {
        SentMark {
            at: at(s),
            channel: channel.to_owned(),
        }
    }

    fn parse(text: &str) -> Policy {
        match Policy::from_str("canvas.yaml", text) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn opt_out_events_default_rename_and_off() {
        assert_eq!(parse("").unsubscribe, Some(Unsubscribe::default()));
        assert_eq!(parse("unsubscribe: off\n").unsubscribe, None);
        let renamed = parse("unsubscribe: { event: opted_out }\n")
            .unsubscribe
            .unwrap();
        assert_eq!(
            (renamed.event.as_str(), renamed.resubscribe.as_str()),
            ("opted_out", "resubscribed")
        );
        let e = errors("unsubscribe: { evnt: x }\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].1, 1);
    }

    fn errors(text: &str) -> Vec<(Code, u32, u32, String)> {
        let e = Policy::from_str("canvas.yaml", text).expect_err("must be refused");
        e.diagnostics
            .iter()
            .map(|d| {
                let (line, col) = d.location.map_or((0, 0), |l| (l.line, l.column));
                (d.code, line, col, d.message.clone())
            })
            .collect()
    }

    const SHANGHAI: Tz = chrono_tz::Asia::Shanghai;
    const DAY: u64 = 86_400;

    fn cap(channel: Option<&str>, max: u32, secs: u64) -> Cap {
        Cap {
            channel: channel.map(str::to_owned),
            max,
            per: Duration::from_secs(secs),
        }
    }

    #[test]
    fn defaults() {
        let p = Policy::default();
        assert_eq!(p.timezone, Tz::UTC);
        assert_eq!(p.caps, vec![cap(None, 2, DAY), cap(None, 5, 7 * DAY)]);
        assert_eq!(
            p.quiet_hours.map(|q| q.to_string()),
            Some("21:00-09:00".to_owned())
        );
        assert_eq!(p.when_capped, Handling::Skip);
        assert_eq!(p.when_quiet, Handling::Delay);
        assert_eq!(p.longest_window(), Duration::from_secs(7 * DAY));
        // An empty file, or one with only comments, is the default.
        assert_eq!(parse(""), p);
        assert_eq!(parse("# nothing set yet\n"), p);
        // A key left out keeps its default.
        let paris = parse("timezone: Europe/Paris\n");
        assert_eq!(paris.timezone, chrono_tz::Europe::Paris);
        assert_eq!(paris.caps, p.caps);
        assert_eq!(paris.quiet_hours, p.quiet_hours);
    }

    #[test]
    fn absent_file_is_the_default_and_present_file_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Policy::load_or_default(dir.path()), Ok(Policy::default()));
        std::fs::write(dir.path().join(FILE_NAME), "quiet_hours: off\ncaps: []\n").expect("write");
        let p = Policy::load_or_default(dir.path()).expect("loads");
        assert_eq!(p.quiet_hours, None);
        assert!(p.caps.is_empty());
        assert_eq!(p.longest_window(), Duration::from_secs(0));
        let missing = Policy::load(dir.path().join("nope.yaml")).expect_err("missing");
        assert_eq!(missing.diagnostics[0].code, Code::Io);
    }

    #[test]
    fn parses_a_full_file() {
        let p = parse(
            "timezone: Asia/Shanghai\n\
             caps:\n\
             \x20 - { max: 2, per: 1d }\n\
             \x20 - { max: 5, per: 7d }\n\
             \x20 - { channel: sms, max: 1, per: 1d }\n\
             quiet_hours:\n\
             \x20 between: \"22:30-08:00\"\n\
             when_capped: delay\n\
             when_quiet: skip\n",
        );
        assert_eq!(p.timezone, SHANGHAI);
        assert_eq!(
            p.caps,
            vec![
                cap(None, 2, DAY),
                cap(None, 5, 7 * DAY),
                cap(Some("sms"), 1, DAY)
            ]
        );
        assert_eq!(
            p.quiet_hours,
            Some(QuietHours {
                start: TimeOfDay(22 * 60 + 30),
                end: TimeOfDay(8 * 60)
            })
        );
        assert_eq!(p.when_capped, Handling::Delay);
        assert_eq!(p.when_quiet, Handling::Skip);
        assert_eq!(parse("quiet_hours: false\n").quiet_hours, None);
    }

    #[test]
    fn the_repository_default_file_parses() {
        let p = parse(include_str!("../../canvas.yaml"));
        assert_eq!(p.timezone, SHANGHAI);
        assert_eq!(
            p.caps,
            vec![
                cap(None, 2, DAY),
                cap(None, 5, 7 * DAY),
                cap(Some("sms"), 1, DAY)
            ]
        );
        assert_eq!(p.quiet_hours, Policy::default().quiet_hours);
        assert_eq!(p.when_capped, Handling::Skip);
        assert_eq!(p.when_quiet, Handling::Delay);
    }

    #[test]
    fn unknown_keys_are_errors_with_their_place() {
        let errs =
            errors("timezone: UTC\ncaps:\n  - { max: 2, per: 1d, chanel: sms }\nquiet: off\n");
        assert_eq!(
            errs,
            vec![
                (Code::UnknownKey, 3, 24, "unknown key `chanel`".to_owned()),
                (Code::UnknownKey, 4, 1, "unknown key `quiet`".to_owned()),
            ]
        );
        let e = Policy::from_str("canvas.yaml", "quiet_hours: { betwen: \"21:00-09:00\" }\n")
            .expect_err("refused");
        assert_eq!(e.diagnostics[0].code, Code::UnknownKey);
        assert_eq!(
            e.diagnostics[0].help.as_deref(),
            Some("did you mean `between`?")
        );
        assert!(
            e.to_string()
                .starts_with("canvas.yaml:1:16: error[CNV0101]"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_all_reported() {
        let errs = errors(
            "timezone: Asia/Shanghia\n\
             caps:\n\
             \x20 - { max: 0, per: 1d }\n\
             \x20 - { max: 2, per: 1x }\n\
             \x20 - { max: two, per: 1d }\n\
             quiet_hours: { between: \"21:00-9:00\" }\n\
             when_capped: later\n",
        );
        let codes: Vec<(Code, u32)> = errs.iter().map(|(c, l, _, _)| (*c, *l)).collect();
        assert_eq!(
            codes,
            vec![(Code::WrongType, 5), (Code::WrongType, 7),],
            "structure errors come first and stop the meaning checks: {errs:?}"
        );
        let errs = errors(
            "timezone: Asia/Shanghia\n\
             caps:\n\
             \x20 - { max: 0, per: 1d }\n\
             \x20 - { max: 2, per: 1x }\n\
             quiet_hours: { between: \"21:00-9:00\" }\n",
        );
        let codes: Vec<(Code, u32)> = errs.iter().map(|(c, l, _, _)| (*c, *l)).collect();
        assert_eq!(
            codes,
            vec![
                (Code::TimeZone, 1),
                (Code::WrongType, 3),
                (Code::Duration, 4),
                (Code::TimeOfDay, 5),
            ],
            "{errs:?}"
        );
        let empty = errors("quiet_hours: { between: \"09:00-09:00\" }\n");
        assert_eq!(empty[0].0, Code::TimeOfDay);
        assert!(empty[0].3.contains("empty"), "{empty:?}");
        assert_eq!(errors("quiet_hours: on\n")[0].0, Code::WrongType);
        assert_eq!(errors("caps: 3\n")[0].0, Code::WrongType);
        assert_eq!(errors("- 1\n")[0].0, Code::WrongType);
        assert_eq!(errors("caps: [\n")[0].0, Code::Syntax);
        let twice = errors("caps:\n  - { max: 2, per: 1d }\n  - { max: 3, per: 24h }\n");
        assert_eq!(twice[0].0, Code::Conflict);
        assert_eq!(twice[0].1, 3);
        assert_eq!(errors("caps:\n  - { per: 1d }\n")[0].3, "missing key `max`");
        let dup = errors("timezone: UTC\ntimezone: UTC\n");
        assert_eq!((dup[0].0, dup[0].1), (Code::DuplicateKey, 2));
    }

    #[test]
    fn overall_caps_count_every_channel() {
        let p = Policy::default();
        let now = at("2024-03-10T12:00:00Z");
        let history = [
            mark("2024-03-09T14:00:00Z", "wechat"),
            mark("2024-03-10T08:00:00Z", "sms"),
        ];
        assert_eq!(
            p.decide("email", false, &history, now, Tz::UTC),
            Decision::Skip {
                reason: Reason::Cap {
                    channel: None,
                    max: 2,
                    per: Duration::from_secs(DAY)
                }
            }
        );
        assert_eq!(
            p.decide("email", false, &history[1..], now, Tz::UTC),
            Decision::Send
        );
        // The weekly cap: five sends in seven days, none in the last day.
        let week: Vec<SentMark> = (4..=8)
            .map(|d| mark(&format!("2024-03-0{d}T12:00:00Z"), "wechat"))
            .collect();
        let Decision::Skip { reason } = p.decide("sms", false, &week, now, Tz::UTC) else {
            panic!("weekly cap")
        };
        assert_eq!(
            reason.to_string(),
            "frequency cap: at most 5 marketing messages per 1w"
        );
    }

    #[test]
    fn channel_caps_count_their_channel_only() {
        let p = Policy {
            caps: vec![cap(None, 2, DAY), cap(Some("sms"), 1, DAY)],
            ..Policy::default()
        };
        let now = at("2024-03-10T12:00:00Z");
        let history = [mark("2024-03-10T09:00:00Z", "sms")];
        let Decision::Skip { reason } = p.decide("sms", false, &history, now, Tz::UTC) else {
            panic!("sms capped")
        };
        assert_eq!(
            reason.to_string(),
            "frequency cap: at most 1 marketing message on sms per 1d"
        );
        assert_eq!(
            p.decide("wechat", false, &history, now, Tz::UTC),
            Decision::Send
        );
        // Two wechat sends fill the overall cap, which also holds sms back.
        let wechat = [
            mark("2024-03-10T09:00:00Z", "wechat"),
            mark("2024-03-10T10:00:00Z", "wechat"),
        ];
        assert!(matches!(
            p.decide("sms", false, &wechat, now, Tz::UTC),
            Decision::Skip {
                reason: Reason::Cap { channel: None, .. }
            }
        ));
    }

    #[test]
    fn rolling_window_edge() {
        let p = Policy {
            caps: vec![cap(None, 1, DAY)],
            quiet_hours: None,
            ..Policy::default()
        };
        let history = [mark("2024-03-10T10:00:00Z", "sms")];
        assert!(matches!(
            p.decide("sms", false, &history, at("2024-03-11T09:59:59Z"), Tz::UTC),
            Decision::Skip { .. }
        ));
        assert_eq!(
            p.decide("sms", false, &history, at("2024-03-11T10:00:00Z"), Tz::UTC),
            Decision::Send,
            "exactly `per` later is allowed"
        );
        let delay = Policy {
            when_capped: Handling::Delay,
            ..p
        };
        assert_eq!(
            delay.decide("sms", false, &history, at("2024-03-10T18:00:00Z"), Tz::UTC),
            Decision::Delay {
                until: at("2024-03-11T10:00:00Z"),
                reason: Reason::Cap {
                    channel: None,
                    max: 1,
                    per: Duration::from_secs(DAY)
                }
            }
        );
    }

    #[test]
    fn quiet_hours_are_customer_local_and_wrap_midnight() {
        let p = Policy::default();
        // 14:00 UTC is 22:00 in Shanghai.
        let now = at("2024-03-10T14:00:00Z");
        let quiet = Reason::QuietHours {
            between: "21:00-09:00".to_owned(),
        };
        assert_eq!(
            p.decide("sms", false, &[], now, SHANGHAI),
            Decision::Delay {
                until: at("2024-03-11T01:00:00Z"),
                reason: quiet.clone()
            },
            "held to 09:00 the next morning, Shanghai time"
        );
        assert_eq!(p.decide("sms", false, &[], now, Tz::UTC), Decision::Send);
        // 23:00 UTC is 07:00 the next day in Shanghai: same morning.
        let late = at("2024-03-10T23:00:00Z");
        assert_eq!(
            p.decide("sms", false, &[], late, SHANGHAI),
            Decision::Delay {
                until: at("2024-03-11T01:00:00Z"),
                reason: quiet.clone()
            }
        );
        assert_eq!(
            p.decide("sms", false, &[], late, Tz::UTC),
            Decision::Delay {
                until: at("2024-03-11T09:00:00Z"),
                reason: quiet.clone()
            }
        );
        // Edges: 21:00 is quiet, 09:00 is not.
        assert!(matches!(
            p.decide("sms", false, &[], at("2024-03-10T13:00:00Z"), SHANGHAI),
            Decision::Delay { .. }
        ));
        assert_eq!(
            p.decide("sms", false, &[], at("2024-03-10T01:00:00Z"), SHANGHAI),
            Decision::Send
        );
        assert_eq!(
            quiet.to_string(),
            "quiet hours 21:00-09:00 (customer-local)"
        );
        let skip = Policy {
            when_quiet: Handling::Skip,
            ..Policy::default()
        };
        assert_eq!(
            skip.decide("sms", false, &[], now, SHANGHAI),
            Decision::Skip { reason: quiet }
        );
        // A range that does not wrap.
        let siesta = QuietHours {
            start: TimeOfDay(13 * 60),
            end: TimeOfDay(15 * 60),
        };
        assert!(siesta.contains(at("2024-03-10T13:30:00Z"), Tz::UTC));
        assert!(!siesta.contains(at("2024-03-10T15:00:00Z"), Tz::UTC));
        assert_eq!(
            siesta.next_end(at("2024-03-10T13:30:00Z"), Tz::UTC),
            Some(at("2024-03-10T15:00:00Z"))
        );
    }

    #[test]
    fn quiet_hours_across_daylight_saving_changes() {
        let paris = chrono_tz::Europe::Paris;
        let p = Policy::default();
        // 2024-03-31 02:00 CET jumps to 03:00 CEST. 22:00 CET the evening before → 09:00 CEST.
        assert_eq!(
            p.decide("sms", false, &[], at("2024-03-30T21:00:00Z"), paris),
            Decision::Delay {
                until: at("2024-03-31T07:00:00Z"),
                reason: Reason::QuietHours {
                    between: "21:00-09:00".to_owned()
                }
            }
        );
        // An end time inside the gap: the quiet period ends at the jump.
        let q = QuietHours {
            start: TimeOfDay(21 * 60),
            end: TimeOfDay(2 * 60 + 30),
        };
        assert_eq!(
            q.next_end(at("2024-03-30T21:00:00Z"), paris),
            Some(at("2024-03-31T01:00:00Z"))
        );
        // 2024-10-27 03:00 CEST falls back to 02:00 CET: 02:30 happens twice. From the second
        // 02:10 (01:10 UTC) the end is the second 02:30, not the first one, already past.
        assert!(q.contains(at("2024-10-27T01:10:00Z"), paris));
        assert_eq!(
            q.next_end(at("2024-10-27T01:10:00Z"), paris),
            Some(at("2024-10-27T01:30:00Z"))
        );
        assert_eq!(
            q.next_end(at("2024-10-26T22:00:00Z"), paris),
            Some(at("2024-10-27T00:30:00Z"))
        );
    }

    #[test]
    fn capped_and_quiet_delay_together() {
        let p = Policy {
            timezone: SHANGHAI,
            caps: vec![cap(None, 1, 12 * 3600)],
            when_capped: Handling::Delay,
            ..Policy::default()
        };
        // Sent at 10:00 Shanghai; at 14:00 the cap frees at 22:00, inside quiet hours: 09:00.
        let history = [mark("2024-03-10T02:00:00Z", "wechat")];
        assert_eq!(
            p.decide("sms", false, &history, at("2024-03-10T06:00:00Z"), SHANGHAI),
            Decision::Delay {
                until: at("2024-03-11T01:00:00Z"),
                reason: Reason::QuietHours {
                    between: "21:00-09:00".to_owned()
                }
            }
        );
        // In quiet hours with a cap that frees later than 09:00: the cap sets the time.
        let daily = Policy {
            caps: vec![cap(None, 1, DAY)],
            ..p.clone()
        };
        let history = [mark("2024-03-10T03:00:00Z", "wechat")];
        let now = at("2024-03-10T14:00:00Z");
        let decision = daily.decide("sms", false, &history, now, SHANGHAI);
        assert_eq!(
            decision,
            Decision::Delay {
                until: at("2024-03-11T03:00:00Z"),
                reason: Reason::Cap {
                    channel: None,
                    max: 1,
                    per: Duration::from_secs(DAY)
                }
            }
        );
        assert_eq!(
            daily.decide("sms", false, &history, at("2024-03-11T03:00:00Z"), SHANGHAI),
            Decision::Send
        );
        // With `when_capped: skip`, a quiet message waits for the morning and the cap is
        // judged then.
        let skip = Policy {
            when_capped: Handling::Skip,
            ..daily
        };
        assert_eq!(
            skip.decide("sms", false, &history, now, SHANGHAI),
            Decision::Delay {
                until: at("2024-03-11T01:00:00Z"),
                reason: Reason::QuietHours {
                    between: "21:00-09:00".to_owned()
                }
            }
        );
        assert!(matches!(
            skip.decide("sms", false, &history, at("2024-03-11T01:00:00Z"), SHANGHAI),
            Decision::Skip {
                reason: Reason::Cap { .. }
            }
        ));
    }

    #[test]
    fn a_delay_is_when_the_same_question_says_send() {
        let p = Policy {
            caps: vec![
                cap(None, 2, DAY),
                cap(None, 5, 7 * DAY),
                cap(Some("sms"), 1, DAY),
            ],
            when_capped: Handling::Delay,
            ..Policy::default()
        };
        let history = [
            mark("2024-03-04T13:30:00Z", "sms"),
            mark("2024-03-06T02:00:00Z", "wechat"),
            mark("2024-03-08T11:00:00Z", "wechat"),
            mark("2024-03-09T12:00:00Z", "sms"),
            mark("2024-03-10T01:15:00Z", "wechat"),
        ];
        let start = at("2024-03-08T00:00:00Z");
        for step in 0..400 {
            let now = start + TimeDelta::minutes(17 * step);
            for (channel, tz) in [("sms", SHANGHAI), ("wechat", Tz::UTC), ("email", SHANGHAI)] {
                let seen: Vec<SentMark> = history.iter().filter(|m| m.at <= now).cloned().collect();
                match p.decide(channel, false, &seen, now, tz) {
                    Decision::Send => {}
                    Decision::Delay { until, .. } => {
                        assert!(until > now);
                        assert_eq!(
                            p.decide(channel, false, &seen, until, tz),
                            Decision::Send,
                            "{channel} at {now} delayed to {until}"
                        );
                    }
                    Decision::Skip { reason } => panic!("delay policy skipped: {reason}"),
                }
            }
        }
    }

    #[test]
    fn transactional_bypasses_caps_and_quiet_hours() {
        let p = Policy {
            caps: vec![cap(None, 1, DAY)],
            ..Policy::default()
        };
        let history = [mark("2024-03-10T13:00:00Z", "sms")];
        let now = at("2024-03-10T14:00:00Z"); // 22:00 in Shanghai, and capped
        assert!(matches!(
            p.decide("sms", false, &history, now, SHANGHAI),
            Decision::Delay { .. }
        ));
        assert_eq!(
            p.decide("sms", true, &history, now, SHANGHAI),
            Decision::Send
        );
    }

    #[test]
    fn prune_keeps_only_what_a_cap_counts() {
        let p = Policy::default();
        let now = at("2024-03-10T12:00:00Z");
        let mut history = vec![
            mark("2024-03-02T12:00:00Z", "sms"),
            mark("2024-03-03T12:00:00Z", "sms"), // exactly 7d: no longer counts
            mark("2024-03-03T12:00:01Z", "wechat"),
            mark("2024-03-10T11:00:00Z", "sms"),
        ];
        p.prune(&mut history, now);
        assert_eq!(
            history,
            vec![
                mark("2024-03-03T12:00:01Z", "wechat"),
                mark("2024-03-10T11:00:00Z", "sms"),
            ]
        );
        let none = Policy {
            caps: Vec::new(),
            ..p
        };
        none.prune(&mut history, now);
        assert!(history.is_empty());
    }

    #[test]
    fn odd_policies_built_in_code_neither_loop_nor_panic() {
        let now = at("2024-03-10T12:00:00Z");
        let zero = Policy {
            caps: vec![cap(None, 0, DAY)],
            when_capped: Handling::Delay,
            quiet_hours: None,
            ..Policy::default()
        };
        assert!(matches!(
            zero.decide("sms", false, &[], now, Tz::UTC),
            Decision::Skip {
                reason: Reason::Cap { max: 0, .. }
            }
        ));
        let empty_quiet = Policy {
            quiet_hours: Some(QuietHours {
                start: TimeOfDay(540),
                end: TimeOfDay(540),
            }),
            ..Policy::default()
        };
        assert_eq!(
            empty_quiet.decide("sms", false, &[], now, Tz::UTC),
            Decision::Send
        );
        let broken = Policy {
            quiet_hours: Some(QuietHours {
                start: TimeOfDay(0),
                end: TimeOfDay(5000),
            }),
            when_capped: Handling::Delay,
            ..Policy::default()
        };
        assert!(matches!(
            broken.decide("sms", false, &[], now, Tz::UTC),
            Decision::Skip { .. }
        ));
        let far = [SentMark {
            at: DateTime::<Utc>::MAX_UTC,
            channel: "sms".to_owned(),
        }];
        let one = Policy {
            caps: vec![cap(None, 1, 7 * DAY)],
            when_capped: Handling::Delay,
            ..Policy::default()
        };
        assert!(matches!(
            one.decide("sms", false, &far, now, Tz::UTC),
            Decision::Skip { .. }
        ));
    }

    #[test]
    fn sent_marks_round_trip_and_zones_fall_back() {
        let m = mark("2024-03-10T12:00:00Z", "sms");
        let json = serde_json::to_string(&m).expect("serializes");
        assert_eq!(json, r#"{"at":"2024-03-10T12:00:00Z","channel":"sms"}"#);
        assert_eq!(serde_json::from_str::<SentMark>(&json).expect("reads"), m);
        let p = Policy {
            timezone: SHANGHAI,
            ..Policy::default()
        };
        assert_eq!(
            p.customer_zone(Some("Europe/Paris")),
            chrono_tz::Europe::Paris
        );
        assert_eq!(p.customer_zone(Some("Mars/Olympus")), SHANGHAI);
        assert_eq!(p.customer_zone(None), SHANGHAI);
        let mut registry = Registry::new();
        registry.add_channel(crate::registry::ChannelSpec {
            name: "sms".to_owned(),
            address: None,
            description: String::new(),
        });
        let typo = Policy {
            caps: vec![cap(Some("smss"), 1, DAY), cap(Some("sms"), 1, DAY)],
            ..Policy::default()
        };
        assert_eq!(typo.unknown_channels(&registry), vec!["smss"]);
    }
}
