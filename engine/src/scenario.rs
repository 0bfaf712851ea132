//! Scripted customer timelines in virtual time: the input of `canvas simulate` and of flow
//! tests (`*.test.yaml`, see [`crate::testing`]). A scenario runs through the same runtime,
//! executor and store code as the daemon, on an in-memory SQLite database, with a virtual
//! clock that jumps from one due moment to the next.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, Offset};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::clock::{Clock, VirtualClock};
use crate::de::{self, Spanned};
use crate::flow::CompiledFlow;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::runtime::{FlowSet, Runtime, Stats};
use crate::state::{CallResult, Event, InboxItem, ProfileUpdate, Time};
use crate::store::{SqliteStore, Store, StoreError};
use crate::yaml::{self, Span};

/// The longest a scenario may cover; a year of virtual time is plenty for any journey.
pub const MAX_SPAN_DAYS: i64 = 3 * 366;
/// At most this many scripted items (customers + events + profile updates) per file.
pub const MAX_ITEMS: usize = 100_000;

/// A problem with a scenario or test file, at a position in it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}:{}:{}: {message}", file.display(), span.start.line, span.start.col + 1)]
pub struct FileError {
    pub file: PathBuf,
    pub span: Span,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    File(Vec<FileError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScenario {
    /// The flow under test; `canvas simulate FLOW` may give it instead.
    #[serde(default)]
    pub flow: Option<Spanned<String>>,
    /// Further flows active in the scenario (they share caps and quiet hours).
    #[serde(default)]
    pub also: Vec<Spanned<String>>,
    pub start: Spanned<String>,
    pub run_until: Spanned<String>,
    #[serde(default)]
    pub customers: Vec<RawCustomer>,
    #[serde(default)]
    pub events: Vec<RawEvent>,
    #[serde(default)]
    pub profiles: Vec<RawProfile>,
    /// Webhook name → what its `call` steps get (default `{}`): see [`ScriptedCall`].
    #[serde(default)]
    pub calls: BTreeMap<String, Spanned<Json>>,
    #[serde(default)]
    pub expect: Vec<crate::testing::RawExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCustomer {
    pub id: Spanned<String>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub attributes: Map<String, Json>,
    /// This customer's own call answers, over the file's `calls:`.
    #[serde(default)]
    pub calls: BTreeMap<String, Spanned<Json>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvent {
    pub at: Spanned<String>,
    pub customer: Spanned<String>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub data: Json,
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub at: Spanned<String>,
    pub customer: Spanned<String>,
    #[serde(default)]
    pub set: Map<String, Json>,
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
}

/// A parsed scenario, times resolved.
#[derive(Debug)]
pub struct Scenario {
    pub file: PathBuf,
    pub flow: Spanned<String>,
    pub also: Vec<Spanned<String>>,
    pub start: Time,
    pub until: Time,
    /// Customers, profile updates and events in time order; at one moment profile updates
    /// come before events.
    pub timeline: Vec<(Time, InboxItem)>,
    pub customer_ids: Vec<String>,
    /// Offsets the file wrote times in, by customer (for showing times back the same way).
    pub offsets: BTreeMap<String, FixedOffset>,
    pub default_offset: FixedOffset,
    /// Webhook name → what its calls get.
    pub calls: BTreeMap<String, ScriptedCall>,
    /// Customer → webhook name → what that customer's calls get, over `calls`.
    pub customer_calls: BTreeMap<String, BTreeMap<String, ScriptedCall>>,
    pub(crate) expect: Vec<crate::testing::RawExpect>,
}

/// What a scripted webhook does with a `call`, as a test file writes it under `calls:`:
///
/// - `{ fail: 500 }` (an HTTP status, 400–599) or `{ fail: "coupon pool empty" }`: the call
///   fails for good, with that error;
/// - `{ answer: VALUE }`: the call answers VALUE;
/// - any other value: the call answers it (`{ code: BDAY-20 }`).
///
/// A map whose only key is `fail` or `answer` is always read as the first two forms; a
/// response that itself holds a `fail` or `answer` key is written inside `answer:`.
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptedCall {
    Answer(Json),
    Fail(String),
}

impl ScriptedCall {
    /// Read one entry of `calls:`.
    pub fn parse(value: &Json) -> Result<ScriptedCall, String> {
        let Json::Object(map) = value else {
            return Ok(ScriptedCall::Answer(value.clone()));
        };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        match (map.get("fail"), map.get("answer")) {
            (Some(_), _) | (_, Some(_)) if keys.len() > 1 => Err(format!(
                "`{}` goes alone: write `{{ fail: 500 }}` for a call that fails, or `{{ answer: {{ … }} }}` for a response that holds `fail` or `answer`",
                if map.contains_key("fail") {
                    "fail"
                } else {
                    "answer"
                }
            )),
            (Some(Json::Number(n)), None) => match n.as_u64() {
                Some(status @ 400..=599) => Ok(ScriptedCall::Fail(format!("HTTP {status}"))),
                _ => Err(format!(
                    "`fail: {n}` is not an HTTP error status: use 400-599, or a text saying why the call fails"
                )),
            },
            (Some(Json::String(why)), None) if !why.trim().is_empty() => {
                Ok(ScriptedCall::Fail(why.trim().to_owned()))
            }
            (Some(_), _) => Err(
                "`fail` takes an HTTP error status (400-599) or a text saying why the call fails"
                    .to_owned(),
            ),
            (None, Some(answer)) => Ok(ScriptedCall::Answer(answer.clone())),
            (None, None) => Ok(ScriptedCall::Answer(value.clone())),
        }
    }
}

/// Parse a time the way operators write it in a test: RFC 3339, seconds optional, an offset
/// or `Z` required (`2026-03-14T09:00+08:00`).
pub fn parse_time(text: &str) -> Result<DateTime<FixedOffset>, String> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d);
    }
    let normal = match t.strip_suffix('Z').or_else(|| t.strip_suffix('z')) {
        Some(rest) => format!("{rest}+00:00"),
        None => t.to_owned(),
    };
    for fmt in [
        "%Y-%m-%dT%H:%M%:z",
        "%Y-%m-%d %H:%M%:z",
        "%Y-%m-%d %H:%M:%S%:z",
    ] {
        if let Ok(d) = DateTime::parse_from_str(&normal, fmt) {
            return Ok(d);
        }
    }
    let local_time = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .any(|f| chrono::NaiveDateTime::parse_from_str(t, f).is_ok());
    if local_time {
        Err(format!("`{t}` needs an offset, e.g. `{t}+08:00` or `{t}Z`"))
    } else if chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").is_ok() {
        Err(format!(
            "`{t}` needs a time and an offset, e.g. `{t}T09:00+08:00`"
        ))
    } else {
        Err(format!(
            "`{t}` is not a time; write e.g. `2026-03-14T09:00+08:00`"
        ))
    }
}

struct Errors {
    file: PathBuf,
    list: Vec<FileError>,
}

impl Errors {
    fn at(&mut self, span: Span, message: impl Into<String>) {
        self.list.push(FileError {
            file: self.file.clone(),
            span,
            message: message.into(),
        });
    }

    fn time(&mut self, s: &Spanned<String>) -> Option<DateTime<FixedOffset>> {
        match parse_time(&s.value) {
            Ok(t) => Some(t),
            Err(e) => {
                self.at(s.span, e);
                None
            }
        }
    }
}

/// Read a scenario or test file; `flow` names the flow when the file does not.
pub fn load(path: &Path, flow: Option<&str>) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ScenarioError::File(vec![FileError {
            file: path.to_owned(),
            span: Span::default(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(path, &text, flow)
}

/// Parse a scenario or test file's text.
pub fn parse(path: &Path, text: &str, flow: Option<&str>) -> Result<Scenario, ScenarioError> {
    let mut errs = Errors {
        file: path.to_owned(),
        list: Vec::new(),
    };
    let doc = match yaml::parse(text, &yaml::Limits::default()) {
        Ok(d) => d,
        Err(e) => {
            errs.at(e.span().unwrap_or_default(), e.to_string());
            return Err(ScenarioError::File(errs.list));
        }
    };
    for d in &doc.duplicate_keys {
        errs.at(d.again, format!("`{}` is written twice", d.key));
    }
    let (raw, decode_errors) = de::decode::<RawScenario>(&doc.root);
    for e in decode_errors {
        errs.at(e.span.unwrap_or_default(), e.to_string());
    }
    let Some(raw) = raw else {
        return Err(ScenarioError::File(errs.list));
    };
    let flow_id = match (&raw.flow, flow) {
        (Some(f), Some(want)) if f.value != want => {
            errs.at(
                f.span,
                format!("this timeline is for `{}`, not `{want}`", f.value),
            );
            None
        }
        (Some(f), _) => Some(f.clone()),
        (None, Some(want)) => Some(Spanned {
            span: Span::default(),
            value: want.to_owned(),
        }),
        (None, None) => {
            errs.at(
                doc.root.span,
                "missing key `flow`: the id of the flow under test",
            );
            None
        }
    };
    let start = errs.time(&raw.start);
    let until = errs.time(&raw.run_until);
    let mut timeline: Vec<(Time, InboxItem)> = Vec::new();
    let mut ids = Vec::new();
    let mut offsets = BTreeMap::new();
    let default_offset = start
        .map(|s| *s.offset())
        .unwrap_or_else(|| chrono::Utc.fix());
    if raw.customers.len() + raw.events.len() + raw.profiles.len() > MAX_ITEMS {
        errs.at(
            raw.start.span,
            format!("a scenario holds at most {MAX_ITEMS} customers, events and profile updates"),
        );
    }
    if let (Some(s), Some(u)) = (start, until) {
        if u <= s {
            errs.at(raw.run_until.span, "`run_until` must be after `start`");
        } else if (u - s).num_days() > MAX_SPAN_DAYS {
            errs.at(
                raw.run_until.span,
                format!("a scenario covers at most {MAX_SPAN_DAYS} days"),
            );
        }
    }
    let start_utc = start.map(|s| s.to_utc());
    for c in &raw.customers {
        if ids.contains(&c.id.value) {
            errs.at(
                c.id.span,
                format!("customer `{}` is listed twice", c.id.value),
            );
            continue;
        }
        ids.push(c.id.value.clone());
        let update = ProfileUpdate {
            id: None,
            customer_id: c.id.value.clone(),
            set: c.attributes.clone(),
            timezone: c.timezone.as_ref().map(|t| t.value.clone()),
            at: start_utc.unwrap_or_default(),
        };
        // `timezone:` and `attributes: { timezone }` are the one zone.
        if let Err(e) = update.zone() {
            let span = c.timezone.as_ref().map_or(c.id.span, |t| t.span);
            errs.at(span, format!("customer `{}`: {e}", c.id.value));
        }
        if start_utc.is_some() {
            timeline.push((update.at, InboxItem::Profile(update)));
        }
    }
    let known = |errs: &mut Errors, c: &Spanned<String>| {
        if !ids.contains(&c.value) {
            let hint = crate::diagnostic::did_you_mean(&c.value, ids.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            errs.at(
                c.span,
                format!("customer `{}` is not under `customers`{hint}", c.value),
            );
        }
    };
    let in_range = |errs: &mut Errors, at: &Spanned<String>, t: DateTime<FixedOffset>| {
        if let (Some(s), Some(u)) = (start, until)
            && (t < s || t > u)
        {
            errs.at(
                at.span,
                format!(
                    "`{}` is outside the scenario ({} to {})",
                    at.value, raw.start.value, raw.run_until.value
                ),
            );
        }
    };
    for (n, e) in raw.events.iter().enumerate() {
        known(&mut errs, &e.customer);
        let Some(at) = errs.time(&e.at) else { continue };
        in_range(&mut errs, &e.at, at);
        offsets
            .entry(e.customer.value.clone())
            .or_insert(*at.offset());
        timeline.push((
            at.to_utc(),
            InboxItem::Event(Event {
                id: e
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("{}#{}", path.display(), n + 1)),
                customer_id: e.customer.value.clone(),
                name: e.name.value.clone(),
                data: e.data.clone(),
                occurred_at: at.to_utc(),
            }),
        ));
    }
    for p in &raw.profiles {
        known(&mut errs, &p.customer);
        let update = ProfileUpdate {
            id: None,
            customer_id: p.customer.value.clone(),
            set: p.set.clone(),
            timezone: p.timezone.as_ref().map(|t| t.value.clone()),
            at: Time::default(),
        };
        if let Err(e) = update.zone() {
            let span = p.timezone.as_ref().map_or(p.customer.span, |t| t.span);
            errs.at(
                span,
                format!("profile update of `{}`: {e}", p.customer.value),
            );
        }
        let Some(at) = errs.time(&p.at) else { continue };
        in_range(&mut errs, &p.at, at);
        timeline.push((
            at.to_utc(),
            InboxItem::Profile(ProfileUpdate {
                at: at.to_utc(),
                ..update
            }),
        ));
    }
    for x in &raw.expect {
        known(&mut errs, &x.customer);
    }
    let scripted = |errs: &mut Errors, list: &BTreeMap<String, Spanned<Json>>| {
        let mut out = BTreeMap::new();
        for (webhook, v) in list {
            match ScriptedCall::parse(&v.value) {
                Ok(c) => {
                    out.insert(webhook.clone(), c);
                }
                Err(e) => errs.at(v.span, format!("calls: `{webhook}`: {e}")),
            }
        }
        out
    };
    let calls = scripted(&mut errs, &raw.calls);
    let mut customer_calls = BTreeMap::new();
    for c in &raw.customers {
        if !c.calls.is_empty() {
            customer_calls.insert(c.id.value.clone(), scripted(&mut errs, &c.calls));
        }
    }
    if !errs.list.is_empty() {
        return Err(ScenarioError::File(errs.list));
    }
    let (Some(start), Some(until), Some(flow)) = (start, until, flow_id) else {
        return Err(ScenarioError::File(errs.list));
    };
    // At one moment: profile changes first (a CRM updates `orders_count` before it sends
    // `order_paid`), then events; each list keeps its file order (the sort is stable).
    timeline.sort_by_key(|(t, item)| (*t, !matches!(item, InboxItem::Profile(_))));
    Ok(Scenario {
        file: path.to_owned(),
        flow,
        also: raw.also,
        start: start.to_utc(),
        until: until.to_utc(),
        timeline,
        customer_ids: ids,
        offsets,
        default_offset,
        calls,
        customer_calls,
        expect: raw.expect,
    })
}

/// A scenario after it ran: the store holds every run, history row and outbox row.
pub struct Outcome<S = SqliteStore> {
    pub runtime: Runtime<S>,
    pub stats: Stats,
}

/// Run a scenario against `flows` (the scenario's `flow` and `also` are picked from them) on
/// a fresh in-memory SQLite database.
pub async fn run(
    scenario: &Scenario,
    flows: &[&CompiledFlow],
    policy: Policy,
    registry: Registry,
) -> Result<Outcome, ScenarioError> {
    let store = SqliteStore::memory().await?;
    run_on(scenario, flows, policy, registry, store).await
}

/// Run a scenario on a store of the caller's (which should be empty).
pub async fn run_on<S: Store>(
    scenario: &Scenario,
    flows: &[&CompiledFlow],
    policy: Policy,
    registry: Registry,
    store: S,
) -> Result<Outcome<S>, ScenarioError> {
    let mut errs = Errors {
        file: scenario.file.clone(),
        list: Vec::new(),
    };
    let mut picked = Vec::new();
    for want in std::iter::once(&scenario.flow).chain(&scenario.also) {
        match flows.iter().find(|f| f.id == want.value) {
            Some(f) => picked.push((*f).clone()),
            None => {
                let hint = crate::diagnostic::did_you_mean(
                    &want.value,
                    flows.iter().map(|f| f.id.as_str()),
                )
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
                errs.at(
                    want.span,
                    format!("no valid flow `{}` next to this file{hint}", want.value),
                );
            }
        }
    }
    if !errs.list.is_empty() {
        return Err(ScenarioError::File(errs.list));
    }
    let runtime = Runtime::new(store, FlowSet::new(picked), policy, registry);
    let clock = VirtualClock::new(scenario.start);
    runtime.register_versions(clock.now()).await?;
    let mut stats = Stats::default();
    let mut next_item = 0;
    let mut last_tick = scenario.start - chrono::Duration::milliseconds(1);
    loop {
        let now = clock.now();
        // Everything due at `now`: the inputs of this moment in file order, then schedules
        // and segments, then timers.
        let mut items = Vec::new();
        while next_item < scenario.timeline.len() && scenario.timeline[next_item].0 <= now {
            items.push(scenario.timeline[next_item].1.clone());
            next_item += 1;
        }
        if !items.is_empty() {
            runtime.store.enqueue(&items).await?;
        }
        let mut round = runtime.process_inbox(now).await?;
        round.add(runtime.tick(last_tick, now).await?);
        last_tick = now;
        round.add(runtime.fire_due(now).await?);
        // Answer `call` steps with the scripted responses, at once, until none are left.
        while !round.calls.is_empty() {
            let answers: Vec<InboxItem> = round
                .calls
                .drain(..)
                .map(|c| {
                    let script = scenario
                        .customer_calls
                        .get(&c.customer_id)
                        .and_then(|calls| calls.get(&c.channel))
                        .or_else(|| scenario.calls.get(&c.channel));
                    let (response, error) = match script {
                        Some(ScriptedCall::Answer(v)) => (v.clone(), None),
                        Some(ScriptedCall::Fail(why)) => (Json::Null, Some(why.clone())),
                        None => (Json::Object(Map::new()), None),
                    };
                    InboxItem::CallResult(CallResult {
                        response,
                        error,
                        run_id: c.run_id,
                        customer_id: c.customer_id,
                        step: c.step,
                        at: now,
                    })
                })
                .collect();
            stats.add(std::mem::take(&mut round));
            runtime.store.enqueue(&answers).await?;
            round = runtime.process_inbox(now).await?;
        }
        stats.add(round);
        let next_input = scenario.timeline.get(next_item).map(|(t, _)| *t);
        let next_due = runtime.next_due(now).await?;
        let next = match (next_input, next_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            Some(t) if t <= scenario.until => {
                clock.advance_to(t.max(now + chrono::Duration::milliseconds(1)))
            }
            _ => break,
        }
    }
    Ok(Outcome { runtime, stats })
}

#[cfg(test)]
mod tests {
    use super::ScriptedCall;
    use serde_json::json;

    #[test]
    fn test_files_can_script_a_failing_call() {
        assert_eq!(
            ScriptedCall::parse(&json!({ "fail": 500 })),
            Ok(ScriptedCall::Fail("HTTP 500".into()))
        );
        assert_eq!(
            ScriptedCall::parse(&json!({ "fail": "coupon pool empty" })),
            Ok(ScriptedCall::Fail("coupon pool empty".into()))
        );
        // The plain form is still an answer; `answer:` says so explicitly.
        assert_eq!(
            ScriptedCall::parse(&json!({ "code": "C-1" })),
            Ok(ScriptedCall::Answer(json!({ "code": "C-1" })))
        );
        assert_eq!(
            ScriptedCall::parse(&json!({ "answer": { "fail": 1 } })),
            Ok(ScriptedCall::Answer(json!({ "fail": 1 })))
        );
        // Ambiguous or meaningless: a clear error, never a guess.
        for bad in [
            json!({ "fail": 200 }),
            json!({ "fail": true }),
            json!({ "fail": " " }),
            json!({ "fail": 500, "code": "C-1" }),
            json!({ "answer": {}, "code": "C-1" }),
        ] {
            let e = ScriptedCall::parse(&bad).expect_err("rejected");
            assert!(e.contains("fail") || e.contains("answer"), "{bad}: {e}");
        }
    }
}
