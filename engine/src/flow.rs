//! The compiled flow: ids resolved to graph nodes, durations, cron, expressions and templates
//! parsed. Nothing downstream of the compiler reads raw strings. Immutable once built.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::duration::{Duration, TimeOfDay};
use crate::expr::Expr;
use crate::model::{Priority, Weekday};
use crate::template::TemplateFile;
use crate::yaml::Span;

/// The content hash of a compiled flow; it is the flow's version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct FlowHash(pub String);

impl FlowHash {
    /// The first 12 hex digits, enough to tell versions apart in logs.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for FlowHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct CompiledFlow {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub timezone: chrono_tz::Tz,
    /// Who goes first when flows compete for a customer's capped moment: higher first, then
    /// the flow id (see [`CompiledFlow::precedence`]).
    pub priority: i16,
    pub trigger: Trigger,
    pub entry: Entry,
    pub exits: Vec<ExitRule>,
    pub goal: Option<Goal>,
    /// Steps as nodes; edges mirror the targets held in each step, labelled for display.
    pub graph: DiGraph<Step, Edge>,
    /// The first step of the list, where every run starts.
    pub start: NodeIndex,
    /// Template files the flow's sends use, by path under `templates/`.
    pub templates: BTreeMap<String, TemplateFile>,
    pub hash: FlowHash,
    pub source: PathBuf,
    /// Step id → where the step says what it uses: the `send:` channels, the `call`'s
    /// `webhook:`, the `task:` (else the `id:`). Checks made after compiling, such as the
    /// daemon's channels, point there.
    pub sites: BTreeMap<String, Span>,
}

/// The range of a flow's `priority`.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;

impl CompiledFlow {
    /// The order in which flows are decided when several want one customer at one moment:
    /// sort by this key — higher `priority` first, then the flow id.
    pub fn precedence(&self) -> (std::cmp::Reverse<i16>, &str) {
        (std::cmp::Reverse(self.priority), self.id.as_str())
    }

    pub fn step(&self, id: &str) -> Option<NodeIndex> {
        self.graph.node_indices().find(|&i| self.graph[i].id == id)
    }

    /// Steps in the order they were written.
    pub fn steps(&self) -> impl Iterator<Item = (NodeIndex, &Step)> {
        self.graph.node_indices().map(|i| (i, &self.graph[i]))
    }
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Event {
        name: String,
        condition: Option<Expr>,
    },
    Schedule {
        cron: Box<Schedule>,
        audience: Option<Expr>,
    },
    Segment {
        condition: Expr,
        recheck: Duration,
    },
}

/// A parsed cron schedule with the text it came from.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub source: String,
    pub cron: croner::Cron,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// At most one active run per customer (the default).
    OneActive,
    /// Once per customer, ever.
    Once,
    /// Again this long after the previous entry.
    ReenterAfter(Duration),
}

#[derive(Debug, Clone)]
pub enum ExitRule {
    Event {
        name: String,
        condition: Option<Expr>,
    },
    When(Expr),
}

#[derive(Debug, Clone)]
pub struct Goal {
    pub event: String,
    pub condition: Option<Expr>,
    pub within: Duration,
    pub exit: bool,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub id: String,
    pub name: Option<String>,
    pub kind: StepKind,
}

/// The channel `task` steps deliver through.
pub const TASK_CHANNEL: &str = "task";

impl Step {
    /// The channels this step may deliver through, as `canvas.yaml` must name them: its
    /// `send` channels, its `call`'s webhook, [`TASK_CHANNEL`] for a task.
    pub fn channels(&self) -> Vec<&str> {
        match &self.kind {
            StepKind::Send { channels, .. } => channels.iter().map(String::as_str).collect(),
            StepKind::Call { webhook, .. } => vec![webhook.as_str()],
            StepKind::Task { .. } => vec![TASK_CHANNEL],
            _ => Vec::new(),
        }
    }
}

/// Where a run goes: a step, or the end of the run (`completed`).
pub type Target = Option<NodeIndex>;

#[derive(Debug, Clone)]
pub enum StepKind {
    Send {
        /// Fallback order: the first channel the customer can receive on.
        channels: Vec<String>,
        template: String,
        /// Channel → template files under `templates/` (an email may have html and text).
        files: BTreeMap<String, Vec<String>>,
        priority: Priority,
        /// When the next channel of the list is tried.
        fallback: Fallback,
        next: Target,
    },
    Wait {
        wait: Wait,
        next: Target,
    },
    Branch {
        arms: Vec<(Expr, NodeIndex)>,
        otherwise: NodeIndex,
    },
    Split {
        arms: Vec<(SplitArm, f64)>,
    },
    Update {
        set: Vec<(String, serde_json::Value)>,
        add: Vec<(String, f64)>,
        tag: Vec<String>,
        untag: Vec<String>,
        next: Target,
    },
    Call {
        webhook: String,
        body: Option<serde_json::Value>,
        save_as: String,
        /// The longest the run waits for an answer, retries included; `None`: as long as
        /// the webhook's retry policy takes.
        timeout: Option<Duration>,
        /// Where a run goes when the call fails for good or times out; `None` ends it with
        /// outcome `error`.
        on_error: Option<NodeIndex>,
        next: Target,
    },
    Task {
        assign: Expr,
        text: String,
        due: Duration,
        next: Target,
    },
    Exit {
        outcome: String,
    },
    Plugin {
        kind: String,
        with: serde_json::Value,
        /// Named outputs of the kind; an unmapped output ends the run.
        outputs: Vec<(String, Target)>,
        next: Target,
    },
}

/// When a `send` to a channel list moves on to the next channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// When the customer has no address on a channel, and when the delivery on a channel
    /// fails for good (a permanent error, or out of attempts). The default.
    #[default]
    Failure,
    /// Only when the customer has no address on a channel (`fallback: address`).
    Address,
}

#[derive(Debug, Clone)]
pub enum Wait {
    For(Duration),
    Until(Expr),
    Event {
        name: String,
        condition: Option<Expr>,
        timeout: Duration,
        /// Where a run goes when the timeout passes; `None` ends it with outcome `timeout`.
        on_timeout: Target,
    },
    Window {
        days: Vec<Weekday>,
        between: Option<(TimeOfDay, TimeOfDay)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitArm {
    Step(NodeIndex),
    /// The holdout: the run ends as `control` and is tracked for lift.
    Control,
}

/// An edge label, for graphs and reachability.
#[derive(Debug, Clone, PartialEq)]
pub enum Edge {
    Next,
    When(String),
    Else,
    Share(f64),
    Timeout(Duration),
    /// A call's `on_error`.
    Error,
    Output(String),
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edge::Next => Ok(()),
            Edge::When(c) => f.write_str(c),
            Edge::Else => f.write_str("else"),
            Edge::Share(p) => write!(f, "{p}%"),
            Edge::Timeout(d) => write!(f, "timeout {d}"),
            Edge::Error => f.write_str("error"),
            Edge::Output(o) => f.write_str(o),
        }
    }
}
