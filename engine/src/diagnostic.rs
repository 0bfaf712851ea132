//! Diagnostics: what is wrong, where (file:line:column), and what to do about it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::yaml::Span;

/// Stable error codes; each has a section in `docs/errors.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    /// YAML syntax error.
    Syntax,
    /// The file breaks a size, depth or node limit, or is empty.
    Limit,
    /// The file cannot be read or is not UTF-8.
    Io,
    /// A mapping key is written twice.
    DuplicateKey,
    /// A key that the language does not have here.
    UnknownKey,
    /// A required key is missing.
    MissingKey,
    /// A value of the wrong type or an unknown value.
    WrongType,
    /// Keys that exclude each other, or none of a set that needs one.
    Conflict,
    /// A key that only makes sense with another one.
    Misplaced,
    /// An id that is not kebab-case, or a reserved one.
    BadId,
    /// The same flow id in two files.
    DuplicateFlow,
    /// The same step id twice in a flow.
    DuplicateStep,
    /// `next`, `on_timeout`, a branch or split arm names a step that does not exist.
    UnknownStep,
    /// A step no path from the first step reaches.
    Unreachable,
    /// Steps that lead back to themselves.
    Cycle,
    /// A branch without a final `else`.
    BranchElse,
    /// Split shares that do not add up to 100%.
    SplitShares,
    /// An event wait without `timeout`.
    WaitTimeout,
    /// A duration that cannot be read.
    Duration,
    /// A cron expression that cannot be read.
    Cron,
    /// An unknown time zone.
    TimeZone,
    /// An expression that does not parse.
    ExprSyntax,
    /// An expression naming something that does not exist there.
    ExprReference,
    /// A clock time or window that cannot be read.
    TimeOfDay,
    /// A `vars.NAME` that no `call` on the way to the step saves (a warning when only some
    /// paths do).
    UnsetVar,
    /// `event` read where the run has no event (a warning when only some paths have one).
    NoEvent,
    /// A channel not in the catalogue.
    UnknownChannel,
    /// A template file that does not exist.
    MissingTemplate,
    /// A template that does not parse.
    TemplateSyntax,
    /// A template naming a variable that does not exist.
    TemplateReference,
    /// A `use:` kind that is not registered.
    UnknownKind,
    /// Settings a plugin kind refuses.
    KindConfig,
    /// A template that needs more work or gives more text than one render may.
    TemplateLimit,
    /// An `include`, `import` or `extends` outside the templates folder, or of a missing file.
    TemplateInclude,
    /// A channel the flows use that the `channels:` section of `canvas.yaml` leaves out.
    UnconfiguredChannel,
    /// An SMS template whose fixed text alone is more segments than `max_segments` allows.
    SmsSegments,
}

impl Code {
    pub const ALL: &'static [Code] = &[
        Code::Syntax,
        Code::Limit,
        Code::Io,
        Code::DuplicateKey,
        Code::UnknownKey,
        Code::MissingKey,
        Code::WrongType,
        Code::Conflict,
        Code::Misplaced,
        Code::BadId,
        Code::DuplicateFlow,
        Code::DuplicateStep,
        Code::UnknownStep,
        Code::Unreachable,
        Code::Cycle,
        Code::BranchElse,
        Code::SplitShares,
        Code::WaitTimeout,
        Code::Duration,
        Code::Cron,
        Code::TimeZone,
        Code::ExprSyntax,
        Code::ExprReference,
        Code::TimeOfDay,
        Code::UnsetVar,
        Code::NoEvent,
        Code::UnknownChannel,
        Code::MissingTemplate,
        Code::TemplateSyntax,
        Code::TemplateReference,
        Code::UnknownKind,
        Code::KindConfig,
        Code::TemplateLimit,
        Code::TemplateInclude,
        Code::UnconfiguredChannel,
        Code::SmsSegments,
    ];

    /// The stable code, e.g. `CNV0205`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "CNV0001",
            Code::Limit => "CNV0002",
            Code::Io => "CNV0003",
            Code::DuplicateKey => "CNV0004",
            Code::UnknownKey => "CNV0101",
            Code::MissingKey => "CNV0102",
            Code::WrongType => "CNV0103",
            Code::Conflict => "CNV0104",
            Code::Misplaced => "CNV0105",
            Code::BadId => "CNV0201",
            Code::DuplicateFlow => "CNV0202",
            Code::DuplicateStep => "CNV0203",
            Code::UnknownStep => "CNV0204",
            Code::Unreachable => "CNV0205",
            Code::Cycle => "CNV0206",
            Code::BranchElse => "CNV0207",
            Code::SplitShares => "CNV0208",
            Code::WaitTimeout => "CNV0209",
            Code::Duration => "CNV0301",
            Code::Cron => "CNV0302",
            Code::TimeZone => "CNV0303",
            Code::ExprSyntax => "CNV0304",
            Code::ExprReference => "CNV0305",
            Code::TimeOfDay => "CNV0306",
            Code::UnsetVar => "CNV0307",
            Code::NoEvent => "CNV0308",
            Code::UnknownChannel => "CNV0401",
            Code::MissingTemplate => "CNV0402",
            Code::TemplateSyntax => "CNV0403",
            Code::TemplateReference => "CNV0404",
            Code::UnknownKind => "CNV0405",
            Code::KindConfig => "CNV0406",
            Code::TemplateLimit => "CNV0407",
            Code::TemplateInclude => "CNV0408",
            Code::UnconfiguredChannel => "CNV0409",
            Code::SmsSegments => "CNV0410",
        }
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A 1-based line and column, as editors and CI annotations count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Location {
    pub line: u32,
    pub column: u32,
    pub end_line: u32,
    pub end_column: u32,
}

impl From<Span> for Location {
    fn from(s: Span) -> Self {
        let end = if s.end > s.start { s.end } else { s.start };
        Location {
            line: s.start.line,
            column: s.start.col + 1,
            end_line: end.line,
            end_column: end.col + 1,
        }
    }
}

/// Another place that explains a diagnostic ("first defined here").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Related {
    pub file: PathBuf,
    #[serde(flatten)]
    pub location: Option<Location>,
    pub message: String,
}

/// How bad a diagnostic is: an error fails validation, a warning is reported and passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub file: PathBuf,
    #[serde(flatten)]
    pub location: Option<Location>,
    pub message: String,
    /// A short note under the caret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
}

impl Diagnostic {
    pub fn new(code: Code, file: &Path, span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            severity: Severity::Error,
            file: file.to_path_buf(),
            location: span.map(Location::from),
            message: message.into(),
            label: None,
            help: None,
            related: Vec::new(),
        }
    }

    /// A key written twice in one mapping (flow files and `canvas.yaml` alike).
    pub fn duplicate_key(file: &Path, dup: &crate::yaml::DuplicateKey) -> Self {
        Diagnostic::new(
            Code::DuplicateKey,
            file,
            Some(dup.again),
            format!("key `{}` is written twice", dup.key),
        )
        .with_related(file, Some(dup.first), "first written here")
        .with_help("remove one of them; YAML keeps only one")
    }

    /// The same diagnostic as a warning: reported, but the file stays valid.
    pub fn warning(mut self) -> Self {
        self.severity = Severity::Warning;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn with_related(
        mut self,
        file: &Path,
        span: Option<Span>,
        message: impl Into<String>,
    ) -> Self {
        self.related.push(Related {
            file: file.to_path_buf(),
            location: span.map(Location::from),
            message: message.into(),
        });
        self
    }

    /// `file:line:col: error[CODE]: message`, the one-line form.
    pub fn headline(&self) -> String {
        match self.location {
            Some(l) => format!(
                "{}:{}:{}: {}[{}]: {}",
                self.file.display(),
                l.line,
                l.column,
                self.severity.as_str(),
                self.code,
                self.message
            ),
            None => format!(
                "{}: {}[{}]: {}",
                self.file.display(),
                self.severity.as_str(),
                self.code,
                self.message
            ),
        }
    }

    /// A GitHub Actions workflow command.
    pub fn github(&self) -> String {
        let mut msg = self.message.clone();
        if let Some(help) = &self.help {
            msg.push_str(" (help: ");
            msg.push_str(help);
            msg.push(')');
        }
        let props = match self.location {
            Some(l) => format!(
                "file={},line={},col={},endLine={},endColumn={},title={}",
                gh_prop(&self.file.display().to_string()),
                l.line,
                l.column,
                l.end_line,
                l.end_column,
                self.code
            ),
            None => format!(
                "file={},title={}",
                gh_prop(&self.file.display().to_string()),
                self.code
            ),
        };
        format!("::{} {props}::{}", self.severity.as_str(), gh_data(&msg))
    }
}

fn gh_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn gh_prop(s: &str) -> String {
    gh_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// `a`, `b` or `c`, for messages.
pub fn quote_list<S: AsRef<str>>(items: &[S]) -> String {
    join_quoted(items, "or")
}

/// `a`, `b` and `c`, for messages.
pub fn quote_all<S: AsRef<str>>(items: &[S]) -> String {
    join_quoted(items, "and")
}

fn join_quoted<S: AsRef<str>>(items: &[S], word: &str) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{}`", s.as_ref())).collect();
    match quoted.len() {
        0 => String::new(),
        1 => quoted[0].clone(),
        n => format!("{} {word} {}", quoted[..n - 1].join(", "), quoted[n - 1]),
    }
}

/// The closest candidate to `word`, if one is close enough to be a likely typo.
pub fn did_you_mean<'a, I: IntoIterator<Item = &'a str>>(
    word: &str,
    candidates: I,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Renders diagnostics for a person, with the source line and a caret, using miette.
pub struct HumanRenderer {
    handler: miette::GraphicalReportHandler,
}

impl HumanRenderer {
    pub fn new(color: bool) -> Self {
        let theme = if color {
            miette::GraphicalTheme::unicode()
        } else {
            miette::GraphicalTheme::unicode_nocolor()
        };
        HumanRenderer {
            handler: miette::GraphicalReportHandler::new_themed(theme).with_context_lines(1),
        }
    }

    /// Render one diagnostic; `source` is the text of `d.file` when it could be read.
    pub fn render(&self, d: &Diagnostic, source: Option<&Arc<String>>) -> String {
        let report = Report::new(d, source);
        let mut out = String::new();
        if self.handler.render_report(&mut out, &report).is_err() {
            out = d.headline();
        }
        out
    }
}

#[derive(Debug)]
struct Report {
    severity: Severity,
    headline: String,
    help: Option<String>,
    source: Option<miette::NamedSource<Arc<String>>>,
    labels: Vec<miette::LabeledSpan>,
    related: Vec<String>,
}

impl Report {
    fn new(d: &Diagnostic, source: Option<&Arc<String>>) -> Self {
        let mut labels = Vec::new();
        let mut src = None;
        if let (Some(text), Some(loc)) = (source, d.location) {
            let start = byte_offset(text, loc.line, loc.column);
            let end = byte_offset(text, loc.end_line, loc.end_column).max(start);
            // One line at most under the caret; a whole mapping would drown the message.
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let end = end.min(line_end);
            labels.push(miette::LabeledSpan::new_primary_with_span(
                d.label.clone(),
                miette::SourceSpan::new(start.into(), end.saturating_sub(start)),
            ));
            src = Some(
                miette::NamedSource::new(d.file.display().to_string(), Arc::clone(text))
                    .with_language("yaml"),
            );
        }
        let level = d.severity.as_str();
        let headline = match (&src, d.location) {
            (None, Some(l)) => format!(
                "{level}[{}]: {}:{}:{}: {}",
                d.code,
                d.file.display(),
                l.line,
                l.column,
                d.message
            ),
            (None, None) => format!("{level}[{}]: {}: {}", d.code, d.file.display(), d.message),
            (Some(_), _) => format!("{level}[{}]: {}", d.code, d.message),
        };
        let related = d
            .related
            .iter()
            .map(|r| match r.location {
                Some(l) => format!(
                    "{}:{}:{}: {}",
                    r.file.display(),
                    l.line,
                    l.column,
                    r.message
                ),
                None => format!("{}: {}", r.file.display(), r.message),
            })
            .collect();
        Report {
            severity: d.severity,
            headline,
            help: d.help.clone(),
            source: src,
            labels,
            related,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.headline)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        let mut parts: Vec<String> = self.related.clone();
        if let Some(h) = &self.help {
            parts.push(h.clone());
        }
        if parts.is_empty() {
            None
        } else {
            Some(Box::new(parts.join("\n")))
        }
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            None
        } else {
            Some(Box::new(self.labels.iter().cloned()))
        }
    }
}

/// Byte offset of a 1-based line and 1-based column counted in characters.
pub fn byte_offset(text: &str, line: u32, column: u32) -> usize {
    let mut offset = 0;
    for _ in 1..line {
        match text[offset..].find('\n') {
            Some(i) => offset += i + 1,
            None => return text.len(),
        }
    }
    let rest = &text[offset..];
    let skip = column.saturating_sub(1) as usize;
    rest.char_indices()
        .take_while(|(_, c)| *c != '\n')
        .nth(skip)
        .map_or_else(
            || offset + rest.find('\n').unwrap_or(rest.len()),
            |(i, _)| offset + i,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_offsets_count_characters() {
        let text = "a: 1\nné: x\n";
        assert_eq!(byte_offset(text, 2, 1), 5);
        assert_eq!(&text[byte_offset(text, 2, 5)..byte_offset(text, 2, 6)], "x");
    }

    #[test]
    fn suggestions_find_typos_only() {
        let steps = ["wait-birthday", "send-gift", "month-start"];
        assert_eq!(did_you_mean("wait-bday", steps), Some("wait-birthday"));
        assert_eq!(did_you_mean("zzz", steps), None);
    }

    #[test]
    fn github_annotations_escape() {
        let d = Diagnostic::new(
            Code::Cycle,
            Path::new("f.yaml"),
            Some(Span::point(3, 4)),
            "a\nb",
        );
        assert_eq!(
            d.github(),
            "::error file=f.yaml,line=3,col=5,endLine=3,endColumn=5,title=CNV0206::a%0Ab"
        );
    }
}
