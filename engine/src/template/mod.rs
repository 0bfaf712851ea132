//! Message templates: where a template name resolves to, and whether its text is sound.
//!
//! `birthday/day` resolves inside the `templates/` folder of the flows folder: per channel
//! `birthday/day.sms.txt`, `birthday/day.email.html`, … win over the generic `birthday/day.txt`.

mod bounds;
mod includes;
mod reads;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use bounds::{
    Includes, MAX_RENDERED_BYTES, RenderError, TEMPLATE_FUEL, environment, loaded_count,
    out_of_fuel_reason, render_bounded, reset_loaded_count, source_hash, too_large_reason,
};
use includes::references;
pub use includes::{MAX_INCLUDE_DEPTH, include_name_problem};
pub use reads::{TemplateRead, reads};

/// Names a template may use: `{{ customer.first_name }}`.
pub const TEMPLATE_ROOTS: &[&str] = &["customer", "event", "vars", "flow", "now"];

/// Largest template file accepted.
pub const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

/// One template file a flow uses, kept in the compiled flow so a run renders the text it
/// was validated with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateFile {
    /// The file relative to the templates folder, e.g. `birthday/day.sms.txt`.
    pub file: String,
    pub source: Arc<String>,
    /// The files it includes, imports or extends, directly or not; also in the flow's
    /// `templates`, so they are part of its version.
    #[serde(skip)]
    pub includes: Includes,
}

/// What is wrong with a template, which decides its diagnostic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
    /// It does not parse.
    Syntax,
    /// A name, filter, test or function that does not exist.
    Reference,
    /// It needs more work or gives more text than one render may.
    Limit,
    /// An `include`, `import` or `extends` that cannot be allowed.
    Include,
}

/// A problem with a template's text; `line` is 1-based within the template, and `file` is
/// set when the problem is in a file the template includes.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateIssue {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
    pub kind: IssueKind,
}

impl TemplateIssue {
    fn new(kind: IssueKind, line: Option<usize>, message: impl Into<String>) -> TemplateIssue {
        TemplateIssue {
            file: None,
            line,
            message: message.into(),
            kind,
        }
    }
}

/// Check an inline template (a `call` body string, a `task` text): syntax, names, filters,
/// work and output size. Inline templates cannot pull in template files.
pub fn check_text(name: &str, source: &str) -> Vec<TemplateIssue> {
    let refs = match references(source) {
        Ok(r) => r,
        Err(issue) => return vec![issue],
    };
    if let Some(r) = refs.first() {
        return vec![TemplateIssue::new(
            IssueKind::Include,
            Some(r.line),
            format!(
                "an inline template cannot `{}` another template; put the text in a file \
                 under templates/",
                r.tag
            ),
        )];
    }
    check_source(name, source, &Includes::default())
}

/// Syntax, names, and a dry run (no data) that finds unknown filters and a template that
/// does too much work or produces too much text whatever the data.
fn check_source(name: &str, source: &str, includes: &Includes) -> Vec<TemplateIssue> {
    let env = environment();
    let tmpl = match env.template_from_named_str(name, source) {
        Ok(t) => t,
        Err(e) => {
            return vec![TemplateIssue::new(
                IssueKind::Syntax,
                e.line(),
                e.detail().unwrap_or("syntax error"),
            )];
        }
    };
    let mut issues = Vec::new();
    let mut unknown: Vec<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !TEMPLATE_ROOTS.contains(&v.as_str()))
        .collect();
    unknown.sort();
    for var in unknown {
        let hint = crate::diagnostic::did_you_mean(&var, TEMPLATE_ROOTS.iter().copied())
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_else(|| {
                format!(
                    "; templates can use {}",
                    crate::diagnostic::quote_list(TEMPLATE_ROOTS)
                )
            });
        issues.push(TemplateIssue::new(
            IssueKind::Reference,
            line_of(source, &var),
            format!("unknown name `{var}`{hint}"),
        ));
    }
    // Filters, tests and functions are looked up when rendering: a dry run with nothing
    // defined finds the misspelt ones without judging the data. The same run meets the
    // bounds a real render has, so a loop that is too long whatever the data is found here.
    let ctx = minijinja::Value::from(BTreeMap::<String, minijinja::Value>::new());
    match render_bounded(&tmpl, &ctx, includes) {
        Ok(_) => {}
        Err(RenderError::TooLarge) => {
            issues.push(TemplateIssue::new(
                IssueKind::Limit,
                None,
                too_large_reason(),
            ));
        }
        Err(RenderError::OutOfFuel { line }) => {
            issues.push(TemplateIssue::new(
                IssueKind::Limit,
                line,
                out_of_fuel_reason(),
            ));
        }
        Err(RenderError::Engine(e)) => {
            use minijinja::ErrorKind::{UnknownFilter, UnknownFunction, UnknownTest};
            if matches!(e.kind(), UnknownFilter | UnknownFunction | UnknownTest) {
                issues.push(TemplateIssue::new(
                    IssueKind::Reference,
                    e.line(),
                    format!(
                        "{}{}",
                        e.kind(),
                        e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                    ),
                ));
            }
        }
    }
    issues
}

/// The text of a template outside its tags: what every render contains whatever the data
/// (the text inside `{% if %}` counts too, as if every branch were taken). Comments and tags
/// give nothing; a template that does not parse gives `None`.
// `SyntaxConfig` is a unit struct unless minijinja's `custom_syntax` is on.
#[allow(clippy::default_constructed_unit_structs)]
pub fn static_text(source: &str) -> Option<String> {
    use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
    let mut out = String::new();
    for item in tokenize(
        source,
        false,
        minijinja::syntax::SyntaxConfig::default(),
        WhitespaceConfig::default(),
    ) {
        if let (Token::TemplateData(text), _) = item.ok()? {
            out.push_str(text);
        }
    }
    Some(out)
}

fn line_of(source: &str, word: &str) -> Option<usize> {
    source.lines().position(|l| l.contains(word)).map(|i| i + 1)
}

/// The files under one `templates/` folder, read once and shared by every flow that uses it.
#[derive(Debug)]
pub struct TemplateDir {
    pub root: PathBuf,
    /// Template name → (suffix after the name, e.g. `sms.txt` or `txt`) → path.
    names: BTreeMap<String, BTreeMap<String, PathBuf>>,
    checked: Mutex<HashMap<PathBuf, Arc<Checked>>>,
}

/// A template file read and checked.
#[derive(Debug)]
pub enum Checked {
    Ok(TemplateFile),
    Issues(Arc<String>, Vec<TemplateIssue>),
    Unreadable(String),
}

/// How one channel's template resolved.
#[derive(Debug)]
pub enum Resolution {
    Found(Vec<PathBuf>),
    Missing { looked_for: Vec<String> },
}

impl TemplateDir {
    /// Index `root` (which may not exist: then every lookup misses).
    pub fn scan(root: &Path) -> TemplateDir {
        let mut names: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(root) else {
                    continue;
                };
                let rel = rel.to_string_lossy().replace('\\', "/");
                let (dir_part, file) = match rel.rsplit_once('/') {
                    Some((d, f)) => (format!("{d}/"), f.to_owned()),
                    None => (String::new(), rel.clone()),
                };
                if let Some((stem, suffix)) = file.split_once('.') {
                    names
                        .entry(format!("{dir_part}{stem}"))
                        .or_default()
                        .insert(suffix.to_owned(), path);
                }
            }
        }
        TemplateDir {
            root: root.to_path_buf(),
            names,
            checked: Mutex::new(HashMap::new()),
        }
    }

    /// Template names known here, for "did you mean".
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The files `name` resolves to for `channel`: every `NAME.CHANNEL.*` file, else `NAME.txt`.
    pub fn resolve(&self, name: &str, channel: &str) -> Resolution {
        let looked_for = vec![format!("{name}.{channel}.*"), format!("{name}.txt")];
        let Some(files) = self.names.get(name) else {
            return Resolution::Missing { looked_for };
        };
        let prefix = format!("{channel}.");
        let own: Vec<PathBuf> = files
            .iter()
            .filter(|(suffix, _)| suffix.starts_with(&prefix))
            .map(|(_, p)| p.clone())
            .collect();
        if !own.is_empty() {
            return Resolution::Found(own);
        }
        match files.get("txt") {
            Some(p) => Resolution::Found(vec![p.clone()]),
            None => Resolution::Missing { looked_for },
        }
    }

    /// The file at `rel` (a path under the folder with its extension, as an include names
    /// it), when the folder has it.
    pub fn file(&self, rel: &str) -> Option<&Path> {
        let (dir_part, file) = match rel.rsplit_once('/') {
            Some((d, f)) => (format!("{d}/"), f),
            None => (String::new(), rel),
        };
        let (stem, suffix) = file.split_once('.')?;
        self.names
            .get(&format!("{dir_part}{stem}"))?
            .get(suffix)
            .map(PathBuf::as_path)
    }

    /// Every file here by its path under the folder, for "did you mean".
    fn files(&self) -> impl Iterator<Item = String> + '_ {
        self.names
            .iter()
            .flat_map(|(name, files)| files.keys().map(move |suffix| format!("{name}.{suffix}")))
    }

    /// Read and check a template file once, however many flows use it, together with the
    /// files it includes, imports or extends.
    pub fn check(&self, path: &Path) -> Arc<Checked> {
        self.check_within(path, &mut Vec::new())
    }

    /// `within`: the files whose check is under way, outermost first (to find cycles).
    fn check_within(&self, path: &Path, within: &mut Vec<PathBuf>) -> Arc<Checked> {
        if let Some(c) = self.checked.lock().ok().and_then(|m| m.get(path).cloned()) {
            return c;
        }
        let file = path
            .strip_prefix(&self.root)
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .unwrap_or_else(|_| path.display().to_string());
        let checked = Arc::new(match read_limited(path) {
            Err(e) => Checked::Unreadable(e),
            Ok(source) => {
                within.push(path.to_path_buf());
                let (includes, mut issues) = self.includes(&source, within);
                within.pop();
                let includes = Arc::new(includes);
                if issues.is_empty() {
                    issues = check_source(&file, &source, &includes);
                }
                let source = Arc::new(source);
                if issues.is_empty() {
                    Checked::Ok(TemplateFile {
                        file,
                        source,
                        includes,
                    })
                } else {
                    Checked::Issues(source, issues)
                }
            }
        });
        if let Ok(mut m) = self.checked.lock() {
            m.insert(path.to_path_buf(), Arc::clone(&checked));
        }
        checked
    }

    /// The files `source` pulls in, transitively, and what is wrong with them: a name
    /// outside the folder, a file that is missing or broken, a cycle, nesting too deep.
    fn includes(
        &self,
        source: &str,
        within: &mut Vec<PathBuf>,
    ) -> (BTreeMap<String, Arc<String>>, Vec<TemplateIssue>) {
        let mut files = BTreeMap::new();
        let refs = match references(source) {
            Ok(r) => r,
            // A syntax error: `check_source` reports it with minijinja's own message.
            Err(issue) if issue.kind == IssueKind::Syntax => return (files, Vec::new()),
            Err(issue) => return (files, vec![issue]),
        };
        let mut issues = Vec::new();
        for r in refs {
            let at =
                |message: String| TemplateIssue::new(IssueKind::Include, Some(r.line), message);
            if let Some(problem) = include_name_problem(&r.name) {
                issues.push(at(problem));
                continue;
            }
            let Some(path) = self.file(&r.name) else {
                let files: Vec<String> = self.files().collect();
                let hint =
                    crate::diagnostic::did_you_mean(&r.name, files.iter().map(String::as_str))
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_else(|| {
                            "; name the file with its extension, such as `partials/footer.txt`"
                                .to_owned()
                        });
                issues.push(at(format!(
                    "`{}` names no file under {}{hint}",
                    r.name,
                    self.root.display()
                )));
                continue;
            };
            if within.iter().any(|p| p == path) {
                issues.push(at(format!(
                    "`{}` includes itself, through `{}`",
                    r.name, r.tag
                )));
                continue;
            }
            if within.len() >= MAX_INCLUDE_DEPTH {
                issues.push(at(format!(
                    "templates nest more than {MAX_INCLUDE_DEPTH} deep (the template limit)"
                )));
                continue;
            }
            match &*self.check_within(path, within) {
                Checked::Ok(t) => {
                    files.insert(r.name.clone(), Arc::clone(&t.source));
                    files.extend(t.includes.iter().map(|(k, v)| (k.clone(), Arc::clone(v))));
                }
                Checked::Issues(_, inner) => {
                    issues.push(at(format!(
                        "`{}` has errors (reported at that file)",
                        r.name
                    )));
                    issues.extend(inner.iter().cloned().map(|mut i| {
                        i.file.get_or_insert_with(|| path.to_path_buf());
                        i
                    }));
                }
                Checked::Unreadable(e) => {
                    issues.push(at(format!("cannot read `{}`: {e}", r.name)));
                }
            }
        }
        (files, issues)
    }
}

fn read_limited(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "the file is {} bytes; templates are limited to {MAX_TEMPLATE_BYTES} bytes",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_owned())
}

/// The templates folder for a flow file: `templates/` beside it, or in the nearest parent
/// folder that has one.
pub fn templates_root_for(flow_file: &Path) -> PathBuf {
    let start = flow_file.parent().unwrap_or(Path::new(""));
    crate::project::folders_up(start)
        .into_iter()
        .map(|d| d.join("templates"))
        .find(|candidate| candidate.is_dir())
        .unwrap_or_else(|| start.join("templates"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Run `f` on a thread of its own and fail if it is not done in 20 s: without a bound a
    /// render does not return, and a test must fail rather than hang.
    pub(crate) fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("still rendering after 20 s")
    }

    #[test]
    fn checks_syntax_names_and_filters() {
        assert!(check_text("a", "Hi {{ customer.first_name | default('there') }}").is_empty());
        let issues = check_text("a", "Hi {{ customer.name ");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].kind, IssueKind::Syntax);
        let issues = check_text("a", "line\nHi {{ custmer.name }}");
        assert_eq!(issues[0].line, Some(2));
        assert!(
            issues[0].message.contains("did you mean `customer`"),
            "{issues:?}"
        );
        let issues = check_text("a", "{{ customer.name | shout }}");
        assert!(issues[0].message.contains("unknown filter"), "{issues:?}");
    }

    #[test]
    fn per_channel_files_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        std::fs::create_dir_all(t.join("birthday")).expect("mkdir");
        std::fs::write(t.join("birthday/day.txt"), "Happy birthday").expect("write");
        std::fs::write(t.join("birthday/day.wechat.txt"), "🎂").expect("write");
        let idx = TemplateDir::scan(t);
        let Resolution::Found(w) = idx.resolve("birthday/day", "wechat") else {
            panic!("wechat resolves")
        };
        assert!(w[0].ends_with("birthday/day.wechat.txt"));
        let Resolution::Found(s) = idx.resolve("birthday/day", "sms") else {
            panic!("sms falls back to txt")
        };
        assert!(s[0].ends_with("birthday/day.txt"));
        assert!(matches!(
            idx.resolve("birthday/nope", "sms"),
            Resolution::Missing { .. }
        ));
    }

    /// Regression: two nested 100,000-item loops made `canvas validate` run until killed.
    #[test]
    fn nested_loops_are_a_limit_issue_not_a_hang() {
        let issues = within_20s(|| {
            check_text(
                "a",
                "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}x{% endfor %}{% endfor %}",
            )
        });
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].kind, IssueKind::Limit);
        assert!(issues[0].message.contains("100000 steps"), "{issues:?}");
    }

    #[test]
    fn output_past_the_bound_is_a_limit_issue() {
        let issues = check_text(
            "a",
            "{% for a in 'x' * 1000 %}{{ 'x' * 10000 }}{% endfor %}",
        );
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].kind, IssueKind::Limit);
        assert!(
            issues[0].message.contains("larger than 262144 bytes"),
            "{issues:?}"
        );
        // Just under the bound renders.
        assert!(check_text("a", "{{ 'x' * 262144 }}").is_empty());
    }

    #[test]
    fn inline_templates_cannot_include() {
        let issues = check_text("inline", "{% include 'partials/footer.txt' %}");
        assert_eq!(issues[0].kind, IssueKind::Include, "{issues:?}");
        assert!(issues[0].message.contains("inline template"), "{issues:?}");
    }

    fn folder(files: &[(&str, &str)]) -> (tempfile::TempDir, TemplateDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let idx = TemplateDir::scan(&dir.path().join("templates"));
        (dir, idx)
    }

    fn issues_of(idx: &TemplateDir, file: &str) -> Vec<TemplateIssue> {
        match &*idx.check(&idx.root.join(file)) {
            Checked::Issues(_, issues) => issues.clone(),
            Checked::Ok(_) => Vec::new(),
            Checked::Unreadable(e) => panic!("{file}: {e}"),
        }
    }

    #[test]
    fn includes_inside_the_folder_are_kept_with_the_file() {
        let (_dir, idx) = folder(&[
            (
                "templates/hello.txt",
                "Hi{% include 'partials/footer.txt' %}",
            ),
            (
                "templates/partials/footer.txt",
                "{% import 'partials/m.txt' as m %} {{ m.bye() }}",
            ),
            (
                "templates/partials/m.txt",
                "{% macro bye() %}bye{% endmacro %}",
            ),
        ]);
        let Checked::Ok(t) = &*idx.check(&idx.root.join("hello.txt")) else {
            panic!("{:?}", issues_of(&idx, "hello.txt"))
        };
        let names: Vec<&str> = t.includes.keys().map(String::as_str).collect();
        assert_eq!(names, ["partials/footer.txt", "partials/m.txt"]);
    }

    /// Regression: an include naming a file outside `templates/` passed validation.
    #[test]
    fn include_outside_the_templates_folder_is_an_error() {
        let (_dir, idx) = folder(&[
            ("secret.txt", "the database password"),
            ("templates/up.txt", "line\n{% include '../secret.txt' %}"),
            ("templates/abs.txt", "{% extends '/etc/passwd' %}"),
            (
                "templates/hidden.txt",
                "{% from 'partials/../../secret.txt' import x %}",
            ),
            // Not rendered without data, still checked: the names are read, not run.
            (
                "templates/guarded.txt",
                "{% if customer.vip %}{% include '../secret.txt' %}{% endif %}",
            ),
        ]);
        for (file, line) in [
            ("up.txt", 2),
            ("abs.txt", 1),
            ("hidden.txt", 1),
            ("guarded.txt", 1),
        ] {
            let issues = issues_of(&idx, file);
            assert_eq!(issues.len(), 1, "{file}: {issues:?}");
            assert_eq!(issues[0].kind, IssueKind::Include, "{file}");
            assert_eq!(issues[0].line, Some(line), "{file}");
            assert!(
                issues[0].message.contains("outside the templates folder"),
                "{file}: {issues:?}"
            );
        }
    }

    #[test]
    fn includes_that_cannot_be_checked_are_errors() {
        let (_dir, idx) = folder(&[
            (
                "templates/missing.txt",
                "{% include 'partials/footr.txt' %}",
            ),
            ("templates/partials/footer.txt", "bye"),
            (
                "templates/computed.txt",
                "{% include 'partials/' ~ customer.tier ~ '.txt' %}",
            ),
            ("templates/a.txt", "{% include 'b.txt' %}"),
            ("templates/b.txt", "{% include 'a.txt' %}"),
            ("templates/outer.txt", "{% include 'partials/broken.txt' %}"),
            ("templates/partials/broken.txt", "ok\n{{ customer.name "),
        ]);
        let missing = issues_of(&idx, "missing.txt");
        assert!(
            missing[0]
                .message
                .contains("did you mean `partials/footer.txt`"),
            "{missing:?}"
        );
        let computed = issues_of(&idx, "computed.txt");
        assert!(computed[0].message.contains("one quoted"), "{computed:?}");
        let cycle = issues_of(&idx, "a.txt");
        assert!(
            cycle.iter().any(|i| i.message.contains("includes itself")),
            "{cycle:?}"
        );
        // The broken file's own error is reported at that file and line.
        let outer = issues_of(&idx, "outer.txt");
        let inner = outer
            .iter()
            .find(|i| i.file.is_some())
            .expect("inner issue");
        assert_eq!(inner.kind, IssueKind::Syntax);
        assert!(
            inner
                .file
                .as_ref()
                .is_some_and(|f| f.ends_with("partials/broken.txt"))
        );
        assert_eq!(inner.line, Some(2));
    }

    #[test]
    fn an_included_loop_counts_against_the_includer() {
        let (_dir, idx) = folder(&[
            (
                "templates/outer.txt",
                "{% for a in 'x' * 1000 %}{% include 'inner.txt' %}{% endfor %}",
            ),
            (
                "templates/inner.txt",
                "{% for b in 'x' * 1000 %}.{% endfor %}",
            ),
        ]);
        assert!(issues_of(&idx, "inner.txt").is_empty());
        let issues = issues_of(&idx, "outer.txt");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].kind, IssueKind::Limit);
    }
}
