//! Pictures of a compiled flow: Mermaid (renders in pull requests) and Graphviz DOT.

use std::fmt::Write as _;

use petgraph::graph::NodeIndex;

use crate::flow::{CompiledFlow, Entry, SplitArm, StepKind, Target, Trigger, Wait};

/// A box in the picture.
struct Box_ {
    id: String,
    label: String,
    shape: Shape,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Start,
    Step,
    Decision,
    End,
}

struct Arrow {
    from: String,
    to: String,
    label: String,
}

struct Picture {
    boxes: Vec<Box_>,
    arrows: Vec<Arrow>,
}

fn node_id(i: NodeIndex) -> String {
    format!("s{}", i.index())
}

fn picture(flow: &CompiledFlow) -> Picture {
    let mut boxes = Vec::new();
    let mut arrows = Vec::new();
    let mut ends: Vec<String> = Vec::new();
    let mut end = |outcome: &str, boxes: &mut Vec<Box_>| -> String {
        let id = format!(
            "end_{}",
            outcome.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        if !ends.contains(&id) {
            ends.push(id.clone());
            boxes.push(Box_ {
                id: id.clone(),
                label: outcome.to_owned(),
                shape: Shape::End,
            });
        }
        id
    };
    let trigger = match &flow.trigger {
        Trigger::Event { name, condition } => match condition {
            Some(c) => format!("event {name}\nwhere {}", c.source()),
            None => format!("event {name}"),
        },
        Trigger::Schedule { cron, audience } => match audience {
            Some(a) => format!("schedule {}\naudience {}", cron.source, a.source()),
            None => format!("schedule {}", cron.source),
        },
        Trigger::Segment { condition, recheck } => {
            format!("segment {}\nrecheck {recheck}", condition.source())
        }
    };
    let entry = match flow.entry {
        Entry::OneActive => String::new(),
        Entry::Once => "\nonce per customer".to_owned(),
        Entry::ReenterAfter(d) => format!("\nre-enter after {d}"),
    };
    boxes.push(Box_ {
        id: "trigger".to_owned(),
        label: format!("{}\n{trigger}{entry}", flow.name),
        shape: Shape::Start,
    });
    arrows.push(Arrow {
        from: "trigger".to_owned(),
        to: node_id(flow.start),
        label: String::new(),
    });
    for (i, step) in flow.steps() {
        let from = node_id(i);
        let mut to = |target: Target, label: String, outcome: &str, boxes: &mut Vec<Box_>| {
            let dest = match target {
                Some(t) => node_id(t),
                None => end(outcome, boxes),
            };
            arrows.push(Arrow {
                from: from.clone(),
                to: dest,
                label,
            });
        };
        let (what, shape) = match &step.kind {
            StepKind::Send {
                channels,
                template,
                next,
                ..
            } => {
                to(*next, String::new(), "completed", &mut boxes);
                (
                    format!("send {} · {template}", channels.join(" → ")),
                    Shape::Step,
                )
            }
            StepKind::Wait { wait, next } => {
                let what = match wait {
                    Wait::For(d) => format!("wait {d}"),
                    Wait::Until(e) => format!("wait until {}", e.source()),
                    Wait::Event {
                        name,
                        condition,
                        timeout,
                        on_timeout,
                    } => {
                        to(
                            *on_timeout,
                            format!("timeout {timeout}"),
                            "timeout",
                            &mut boxes,
                        );
                        match condition {
                            Some(c) => format!("wait for {name}\nwhere {}", c.source()),
                            None => format!("wait for {name}"),
                        }
                    }
                    Wait::Window { days, between } => {
                        let days = if days.is_empty() {
                            "every day".to_owned()
                        } else {
                            days.iter()
                                .map(|d| format!("{d:?}").to_lowercase())
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        match between {
                            Some((a, z)) => format!("window {days} {a}-{z}"),
                            None => format!("window {days}"),
                        }
                    }
                };
                let label = if matches!(wait, Wait::Event { .. }) {
                    "event"
                } else {
                    ""
                };
                to(*next, label.to_owned(), "completed", &mut boxes);
                (what, Shape::Step)
            }
            StepKind::Branch { arms, otherwise } => {
                for (cond, t) in arms {
                    to(Some(*t), cond.source().to_owned(), "", &mut boxes);
                }
                to(Some(*otherwise), "else".to_owned(), "", &mut boxes);
                ("branch".to_owned(), Shape::Decision)
            }
            StepKind::Split { arms } => {
                for (arm, share) in arms {
                    match arm {
                        SplitArm::Step(t) => to(Some(*t), format!("{share}%"), "", &mut boxes),
                        SplitArm::Control => to(None, format!("{share}%"), "control", &mut boxes),
                    }
                }
                ("split".to_owned(), Shape::Decision)
            }
            StepKind::Update {
                set,
                add,
                tag,
                untag,
                next,
            } => {
                to(*next, String::new(), "completed", &mut boxes);
                let mut parts: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
                parts.extend(add.iter().map(|(k, v)| format!("{k}+={v}")));
                parts.extend(tag.iter().map(|t| format!("+#{t}")));
                parts.extend(untag.iter().map(|t| format!("-#{t}")));
                (format!("update {}", parts.join(" ")), Shape::Step)
            }
            StepKind::Call {
                webhook,
                save_as,
                timeout,
                on_error,
                next,
                ..
            } => {
                to(*next, String::new(), "completed", &mut boxes);
                to(*on_error, "error".to_owned(), "error", &mut boxes);
                let within = timeout.map_or(String::new(), |t| format!("\nwithin {t}"));
                (
                    format!("call {webhook} → vars.{save_as}{within}"),
                    Shape::Step,
                )
            }
            StepKind::Task { due, next, .. } => {
                to(*next, String::new(), "completed", &mut boxes);
                (format!("task, due {due}"), Shape::Step)
            }
            StepKind::Exit { outcome } => (format!("exit {outcome}"), Shape::End),
            StepKind::Plugin {
                kind,
                outputs,
                next,
                ..
            } => {
                to(*next, String::new(), "completed", &mut boxes);
                for (name, t) in outputs {
                    to(*t, name.clone(), name, &mut boxes);
                }
                (format!("use {kind}"), Shape::Step)
            }
        };
        let title = step.name.as_deref().unwrap_or(&step.id);
        boxes.push(Box_ {
            id: from.clone(),
            label: format!("{title}\n{what}"),
            shape,
        });
    }
    Picture { boxes, arrows }
}

/// A Mermaid flowchart.
pub fn mermaid(flow: &CompiledFlow) -> String {
    let p = picture(flow);
    let esc = |s: &str| s.replace('"', "#quot;").replace('\n', "<br/>");
    let mut out = String::from("flowchart TD\n");
    for b in &p.boxes {
        let label = esc(&b.label);
        let _ = match b.shape {
            Shape::Start => writeln!(out, "    {}([\"{label}\"])", b.id),
            Shape::Step => writeln!(out, "    {}[\"{label}\"]", b.id),
            Shape::Decision => writeln!(out, "    {}{{\"{label}\"}}", b.id),
            Shape::End => writeln!(out, "    {}((\"{label}\"))", b.id),
        };
    }
    for a in &p.arrows {
        let _ = if a.label.is_empty() {
            writeln!(out, "    {} --> {}", a.from, a.to)
        } else {
            writeln!(out, "    {} -->|\"{}\"| {}", a.from, esc(&a.label), a.to)
        };
    }
    out
}

/// A Graphviz digraph.
pub fn dot(flow: &CompiledFlow) -> String {
    let p = picture(flow);
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut out = format!(
        "digraph \"{}\" {{\n    rankdir=TB;\n    node [fontname=\"Helvetica\"];\n",
        esc(&flow.id)
    );
    for b in &p.boxes {
        let shape = match b.shape {
            Shape::Start => "shape=oval, style=bold",
            Shape::Step => "shape=box, style=rounded",
            Shape::Decision => "shape=diamond",
            Shape::End => "shape=doublecircle",
        };
        let _ = writeln!(out, "    {} [label=\"{}\", {shape}];", b.id, esc(&b.label));
    }
    for a in &p.arrows {
        let _ = if a.label.is_empty() {
            writeln!(out, "    {} -> {};", a.from, a.to)
        } else {
            writeln!(
                out,
                "    {} -> {} [label=\"{}\"];",
                a.from,
                a.to,
                esc(&a.label)
            )
        };
    }
    out.push_str("}\n");
    out
}
