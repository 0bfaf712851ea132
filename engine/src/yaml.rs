//! YAML → a tree of nodes that remember where they were written.
//!
//! Built from `saphyr-parser` events rather than a ready-made loader so that every value keeps
//! its span and so that the limits below are enforced while the tree grows: a flow file is
//! operator input, and junk, deep nesting or an alias bomb must end in a clear error.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError};

/// Explicit limits on what a flow file may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted file, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of sequences and mappings.
    pub max_depth: usize,
    /// Most nodes in the tree, counting every node an alias expands to.
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1024 * 1024,
            max_depth: 64,
            max_nodes: 100_000,
        }
    }
}

/// A position in a source file: 1-based line, 0-based column counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

/// A range in a source file, start inclusive, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span {
    pub start: Pos,
    pub end: Pos,
}

impl Span {
    fn from_parser(s: saphyr_parser::Span) -> Span {
        let pos = |m: saphyr_parser::Marker| Pos {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX),
            col: u32::try_from(m.col()).unwrap_or(u32::MAX),
        };
        Span {
            start: pos(s.start),
            end: pos(s.end),
        }
    }

    pub fn point(line: u32, col: u32) -> Span {
        let p = Pos { line, col };
        Span { start: p, end: p }
    }
}

/// How a scalar was written; quoted scalars are always strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Quoted,
    Block,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar { text: String, style: Style },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub value: Value,
}

impl Node {
    /// A plain scalar that YAML's core schema reads as null (`~`, `null`, or nothing).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, style: Style::Plain } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The value of `key` when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Number of nodes in this subtree, itself included.
    fn weight(&self) -> usize {
        match &self.value {
            Value::Scalar { .. } => 1,
            Value::Seq(items) => 1 + items.iter().map(Node::weight).sum::<usize>(),
            Value::Map(pairs) => {
                1 + pairs
                    .iter()
                    .map(|(k, v)| k.weight() + v.weight())
                    .sum::<usize>()
            }
        }
    }

    /// A name for the kind of value, for "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
            Value::Scalar { .. } if self.is_null() => "nothing (null)",
            Value::Scalar {
                style: Style::Plain,
                text,
            } => {
                if text == "true" || text == "false" {
                    "a boolean"
                } else if text.parse::<f64>().is_ok() {
                    "a number"
                } else {
                    "a string"
                }
            }
            Value::Scalar { .. } => "a string",
        }
    }
}

/// Why a file could not be turned into a tree at all.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LoadError {
    #[error("YAML syntax error: {message}")]
    Syntax { message: String, at: Span },
    #[error("the file is {size} bytes; flow files are limited to {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("nesting deeper than {limit} levels")]
    TooDeep { limit: usize, at: Span },
    #[error(
        "the document expands to more than {limit} nodes (aliases count once per use); flow files are limited to that"
    )]
    TooManyNodes { limit: usize, at: Span },
    #[error(
        "the file is empty; a flow file holds one mapping with `flow:`, `trigger:` and `steps:`"
    )]
    Empty,
    #[error("the file holds more than one YAML document; put each flow in its own file")]
    MultipleDocuments { at: Span },
    #[error("alias `*{0}` refers to an anchor that is not defined before it")]
    UnknownAlias(usize, Span),
}

impl LoadError {
    pub fn span(&self) -> Option<Span> {
        match self {
            LoadError::Syntax { at, .. }
            | LoadError::TooDeep { at, .. }
            | LoadError::TooManyNodes { at, .. }
            | LoadError::MultipleDocuments { at }
            | LoadError::UnknownAlias(_, at) => Some(*at),
            LoadError::TooLarge { .. } | LoadError::Empty => None,
        }
    }
}

/// A mapping key written twice. Not fatal: the first value is kept and the rest of the file
/// is still checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DuplicateKey {
    pub key: String,
    pub first: Span,
    pub again: Span,
}

/// The parsed document and the non-fatal problems met while building it.
#[derive(Debug)]
pub struct Document {
    pub root: Node,
    pub duplicate_keys: Vec<DuplicateKey>,
}

enum Frame {
    Seq {
        span: Span,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        span: Span,
        anchor: usize,
        pairs: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

/// Parse one YAML document into a spanned tree, within `limits`.
pub fn parse(source: &str, limits: &Limits) -> Result<Document, LoadError> {
    if source.len() > limits.max_bytes {
        return Err(LoadError::TooLarge {
            size: source.len(),
            limit: limits.max_bytes,
        });
    }
    let mut parser = Parser::new_from_str(source);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0usize;
    let mut duplicate_keys = Vec::new();
    let mut documents = 0usize;

    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(syntax)?;
        let span = Span::from_parser(span);
        let finished: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(LoadError::MultipleDocuments { at: span });
                }
                None
            }
            Event::Scalar(text, style, anchor, _tag) => {
                nodes += 1;
                let style = match style {
                    ScalarStyle::Plain => Style::Plain,
                    ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => Style::Quoted,
                    _ => Style::Block,
                };
                Some((
                    Node {
                        span,
                        value: Value::Scalar {
                            text: text.into_owned(),
                            style,
                        },
                    },
                    anchor,
                ))
            }
            Event::Alias(id) => {
                let node = anchors.get(&id).ok_or(LoadError::UnknownAlias(id, span))?;
                nodes += node.weight();
                if nodes > limits.max_nodes {
                    return Err(LoadError::TooManyNodes {
                        limit: limits.max_nodes,
                        at: span,
                    });
                }
                Some((node.clone(), 0))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                nodes += 1;
                if stack.len() >= limits.max_depth {
                    return Err(LoadError::TooDeep {
                        limit: limits.max_depth,
                        at: span,
                    });
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        span,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        span,
                        anchor,
                        pairs: Vec::new(),
                        pending_key: None,
                    }
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq {
                    span: start,
                    anchor,
                    items,
                }) => Some((
                    Node {
                        span: Span {
                            start: start.start,
                            end: span.end,
                        },
                        value: Value::Seq(items),
                    },
                    anchor,
                )),
                Some(Frame::Map {
                    span: start,
                    anchor,
                    pairs,
                    ..
                }) => Some((
                    Node {
                        span: Span {
                            start: start.start,
                            end: span.end,
                        },
                        value: Value::Map(pairs),
                    },
                    anchor,
                )),
                None => None,
            },
        };
        if nodes > limits.max_nodes {
            return Err(LoadError::TooManyNodes {
                limit: limits.max_nodes,
                at: span,
            });
        }
        let Some((node, anchor)) = finished else {
            continue;
        };
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                pairs, pending_key, ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    let text = key.as_str().map(str::to_owned);
                    let first = text.as_deref().and_then(|t| {
                        pairs
                            .iter()
                            .find(|(k, _)| k.as_str() == Some(t))
                            .map(|(k, _)| k.span)
                    });
                    match (text, first) {
                        (Some(key_text), Some(first)) => duplicate_keys.push(DuplicateKey {
                            key: key_text,
                            first,
                            again: key.span,
                        }),
                        _ => pairs.push((key, node)),
                    }
                }
            },
        }
    }
    match root {
        Some(root) if !root.is_null() => Ok(Document {
            root,
            duplicate_keys,
        }),
        _ => Err(LoadError::Empty),
    }
}

fn syntax(e: ScanError) -> LoadError {
    let m = e.marker();
    LoadError::Syntax {
        message: e.info().to_owned(),
        at: Span::point(
            u32::try_from(m.line()).unwrap_or(u32::MAX),
            u32::try_from(m.col()).unwrap_or(u32::MAX),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_values() {
        let doc = parse("flow: x\nsteps:\n  - id: a\n", &Limits::default()).expect("parses");
        let steps = doc.root.get("steps").expect("steps");
        let Value::Seq(items) = &steps.value else {
            panic!("steps is a list")
        };
        let id = items[0].get("id").expect("id");
        assert_eq!(id.span.start, Pos { line: 3, col: 8 });
    }

    #[test]
    fn duplicate_keys_are_reported_and_first_kept() {
        let doc = parse("a: 1\nb: 2\na: 3\n", &Limits::default()).expect("parses");
        assert_eq!(doc.duplicate_keys.len(), 1);
        assert_eq!(doc.duplicate_keys[0].first.start.line, 1);
        assert_eq!(doc.duplicate_keys[0].again.start.line, 3);
        assert_eq!(doc.root.get("a").and_then(Node::as_str), Some("1"));
    }

    #[test]
    fn alias_bomb_hits_the_node_limit() {
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            src.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&src, &Limits::default()).expect_err("must refuse");
        assert!(matches!(err, LoadError::TooManyNodes { .. }), "{err:?}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let src = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let err = parse(&src, &Limits::default()).expect_err("must refuse");
        assert!(
            matches!(err, LoadError::TooDeep { limit: 64, .. }),
            "{err:?}"
        );
        // Far deeper, the parser's own recursion guard answers first: still an error.
        let src = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&src, &Limits::default()).is_err());
    }
}
