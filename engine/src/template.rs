//! Message templates: where a template name resolves to, and whether its text is sound.
//!
//! `birthday/day` resolves inside the `templates/` folder of the flows folder: per channel
//! `birthday/day.sms.txt`, `birthday/day.email.html`, … win over the generic `birthday/day.txt`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

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
}

/// A problem with a template's text; `line` is 1-based within the template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateIssue {
    pub line: Option<usize>,
    pub message: String,
    pub reference: bool,
}

/// Check a template text: syntax, names it reads, filters and functions it calls.
pub fn check_text(name: &str, source: &str) -> Vec<TemplateIssue> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    let tmpl = match env.template_from_named_str(name, source) {
        Ok(t) => t,
        Err(e) => {
            return vec![TemplateIssue {
                line: e.line(),
                message: e.detail().unwrap_or("syntax error").to_owned(),
                reference: false,
            }];
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
        issues.push(TemplateIssue {
            line: line_of(source, &var),
            message: format!("unknown name `{var}`{hint}"),
            reference: true,
        });
    }
    // Filters, tests and functions are looked up when rendering: a dry run with nothing
    // defined finds the misspelt ones without judging the data.
    if let Err(e) = tmpl.render(minijinja::context! {}) {
        use minijinja::ErrorKind::{UnknownFilter, UnknownFunction, UnknownTest};
        if matches!(e.kind(), UnknownFilter | UnknownFunction | UnknownTest) {
            issues.push(TemplateIssue {
                line: e.line(),
                message: format!(
                    "{}{}",
                    e.kind(),
                    e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                ),
                reference: true,
            });
        }
    }
    issues
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

    /// Read and check a template file once, however many flows use it.
    pub fn check(&self, path: &Path) -> Arc<Checked> {
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
                let issues = check_text(&file, &source);
                let source = Arc::new(source);
                if issues.is_empty() {
                    Checked::Ok(TemplateFile { file, source })
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
    let start = flow_file.parent().unwrap_or(Path::new("."));
    let mut dir = Some(start);
    while let Some(d) = dir {
        let candidate = d.join("templates");
        if candidate.is_dir() {
            return candidate;
        }
        dir = d.parent().filter(|p| !p.as_os_str().is_empty());
    }
    start.join("templates")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_syntax_names_and_filters() {
        assert!(check_text("a", "Hi {{ customer.first_name | default('there') }}").is_empty());
        let issues = check_text("a", "Hi {{ customer.name ");
        assert_eq!(issues.len(), 1);
        assert!(!issues[0].reference);
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
}
