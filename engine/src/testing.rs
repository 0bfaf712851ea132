//! Flow tests: a `*.test.yaml` file is a scenario (see [`crate::scenario`]) plus `expect:`,
//! what each customer must have received and where their run must be when time runs out.
//! A failure reads like a good test diff: what was expected, what happened instead, and
//! where the run is now.

use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, Offset};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::de::Spanned;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::runtime::Stats;
use crate::scenario::{self, FileError, Scenario, ScenarioError};
use crate::state::{HistoryEntry, OutboxKind, OutboxRow, Run, RunStatus, Time};
use crate::store::Store;
use crate::yaml::Span;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExpect {
    pub customer: Spanned<String>,
    /// Every message the flow sent the customer, in order; `[]` means none.
    #[serde(default)]
    pub sent: Option<Spanned<Vec<Spanned<RawSent>>>>,
    /// Every task the flow created about the customer, in order.
    #[serde(default)]
    pub tasks: Option<Spanned<Vec<Spanned<RawTask>>>>,
    #[serde(default)]
    pub goal_reached: Option<Spanned<bool>>,
    /// How the customer's last run ended.
    #[serde(default)]
    pub outcome: Option<Spanned<String>>,
    /// The step the customer's last run waits at when time runs out.
    #[serde(default)]
    pub waiting_at: Option<Spanned<String>>,
    /// How many times the customer entered the flow.
    #[serde(default)]
    pub entries: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSent {
    pub at: Spanned<String>,
    pub channel: Spanned<String>,
    pub template: Spanned<String>,
    /// Text the rendered message must contain (subject, text or html).
    #[serde(default)]
    pub contains: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTask {
    pub at: Spanned<String>,
    #[serde(default)]
    pub assign: Option<Spanned<String>>,
}

/// One unmet expectation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    pub customer: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// The result of one test file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub file: PathBuf,
    pub flow: String,
    pub customers: usize,
    pub expectations: usize,
    pub failures: Vec<Failure>,
    pub transitions: u64,
    pub messages: u64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Is this a flow test file by its name?
pub fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

/// Test files under `paths` (files as given, folders searched), sorted.
pub fn discover(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", p.display()),
            ));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_test_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The engine policy for files in `dir`: `canvas.yaml` there or in the folder above.
pub fn policy_for(dir: &Path) -> Result<Policy, ScenarioError> {
    for d in crate::project::folders_up(dir).iter().take(2) {
        let candidate = d.join("canvas.yaml");
        if candidate.is_file() {
            return Policy::load(&candidate).map_err(|e| {
                ScenarioError::File(vec![FileError {
                    file: candidate.clone(),
                    span: Span::default(),
                    message: e.to_string(),
                }])
            });
        }
    }
    Ok(Policy::default())
}

/// Run one test file: load the flows beside it, play the scenario, check the expectations.
pub async fn run_file(path: &Path, registry: &Registry) -> Result<Report, ScenarioError> {
    let scenario = scenario::load(path, None)?;
    let dir = crate::project::folder_of(path);
    let validation =
        crate::project::validate_paths(std::slice::from_ref(&dir), registry).map_err(|e| {
            ScenarioError::File(vec![FileError {
                file: path.to_owned(),
                span: scenario.flow.span,
                message: e.to_string(),
            }])
        })?;
    explain_missing_flows(&scenario, &dir, &validation)?;
    let flows: Vec<_> = validation.flows().collect();
    let policy = policy_for(&dir)?;
    let zone = policy.timezone;
    let outcome = scenario::run(&scenario, &flows, policy, registry.clone()).await?;
    check_in(
        &scenario,
        &outcome.runtime.store,
        &outcome.stats,
        Some(zone),
    )
    .await
}

/// The flows a test names (`flow:` and `also:`) that are not among the valid flows beside it,
/// each with why: the file that has the id does not validate (and its first errors), or no
/// file has it (and which flows were found).
fn explain_missing_flows(
    scenario: &Scenario,
    dir: &Path,
    validation: &crate::project::Validation,
) -> Result<(), ScenarioError> {
    let mut errors = Vec::new();
    for want in std::iter::once(&scenario.flow).chain(&scenario.also) {
        let id = want.value.as_str();
        if validation.flows().any(|f| f.id == id) {
            continue;
        }
        let message = match validation
            .files
            .iter()
            .find(|f| f.flow_id.as_deref() == Some(id))
        {
            Some(file) => {
                let first: Vec<String> = validation
                    .diagnostics
                    .iter()
                    .filter(|d| d.file == file.path)
                    .take(3)
                    .map(|d| d.headline())
                    .collect();
                let more = file.errors.saturating_sub(first.len());
                format!(
                    "flow `{id}` ({}) does not validate: {}{}; run `canvas validate {}`",
                    file.path.display(),
                    first.join("; "),
                    if more > 0 {
                        format!(" (and {more} more)")
                    } else {
                        String::new()
                    },
                    file.path.display()
                )
            }
            None => {
                let found: Vec<&str> = validation
                    .files
                    .iter()
                    .filter_map(|f| f.flow_id.as_deref())
                    .collect();
                let unreadable: Vec<String> = validation
                    .files
                    .iter()
                    .filter(|f| f.flow_id.is_none())
                    .map(|f| f.path.display().to_string())
                    .collect();
                let hint = crate::diagnostic::did_you_mean(id, found.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                let mut message = format!(
                    "no flow `{id}` in {} (searched recursively): found {}{hint}",
                    dir.display(),
                    if found.is_empty() {
                        "none".to_owned()
                    } else {
                        found
                            .iter()
                            .map(|f| format!("`{f}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                );
                if !unreadable.is_empty() {
                    message.push_str(&format!(
                        "; these files have no readable flow id: {}",
                        unreadable.join(", ")
                    ));
                }
                message
            }
        };
        errors.push(FileError {
            file: scenario.file.clone(),
            span: want.span,
            message,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ScenarioError::File(errors))
    }
}

/// Check a played scenario's expectations against its store; times in messages are shown
/// in each customer's zone when they have one, else at the offset the test file writes.
pub async fn check<S: Store>(
    sc: &Scenario,
    store: &S,
    stats: &Stats,
) -> Result<Report, ScenarioError> {
    check_in(sc, store, stats, None).await
}

/// [`check`], showing the times of a customer without a zone of their own in `default_zone`
/// (`canvas.yaml`'s `timezone`): a failure message prints only local times that existed,
/// with the offset they had, never a reading from a daylight-saving gap.
pub async fn check_in<S: Store>(
    sc: &Scenario,
    store: &S,
    stats: &Stats,
    default_zone: Option<Tz>,
) -> Result<Report, ScenarioError> {
    let flow = sc.flow.value.as_str();
    let mut failures = Vec::new();
    let mut expectations = 0;
    let conversions = store.conversions(Some(flow)).await?;
    for x in &sc.expect {
        let customer = x.customer.value.as_str();
        let own_zone = store
            .load(&[customer.to_owned()], sc.until)
            .await?
            .first()
            .and_then(|c| {
                c.customer
                    .zone()
                    .and_then(|z| crate::state::parse_zone(z).ok())
            });
        let zone = own_zone.or(default_zone);
        let near = |offset: FixedOffset| match zone {
            Some(tz) => ShowIn::Near(offset, tz),
            None => ShowIn::Offset(offset),
        };
        let offset = near(
            sc.offsets
                .get(customer)
                .copied()
                .unwrap_or(sc.default_offset),
        );
        let outbox: Vec<OutboxRow> = store
            .outbox(Some(customer))
            .await?
            .into_iter()
            .filter(|o| o.flow == flow)
            .collect();
        let history: Vec<HistoryEntry> = store
            .history(Some(customer))
            .await?
            .into_iter()
            .filter(|h| h.flow == flow)
            .collect();
        let runs: Vec<Run> = store
            .runs(customer)
            .await?
            .into_iter()
            .filter(|r| r.flow == flow)
            .collect();
        let last = runs.last();
        let mut fail = |span: Span, message: String| {
            failures.push(Failure {
                customer: customer.to_owned(),
                line: span.start.line,
                column: span.start.col + 1,
                message,
            });
        };
        if let Some(sent) = &x.sent {
            expectations += 1;
            let actual: Vec<&OutboxRow> = outbox
                .iter()
                .filter(|o| o.kind == OutboxKind::Message)
                .collect();
            for (i, want) in sent.value.iter().enumerate() {
                let at = match scenario::parse_time(&want.at.value) {
                    Ok(t) => t,
                    Err(e) => {
                        fail(want.at.span, e);
                        continue;
                    }
                };
                let expected = format!(
                    "{} {} at {}",
                    want.channel.value,
                    want.template.value,
                    show(at.to_utc(), near(*at.offset()))
                );
                match actual.get(i) {
                    None => {
                        let why = skipped_note(&history, &want.template.value, near(*at.offset()));
                        fail(
                            want.span,
                            format!(
                                "{customer}: expected {expected}; nothing was sent{why}; {}",
                                where_is(last, near(*at.offset()))
                            ),
                        );
                        break;
                    }
                    Some(got) => {
                        let same_time = minute(got.created_at) == minute(at.to_utc());
                        let same = got.channel == want.channel.value
                            && got.template.as_deref() == Some(want.template.value.as_str())
                            && same_time;
                        if same {
                            if let Some(text) = &want.contains {
                                let body = ["subject", "text", "html"]
                                    .iter()
                                    .filter_map(|k| got.payload.get(*k).and_then(|v| v.as_str()))
                                    .collect::<Vec<_>>()
                                    .join("\n");
                                if !body.contains(text.value.as_str()) {
                                    fail(
                                        text.span,
                                        format!(
                                            "{customer}: {expected} does not contain `{}`; it reads: {}",
                                            text.value,
                                            body.trim()
                                        ),
                                    );
                                }
                            }
                        } else {
                            fail(
                                want.span,
                                format!(
                                    "{customer}: expected {expected}; sent {} {} at {} instead (step `{}`)",
                                    got.channel,
                                    got.template.as_deref().unwrap_or("-"),
                                    show(got.created_at, near(*at.offset())),
                                    got.step
                                ),
                            );
                            break;
                        }
                    }
                }
            }
            if actual.len() > sent.value.len() {
                let extra: Vec<String> = actual[sent.value.len()..]
                    .iter()
                    .map(|o| {
                        format!(
                            "{} {} at {} (step `{}`)",
                            o.channel,
                            o.template.as_deref().unwrap_or("-"),
                            show(o.created_at, offset),
                            o.step
                        )
                    })
                    .collect();
                fail(
                    sent.span,
                    format!(
                        "{customer}: {} more sent than expected: {}",
                        extra.len(),
                        extra.join("; ")
                    ),
                );
            }
        }
        if let Some(tasks) = &x.tasks {
            expectations += 1;
            let actual: Vec<&OutboxRow> = outbox
                .iter()
                .filter(|o| o.kind == OutboxKind::Task)
                .collect();
            for (i, want) in tasks.value.iter().enumerate() {
                let Ok(at) = scenario::parse_time(&want.at.value) else {
                    fail(want.at.span, format!("`{}` is not a time", want.at.value));
                    continue;
                };
                match actual.get(i) {
                    None => {
                        fail(
                            want.span,
                            format!(
                                "{customer}: expected a task at {}; none was created; {}",
                                show(at.to_utc(), near(*at.offset())),
                                where_is(last, near(*at.offset()))
                            ),
                        );
                        break;
                    }
                    Some(got) => {
                        let assign_ok = want
                            .assign
                            .as_ref()
                            .is_none_or(|a| got.address.as_deref() == Some(a.value.as_str()));
                        if minute(got.created_at) != minute(at.to_utc()) || !assign_ok {
                            fail(
                                want.span,
                                format!(
                                    "{customer}: expected a task at {}{}; got one at {} for {}",
                                    show(at.to_utc(), near(*at.offset())),
                                    want.assign
                                        .as_ref()
                                        .map(|a| format!(" for {}", a.value))
                                        .unwrap_or_default(),
                                    show(got.created_at, near(*at.offset())),
                                    got.address.as_deref().unwrap_or("nobody")
                                ),
                            );
                            break;
                        }
                    }
                }
            }
            if actual.len() > tasks.value.len() {
                fail(
                    tasks.span,
                    format!(
                        "{customer}: {} more task(s) than expected",
                        actual.len() - tasks.value.len()
                    ),
                );
            }
        }
        if let Some(goal) = &x.goal_reached {
            expectations += 1;
            let reached = conversions.iter().find(|c| c.customer_id == customer);
            match (goal.value, reached) {
                (true, None) => fail(
                    goal.span,
                    format!(
                        "{customer}: expected the goal to be reached; it was not; {}",
                        where_is(last, offset)
                    ),
                ),
                (false, Some(c)) => fail(
                    goal.span,
                    format!(
                        "{customer}: expected no goal; it was reached at {} (event `{}`)",
                        show(c.at, offset),
                        c.event_id
                    ),
                ),
                _ => {}
            }
        }
        if let Some(outcome) = &x.outcome {
            expectations += 1;
            match last {
                Some(r)
                    if r.status == RunStatus::Ended
                        && r.outcome.as_deref() == Some(outcome.value.as_str()) => {}
                _ => fail(
                    outcome.span,
                    format!(
                        "{customer}: expected the run to end `{}`; {}",
                        outcome.value,
                        where_is(last, offset)
                    ),
                ),
            }
        }
        if let Some(step) = &x.waiting_at {
            expectations += 1;
            match last {
                Some(r)
                    if r.status == RunStatus::Waiting
                        && r.step.as_deref() == Some(step.value.as_str()) => {}
                _ => fail(
                    step.span,
                    format!(
                        "{customer}: expected the run to wait at `{}`; {}",
                        step.value,
                        where_is(last, offset)
                    ),
                ),
            }
        }
        if let Some(n) = &x.entries {
            expectations += 1;
            if runs.len() != n.value as usize {
                fail(
                    n.span,
                    format!(
                        "{customer}: expected {} entr{} into `{flow}`; found {}",
                        n.value,
                        if n.value == 1 { "y" } else { "ies" },
                        runs.len()
                    ),
                );
            }
        }
    }
    Ok(Report {
        file: sc.file.clone(),
        flow: flow.to_owned(),
        customers: sc.customer_ids.len(),
        expectations,
        failures,
        transitions: stats.transitions,
        messages: stats.outbox,
    })
}

fn minute(t: Time) -> i64 {
    t.timestamp().div_euclid(60)
}

/// Where a time is shown: in a zone, with the offset the zone had at that instant, or at a
/// fixed offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ShowIn {
    Zone(Tz),
    Offset(FixedOffset),
    /// At the offset (the one the test file writes), unless the offset is one the zone uses
    /// at other times of the year but not at this instant: then in the zone, so a time is
    /// never shown as a local reading that did not exist (02:30 -05:00 in New York on the
    /// night the clocks jump from 02:00 EST to 03:00 EDT).
    Near(FixedOffset, Tz),
}

impl From<FixedOffset> for ShowIn {
    fn from(offset: FixedOffset) -> ShowIn {
        ShowIn::Offset(offset)
    }
}

impl From<Tz> for ShowIn {
    fn from(tz: Tz) -> ShowIn {
        ShowIn::Zone(tz)
    }
}

/// `2026-03-14 09:00 +08:00`.
pub fn show(t: Time, at: impl Into<ShowIn>) -> String {
    const FORMAT: &str = "%Y-%m-%d %H:%M %:z";
    match at.into() {
        ShowIn::Zone(tz) => t.with_timezone(&tz).format(FORMAT).to_string(),
        ShowIn::Offset(offset) => {
            let local: DateTime<FixedOffset> = t.with_timezone(&offset);
            local.format(FORMAT).to_string()
        }
        ShowIn::Near(offset, tz) => {
            let offset_at = |t: Time| t.with_timezone(&tz).offset().fix();
            // The zone's offsets around the year (standard and daylight saving time).
            let the_zones = (-6..=6)
                .map(|months| t + chrono::Duration::days(30 * months))
                .any(|u| offset_at(u) == offset);
            if the_zones && offset_at(t) != offset {
                show(t, tz)
            } else {
                show(t, offset)
            }
        }
    }
}

/// Where the run is, in words.
fn where_is(run: Option<&Run>, offset: ShowIn) -> String {
    let Some(r) = run else {
        return "the customer never entered the flow".to_owned();
    };
    match r.status {
        RunStatus::Waiting => {
            let step = r.step.as_deref().unwrap_or("?");
            let until = r
                .wake_at
                .map(|t| format!(" until {}", show(t, offset)))
                .unwrap_or_default();
            match r.waiting_for.as_deref() {
                Some(crate::executor::WAITING_FOR_CALL) => {
                    format!("the run waits at `{step}` for the call's response")
                }
                Some(ev) => format!("the run waits at `{step}` for `{ev}`{until}"),
                None => format!("the run waits at `{step}`{until}"),
            }
        }
        RunStatus::Ended => format!(
            "the run ended `{}` at {}",
            r.outcome.as_deref().unwrap_or("?"),
            show(r.updated_at, offset)
        ),
    }
}

/// Why a template was not sent, when the history says.
fn skipped_note(history: &[HistoryEntry], template: &str, offset: ShowIn) -> String {
    history
        .iter()
        .rev()
        .find(|h| {
            (h.action == "skipped" || h.action == "delayed")
                && h.detail.get("template").and_then(|t| t.as_str()) == Some(template)
        })
        .map(|h| {
            format!(
                " (`{}` {} it at {}: {})",
                h.step,
                h.action,
                show(h.at, offset),
                h.detail
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("no reason recorded")
            )
        })
        .unwrap_or_default()
}
