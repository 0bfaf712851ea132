//! The docs match the code: every flow shown in README.md and docs/*.md validates, every
//! `canvas …` command in a shell block runs (exit 0) in a copy of this repository, and every
//! command synopsis names a real subcommand with real options.
//!
//! What is deliberately not run, and why:
//! - `canvas serve`: the daemon does not return; tests/serve.rs and its neighbours run it.
//! - `canvas bench …`: load tests that take minutes; src/bench*.rs have their own tests.
//! - the part of a command line after `|`: another program (`dot`), not Canvas.
//! - `docs/errors.md`: its flows are deliberate mistakes, each showing a diagnostic.
//! - flow tests (`*.test.yaml` blocks) and `canvas.yaml` snippets are not flows: the shipped
//!   tests run in tests/play.rs, and `canvas validate` below checks the repository's
//!   `canvas.yaml`.
//!
//! Code blocks are found by their fences (```lang … ```); nothing else of Markdown matters
//! here, so no Markdown parser is pulled in.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NOT_RUN: &[(&str, &str)] = &[
    ("serve", "the daemon does not return"),
    ("bench", "a load test of minutes"),
];

struct Block {
    file: String,
    line: usize,
    lang: String,
    body: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The fenced code blocks of `path`, indented ones (inside a list item) included.
fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let file = path.strip_prefix(root()).unwrap().display().to_string();
    let mut out = Vec::new();
    let mut open: Option<(usize, usize, String, Vec<String>)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(lang) = trimmed.strip_prefix("```") {
                    open = Some((i + 1, indent, lang.trim().to_owned(), Vec::new()));
                }
            }
            Some((start, ind, lang, body)) => {
                if trimmed == "```" {
                    out.push(Block {
                        file: file.clone(),
                        line: *start,
                        lang: std::mem::take(lang),
                        body: std::mem::take(body).join("\n"),
                    });
                    open = None;
                } else {
                    let cut = line
                        .char_indices()
                        .take_while(|(n, c)| *n < *ind && *c == ' ')
                        .count();
                    body.push(line[cut..].to_owned());
                }
            }
        }
    }
    assert!(open.is_none(), "{file}: a code block is never closed");
    out
}

fn is_flow(block: &Block) -> bool {
    matches!(block.lang.as_str(), "yaml" | "yml")
        && block.body.lines().any(|l| l.starts_with("flow:"))
        && block.body.lines().any(|l| l.starts_with("steps:"))
}

/// `# flows/NAME.yaml` on a flow block's first lines: where the docs say to put it.
fn named_path(block: &Block) -> Option<String> {
    block
        .body
        .lines()
        .take(3)
        .filter_map(|l| l.strip_prefix("# "))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .find(|p| p.starts_with("flows/") && p.ends_with(".yaml"))
        .map(str::to_owned)
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A copy of what the docs' commands read: `flows/` (templates included), `canvas.yaml`, an
/// empty `schema/`, and `events.jsonl` holding the lines docs/runtime.md shows for it.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy(&root().join("flows"), &dir.path().join("flows"));
    std::fs::copy(root().join("canvas.yaml"), dir.path().join("canvas.yaml")).unwrap();
    std::fs::create_dir_all(dir.path().join("schema")).unwrap();
    let events = blocks(&root().join("docs/runtime.md"))
        .into_iter()
        .find(|b| b.lang == "json" && b.body.starts_with("{\"kind\":"))
        .expect("docs/runtime.md shows the lines of events.jsonl");
    std::fs::write(dir.path().join("events.jsonl"), events.body + "\n").unwrap();
    dir
}

fn canvas(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canvas"));
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1");
    for var in [
        "CANVAS_DATABASE_URL",
        "CANVAS_FLOWS",
        "CANVAS_CONFIG",
        "CANVAS_DATABASE_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_flow_in_the_docs_validates() {
    let dir = workspace();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in doc_files() {
        if path.ends_with("docs/errors.md") {
            continue; // deliberate mistakes
        }
        for b in blocks(&path).iter().filter(|b| is_flow(b)) {
            // Alone (its id may be a shipped flow's), beside the shipped templates.
            let file = dir.path().join("flows/doc-example.yaml");
            std::fs::write(&file, format!("{}\n", b.body)).unwrap();
            let out = canvas(dir.path(), &["validate", "flows/doc-example.yaml"], &[]);
            checked += 1;
            if out.status.code() != Some(0) {
                failures.push(format!(
                    "{}:{}: the flow does not validate:\n{}",
                    b.file,
                    b.line,
                    said(&out)
                ));
            }
        }
    }
    assert!(
        checked >= 3,
        "found only {checked} flows in the docs: is the block finder broken?"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One shell line as `(environment, arguments, stdout file)`; `None` when it is not a
/// `canvas` command.
#[allow(clippy::type_complexity)]
fn parse_command(line: &str) -> Option<(Vec<(String, String)>, Vec<String>, Option<String>)> {
    let line = line.split(" # ").next().unwrap_or(line);
    // After `|` comes another program.
    let line = line.split(" | ").next().unwrap_or(line).trim();
    let line = line.strip_prefix("$ ").unwrap_or(line);
    let (line, redirect) = match line.split_once(" > ") {
        Some((cmd, file)) => (cmd, Some(file.trim().to_owned())),
        None => (line, None),
    };
    let mut words = line.split_whitespace().peekable();
    let mut env = Vec::new();
    while let Some(w) = words.peek() {
        match w.split_once('=') {
            Some((k, v)) if k.chars().all(|c| c.is_ascii_uppercase() || c == '_') => {
                env.push((k.to_owned(), v.to_owned()));
                words.next();
            }
            _ => break,
        }
    }
    if words.next() != Some("canvas") {
        return None;
    }
    let args: Vec<String> = words.map(str::to_owned).collect();
    assert!(
        !args.iter().any(|a| a.contains(['"', '\''])),
        "`{line}`: quoted arguments are beyond this test's parser"
    );
    Some((env, args, redirect))
}

#[test]
fn every_command_in_the_docs_runs() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for path in doc_files() {
        let blocks = blocks(&path);
        let dir = workspace();
        // A flow the doc tells you to create (`# flows/hello.yaml`) is there for its commands.
        for b in blocks.iter().filter(|b| is_flow(b)) {
            if let Some(name) = named_path(b) {
                let target = dir.path().join(&name);
                if !target.exists() {
                    std::fs::write(&target, format!("{}\n", b.body)).unwrap();
                }
            }
        }
        for b in blocks
            .iter()
            .filter(|b| matches!(b.lang.as_str(), "sh" | "bash" | "shell" | "console"))
        {
            for line in b.body.lines() {
                let Some((env, args, redirect)) = parse_command(line) else {
                    continue;
                };
                if let Some((_, why)) = NOT_RUN
                    .iter()
                    .find(|(c, _)| args.first().map(String::as_str) == Some(*c))
                {
                    eprintln!("{}:{}: not run ({why}): {line}", b.file, b.line);
                    continue;
                }
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let envv: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let out = canvas(dir.path(), &argv, &envv);
                ran += 1;
                if let Some(file) = redirect {
                    std::fs::write(dir.path().join(file), &out.stdout).unwrap();
                }
                if out.status.code() != Some(0) {
                    failures.push(format!(
                        "{}:{}: `{}` exits {:?}:\n{}",
                        b.file,
                        b.line,
                        line.trim(),
                        out.status.code(),
                        said(&out)
                    ));
                }
            }
        }
    }
    assert!(
        ran >= 10,
        "ran only {ran} commands from the docs: is the block finder broken?"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_command_synopsis_matches_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in doc_files() {
        for b in blocks(&path)
            .iter()
            .filter(|b| b.lang.is_empty() || b.lang == "text")
        {
            for line in b.body.lines() {
                let Some(rest) = line.trim().strip_prefix("canvas ") else {
                    continue;
                };
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words.iter().any(|w| w.ends_with(':')) {
                    continue; // output, such as `canvas bench validate: 1000 flow files…`
                }
                // The subcommand: the leading lower-case words.
                let sub: Vec<&str> = words
                    .iter()
                    .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
                    .take_while(|w| !w.starts_with('-'))
                    .copied()
                    .collect();
                let help = canvas(dir.path(), &[&sub[..], &["--help"]].concat(), &[]);
                checked += 1;
                if help.status.code() != Some(0) {
                    failures.push(format!(
                        "{}:{}: `canvas {}` is no command: {}",
                        b.file,
                        b.line,
                        sub.join(" "),
                        said(&help)
                    ));
                    continue;
                }
                let text = String::from_utf8_lossy(&help.stdout);
                for flag in words.iter().filter_map(|w| {
                    let w = w.trim_start_matches('[');
                    w.strip_prefix("--").map(|f| {
                        f.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                            .next()
                            .unwrap_or("")
                    })
                }) {
                    if !text.contains(&format!("--{flag}")) {
                        failures.push(format!(
                            "{}:{}: `canvas {}` has no option `--{flag}`",
                            b.file,
                            b.line,
                            sub.join(" ")
                        ));
                    }
                }
            }
        }
    }
    assert!(checked >= 8, "checked only {checked} synopses");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn channels_md_showed_a_node_snippet_instead_of_the_webhook_message_body() {
    // The body channels.md shows is what a webhook gets: the same keys, the same shape.
    let block = blocks(&root().join("docs/channels.md"))
        .into_iter()
        .find(|b| b.lang == "json" && b.body.contains("\"customer_id\""))
        .expect("docs/channels.md shows the webhook message body");
    let shown: serde_json::Value = serde_json::from_str(&block.body)
        .unwrap_or_else(|e| panic!("{}:{}: not JSON: {e}", block.file, block.line));
    let msg = canvas_channels::Message {
        key: shown["key"].as_str().unwrap().to_owned(),
        kind: canvas_channels::MessageKind::Message,
        flow: shown["flow"].as_str().unwrap().to_owned(),
        step: shown["step"].as_str().unwrap().to_owned(),
        customer_id: shown["customer_id"].as_str().unwrap().to_owned(),
        address: shown["address"].as_str().map(str::to_owned),
        template: shown["template"].as_str().map(str::to_owned),
        payload: shown["content"].clone(),
        now: chrono::DateTime::UNIX_EPOCH,
    };
    let channel = shown["channel"].as_str().unwrap();
    assert_eq!(canvas_channels::envelope(channel, &msg), shown);
}

#[test]
fn run_help_spoke_of_serve_in_the_future_tense() {
    let dir = tempfile::tempdir().unwrap();
    let help = canvas(dir.path(), &["run", "--help"], &[]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("`canvas serve` does this"), "{text}");
    assert!(!text.contains(" will "), "{text}");
}

#[test]
fn runtime_md_said_the_daemon_had_not_landed_and_old_versions_were_lost() {
    let text = std::fs::read_to_string(root().join("docs/runtime.md")).unwrap();
    for stale in [
        "Until the daemon",
        "(`canvas serve`) lands",
        "will\nrun in the daemon",
        "comes with the\n  daemon",
    ] {
        assert!(
            !text.contains(stale),
            "docs/runtime.md still says `{stale}`"
        );
    }
    assert!(text.contains("rebuilds the old\n  versions"), "{text}");
}
