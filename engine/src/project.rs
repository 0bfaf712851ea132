//! Validate a set of flow files or folders: find the files, compile each, and check what
//! spans files (one flow id per file across the set).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::compile::{Compiled, compile};
use crate::diagnostic::{Code, Diagnostic};
use crate::flow::CompiledFlow;
use crate::registry::Registry;
use crate::template::{TemplateDir, templates_root_for};
use crate::yaml::Limits;

/// Folders deeper than this are not searched (and symlinked folders are not followed).
const MAX_FOLDER_DEPTH: usize = 32;

/// Why validation could not run at all (usage or IO, exit code 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectError {
    /// A path given on the command line does not exist.
    #[error("{0}: no such file or folder")]
    NotFound(PathBuf),
    /// A flow test (`*.test.yaml`) given to `canvas validate`.
    #[error("{0} is a flow test, not a flow: run `canvas test {0}`")]
    TestFile(PathBuf),
    /// A folder holds no flow files.
    #[error("{0}: no flow files (*.yaml, *.yml) found")]
    NoFlows(PathBuf),
    /// A file or folder cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A worker's result for one file: what compiling gave, and the text it read.
type Slot = Mutex<Option<(Compiled, Option<Arc<String>>)>>;

/// One file's result.
#[derive(Debug)]
pub struct FileResult {
    pub path: PathBuf,
    pub flow_id: Option<String>,
    pub flow: Option<CompiledFlow>,
    pub errors: usize,
}

/// The result of validating a set of files.
#[derive(Debug, Default)]
pub struct Validation {
    pub files: Vec<FileResult>,
    pub diagnostics: Vec<Diagnostic>,
    /// Texts of the files that diagnostics point into, for rendering snippets.
    pub sources: HashMap<PathBuf, Arc<String>>,
}

impl Validation {
    /// No errors (warnings may be there).
    pub fn is_valid(&self) -> bool {
        !self.diagnostics.iter().any(Diagnostic::is_error)
    }

    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics.len() - self.errors()
    }

    pub fn flows(&self) -> impl Iterator<Item = &CompiledFlow> {
        self.files.iter().filter_map(|f| f.flow.as_ref())
    }
}

/// Is this a flow file by its name? (`*.test.yaml` files are flow tests and `canvas.yaml`
/// is the engine policy, not flows.)
pub fn is_flow_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.ends_with(".yaml") || name.ends_with(".yml"))
        && !name.ends_with(".test.yaml")
        && !name.ends_with(".test.yml")
        && name != crate::policy::FILE_NAME
}

/// The folder a file is in, as a path that can be read: `.` for a bare file name (whose
/// `parent()` is the empty path).
pub fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `dir`, then every folder above it up to the root, each spelled from `dir` as it was given:
/// `flows/seasonal`, `flows`, `` (the working folder), `..`, `../..`, … — so a relative path
/// (with or without `./`, or from inside a subfolder) finds what lies above its first
/// component, and the paths shown in messages stay the operator's.
pub fn folders_up(dir: &Path) -> Vec<PathBuf> {
    let real = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let depth = std::fs::canonicalize(real)
        .map(|c| c.ancestors().count())
        // A folder that is not there: its ancestors as written.
        .unwrap_or_else(|_| dir.components().count() + 1)
        .min(MAX_FOLDER_DEPTH * 8);
    let mut out = Vec::with_capacity(depth);
    let mut d = dir.to_path_buf();
    for _ in 0..depth {
        let next = up(&d);
        out.push(std::mem::replace(&mut d, next));
    }
    out
}

/// The folder above `d`, spelled from `d`.
fn up(d: &Path) -> PathBuf {
    use std::path::Component;
    match d.components().next_back() {
        Some(Component::Normal(_)) => d.parent().map(Path::to_path_buf).unwrap_or_default(),
        Some(Component::CurDir) | None => PathBuf::from(".."),
        Some(Component::ParentDir) => d.join(".."),
        Some(Component::RootDir | Component::Prefix(_)) => d.to_path_buf(),
    }
}

/// The flow files under `paths`: files as given, folders searched recursively (skipping
/// `templates/` and hidden folders), sorted.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ProjectError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProjectError::NotFound(path.clone()),
            _ => ProjectError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        if meta.is_dir() {
            let before = out.len();
            walk(path, 0, &mut out)?;
            if out.len() == before {
                return Err(ProjectError::NoFlows(path.clone()));
            }
        } else if crate::testing::is_test_file(path) {
            return Err(ProjectError::TestFile(path.clone()));
        } else {
            out.push(path.clone());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), ProjectError> {
    if depth > MAX_FOLDER_DEPTH {
        return Ok(());
    }
    let io = |source| ProjectError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry.file_type().map_err(io)?;
        if kind.is_dir() {
            if !name.starts_with('.') && name != "templates" {
                walk(&path, depth + 1, out)?;
            }
        } else if is_flow_file(&path) && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    Ok(())
}

/// Validate every flow file under `paths`.
pub fn validate_paths(paths: &[PathBuf], registry: &Registry) -> Result<Validation, ProjectError> {
    let files = discover(paths)?;
    Ok(validate_files(&files, registry))
}

/// Compile `files` (in parallel), then check what spans them.
pub fn validate_files(files: &[PathBuf], registry: &Registry) -> Validation {
    let template_dirs: Mutex<HashMap<PathBuf, Arc<TemplateDir>>> = Mutex::new(HashMap::new());
    let results: Vec<Slot> = files.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = files.get(i) else { break };
                    let templates = {
                        let root = templates_root_for(path);
                        let mut dirs = template_dirs.lock().unwrap_or_else(|e| e.into_inner());
                        Arc::clone(
                            dirs.entry(root.clone())
                                .or_insert_with(|| Arc::new(TemplateDir::scan(&root))),
                        )
                    };
                    let result = compile_file(path, registry, &templates);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });

    let mut validation = Validation::default();
    let mut seen_ids: HashMap<String, (PathBuf, crate::yaml::Span)> = HashMap::new();
    for slot in results {
        let Some((compiled, source)) = slot.into_inner().unwrap_or_else(|e| e.into_inner()) else {
            continue;
        };
        let mut diagnostics = compiled.diagnostics;
        if let Some((id, span)) = &compiled.id {
            match seen_ids.get(id) {
                Some((first_file, first_span)) => diagnostics.push(
                    Diagnostic::new(
                        Code::DuplicateFlow,
                        &compiled.file,
                        Some(*span),
                        format!("flow id `{id}` is already used"),
                    )
                    .with_related(first_file, Some(*first_span), "first used here")
                    .with_help("flow ids are unique across the flows folder; rename one"),
                ),
                None => {
                    seen_ids.insert(id.clone(), (compiled.file.clone(), *span));
                }
            }
        }
        let errors = diagnostics
            .iter()
            .filter(|d| d.file == compiled.file && d.is_error())
            .count();
        let flow = if diagnostics.iter().any(Diagnostic::is_error) {
            None
        } else {
            compiled.flow
        };
        for d in &diagnostics {
            if !validation.sources.contains_key(&d.file) {
                let text = if d.file == compiled.file {
                    source.clone()
                } else {
                    std::fs::read_to_string(&d.file).ok().map(Arc::new)
                };
                if let Some(t) = text {
                    validation.sources.insert(d.file.clone(), t);
                }
            }
        }
        validation.files.push(FileResult {
            path: compiled.file,
            flow_id: compiled.id.map(|(id, _)| id),
            flow,
            errors,
        });
        validation.diagnostics.extend(diagnostics);
    }
    // A template shared by several flows reports its problems once.
    let mut seen = std::collections::HashSet::new();
    validation
        .diagnostics
        .retain(|d| seen.insert((d.file.clone(), d.location, d.message.clone())));
    validation
}

fn compile_file(
    path: &Path,
    registry: &Registry,
    templates: &TemplateDir,
) -> (Compiled, Option<Arc<String>>) {
    let failed = |code, message: String| Compiled {
        file: path.to_path_buf(),
        id: None,
        flow: None,
        diagnostics: vec![Diagnostic::new(code, path, None, message)],
    };
    let limit = Limits::default().max_bytes;
    match std::fs::metadata(path) {
        Ok(m) if m.len() > limit as u64 => {
            return (
                failed(
                    Code::Limit,
                    format!(
                        "the file is {} bytes; flow files are limited to {limit} bytes",
                        m.len()
                    ),
                ),
                None,
            );
        }
        Err(e) => return (failed(Code::Io, format!("cannot read the file: {e}")), None),
        Ok(_) => {}
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return (failed(Code::Io, format!("cannot read the file: {e}")), None),
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            return (
                failed(
                    Code::Io,
                    format!("the file is not UTF-8 text (invalid byte at offset {at})"),
                ),
                None,
            );
        }
    };
    let compiled = compile(path, &text, registry, templates);
    tracing::debug!(
        file = %path.display(),
        valid = !compiled.diagnostics.iter().any(Diagnostic::is_error),
        diagnostics = compiled.diagnostics.len(),
        "compiled flow file"
    );
    (compiled, Some(Arc::new(text)))
}
