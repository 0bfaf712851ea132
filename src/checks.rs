//! What `canvas validate` checks beyond the flow files: the daemon's sections of
//! `canvas.yaml`, and the flows against the channels it configures, so that a folder that
//! validates is one `canvas serve` starts on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use canvas_channels::ChannelsConfig;
use canvas_engine::CompiledFlow;
use canvas_engine::diagnostic::{Code, Diagnostic, quote_list};
use canvas_engine::flow::StepKind;
use canvas_engine::policy::Policy;
use canvas_engine::registry::Registry;
use canvas_engine::template::{static_text, templates_root_for};

/// The daemon's sections of `canvas.yaml` (`server:`, `channels:`), checked without the
/// environment: a typo in a channel should fail CI, not the deploy. The `channels:` section
/// comes back when it decoded, for the checks against the flows.
fn daemon_sections(policy: &Policy, file: &Path) -> (Vec<Diagnostic>, Option<ChannelsConfig>) {
    let mut out = Vec::new();
    if let Err(e) = policy.section::<crate::serve::config::ServerSection>("server") {
        out.extend(e.diagnostics);
    }
    let channels = match policy.section::<ChannelsConfig>("channels") {
        Err(e) => {
            out.extend(e.diagnostics);
            None
        }
        Ok(Some(channels)) => {
            for e in channels.problems() {
                let span = match &e {
                    canvas_channels::ConfigError::Invalid { channel, problem } => {
                        setting_span(policy, channel, problem)
                    }
                    _ => None,
                };
                out.push(Diagnostic::new(
                    Code::WrongType,
                    file,
                    span,
                    format!("`channels:`: {e}"),
                ));
            }
            Some(channels)
        }
        Ok(None) => None,
    };
    (out, channels)
}

/// Where the setting a channel problem names is written: a problem reads "`body`: …" or
/// "`retry.max` must …"; else the channel itself.
fn setting_span(
    policy: &Policy,
    channel: &str,
    problem: &str,
) -> Option<canvas_engine::yaml::Span> {
    let named = problem
        .strip_prefix('`')
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key);
    let mut path = vec!["channels", channel];
    if let Some(key) = named {
        path.extend(key.split('.'));
        if let Some(span) = policy.section_span(&path) {
            return Some(span);
        }
    }
    policy.section_span(&["channels", channel])
}

/// `canvas.yaml` beside the validated folders (or one level up) is checked too: a typo in a
/// cap should fail CI like a typo in a flow. When it has a `channels:` section, the valid
/// flows are checked against it ([`against_channels`]).
pub fn check_policies(
    paths: &[PathBuf],
    validation: &mut canvas_engine::Validation,
    registry: &Registry,
) {
    let mut seen = std::collections::BTreeSet::new();
    for p in paths.iter().filter(|p| p.is_dir()) {
        for dir in canvas_engine::project::folders_up(p).into_iter().take(2) {
            let file = dir.join(canvas_engine::policy::FILE_NAME);
            if !file.is_file() || !seen.insert(file.clone()) {
                continue;
            }
            let mut diagnostics = match Policy::load(&file) {
                Err(e) => e.diagnostics,
                Ok(policy) => {
                    let (mut out, channels) = daemon_sections(&policy, &file);
                    if let Some(channels) = channels {
                        out.extend(against_channels(
                            &policy,
                            &channels,
                            validation.flows(),
                            registry,
                        ));
                    }
                    out
                }
            };
            diagnostics.retain(|d| !validation.diagnostics.contains(d));
            for d in &diagnostics {
                if !validation.sources.contains_key(&d.file)
                    && let Ok(text) = std::fs::read_to_string(&d.file)
                {
                    validation.sources.insert(d.file.clone(), Arc::new(text));
                }
            }
            validation.diagnostics.extend(diagnostics);
            break;
        }
    }
}

/// The flows against a `channels:` section: every channel a flow uses must be configured
/// (as `canvas serve` requires), and an SMS template's fixed text must fit `max_segments`.
pub fn against_channels<'a>(
    policy: &Policy,
    channels: &ChannelsConfig,
    flows: impl Iterator<Item = &'a CompiledFlow>,
    registry: &Registry,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let configured: Vec<&str> = channels.channels.keys().map(String::as_str).collect();
    let config_file = policy.sections_file();
    for flow in flows {
        for (_, step) in flow.steps() {
            let site = flow.sites.get(&step.id).copied();
            for channel in step.channels() {
                if channels.channels.contains_key(channel) {
                    continue;
                }
                let what = match &step.kind {
                    StepKind::Call { .. } => format!("calls webhook `{channel}`"),
                    StepKind::Task { .. } => "creates tasks, delivered on channel `task`,".into(),
                    _ => format!("sends on `{channel}`"),
                };
                let kind = registry
                    .channel(channel)
                    .map(|c| format!(" ({})", c.description))
                    .unwrap_or_default();
                out.push(
                    Diagnostic::new(
                        Code::UnconfiguredChannel,
                        &flow.source,
                        site,
                        format!(
                            "step `{}` {what} but `channels:` in {} does not configure it{kind}",
                            step.id,
                            config_file.display()
                        ),
                    )
                    .with_help(format!(
                        "add `{channel}:` with a `type` under `channels:` (configured: {}); \
                         `canvas serve` refuses to start without it — see docs/channels.md",
                        if configured.is_empty() {
                            "none".to_owned()
                        } else {
                            quote_list(&configured)
                        }
                    )),
                );
            }
            out.extend(segments(policy, channels, flow, step));
        }
    }
    out
}

/// An SMS send whose template's fixed text (outside `{{ }}` and `{% %}`, with the file's
/// trailing newline trimmed as when sending) is already more segments than allowed.
fn segments(
    policy: &Policy,
    channels: &ChannelsConfig,
    flow: &CompiledFlow,
    step: &canvas_engine::flow::Step,
) -> Vec<Diagnostic> {
    let sms = canvas_channels::SMS;
    let Some(max) = channels.channels.get(sms).and_then(|c| c.max_segments()) else {
        return Vec::new();
    };
    let StepKind::Send {
        files, template, ..
    } = &step.kind
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in files.get(sms).into_iter().flatten() {
        let Some(t) = flow.templates.get(file) else {
            continue;
        };
        let Some(text) = static_text(&t.source) else {
            continue;
        };
        let s = canvas_engine::sms::segments(text.trim_end_matches(['\n', '\r']));
        if s.segments as u64 <= u64::from(max) {
            continue;
        }
        let (single, part) = s.encoding.limits();
        let path = templates_root_for(&flow.source).join(file);
        out.push(
            Diagnostic::new(
                Code::SmsSegments,
                &path,
                Some(canvas_engine::yaml::Span::point(1, 0)),
                format!(
                    "template `{template}` is {} SMS segments before any value is filled in \
                     ({} {} characters); `channels.{sms}.max_segments` allows {max}",
                    s.segments,
                    s.units,
                    match s.encoding {
                        canvas_engine::sms::Encoding::Gsm7 => "GSM-7",
                        canvas_engine::sms::Encoding::Ucs2 => "UCS-2",
                    },
                ),
            )
            .with_related(
                policy.sections_file(),
                policy.section_span(&["channels", sms, "max_segments"]),
                "the limit is set here",
            )
            .with_related(
                &flow.source,
                flow.sites.get(&step.id).copied(),
                format!("sent by step `{}`", step.id),
            )
            .with_help(format!(
                "shorten the text: one segment holds {single} characters, each part of a \
                 longer message {part}{}",
                if s.encoding == canvas_engine::sms::Encoding::Ucs2 {
                    " (any character outside GSM-7, such as Chinese or an emoji, makes the \
                     whole message UCS-2)"
                } else {
                    ""
                }
            )),
        );
    }
    out
}
