//! serde over the spanned YAML tree.
//!
//! Every error carries the span of the innermost node it concerns. Serde's derived code stops
//! at the first error; `decode` works around that so one pass reports every problem of a file:
//! after a failed decode of a mapping it decodes each key on its own to find the other bad keys,
//! and [`Lenient`] items (the steps of a flow) decode independently of each other.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde::{Deserialize, Serialize};

use crate::yaml::{Node, Span, Style, Value};

/// What is wrong with a value, structurally.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeErrorKind {
    UnknownField {
        field: String,
        expected: &'static [&'static str],
    },
    MissingField(&'static str),
    UnknownVariant {
        variant: String,
        expected: &'static [&'static str],
    },
    InvalidType {
        found: String,
        expected: String,
    },
    Custom(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub span: Option<Span>,
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    fn at(mut self, span: Span) -> Self {
        self.span.get_or_insert(span);
        self
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DecodeErrorKind::UnknownField { field, .. } => write!(f, "unknown key `{field}`"),
            DecodeErrorKind::MissingField(field) => write!(f, "missing key `{field}`"),
            DecodeErrorKind::UnknownVariant { variant, expected } => write!(
                f,
                "unknown value `{variant}`, expected one of {}",
                crate::diagnostic::quote_list(expected)
            ),
            DecodeErrorKind::InvalidType { found, expected } => {
                write!(f, "expected {expected}, found {found}")
            }
            DecodeErrorKind::Custom(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError {
            span: None,
            kind: DecodeErrorKind::Custom(msg.to_string()),
        }
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DecodeError {
            span: None,
            kind: DecodeErrorKind::UnknownField {
                field: field.to_owned(),
                expected,
            },
        }
    }
    fn missing_field(field: &'static str) -> Self {
        DecodeError {
            span: None,
            kind: DecodeErrorKind::MissingField(field),
        }
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DecodeError {
            span: None,
            kind: DecodeErrorKind::UnknownVariant {
                variant: variant.to_owned(),
                expected,
            },
        }
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DecodeError {
            span: None,
            kind: DecodeErrorKind::InvalidType {
                found: unexpected_name(&unexp),
                expected: exp.to_string(),
            },
        }
    }
}

fn unexpected_name(u: &de::Unexpected<'_>) -> String {
    match u {
        de::Unexpected::Bool(b) => format!("the boolean `{b}`"),
        de::Unexpected::Unsigned(n) => format!("the number `{n}`"),
        de::Unexpected::Signed(n) => format!("the number `{n}`"),
        de::Unexpected::Float(n) => format!("the number `{n}`"),
        de::Unexpected::Str(s) => format!("the string `{s}`"),
        de::Unexpected::Unit => "nothing (null)".to_owned(),
        de::Unexpected::Seq => "a list".to_owned(),
        de::Unexpected::Map => "a mapping".to_owned(),
        other => other.to_string(),
    }
}

thread_local! {
    /// Errors of [`Lenient`] items met during one [`decode`] call.
    static SINK: RefCell<Vec<DecodeError>> = const { RefCell::new(Vec::new()) };
    /// The node a [`Lenient`] is being decoded from: serde's data model cannot carry it.
    static LENIENT_NODE: RefCell<Option<Node>> = const { RefCell::new(None) };
}

const SPANNED: &str = "$canvas::Spanned";
const SPANNED_FIELDS: &[&str] = &["$start", "$end", "$value"];
const LENIENT: &str = "$canvas::Lenient";

/// Decode `T` from `node`, reporting every error found (not only the first).
pub fn decode<T: DeserializeOwned>(node: &Node) -> (Option<T>, Vec<DecodeError>) {
    let outer = SINK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let value = decode_collect::<T>(node);
    let mut errors = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), outer));
    let (value, own) = value;
    errors.extend(own);
    errors.sort_by_key(|e| e.span);
    errors.dedup();
    (value, errors)
}

fn decode_collect<T: DeserializeOwned>(node: &Node) -> (Option<T>, Vec<DecodeError>) {
    match T::deserialize(NodeDe(node)) {
        Ok(v) => (Some(v), Vec::new()),
        Err(first) => {
            let Value::Map(pairs) = &node.value else {
                return (None, vec![first]);
            };
            // Decode each key alone to find every bad key; then the good keys together to
            // learn which required keys are missing.
            let mut errors = Vec::new();
            let mut good = Vec::new();
            let mut bad_keys = Vec::new();
            for pair in pairs {
                let single = Node {
                    span: node.span,
                    value: Value::Map(vec![pair.clone()]),
                };
                match T::deserialize(NodeDe(&single)) {
                    Err(e) if !matches!(e.kind, DecodeErrorKind::MissingField(_)) => {
                        errors.push(e);
                        bad_keys.extend(pair.0.as_str().map(str::to_owned));
                    }
                    _ => good.push(pair.clone()),
                }
            }
            let rest = Node {
                span: node.span,
                value: Value::Map(good),
            };
            match T::deserialize(NodeDe(&rest)) {
                // A key that is there but broken is not also missing.
                Err(DecodeError {
                    kind: DecodeErrorKind::MissingField(f),
                    ..
                }) if bad_keys.iter().any(|k| k == f) => {}
                Err(e) => errors.push(e),
                Ok(_) => {}
            }
            if errors.is_empty() {
                errors.push(first);
            }
            (None, errors)
        }
    }
}

/// A value with the span it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub span: Span,
    pub value: T,
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(g)
    }
}

fn pack(p: crate::yaml::Pos) -> u64 {
    (u64::from(p.line) << 32) | u64::from(p.col)
}

fn unpack(v: u64) -> crate::yaml::Pos {
    crate::yaml::Pos {
        line: (v >> 32) as u32,
        col: (v & 0xffff_ffff) as u32,
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Spanned<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a spanned value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Spanned<T>, A::Error> {
                let mut start = None;
                let mut end = None;
                let mut value = None;
                while let Some(key) = map.next_key::<&str>()? {
                    match key {
                        "$start" => start = Some(unpack(map.next_value()?)),
                        "$end" => end = Some(unpack(map.next_value()?)),
                        _ => value = Some(map.next_value()?),
                    }
                }
                match (start, end, value) {
                    (Some(start), Some(end), Some(value)) => Ok(Spanned {
                        span: Span { start, end },
                        value,
                    }),
                    _ => Err(de::Error::custom("spans are only known to the flow loader")),
                }
            }
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, V(PhantomData))
    }
}

/// A list item decoded on its own: when it is broken, its errors go to the report and the
/// list around it still decodes. The raw node is kept so later checks can still find, say,
/// the `id` of a broken step.
#[derive(Debug, Clone)]
pub enum Lenient<T> {
    Ok(T),
    Broken(Node),
}

impl<T: Serialize> Serialize for Lenient<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Lenient::Ok(v) => v.serialize(s),
            Lenient::Broken(_) => s.serialize_unit(),
        }
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Lenient<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(g)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: DeserializeOwned> Visitor<'_> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Lenient<T>, E> {
                let Some(node) = LENIENT_NODE.with(|n| n.borrow_mut().take()) else {
                    return Err(E::custom(
                        "lenient values are only known to the flow loader",
                    ));
                };
                let (value, errors) = decode_collect::<T>(&node);
                match value {
                    Some(v) => Ok(Lenient::Ok(v)),
                    None => {
                        SINK.with(|s| s.borrow_mut().extend(errors));
                        Ok(Lenient::Broken(node))
                    }
                }
            }
        }
        d.deserialize_struct(LENIENT, &[], V(PhantomData))
    }
}

/// The deserializer for one node.
#[derive(Clone, Copy)]
pub struct NodeDe<'a>(pub &'a Node);

impl NodeDe<'_> {
    fn scalar(&self) -> Option<(&str, Style)> {
        match &self.0.value {
            Value::Scalar { text, style } => Some((text, *style)),
            _ => None,
        }
    }

    fn invalid(&self, exp: &dyn de::Expected) -> DecodeError {
        DecodeError {
            span: Some(self.0.span),
            kind: DecodeErrorKind::InvalidType {
                found: self.0.kind_name().to_owned(),
                expected: exp.to_string(),
            },
        }
    }

    fn plain_number<T: std::str::FromStr>(&self) -> Option<T> {
        match self.scalar() {
            Some((text, Style::Plain)) => {
                let cleaned = text.replace('_', "");
                cleaned.parse::<T>().ok()
            }
            _ => None,
        }
    }
}

macro_rules! number {
    ($method:ident, $visit:ident, $ty:ty) => {
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
            match self.plain_number::<$ty>() {
                Some(n) => v.$visit(n).map_err(|e: DecodeError| e.at(self.0.span)),
                None => Err(self.invalid(&v)),
            }
        }
    };
}

impl<'de> Deserializer<'de> for NodeDe<'_> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        let span = self.0.span;
        let r = match &self.0.value {
            Value::Seq(items) => v.visit_seq(Seq {
                items: items.iter(),
            }),
            Value::Map(pairs) => v.visit_map(Map {
                pairs: pairs.iter(),
                value: None,
            }),
            Value::Scalar { .. } if self.0.is_null() => v.visit_unit(),
            Value::Scalar {
                text,
                style: Style::Plain,
            } => {
                if text == "true" {
                    v.visit_bool(true)
                } else if text == "false" {
                    v.visit_bool(false)
                } else if let Ok(n) = text.parse::<i64>() {
                    v.visit_i64(n)
                } else if let Ok(n) = text.parse::<u64>() {
                    v.visit_u64(n)
                } else if let Some(n) = parse_float(text) {
                    v.visit_f64(n)
                } else {
                    v.visit_str(text)
                }
            }
            Value::Scalar { text, .. } => v.visit_str(text),
        };
        r.map_err(|e| e.at(span))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        match self.scalar() {
            Some(("true", Style::Plain)) => v.visit_bool(true),
            Some(("false", Style::Plain)) => v.visit_bool(false),
            _ => Err(self.invalid(&"`true` or `false`")),
        }
    }

    number!(deserialize_i8, visit_i64, i64);
    number!(deserialize_i16, visit_i64, i64);
    number!(deserialize_i32, visit_i64, i64);
    number!(deserialize_i64, visit_i64, i64);
    number!(deserialize_u8, visit_u64, u64);
    number!(deserialize_u16, visit_u64, u64);
    number!(deserialize_u32, visit_u64, u64);
    number!(deserialize_u64, visit_u64, u64);

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_f64(v)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        match self.scalar() {
            Some((text, Style::Plain)) => match parse_float(text) {
                Some(n) => v.visit_f64(n).map_err(|e: DecodeError| e.at(self.0.span)),
                None => Err(self.invalid(&v)),
            },
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        // Any scalar reads as a string where a string is wanted: `template: 404` is fine.
        match self.scalar() {
            Some((text, _)) if !self.0.is_null() => v
                .visit_str(text)
                .map_err(|e: DecodeError| e.at(self.0.span)),
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        if self.0.is_null() {
            v.visit_none()
        } else {
            v.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        if self.0.is_null() {
            v.visit_unit()
        } else {
            Err(self.invalid(&v))
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DecodeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        match &self.0.value {
            Value::Seq(items) => v
                .visit_seq(Seq {
                    items: items.iter(),
                })
                .map_err(|e: DecodeError| e.at(self.0.span)),
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        v: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, DecodeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        match &self.0.value {
            Value::Map(pairs) => v
                .visit_map(Map {
                    pairs: pairs.iter(),
                    value: None,
                })
                .map_err(|e: DecodeError| e.at(self.0.span)),
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DecodeError> {
        match name {
            SPANNED => v.visit_map(SpannedAccess {
                node: self.0,
                step: 0,
            }),
            LENIENT => {
                LENIENT_NODE.with(|n| *n.borrow_mut() = Some(self.0.clone()));
                v.visit_unit()
            }
            _ => {
                let _ = fields;
                self.deserialize_map(v)
            }
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DecodeError> {
        match &self.0.value {
            Value::Scalar { text, .. } if !self.0.is_null() => v
                .visit_enum(text.as_str().into_deserializer())
                .map_err(|e: DecodeError| e.at(self.0.span)),
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DecodeError> {
        v.visit_unit()
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    // YAML numbers start with a digit, a sign or a dot; Rust's parser would also take "inf".
    let first = text.chars().next()?;
    if !(first.is_ascii_digit() || first == '-' || first == '+' || first == '.') {
        return None;
    }
    text.replace('_', "").parse::<f64>().ok()
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Node>,
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = DecodeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        match self.items.next() {
            Some(node) => seed
                .deserialize(NodeDe(node))
                .map(Some)
                .map_err(|e| e.at(node.span)),
            None => Ok(None),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map<'a> {
    pairs: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a Node>,
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = DecodeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        match self.pairs.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(NodeDe(k))
                    .map(Some)
                    .map_err(|e| e.at(k.span))
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        match self.value.take() {
            Some(node) => seed.deserialize(NodeDe(node)).map_err(|e| e.at(node.span)),
            None => Err(de::Error::custom("value asked for before its key")),
        }
    }
}

struct SpannedAccess<'a> {
    node: &'a Node,
    step: usize,
}

impl<'de> MapAccess<'de> for SpannedAccess<'_> {
    type Error = DecodeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some(key) = SPANNED_FIELDS.get(self.step) else {
            return Ok(None);
        };
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let step = self.step;
        self.step += 1;
        match step {
            0 => seed.deserialize(pack(self.node.span.start).into_deserializer()),
            1 => seed.deserialize(pack(self.node.span.end).into_deserializer()),
            _ => seed.deserialize(NodeDe(self.node)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::{Limits, parse};

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        id: Spanned<String>,
        count: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        enabled: Option<bool>,
        items: Vec<Lenient<Item>>,
    }

    fn load(src: &str) -> Node {
        parse(src, &Limits::default()).expect("yaml").root
    }

    #[test]
    fn every_bad_key_and_every_bad_item_is_reported() {
        let node = load(
            "nmae: x\nenabled: yes\nitems:\n  - id: a\n    count: many\n  - id: b\n  - cnt: 1\n",
        );
        let (doc, errors) = decode::<Doc>(&node);
        assert!(doc.is_none());
        let lines: Vec<(u32, String)> = errors
            .iter()
            .map(|e| (e.span.map_or(0, |s| s.start.line), e.to_string()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (1, "unknown key `nmae`".to_owned()),
                (1, "missing key `name`".to_owned()),
                (2, "expected `true` or `false`, found a string".to_owned()),
                (5, "expected u32, found a string".to_owned()),
                (7, "unknown key `cnt`".to_owned()),
                (7, "missing key `id`".to_owned()),
            ]
        );
    }

    #[test]
    fn spanned_values_know_their_place() {
        let node = load("name: x\nitems:\n  - id: first\n");
        let (doc, errors) = decode::<Doc>(&node);
        assert!(errors.is_empty(), "{errors:?}");
        let doc = doc.expect("decodes");
        let Lenient::Ok(item) = &doc.items[0] else {
            panic!("item decodes")
        };
        assert_eq!(item.id.value, "first");
        assert_eq!((item.id.span.start.line, item.id.span.start.col), (3, 8));
    }
}
