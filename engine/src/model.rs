//! The raw flow document: what an operator wrote, with spans, before any meaning is checked.
//!
//! These types are the single source of truth for the accepted keys: serde derives strict
//! parsing from them (`deny_unknown_fields`) and schemars derives `schema/flow.schema.json`.
//! Strings that carry meaning (durations, expressions, cron, step references) stay strings
//! here; `compile` turns them into typed values and reports what is wrong with them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::de::{Lenient, Spanned};
use crate::schema_types::{Cron, Duration, Expression, Identifier, StepId, TimeZone};

type S<T> = Spanned<T>;

/// A journey: who enters, when, what happens to them, and what counts as success.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Canvas flow (canvas/v1)")]
pub struct RawFlow {
    /// Id of the flow: kebab-case, unique across the flows folder.
    #[schemars(with = "StepId")]
    pub flow: S<String>,
    /// A human name, shown in graphs and the API.
    pub name: Option<S<String>>,
    /// What the journey is for.
    pub description: Option<S<String>>,
    /// IANA time zone for schedules and clock times (default UTC); customers may carry their own.
    #[schemars(with = "Option<TimeZone>")]
    pub timezone: Option<S<String>>,
    /// When several marketing flows want the same customer at the same moment and the caps
    /// allow fewer messages: the higher priority sends first (then the flow id). A whole
    /// number from -1000 to 1000; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: Option<S<i64>>,
    /// How customers enter: exactly one of `event`, `schedule` or `segment`.
    pub trigger: S<RawTrigger>,
    /// Re-entry rule. Without it a customer has at most one active run of this flow.
    pub entry: Option<S<RawEntry>>,
    /// Leave the journey at once when any of these holds.
    #[serde(default)]
    pub exit: Vec<S<RawExitRule>>,
    /// What counts as success, attributed to this flow.
    pub goal: Option<S<RawGoal>>,
    /// The steps, in order; each runs the next one unless `next:` says otherwise.
    pub steps: S<Vec<Lenient<RawStep>>>,
}

/// How customers enter the flow.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTrigger {
    /// Enter when the customer sends this event.
    #[schemars(with = "Option<Identifier>")]
    pub event: Option<S<String>>,
    /// With `event`: enter only when this expression holds (`customer`, `event`, `now`).
    #[serde(rename = "where")]
    #[schemars(with = "Option<Expression>")]
    pub where_: Option<S<String>>,
    /// Cron (5 or 6 fields) in the flow time zone.
    #[schemars(with = "Option<Cron>")]
    pub schedule: Option<S<String>>,
    /// With `schedule`: who enters at each tick (`customer`, `now`).
    #[schemars(with = "Option<Expression>")]
    pub audience: Option<S<String>>,
    /// Enter when this expression becomes true for a customer (`customer`, `now`).
    #[schemars(with = "Option<Expression>")]
    pub segment: Option<S<String>>,
    /// With `segment`: how often to re-check every customer besides on profile change (default 1d).
    #[schemars(with = "Option<Duration>")]
    pub recheck: Option<S<String>>,
}

/// Re-entry rule.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEntry {
    /// A customer enters this flow once, ever.
    pub once: Option<S<bool>>,
    /// A customer may enter again this long after their last entry.
    #[schemars(with = "Option<Duration>")]
    pub reenter_after: Option<S<String>>,
}

/// A reason to leave the journey at once.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawExitRule {
    /// Leave when the customer sends this event.
    #[schemars(with = "Option<Identifier>")]
    pub event: Option<S<String>>,
    /// With `event`: only when this holds.
    #[serde(rename = "where")]
    #[schemars(with = "Option<Expression>")]
    pub where_: Option<S<String>>,
    /// Leave when this profile condition holds (`customer`, `vars`, `now`).
    #[schemars(with = "Option<Expression>")]
    pub when: Option<S<String>>,
}

/// The success event of the flow.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGoal {
    /// The event that counts as a conversion.
    #[schemars(with = "Identifier")]
    pub event: S<String>,
    /// Only when this holds.
    #[serde(rename = "where")]
    #[schemars(with = "Option<Expression>")]
    pub where_: Option<S<String>>,
    /// How long after entry a conversion counts.
    #[schemars(with = "Duration")]
    pub within: S<String>,
    /// End the run when the goal is reached (default false).
    pub exit: Option<S<bool>>,
}

/// One step: `id`, optional `next`, and exactly one kind key
/// (`send`, `wait`, `branch`, `split`, `update`, `call`, `task`, `exit`, `use`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// Step id: kebab-case, unique in the flow.
    #[schemars(with = "StepId")]
    pub id: S<String>,
    /// A label for graphs.
    pub name: Option<S<String>>,
    /// The step to run after this one (default: the following step in the list).
    #[schemars(with = "Option<StepId>")]
    pub next: Option<S<String>>,

    /// Send a message through a channel, or the first reachable of several, in order.
    pub send: Option<S<Channels>>,
    /// With `send`: the template name, e.g. `birthday/day` (templates/birthday/day.sms.txt).
    pub template: Option<S<String>>,
    /// With `send`: `marketing` (default; subject to caps and quiet hours) or `transactional`.
    pub priority: Option<S<Priority>>,
    /// With a `send` to a channel list: `failure` (default: the next channel is tried when
    /// the customer has no address on one, or when its delivery fails for good) or `address`
    /// (only when the customer has no address).
    pub fallback: Option<S<FallbackMode>>,

    /// Hold the run: `for`, `until`, `event` (+ `timeout`) or `window`.
    pub wait: Option<S<RawWait>>,
    /// With an event `wait`: the step to run when the timeout passes (default: end the run
    /// with outcome `timeout`).
    #[schemars(with = "Option<StepId>")]
    pub on_timeout: Option<S<String>>,
    /// With `call`: the step to run when the call fails for good or gets no answer within its
    /// `timeout` (default: end the run with outcome `error`).
    #[schemars(with = "Option<StepId>")]
    pub on_error: Option<S<String>>,

    /// Conditions tried in order; the first that holds wins; the last arm is `else`.
    pub branch: Option<S<Vec<S<RawArm>>>>,
    /// Random split, stable per customer: `{ step-a: 45%, step-b: 45%, control: 10% }`.
    pub split: Option<S<OrderedMap<S<String>, S<Share>>>>,
    /// Change the customer profile.
    pub update: Option<S<RawUpdate>>,
    /// Call an internal system; its JSON response is kept in `vars`.
    pub call: Option<S<RawCall>>,
    /// A task for a person (a store associate); its completion returns as an event.
    pub task: Option<S<RawTask>>,
    /// End the run with this outcome.
    #[schemars(with = "Option<Identifier>")]
    pub exit: Option<S<String>>,
    /// A node kind registered by a plugin crate.
    #[serde(rename = "use")]
    pub use_: Option<S<String>>,
    /// With `use`: the kind's settings.
    pub with: Option<S<serde_json::Value>>,
    /// With `use`: where each named output of the kind goes.
    pub on: Option<S<OrderedMap<S<String>, S<String>>>>,
}

/// Message priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Marketing,
    Transactional,
}

/// When a `send` to a channel list moves on to the next channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FallbackMode {
    /// No address on the channel, or the delivery failed for good (the default).
    Failure,
    /// Only no address on the channel.
    Address,
}

/// One channel or a fallback list.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Channels {
    One(String),
    Many(Vec<String>),
}

impl Channels {
    pub fn names(&self) -> Vec<&str> {
        match self {
            Channels::One(c) => vec![c.as_str()],
            Channels::Many(cs) => cs.iter().map(String::as_str).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for Channels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Channels;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a channel name or a list of channel names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Channels, E> {
                Ok(Channels::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Channels, A::Error> {
                let mut out = Vec::new();
                while let Some(c) = seq.next_element::<String>()? {
                    out.push(c);
                }
                Ok(Channels::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A split share: `45%`, or a plain number of percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
#[schemars(with = "crate::schema_types::Percent")]
pub struct Share(pub f64);

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Share;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a share like `45%`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Share, E> {
                let number = v.trim().strip_suffix('%').unwrap_or(v).trim();
                number
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .map(Share)
                    .ok_or_else(|| E::custom(format!("`{v}` is not a share; write it like `45%`")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Share, E> {
                Ok(Share(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Share, E> {
                Ok(Share(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Share, E> {
                Ok(Share(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping that keeps the order it was written in.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for OrderedMap<K, V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<K: Serialize, V: Serialize> Serialize for OrderedMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> serde::de::Visitor<'de> for Vis<K, V> {
            type Value = OrderedMap<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(Vis(std::marker::PhantomData))
    }
}

impl<K, V: JsonSchema> JsonSchema for OrderedMap<K, V> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Map_of_{}", V::schema_name()).into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let values = g.subschema_for::<V>();
        schemars::json_schema!({ "type": "object", "additionalProperties": values })
    }
}

/// How a run waits; exactly one of `for`, `until`, `event`, `window`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWait {
    /// A fixed delay.
    #[serde(rename = "for")]
    #[schemars(with = "Option<Duration>")]
    pub for_: Option<S<String>>,
    /// Until the timestamp this expression gives.
    #[schemars(with = "Option<Expression>")]
    pub until: Option<S<String>>,
    /// Until the customer sends this event (requires `timeout`).
    #[schemars(with = "Option<Identifier>")]
    pub event: Option<S<String>>,
    /// With `event`: only an event for which this holds.
    #[serde(rename = "where")]
    #[schemars(with = "Option<Expression>")]
    pub where_: Option<S<String>>,
    /// With `event`: give up after this long.
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<S<String>>,
    /// Hold until inside a send window, in the customer's time zone.
    pub window: Option<S<RawWindow>>,
}

/// A send window.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// Days of the week (default: every day).
    pub days: Option<Vec<S<Weekday>>>,
    /// Local time range, e.g. `10:00-20:00` (default: the whole day).
    #[schemars(with = "Option<crate::schema_types::TimeRange>")]
    pub between: Option<S<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A branch arm: `when` + `next`, or the final `else`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawArm {
    /// The condition of this arm.
    #[schemars(with = "Option<Expression>")]
    pub when: Option<S<String>>,
    /// With `when`: the step to run when it holds.
    #[schemars(with = "Option<StepId>")]
    pub next: Option<S<String>>,
    /// The step to run when no condition holds (required, last).
    #[serde(rename = "else")]
    #[schemars(with = "Option<StepId>")]
    pub else_: Option<S<String>>,
}

/// Profile changes.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpdate {
    /// Attributes to set to these values.
    pub set: Option<S<OrderedMap<S<String>, serde_json::Value>>>,
    /// Numeric attributes to add to.
    pub add: Option<S<OrderedMap<S<String>, S<f64>>>>,
    /// Tags to add.
    pub tag: Option<Vec<S<String>>>,
    /// Tags to remove.
    pub untag: Option<Vec<S<String>>>,
}

/// A call to an internal system, configured by name in `canvas.yaml`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCall {
    /// The webhook's name.
    #[schemars(with = "StepId")]
    pub webhook: S<String>,
    /// The JSON body; string values are templates.
    pub body: Option<S<serde_json::Value>>,
    /// Where the JSON response is kept: `vars.<save_as>` (default: the step id, `-` as `_`).
    #[schemars(with = "Option<Identifier>")]
    pub save_as: Option<S<String>>,
    /// The longest the run waits for the answer, retries included, e.g. `30s`, `1h`
    /// (default: as long as the webhook's retry policy takes).
    #[schemars(with = "Option<Duration>")]
    pub timeout: Option<S<String>>,
}

/// A task for a person.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    /// Who does it: an expression, e.g. `customer.associate_id`.
    #[schemars(with = "Expression")]
    pub assign: S<String>,
    /// What to do: a template.
    pub text: S<String>,
    /// When it is due after creation (default 1d).
    #[schemars(with = "Option<Duration>")]
    pub due: Option<S<String>>,
}
