//! Runtime evaluation of flow expressions (CEL) and message templates (minijinja).
//!
//! Pure: nothing here reads the clock or does IO. The caller hands in `now` and the
//! customer's time zone, so a run replays the same way in tests, simulations and production.
//!
//! The executor evaluates a great many expressions, so the expensive parts are built once:
//! one CEL root context holding the date helpers (shared by all threads), and one minijinja
//! environment per thread that keeps every template it has compiled. Per evaluation only a
//! child scope is made, and the JSON roots are converted to CEL values lazily, borrowing
//! their strings instead of copying them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::OnceLock;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
    CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, ExecutionError, FunctionContext, Value as CelValue};
use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, FixedOffset, NaiveDate, NaiveDateTime,
    NaiveTime, SecondsFormat, Utc, Weekday,
};
use chrono_tz::Tz;
use serde_json::{Map, Value as Json};

use crate::duration::TimeOfDay;
use crate::expr::Expr;
use crate::template::{self, Includes, RenderError, TemplateFile};

/// An instant, as the executor stores it.
pub type Time = DateTime<Utc>;

/// What an expression or template can see.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Profile attributes; `id` is included by the caller.
    pub customer: &'a Map<String, Json>,
    /// `{id, name, data, occurred_at (RFC 3339 string), customer_id}`, when there is one.
    pub event: Option<&'a Json>,
    /// Run variables (a JSON object), inside a run.
    pub vars: Option<&'a Json>,
    /// `{id, name}` of the flow, for templates.
    pub flow: Option<&'a Json>,
    /// The current instant.
    pub now: Time,
    /// The customer's time zone (the caller falls back to the flow's).
    pub tz: Tz,
}

/// Why an expression or template could not be evaluated; each message names it and says why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The expression failed while running: a missing attribute, a bad helper argument, …
    #[error("cannot evaluate `{expr}`: {reason}")]
    Expr { expr: String, reason: String },
    /// The expression ran, but its value is not what the place it is written in needs.
    #[error("`{expr}` gave {got}, but {wanted} is needed here")]
    Type {
        expr: String,
        wanted: &'static str,
        got: String,
    },
    /// The template has a syntax error or failed while rendering.
    #[error("cannot render template `{name}`{}: {reason}", line_suffix(.line))]
    Template {
        name: String,
        line: Option<usize>,
        reason: String,
    },
}

fn line_suffix(line: &Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// Evaluate `expr` to JSON: timestamps become RFC 3339 strings (with their offset), durations
/// become seconds, so the result can be stored in run variables as is.
pub fn eval(expr: &Expr, scope: &Scope) -> Result<Json, EvalError> {
    let value = run(expr, scope)?;
    cel_to_json(&value).map_err(|reason| EvalError::Expr {
        expr: expr.source().to_owned(),
        reason,
    })
}

/// Evaluate a condition; anything but a bool is an error rather than "falsy", so a typo like
/// `customer.tier` (a string) where `customer.tier == "gold"` was meant is reported.
pub fn eval_bool(expr: &Expr, scope: &Scope) -> Result<bool, EvalError> {
    match run(expr, scope)? {
        CelValue::Bool(b) => Ok(b),
        other => Err(EvalError::Type {
            expr: expr.source().to_owned(),
            wanted: "true or false",
            got: describe(&other),
        }),
    }
}

/// Evaluate an instant, e.g. `wait.until`: a timestamp, or a string holding an RFC 3339
/// timestamp or a date `YYYY-MM-DD` (00:00 in `scope.tz`), since profiles keep dates as text.
pub fn eval_time(expr: &Expr, scope: &Scope) -> Result<Time, EvalError> {
    match run(expr, scope)? {
        CelValue::Timestamp(t) => Ok(t.with_timezone(&Utc)),
        CelValue::String(s) => parse_time(&s, scope.tz)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|reason| EvalError::Expr {
                expr: expr.source().to_owned(),
                reason,
            }),
        other => Err(EvalError::Type {
            expr: expr.source().to_owned(),
            wanted: "a timestamp or a date",
            got: describe(&other),
        }),
    }
}

/// Render a template with `customer`, `event`, `vars`, `flow` and `now` (an RFC 3339 string in
/// `scope.tz`). Undefined lookups render empty (guard them with `default`); the output is
/// returned exactly as rendered, trailing newline included.
///
/// A render is bounded ([`crate::template::TEMPLATE_FUEL`],
/// [`crate::template::MAX_RENDERED_BYTES`]): past either bound it fails rather than holding
/// the thread or memory.
pub fn render(name: &str, source: &str, scope: &Scope) -> Result<String, EvalError> {
    let ctx = template_context(scope);
    render_with(name, source, &Includes::default(), &ctx)
}

/// Render a template file of a flow version; it may include, import or extend the files
/// validated with it (`file.includes`), and nothing else.
pub fn render_file(file: &TemplateFile, scope: &Scope) -> Result<String, EvalError> {
    let ctx = template_context(scope);
    render_with(&file.file, &file.source, &file.includes, &ctx)
}

/// Render every string inside `value` that contains `{{` or `{%` (a `call` body such as
/// `customer_id: "{{ customer.id }}"`); other strings, keys and non-strings are kept as is.
pub fn render_value(value: &Json, scope: &Scope) -> Result<Json, EvalError> {
    // Most bodies have few or no templates: build the template context only when needed.
    let mut ctx = None;
    let mut path = String::from("$");
    render_json(value, scope, &mut ctx, &mut path)
}

fn render_json(
    value: &Json,
    scope: &Scope,
    ctx: &mut Option<minijinja::Value>,
    path: &mut String,
) -> Result<Json, EvalError> {
    Ok(match value {
        Json::String(s) if s.contains("{{") || s.contains("{%") => {
            let ctx = ctx.get_or_insert_with(|| template_context(scope));
            Json::String(render_with(path, s, &Includes::default(), ctx)?)
        }
        Json::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(render_json(item, scope, ctx, path)?);
                path.truncate(len);
            }
            Json::Array(out)
        }
        Json::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map {
                let len = path.len();
                // Bracketed keys: a key like `x.html` must not switch on HTML escaping.
                path.push_str(&format!("[{k:?}]"));
                out.insert(k.clone(), render_json(v, scope, ctx, path)?);
                path.truncate(len);
            }
            Json::Object(out)
        }
        other => other.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Expressions

/// The clock the helpers read; set only while an expression runs on this thread.
#[derive(Clone, Copy)]
struct Clock {
    now: Time,
    tz: Tz,
}

thread_local! {
    static CLOCK: Cell<Option<Clock>> = const { Cell::new(None) };
}

/// Restores the previous clock when an evaluation ends, also on early return.
struct ClockGuard(Option<Clock>);

impl ClockGuard {
    fn set(clock: Clock) -> ClockGuard {
        ClockGuard(CLOCK.with(|c| c.replace(Some(clock))))
    }
}

impl Drop for ClockGuard {
    fn drop(&mut self) {
        CLOCK.with(|c| c.set(self.0));
    }
}

/// The root context: CEL's standard library plus the date helpers, built once per process.
fn root() -> Result<&'static Context<'static, 'static>, String> {
    static ROOT: OnceLock<Result<Context<'static, 'static>, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mut ctx = Context::default();
        for &(name, arity, helper) in HELPER_FNS {
            ctx.add_function(name, helper_fn(name, arity, helper))
                .map_err(|e| format!("cannot register helper `{name}`: {e}"))?;
        }
        Ok(ctx)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Resolves the roots lazily: an expression that never names `event` never converts it, and
/// one that names `customer` three times converts it once.
struct Roots<'a> {
    scope: &'a Scope<'a>,
    now: CelTimestamp,
    customer: OnceLock<Box<dyn Val + 'a>>,
    event: OnceLock<Box<dyn Val + 'a>>,
    vars: OnceLock<Box<dyn Val + 'a>>,
}

impl VariableResolver for Roots<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        // CEL asks for the whole dotted name (`customer.last_visit_at`) before its prefixes:
        // answering it converts one attribute instead of the whole profile. A path that does
        // not lead anywhere is left to CEL, which then reports it as usual.
        if let Some((root, path)) = variable.split_once('.') {
            let found = match root {
                "customer" => {
                    let (first, rest) = path.split_once('.').unwrap_or((path, ""));
                    walk(self.scope.customer.get(first)?, rest)
                }
                "event" => walk(self.scope.event?, path),
                "vars" => walk(self.scope.vars?, path),
                _ => None,
            }?;
            return Some(CowVal::Owned(json_to_val(found)));
        }
        let val: &'b (dyn Val + 'b) = match variable {
            "customer" => self
                .customer
                .get_or_init(|| map_to_val(self.scope.customer))
                .as_ref(),
            "event" => {
                let event = self.scope.event?;
                self.event.get_or_init(|| json_to_val(event)).as_ref()
            }
            "vars" => {
                let vars = self.scope.vars?;
                self.vars.get_or_init(|| json_to_val(vars)).as_ref()
            }
            "now" => &self.now,
            _ => return None,
        };
        Some(CowVal::Borrowed(val))
    }
}

/// Follow `a.b.c` through JSON objects; `""` is `value` itself.
fn walk<'j>(value: &'j Json, path: &str) -> Option<&'j Json> {
    if path.is_empty() {
        return Some(value);
    }
    path.split('.')
        .try_fold(value, |v, field| v.as_object()?.get(field))
}

fn run(expr: &Expr, scope: &Scope) -> Result<CelValue, EvalError> {
    let fail = |reason: String| EvalError::Expr {
        expr: expr.source().to_owned(),
        reason,
    };
    let root = root().map_err(fail)?;
    let roots = Roots {
        scope,
        now: CelTimestamp::from(fixed(scope.now.with_timezone(&scope.tz))),
        customer: OnceLock::new(),
        event: OnceLock::new(),
        vars: OnceLock::new(),
    };
    let mut ctx = root.new_inner_scope();
    ctx.set_variable_resolver(&roots);
    let _clock = ClockGuard::set(Clock {
        now: scope.now,
        tz: scope.tz,
    });
    expr.program().execute(&ctx).map_err(|e| fail(explain(&e)))
}

/// CEL's errors in words an operator reads in a run log.
fn explain(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(key) => {
            format!("there is no `{key}` (guard an optional attribute with `has(…)`)")
        }
        ExecutionError::UndeclaredReference(name) => match name.as_str() {
            "event" => "there is no event here".to_owned(),
            "vars" => "there are no run variables here".to_owned(),
            other => format!("`{other}` is not defined"),
        },
        ExecutionError::FunctionError { function, message } => format!("{function}: {message}"),
        ExecutionError::DivisionByZero(_) => "division by zero".to_owned(),
        ExecutionError::RemainderByZero(_) => "remainder by zero".to_owned(),
        other => other.to_string(),
    }
}

/// A short description of a value for error messages: its type and, for scalars, the value.
fn describe(v: &CelValue) -> String {
    match v {
        CelValue::Null => "null".to_owned(),
        CelValue::Bool(b) => format!("the bool {b}"),
        CelValue::Int(i) => format!("the int {i}"),
        CelValue::UInt(u) => format!("the uint {u}"),
        CelValue::Float(f) => format!("the double {f}"),
        CelValue::String(s) => format!("the string {:?}", s.as_str()),
        CelValue::Timestamp(t) => format!("the timestamp {}", t.to_rfc3339()),
        CelValue::Duration(d) => format!("a duration of {}s", d.num_seconds()),
        CelValue::List(_) => "a list".to_owned(),
        CelValue::Map(_) => "a map".to_owned(),
        other => format!("a value of type {}", other.type_of()),
    }
}

/// JSON → CEL, borrowing strings and keys from the JSON rather than copying them.
fn json_to_val(v: &Json) -> Box<dyn Val + '_> {
    match v {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Json::String(s) => Box::new(CelString::from(s.as_str())),
        Json::Array(items) => Box::new(CelList::from(
            items.iter().map(json_to_val).collect::<Vec<_>>(),
        )),
        Json::Object(map) => map_to_val(map),
    }
}

fn map_to_val(map: &Map<String, Json>) -> Box<dyn Val + '_> {
    let mut out = HashMap::with_capacity(map.len());
    for (k, v) in map {
        out.insert(
            CelMapKey::String(CelString::from(k.as_str())),
            json_to_val(v),
        );
    }
    Box::new(CelMap::from(out))
}

/// CEL → JSON for results that are stored or sent on.
fn cel_to_json(v: &CelValue) -> Result<Json, String> {
    Ok(match v {
        CelValue::Null => Json::Null,
        CelValue::Bool(b) => Json::Bool(*b),
        CelValue::Int(i) => Json::from(*i),
        CelValue::UInt(u) => Json::from(*u),
        CelValue::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("the result {f} is not a finite number"))?,
        CelValue::String(s) => Json::String(s.as_str().to_owned()),
        CelValue::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => Json::String(s.to_owned()),
            Err(_) => Json::Array(b.iter().map(|&x| Json::from(x)).collect()),
        },
        CelValue::Timestamp(t) => Json::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        CelValue::Duration(d) => duration_secs(*d),
        CelValue::List(items) => Json::Array(
            items
                .iter()
                .map(cel_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        CelValue::Map(map) => {
            let mut entries: Vec<(String, Json)> = map
                .map
                .iter()
                .map(|(k, v)| Ok((key_string(k), cel_to_json(v)?)))
                .collect::<Result<_, String>>()?;
            // CEL maps are unordered; sort so the same value always serializes the same way.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(entries.into_iter().collect())
        }
        other => return Err(format!("{} cannot be stored as JSON", describe(other))),
    })
}

fn key_string(k: &cel::objects::Key) -> String {
    match k {
        cel::objects::Key::Int(i) => i.to_string(),
        cel::objects::Key::Uint(u) => u.to_string(),
        cel::objects::Key::Bool(b) => b.to_string(),
        cel::objects::Key::String(s) => s.as_str().to_owned(),
    }
}

/// Whole seconds as an integer, fractions as a double.
fn duration_secs(d: ChronoDuration) -> Json {
    if d.subsec_nanos() == 0 {
        Json::from(d.num_seconds())
    } else {
        let secs = d.num_seconds() as f64 + f64::from(d.subsec_nanos()) / 1e9;
        serde_json::Number::from_f64(secs).map_or(Json::Null, Json::Number)
    }
}

// ---------------------------------------------------------------------------------------------
// Date helpers

/// What a helper gives back, before it becomes a CEL value.
enum Out {
    Int(i64),
    Str(&'static str),
    Time(DateTime<Tz>),
}

type Helper = fn(&[&dyn Val], Clock) -> Result<Out, String>;

/// The helpers of `expr::HELPERS`, with their arity and implementation.
const HELPER_FNS: &[(&str, usize, Helper)] = &[
    ("days_since", 1, days_since),
    ("hours_since", 1, hours_since),
    ("days_until", 1, days_until),
    ("at", 2, at),
    ("birthday_this_year", 1, birthday_this_year),
    ("start_of_month", 1, start_of_month),
    ("end_of_month", 1, end_of_month),
    ("start_of_next_month", 1, start_of_next_month),
    ("month", 1, month),
    ("year", 1, year),
    ("day", 1, day),
    ("weekday", 1, weekday),
];

type CelFunction = Box<
    dyn for<'c, 'v> Fn(&mut FunctionContext<'c, 'v>) -> Result<CowVal<'c, 'v>, ExecutionError>
        + Send
        + Sync,
>;

/// Wrap a helper as a CEL function: read the arguments without converting them, check the
/// count (validation already did, but a bad call must never panic), and box the result.
fn helper_fn(name: &'static str, arity: usize, helper: Helper) -> CelFunction {
    Box::new(move |ftx| {
        let Some(clock) = CLOCK.with(Cell::get) else {
            return Err(ftx.error("called outside an evaluation"));
        };
        // Called as a method (`now.month()`), the target is the first argument. A fixed
        // buffer, not a Vec: helpers run once per expression on the executor's hot path.
        let mut buf: [&dyn Val; 2] = [&CelNull, &CelNull];
        let mut n = 0;
        for a in ftx.this.iter().chain(ftx.args.iter()) {
            if let Some(slot) = buf.get_mut(n) {
                *slot = &**a;
            }
            n += 1;
        }
        let Some(args) = buf.get(..n).filter(|_| n == arity) else {
            return Err(ftx.error(format!(
                "takes {arity} argument{}, got {n}",
                if arity == 1 { "" } else { "s" }
            )));
        };
        match helper(args, clock) {
            Ok(Out::Int(i)) => Ok(CowVal::owned(CelInt::from(i))),
            Ok(Out::Str(s)) => Ok(CowVal::owned(CelString::from(s))),
            Ok(Out::Time(t)) => Ok(CowVal::owned(CelTimestamp::from(fixed(t)))),
            Err(message) => Err(ExecutionError::function_error(name, message)),
        }
    })
}

fn fixed(t: DateTime<Tz>) -> DateTime<FixedOffset> {
    t.fixed_offset()
}

/// A helper's time argument in the local zone: a timestamp, or a string holding an RFC 3339
/// timestamp or a plain date (local midnight).
fn local_arg(args: &[&dyn Val], clock: Clock) -> Result<DateTime<Tz>, String> {
    let Some(v) = args.first() else {
        return Err("a timestamp or a date is missing".to_owned());
    };
    if let Some(t) = v.downcast_ref::<CelTimestamp>() {
        return Ok(t.inner().with_timezone(&clock.tz));
    }
    if let Some(s) = v.downcast_ref::<CelString>() {
        return parse_time(s.inner(), clock.tz);
    }
    if v.downcast_ref::<CelNull>().is_some() {
        return Err("expected a timestamp or a date, got null".to_owned());
    }
    Err(format!(
        "expected a timestamp or a date, got {}",
        v.get_type().name()
    ))
}

/// An RFC 3339 timestamp, or a date `YYYY-MM-DD` read as 00:00 in `tz`.
fn parse_time(text: &str, tz: Tz) -> Result<DateTime<Tz>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&tz));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(local_midnight(d, tz));
    }
    Err(format!(
        "{text:?} is neither a timestamp (RFC 3339) nor a date (YYYY-MM-DD)"
    ))
}

fn local_midnight(d: NaiveDate, tz: Tz) -> DateTime<Tz> {
    resolve_local(d.and_time(NaiveTime::MIN), tz)
}

/// A local clock reading as an instant, by the daylight-saving policy of
/// [`crate::local_time`].
fn resolve_local(naive: NaiveDateTime, tz: Tz) -> DateTime<Tz> {
    crate::local_time::resolve(naive, tz)
}

fn days_since(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let t = local_arg(args, clock)?;
    // Measured on the local clock, so a date (local midnight) counts whole days even when a
    // DST change makes one of the days 23 or 25 hours long.
    let now = clock.now.with_timezone(&clock.tz).naive_local();
    let secs = (now - t.naive_local()).num_seconds();
    Ok(Out::Int(secs.div_euclid(86_400)))
}

fn hours_since(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let t = local_arg(args, clock)?;
    let secs = (clock.now - t.with_timezone(&Utc)).num_seconds();
    Ok(Out::Int(secs.div_euclid(3_600)))
}

fn days_until(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let t = local_arg(args, clock)?;
    let today = clock.now.with_timezone(&clock.tz).date_naive();
    Ok(Out::Int((t.date_naive() - today).num_days()))
}

fn at(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let t = local_arg(args, clock)?;
    let clock_time = args
        .get(1)
        .and_then(|v| v.downcast_ref::<CelString>())
        .ok_or("the clock time must be a string like \"09:00\"")?;
    let tod = TimeOfDay::parse(clock_time.inner()).ok_or_else(|| {
        format!(
            "{:?} is not a clock time like \"09:00\"",
            clock_time.inner()
        )
    })?;
    let time = NaiveTime::from_hms_opt(u32::from(tod.0 / 60), u32::from(tod.0 % 60), 0)
        .ok_or("the clock time is out of range")?;
    Ok(Out::Time(resolve_local(
        t.date_naive().and_time(time),
        clock.tz,
    )))
}

fn birthday_this_year(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let born = local_arg(args, clock)?.date_naive();
    let year = clock.now.with_timezone(&clock.tz).year();
    // Feb 29 birthdays are celebrated on Feb 28 in common years.
    let date = NaiveDate::from_ymd_opt(year, born.month(), born.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, born.month(), born.day() - 1))
        .ok_or_else(|| format!("{born} has no date in {year}"))?;
    Ok(Out::Time(local_midnight(date, clock.tz)))
}

fn first_of_month(year: i32, month: u32) -> Result<NaiveDate, String> {
    NaiveDate::from_ymd_opt(year, month, 1)
        .ok_or_else(|| format!("{year}-{month:02} is out of range"))
}

fn first_of_next_month(d: NaiveDate) -> Result<NaiveDate, String> {
    if d.month() == 12 {
        first_of_month(d.year() + 1, 1)
    } else {
        first_of_month(d.year(), d.month() + 1)
    }
}

fn start_of_month(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let d = local_arg(args, clock)?.date_naive();
    Ok(Out::Time(local_midnight(
        first_of_month(d.year(), d.month())?,
        clock.tz,
    )))
}

fn end_of_month(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let d = local_arg(args, clock)?.date_naive();
    let last = first_of_next_month(d)?
        .pred_opt()
        .ok_or("the date is out of range")?;
    Ok(Out::Time(local_midnight(last, clock.tz)))
}

fn start_of_next_month(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    let d = local_arg(args, clock)?.date_naive();
    Ok(Out::Time(local_midnight(first_of_next_month(d)?, clock.tz)))
}

fn month(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    Ok(Out::Int(i64::from(local_arg(args, clock)?.month())))
}

fn year(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    Ok(Out::Int(i64::from(local_arg(args, clock)?.year())))
}

fn day(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    Ok(Out::Int(i64::from(local_arg(args, clock)?.day())))
}

fn weekday(args: &[&dyn Val], clock: Clock) -> Result<Out, String> {
    Ok(Out::Str(match local_arg(args, clock)?.weekday() {
        Weekday::Mon => "mon",
        Weekday::Tue => "tue",
        Weekday::Wed => "wed",
        Weekday::Thu => "thu",
        Weekday::Fri => "fri",
        Weekday::Sat => "sat",
        Weekday::Sun => "sun",
    }))
}

// ---------------------------------------------------------------------------------------------
// Templates

/// Templates kept per thread; past this many, the cache starts over (flows are reloaded
/// rarely, so this only bounds memory for a daemon that lives through many versions).
const MAX_CACHED_TEMPLATES: usize = 2048;

struct TemplateCache {
    env: minijinja::Environment<'static>,
    count: usize,
}

thread_local! {
    static TEMPLATES: RefCell<TemplateCache> = RefCell::new(TemplateCache {
        env: template_env(),
        count: 0,
    });
}

fn template_env() -> minijinja::Environment<'static> {
    let mut env = template::environment();
    env.set_keep_trailing_newline(true);
    env
}

fn template_context(scope: &Scope) -> minijinja::Value {
    let now = scope
        .now
        .with_timezone(&scope.tz)
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let mut roots: Vec<(&str, minijinja::Value)> = vec![
        ("customer", minijinja::Value::from_serialize(scope.customer)),
        ("now", minijinja::Value::from(now)),
    ];
    for (name, value) in [
        ("event", scope.event),
        ("vars", scope.vars),
        ("flow", scope.flow),
    ] {
        if let Some(v) = value {
            roots.push((name, minijinja::Value::from_serialize(v)));
        }
    }
    roots.into_iter().collect()
}

fn template_error(name: &str, e: &minijinja::Error) -> EvalError {
    let reason = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    EvalError::Template {
        name: name.to_owned(),
        line: e.line(),
        reason,
    }
}

fn render_error(name: &str, e: RenderError) -> EvalError {
    let (line, reason) = match e {
        RenderError::Engine(e) => return template_error(name, &e),
        RenderError::OutOfFuel { line } => (line, template::out_of_fuel_reason()),
        RenderError::TooLarge => (None, template::too_large_reason()),
    };
    EvalError::Template {
        name: name.to_owned(),
        line,
        reason,
    }
}

fn render_with(
    name: &str,
    source: &str,
    includes: &Includes,
    ctx: &minijinja::Value,
) -> Result<String, EvalError> {
    // The hash leads so the name keeps its extension: `x.email.html` is HTML-escaped.
    let key = format!("{:016x}:{name}", template::source_hash(source));
    TEMPLATES.with(|cell| {
        {
            let mut cache = cell.borrow_mut();
            if cache.env.get_template(&key).is_err() {
                // Included files are cached by the loader too: count them all.
                if cache.count + template::loaded_count() >= MAX_CACHED_TEMPLATES {
                    cache.env.clear_templates();
                    cache.count = 0;
                    template::reset_loaded_count();
                }
                cache
                    .env
                    .add_template_owned(key.clone(), source.to_owned())
                    .map_err(|e| template_error(name, &e))?;
                cache.count += 1;
            }
        }
        let cache = cell.borrow();
        let tmpl = cache
            .env
            .get_template(&key)
            .map_err(|e| template_error(name, &e))?;
        if tmpl.source() == source {
            return template::render_bounded(&tmpl, ctx, includes)
                .map_err(|e| render_error(name, e));
        }
        // A hash collision: render this text uncached rather than the wrong template.
        let env = template_env();
        let tmpl = env
            .template_from_named_str(&key, source)
            .map_err(|e| template_error(name, &e))?;
        template::render_bounded(&tmpl, ctx, includes).map_err(|e| render_error(name, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::America::New_York;
    use chrono_tz::Asia::Shanghai;
    use serde_json::json;

    fn expr(src: &str) -> Expr {
        crate::expr::compile(src, crate::expr::Scope::STEP)
            .unwrap_or_else(|e| panic!("`{src}` compiles: {e:?}"))
    }

    fn utc(s: &str) -> Time {
        DateTime::parse_from_rfc3339(s)
            .expect("test timestamp")
            .with_timezone(&Utc)
    }

    struct Fixture {
        customer: Map<String, Json>,
        event: Json,
        vars: Json,
        flow: Json,
    }

    fn fixture() -> Fixture {
        let Json::Object(customer) = json!({
            "id": "c-1",
            "first_name": "Lin",
            "member": true,
            "birthday": "1992-02-29",
            "last_visit_at": "2024-02-20T10:00:00+08:00",
            "tags": ["vip", "tops"],
            "points": 120,
        }) else {
            panic!("object")
        };
        Fixture {
            customer,
            event: json!({
                "id": "e-1",
                "name": "order_paid",
                "data": {"amount": 320.5, "category": "tops"},
                "occurred_at": "2024-03-11T09:00:00+08:00",
                "customer_id": "c-1",
            }),
            vars: json!({"coupon": {"amount": 15, "title": "15 off"}}),
            flow: json!({"id": "birthday-ritual", "name": "Birthday ritual"}),
        }
    }

    fn scope<'a>(f: &'a Fixture, now: &str, tz: Tz) -> Scope<'a> {
        Scope {
            customer: &f.customer,
            event: Some(&f.event),
            vars: Some(&f.vars),
            flow: Some(&f.flow),
            now: utc(now),
            tz,
        }
    }

    fn value(src: &str, s: &Scope) -> Json {
        eval(&expr(src), s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn truth(src: &str, s: &Scope) -> bool {
        eval_bool(&expr(src), s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn time(src: &str, s: &Scope) -> Time {
        eval_time(&expr(src), s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn variables_and_branch_conditions() {
        let f = fixture();
        // Mon 2024-03-11 10:00 in Shanghai.
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        assert_eq!(value("customer.first_name", &s), json!("Lin"));
        assert_eq!(value("customer.birthday", &s), json!("1992-02-29"));
        assert!(truth("customer.member && 'vip' in customer.tags", &s));
        assert!(truth("customer.tags.exists(t, t == 'tops')", &s));
        assert!(truth("vars.coupon.amount > 10", &s));
        assert!(truth("event.data.amount >= 300", &s));
        assert!(truth("event.data.category in ['tops', 'shirts']", &s));
        assert!(truth("days_since(customer.last_visit_at) >= 20", &s));
        assert!(!truth("days_since(customer.last_visit_at) >= 30", &s));
        assert!(truth("has(customer.tags)", &s));
        assert!(!truth("has(customer.wechat_id)", &s));
        assert!(truth(
            "!has(customer.wechat_id) || customer.wechat_id == ''",
            &s
        ));
        assert_eq!(value("now", &s), json!("2024-03-11T10:00:00+08:00"));
        assert_eq!(value("customer.points * 2", &s), json!(240));
        assert_eq!(
            value("vars.coupon", &s),
            json!({"amount": 15, "title": "15 off"})
        );
        assert_eq!(value("2d", &s), json!(172_800));
        assert_eq!(
            value("now - timestamp('2024-03-11T01:00:00Z')", &s),
            json!(3600)
        );
    }

    #[test]
    fn missing_roots_are_absent() {
        let f = fixture();
        let mut s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        s.event = None;
        s.vars = None;
        let err = eval_bool(&expr("event.data.amount >= 300"), &s).expect_err("no event");
        assert_eq!(
            err.to_string(),
            "cannot evaluate `event.data.amount >= 300`: there is no event here"
        );
        assert!(eval(&expr("vars.coupon"), &s).is_err());
        // The rest still works without them.
        assert!(truth("customer.member", &s));
    }

    #[test]
    fn days_since_and_hours_since() {
        let f = fixture();
        // 2024-03-11 09:00 in Shanghai.
        let s = scope(&f, "2024-03-11T01:00:00Z", Shanghai);
        // 23:30 the night before is not a whole day ago.
        assert_eq!(
            value("days_since('2024-03-10T23:30:00+08:00')", &s),
            json!(0)
        );
        assert_eq!(
            value("hours_since('2024-03-10T23:30:00+08:00')", &s),
            json!(9)
        );
        assert_eq!(
            value("days_since('2024-03-09T23:30:00+08:00')", &s),
            json!(1)
        );
        assert_eq!(
            value("days_since(timestamp('2024-03-01T09:00:00+08:00'))", &s),
            json!(10)
        );
        assert_eq!(value("hours_since(now - 90m)", &s), json!(1));
        // A future instant is a negative count.
        assert_eq!(value("hours_since(now + 30m)", &s), json!(-1));
    }

    #[test]
    fn shanghai_and_utc_days_differ_at_the_boundary() {
        let f = fixture();
        // 2024-03-11 03:00 in Shanghai, but still 2024-03-10 19:00 in UTC.
        let sh = scope(&f, "2024-03-10T19:00:00Z", Shanghai);
        let u = scope(&f, "2024-03-10T19:00:00Z", Tz::UTC);
        // A date is local midnight: 27 hours ago in Shanghai, 19 hours ago in UTC.
        assert_eq!(value("days_since('2024-03-10')", &sh), json!(1));
        assert_eq!(value("days_since('2024-03-10')", &u), json!(0));
        assert_eq!(value("day(now)", &sh), json!(11));
        assert_eq!(value("day(now)", &u), json!(10));
        assert_eq!(value("weekday(now)", &sh), json!("mon"));
        assert_eq!(value("weekday(now)", &u), json!("sun"));
        assert_eq!(value("days_until('2024-03-12')", &sh), json!(1));
        assert_eq!(value("days_until('2024-03-12')", &u), json!(2));
        // A time late at night in Shanghai is already the next day there, not in UTC.
        let late = "'2024-03-10T23:30:00+08:00'";
        assert_eq!(value(&format!("day({late})"), &sh), json!(10));
        assert_eq!(value(&format!("day({late})"), &u), json!(10));
        let late_utc = "'2024-03-10T17:30:00Z'";
        assert_eq!(value(&format!("day({late_utc})"), &sh), json!(11));
        assert_eq!(value(&format!("day({late_utc})"), &u), json!(10));
    }

    #[test]
    fn days_until_counts_calendar_days() {
        let f = fixture();
        // 2024-03-11 23:00 in Shanghai.
        let s = scope(&f, "2024-03-11T15:00:00Z", Shanghai);
        assert_eq!(
            value("days_until('2024-03-12T00:30:00+08:00')", &s),
            json!(1)
        );
        assert_eq!(value("days_until('2024-03-11')", &s), json!(0));
        assert_eq!(value("days_until('2024-03-01')", &s), json!(-10));
        assert_eq!(value("days_until(now + 2d)", &s), json!(2));
    }

    #[test]
    fn at_sets_the_local_clock_time() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        assert_eq!(time("at(now, \"09:00\")", &s), utc("2024-03-11T01:00:00Z"));
        assert_eq!(
            value("at('2024-05-01', \"18:30\")", &s),
            json!("2024-05-01T18:30:00+08:00")
        );
    }

    #[test]
    fn at_skips_forward_over_a_dst_gap() {
        let f = fixture();
        // 2024-03-10 is the spring-forward date in New York: 02:00 → 03:00.
        let s = scope(&f, "2024-03-09T15:00:00Z", New_York);
        assert_eq!(
            value("at('2024-03-10', \"02:30\")", &s),
            json!("2024-03-10T03:00:00-04:00")
        );
        assert_eq!(
            value("at('2024-03-10', \"01:30\")", &s),
            json!("2024-03-10T01:30:00-05:00")
        );
        assert_eq!(
            value("at('2024-03-10', \"09:00\")", &s),
            json!("2024-03-10T09:00:00-04:00")
        );
        // Fall back (2024-11-03, 01:00–02:00 twice): the first of the two.
        assert_eq!(
            value("at('2024-11-03', \"01:30\")", &s),
            json!("2024-11-03T01:30:00-04:00")
        );
        // Whole days across the change count on the local clock.
        let s = scope(&f, "2024-03-20T04:00:00Z", New_York);
        assert_eq!(value("days_since('2024-03-01')", &s), json!(19));
    }

    #[test]
    fn birthdays() {
        let f = fixture();
        // 2023 is a common year: Feb 29 is celebrated on Feb 28.
        let s = scope(&f, "2023-02-01T00:00:00Z", Shanghai);
        assert_eq!(
            value("birthday_this_year(customer.birthday)", &s),
            json!("2023-02-28T00:00:00+08:00")
        );
        assert_eq!(
            time("at(birthday_this_year(customer.birthday), \"09:00\")", &s),
            utc("2023-02-28T01:00:00Z")
        );
        let s = scope(&f, "2024-02-01T00:00:00Z", Shanghai);
        assert_eq!(
            value("birthday_this_year(customer.birthday)", &s),
            json!("2024-02-29T00:00:00+08:00")
        );
        assert_eq!(
            value("birthday_this_year('1990-12-31')", &s),
            json!("2024-12-31T00:00:00+08:00")
        );
        // The year is the local one: 2023-12-31 20:00 UTC is already 2024 in Shanghai.
        let s = scope(&f, "2023-12-31T20:00:00Z", Shanghai);
        assert_eq!(
            value("birthday_this_year('1990-06-01')", &s),
            json!("2024-06-01T00:00:00+08:00")
        );
        // Branch-like: within the first three days of the month.
        let s = scope(&f, "2024-03-02T00:00:00Z", Shanghai);
        assert!(!truth(
            "day(birthday_this_year(customer.birthday)) <= 3",
            &s
        ));
        assert!(truth(
            "month(customer.birthday) == 2 && day(birthday_this_year('2001-03-02')) <= 3",
            &s
        ));
    }

    #[test]
    fn month_boundaries() {
        let f = fixture();
        // 2024-02-15 in Shanghai.
        let s = scope(&f, "2024-02-15T04:00:00Z", Shanghai);
        assert_eq!(
            value("start_of_month(now)", &s),
            json!("2024-02-01T00:00:00+08:00")
        );
        assert_eq!(
            value("end_of_month(now)", &s),
            json!("2024-02-29T00:00:00+08:00")
        );
        assert_eq!(
            value("start_of_next_month(now)", &s),
            json!("2024-03-01T00:00:00+08:00")
        );
        assert_eq!(
            value("start_of_next_month('2024-12-31')", &s),
            json!("2025-01-01T00:00:00+08:00")
        );
        assert_eq!(
            value("end_of_month('2023-12-05')", &s),
            json!("2023-12-31T00:00:00+08:00")
        );
        assert_eq!(
            time("at(end_of_month(now) - 2d, \"10:00\")", &s),
            utc("2024-02-27T02:00:00Z")
        );
        assert_eq!(value("month(now)", &s), json!(2));
        assert_eq!(value("year(now)", &s), json!(2024));
        assert_eq!(value("day(now)", &s), json!(15));
        assert_eq!(value("weekday(now)", &s), json!("thu"));
        assert_eq!(value("weekday('2024-02-18')", &s), json!("sun"));
        assert!(truth("now < at(end_of_month(now) - 2d, \"10:00\")", &s));
    }

    #[test]
    fn eval_time_accepts_strings_and_dates() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        assert_eq!(time("event.occurred_at", &s), utc("2024-03-11T01:00:00Z"));
        assert_eq!(time("'2024-03-12'", &s), utc("2024-03-11T16:00:00Z"));
        assert_eq!(time("now + 1d", &s), utc("2024-03-12T02:00:00Z"));
        assert!(matches!(
            eval_time(&expr("customer.points"), &s),
            Err(EvalError::Type { .. })
        ));
        assert!(matches!(
            eval_time(&expr("customer.first_name"), &s),
            Err(EvalError::Expr { .. })
        ));
    }

    #[test]
    fn errors_are_reported_not_panics() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        let err =
            eval_bool(&expr("days_since(customer.first_name) > 1"), &s).expect_err("not a date");
        assert_eq!(
            err.to_string(),
            "cannot evaluate `days_since(customer.first_name) > 1`: days_since: \"Lin\" is \
             neither a timestamp (RFC 3339) nor a date (YYYY-MM-DD)"
        );
        let err = eval(&expr("month(customer.points)"), &s).expect_err("an int");
        assert!(
            err.to_string()
                .ends_with("month: expected a timestamp or a date, got int"),
            "{err}"
        );
        let err = eval(&expr("day('2024-02-30')"), &s).expect_err("no such day");
        assert!(err.to_string().contains("\"2024-02-30\""), "{err}");
        let err = eval_bool(&expr("customer.first_name"), &s).expect_err("not a bool");
        assert_eq!(
            err.to_string(),
            "`customer.first_name` gave the string \"Lin\", but true or false is needed here"
        );
        let err = eval_bool(&expr("customer.first_name > 3"), &s).expect_err("type error");
        assert!(matches!(err, EvalError::Expr { .. }), "{err}");
        let err = eval_bool(&expr("customer.wechat_id == 'x'"), &s).expect_err("absent");
        assert!(err.to_string().contains("`wechat_id`"), "{err}");
        let err = eval(&expr("customer.points / 0"), &s).expect_err("division");
        assert!(err.to_string().contains("division by zero"), "{err}");
        assert!(eval(&expr("at(customer.tags, \"09:00\")"), &s).is_err());
        assert!(eval(&expr("weekday(null)"), &s).is_err());
        assert!(eval(&expr("year(customer.tags)"), &s).is_err());
    }

    #[test]
    fn renders_templates() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        let out = render(
            "birthday/day.txt",
            "Hi {{ customer.first_name }}, {{ vars.coupon.title }} on {{ event.data.category }} \
             ({{ flow.name }}) at {{ now }}{% if customer.member %}!{% endif %}\n",
            &s,
        )
        .expect("renders");
        assert_eq!(
            out,
            "Hi Lin, 15 off on tops (Birthday ritual) at 2024-03-11T10:00:00+08:00!\n"
        );
        // Cached: the same text renders the same, other data renders differently.
        let mut other = fixture();
        other.customer.insert("first_name".to_owned(), json!("Mei"));
        let s2 = scope(&other, "2024-03-11T02:00:00Z", Shanghai);
        assert_eq!(
            render("a", "Hi {{ customer.first_name }}", &s2).expect("renders"),
            "Hi Mei"
        );
        assert_eq!(
            render("a", "Hi {{ customer.first_name }}", &s).expect("renders"),
            "Hi Lin"
        );
        // Same name, new text (a new flow version): the new text wins.
        assert_eq!(
            render("a", "Hello {{ customer.first_name }}", &s).expect("renders"),
            "Hello Lin"
        );
        // Optional data.
        assert_eq!(
            render(
                "b",
                "{{ customer.nickname | default('there') }}|{{ customer.x.y }}",
                &s
            )
            .expect("renders"),
            "there|"
        );
        // HTML templates escape.
        let mut html = fixture();
        html.customer
            .insert("first_name".to_owned(), json!("<b>Lin</b>"));
        let s3 = scope(&html, "2024-03-11T02:00:00Z", Shanghai);
        assert_eq!(
            render("x.email.html", "{{ customer.first_name }}", &s3).expect("renders"),
            "&lt;b&gt;Lin&lt;&#x2f;b&gt;"
        );
        assert_eq!(
            render("x.sms.txt", "{{ customer.first_name }}", &s3).expect("renders"),
            "<b>Lin</b>"
        );
    }

    #[test]
    fn template_errors() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        let err = render("bad", "line\nHi {{ customer.first_name ", &s).expect_err("syntax");
        let EvalError::Template { name, line, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(name, "bad");
        assert_eq!(*line, Some(2));
        assert!(
            err.to_string()
                .starts_with("cannot render template `bad` at line 2: "),
            "{err}"
        );
        let err = render("f", "{{ customer.first_name | shout }}", &s).expect_err("filter");
        assert!(err.to_string().contains("unknown filter"), "{err}");
    }

    #[test]
    fn renders_values() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        let body = json!({
            "action": "issue",
            "customer_id": "{{ customer.id }}",
            "amount": 15,
            "items": [
                {"name": "{{ event.data.category | upper }}", "x.html": "{{ '<' }}"},
                "plain {text}",
                null,
            ],
            "when": "{% if customer.member %}now{% else %}later{% endif %}",
        });
        assert_eq!(
            render_value(&body, &s).expect("renders"),
            json!({
                "action": "issue",
                "customer_id": "c-1",
                "amount": 15,
                "items": [
                    {"name": "TOPS", "x.html": "<"},
                    "plain {text}",
                    null,
                ],
                "when": "now",
            })
        );
        let err = render_value(&json!({"a": [{"b": "{{ oops "}]}), &s).expect_err("syntax");
        assert!(err.to_string().contains("$[\"a\"][0][\"b\"]"), "{err}");
    }

    #[test]
    fn nested_evaluations_keep_their_clock() {
        // The clock is per evaluation: a later one with another zone sees its own.
        let f = fixture();
        let a = scope(&f, "2024-03-10T19:00:00Z", Shanghai);
        let b = scope(&f, "2024-03-10T19:00:00Z", Tz::UTC);
        assert_eq!(value("day(now)", &a), json!(11));
        assert_eq!(value("day(now)", &b), json!(10));
        assert!(CLOCK.with(Cell::get).is_none());
    }

    /// A customer whose data makes a template loop long: `items` has `n` entries and a
    /// `blob` of `blob` bytes.
    fn heavy(n: usize, blob: usize) -> Fixture {
        let mut f = fixture();
        f.customer
            .insert("items".to_owned(), json!((0..n).collect::<Vec<_>>()));
        f.customer
            .insert("blob".to_owned(), json!("x".repeat(blob)));
        f
    }

    /// Regression: a render had no bound, so data that made a template loop long held the
    /// engine worker rendering it for as long as the loops ran.
    #[test]
    fn renders_past_the_work_bound_fail_quickly() {
        let src = "{% for a in customer.items %}{% for b in customer.items %}{{ b }}\
                   {% endfor %}{% endfor %}";
        let small = heavy(10, 0);
        let out = render(
            "r.txt",
            src,
            &scope(&small, "2024-03-11T02:00:00Z", Shanghai),
        );
        assert_eq!(out.expect("ten by ten renders").len(), 100);
        let err = crate::template::tests::within_20s(move || {
            let big = heavy(100_000, 0);
            render("r.txt", src, &scope(&big, "2024-03-11T02:00:00Z", Shanghai))
                .expect_err("100,000 by 100,000 is over the bound")
        });
        let EvalError::Template { name, line, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((name.as_str(), *line), ("r.txt", Some(1)));
        assert!(reason.contains("100000 steps"), "{reason}");
    }

    #[test]
    fn renders_past_the_size_bound_fail() {
        let src = "{% for a in customer.items %}{{ customer.blob }}{% endfor %}";
        let f = heavy(3, 100_000);
        let err = render("r.txt", src, &scope(&f, "2024-03-11T02:00:00Z", Shanghai))
            .expect_err("300,000 bytes is over the bound");
        assert!(
            err.to_string().contains("larger than 262144 bytes"),
            "{err}"
        );
        let f = heavy(2, 100_000);
        let out = render("r.txt", src, &scope(&f, "2024-03-11T02:00:00Z", Shanghai));
        assert_eq!(out.expect("200,000 bytes renders").len(), 200_000);
        // Inline templates (a `call` body) have the same bound.
        let body = json!({"a": "{% for a in customer.items %}{{ customer.blob }}{% endfor %}"});
        let f = heavy(3, 100_000);
        let err = render_value(&body, &scope(&f, "2024-03-11T02:00:00Z", Shanghai))
            .expect_err("over the bound");
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    fn file(name: &str, source: &str, includes: &[(&str, &str)]) -> TemplateFile {
        TemplateFile {
            file: name.to_owned(),
            source: std::sync::Arc::new(source.to_owned()),
            includes: std::sync::Arc::new(
                includes
                    .iter()
                    .map(|(n, s)| ((*n).to_owned(), std::sync::Arc::new((*s).to_owned())))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_file_renders_only_the_includes_it_was_validated_with() {
        let f = fixture();
        let s = scope(&f, "2024-03-11T02:00:00Z", Shanghai);
        let hello = file(
            "hello.txt",
            "Hi {{ customer.first_name }}.{% include 'partials/footer.txt' %}",
            &[("partials/footer.txt", " Bye {{ flow.name }}")],
        );
        assert_eq!(
            render_file(&hello, &s).expect("renders"),
            "Hi Lin. Bye Birthday ritual"
        );
        // Another version of the footer: the cache keeps the two apart.
        let v2 = file(
            "hello.txt",
            "Hi {{ customer.first_name }}.{% include 'partials/footer.txt' %}",
            &[("partials/footer.txt", " Ciao")],
        );
        assert_eq!(render_file(&v2, &s).expect("renders"), "Hi Lin. Ciao");
        assert_eq!(
            render_file(&hello, &s).expect("renders"),
            "Hi Lin. Bye Birthday ritual"
        );
        // A file not validated with this one, and a name outside the folder, are refused
        // (the rendering thread's earlier includes do not leak into this render).
        for (src, why) in [
            (
                "{% include 'partials/footer.txt' %}",
                "not a template file this flow version",
            ),
            (
                "{% include '../secret.txt' %}",
                "outside the templates folder",
            ),
            (
                "{% include '/etc/passwd' %}",
                "outside the templates folder",
            ),
        ] {
            let err = render_file(&file("x.txt", src, &[]), &s).expect_err(src);
            assert!(err.to_string().contains(why), "{src}: {err}");
        }
        // Inline templates never include.
        let err = render("inline", "{% include 'partials/footer.txt' %}", &s).expect_err("refused");
        assert!(err.to_string().contains("not a template file"), "{err}");
    }
}
