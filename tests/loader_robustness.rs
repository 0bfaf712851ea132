//! No input may panic or hang the loader: junk, huge files, deep nesting, alias bombs, and
//! random damage to real flows all end in diagnostics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use canvas_engine::diagnostic::Code;
use canvas_engine::project::validate_files;
use canvas_engine::template::TemplateDir;
use proptest::prelude::*;

fn compile_text(text: &str) -> Vec<Code> {
    let registry = canvas_nodes::catalogue();
    let templates = TemplateDir::scan(Path::new("flows/templates"));
    canvas_engine::compile(Path::new("fuzz.yaml"), text, &registry, &templates)
        .diagnostics
        .into_iter()
        .map(|d| d.code)
        .collect()
}

fn validate_bytes(bytes: &[u8]) -> (Vec<Code>, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input.yaml");
    std::fs::write(&path, bytes).expect("write");
    let started = Instant::now();
    let v = validate_files(&[path], &canvas_nodes::catalogue());
    (
        v.diagnostics.into_iter().map(|d| d.code).collect(),
        started.elapsed(),
    )
}

#[test]
fn a_ten_megabyte_file_is_refused_by_size() {
    let big = "# padding\n".repeat(1024 * 1024);
    let (codes, took) = validate_bytes(big.as_bytes());
    assert_eq!(codes, [Code::Limit]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn binary_junk_is_not_utf8() {
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (codes, _) = validate_bytes(&junk);
    assert_eq!(codes, [Code::Io]);
}

#[test]
fn deep_nesting_is_a_limit() {
    let deep = format!("flow: x\nsteps: {}{}\n", "[".repeat(5000), "]".repeat(5000));
    let codes = compile_text(&deep);
    assert_eq!(codes.len(), 1, "{codes:?}");
    assert!(matches!(codes[0], Code::Limit | Code::Syntax), "{codes:?}");
    let block = (0..200)
        .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
        .collect::<String>();
    assert_eq!(compile_text(&block), [Code::Limit]);
}

#[test]
fn an_alias_bomb_is_a_limit() {
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let started = Instant::now();
    assert_eq!(compile_text(&bomb), [Code::Limit]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn small_aliases_still_work() {
    let text = "flow: aliased\ntrigger:\n  event: order_paid\nsteps:\n  - &hello\n    id: hello\n    send: sms\n    template: birthday/day\n";
    assert_eq!(compile_text(text), []);
}

fn real_flows() -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("flows")
        .expect("flows")
        .map(|e| e.expect("entry").path())
        .filter(|p| canvas_engine::project::is_flow_file(p))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read"))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = compile_text(&text);
    }

    #[test]
    fn yaml_ish_text_never_panics(text in "[a-z_:\\- \\n\\[\\]{}&*!|>'\"#%@0-9]{0,300}") {
        let _ = compile_text(&text);
    }

    #[test]
    fn damaged_real_flows_never_panic(which in 0usize..64, cut in 0usize..8000, len in 0usize..40, insert in "[\\[\\]{}:\\-&* a-z0-9\\n\"]{0,12}") {
        let flows = real_flows();
        let original = &flows[which % flows.len()];
        let chars: Vec<char> = original.chars().collect();
        let at = cut % chars.len().max(1);
        let end = (at + len).min(chars.len());
        let damaged: String = chars[..at].iter().chain(insert.chars().collect::<Vec<_>>().iter()).chain(chars[end..].iter()).collect();
        let _ = compile_text(&damaged);
    }
}
