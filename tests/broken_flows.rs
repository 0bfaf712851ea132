//! The corpus of broken flows: each file under tests/broken has one defect and says in its
//! first line which diagnostic it must get: `# expect: CODE LINE message`, where LINE is a
//! line of the flow file, `templates:N` a line of the template it uses, or `-` for none.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use canvas_engine::diagnostic::Code;
use canvas_engine::project::{validate_files, validate_paths};

struct Expect {
    code: String,
    line: Option<(bool, u32)>,
    message: String,
}

fn expectation(path: &Path) -> Option<Expect> {
    let text = std::fs::read_to_string(path).expect("readable");
    let first = text.lines().next().unwrap_or("");
    let rest = first.strip_prefix("# expect: ")?;
    if rest == "none" {
        return None;
    }
    let mut parts = rest.splitn(3, ' ');
    let code = parts.next().expect("code").to_owned();
    let line = parts.next().expect("line");
    let message = parts.next().unwrap_or("").to_owned();
    let line = match line {
        "-" => None,
        l => match l.strip_prefix("templates:") {
            Some(n) => Some((true, n.parse().expect("line number"))),
            None => Some((false, l.parse().expect("line number"))),
        },
    };
    Some(Expect {
        code,
        line,
        message,
    })
}

fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/broken")
        .expect("tests/broken exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_broken_flow_gets_exactly_its_diagnostic() {
    let registry = canvas_nodes::catalogue();
    let mut failures = Vec::new();
    let files = corpus();
    assert!(
        files.len() >= 50,
        "the corpus shrank to {} files",
        files.len()
    );
    for path in &files {
        let expect =
            expectation(path).unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display()));
        let v = validate_files(std::slice::from_ref(path), &registry);
        let got: Vec<String> = v
            .diagnostics
            .iter()
            .map(|d| {
                format!(
                    "{} {:?} {}",
                    d.code,
                    d.location.map(|l| (l.line, l.column)),
                    d.message
                )
            })
            .collect();
        let [d] = v.diagnostics.as_slice() else {
            failures.push(format!(
                "{}: expected one diagnostic, got {}: {got:#?}",
                path.display(),
                got.len()
            ));
            continue;
        };
        let line_ok = match expect.line {
            None => d.location.is_none(),
            Some((in_template, line)) => {
                d.location.is_some_and(|l| l.line == line)
                    && (d.file.components().any(|c| c.as_os_str() == "templates") == in_template)
            }
        };
        if d.code.as_str() != expect.code || !line_ok || !d.message.contains(&expect.message) {
            failures.push(format!(
                "{}: expected {} at {:?} containing {:?}; got {}",
                path.display(),
                expect.code,
                expect.line,
                expect.message,
                got[0]
            ));
        }
        if d.location.is_some()
            && d.help.is_none()
            && d.label.is_none()
            && !matches!(
                d.code,
                Code::Syntax
                    | Code::WrongType
                    | Code::TemplateSyntax
                    | Code::TemplateReference
                    | Code::ExprSyntax
            )
        {
            failures.push(format!(
                "{}: {} has neither help nor label",
                path.display(),
                d.code
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_corpus_covers_every_code() {
    let mut seen: BTreeSet<String> = corpus()
        .iter()
        .filter_map(|p| expectation(p))
        .map(|e| e.code)
        .collect();
    seen.insert("CNV0202".to_owned()); // duplicate flow ids: the folder test below
    seen.insert("CNV0003".to_owned()); // unreadable or not UTF-8: tests/loader_robustness.rs
    // Flows against the `channels:` of canvas.yaml: tests/validate_channels.rs
    seen.insert("CNV0409".to_owned());
    seen.insert("CNV0410".to_owned());
    let missing: Vec<&str> = Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !seen.contains(*c))
        .collect();
    assert!(missing.is_empty(), "no broken flow shows {missing:?}");
}

#[test]
fn the_same_flow_id_in_two_files_is_reported_in_the_second() {
    let registry = canvas_nodes::catalogue();
    let v =
        validate_paths(&[PathBuf::from("tests/broken/duplicate-flow")], &registry).expect("folder");
    let [d] = v.diagnostics.as_slice() else {
        panic!("expected one diagnostic, got {:#?}", v.diagnostics)
    };
    let expect = expectation(Path::new("tests/broken/duplicate-flow/b.yaml")).expect("b expects");
    assert_eq!(d.code.as_str(), expect.code);
    assert!(d.file.ends_with("b.yaml"));
    assert_eq!(d.location.map(|l| l.line), expect.line.map(|l| l.1));
    assert!(d.message.contains(&expect.message), "{}", d.message);
    assert!(d.related[0].file.ends_with("a.yaml"));
}

#[test]
fn all_errors_of_a_file_come_at_once() {
    let registry = canvas_nodes::catalogue();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("many.yaml");
    std::fs::write(
        &path,
        "flow: many\ntimezone: Mars/Base\ntrigger:\n  event: order_paid\nsteps:\n  - id: a\n    send: smss\n    template: x\n    next: nowhere\n  - id: b\n    wait: { for: 3x }\n  - id: c\n    tempalte: x\n    send: sms\n  - id: d\n    split: { a: 10%, b: 10% }\n",
    )
    .expect("write");
    let v = validate_files(&[path], &registry);
    let codes: Vec<&str> = v.diagnostics.iter().map(|d| d.code.as_str()).collect();
    assert_eq!(
        codes,
        [
            "CNV0303", "CNV0401", "CNV0204", "CNV0301", "CNV0101", "CNV0208"
        ],
        "{:#?}",
        v.diagnostics
    );
}
