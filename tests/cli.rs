//! End-to-end tests of the `canvas` binary: exit codes, output formats, graphs, schema.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn canvas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("canvas runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn flow_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("flows")
        .expect("flows")
        .map(|e| e.expect("entry").path())
        .filter(|p| canvas_engine::project::is_flow_file(p))
        .collect();
    files.sort();
    files
}

#[test]
fn the_shipped_flows_are_valid() {
    let out = canvas(&["validate", "flows"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(flow_files().len() >= 9, "at least nine journeys ship");
}

#[test]
fn every_flow_points_editors_at_the_schema() {
    for f in flow_files() {
        let text = std::fs::read_to_string(&f).expect("read");
        assert!(
            text.lines().next()
                == Some("# yaml-language-server: $schema=../schema/flow.schema.json"),
            "{} must start with the schema modeline",
            f.display()
        );
    }
}

#[test]
fn invalid_files_exit_1_with_every_format() {
    let file = "tests/broken/unknown-next.yaml";
    let human = canvas(&["validate", file]);
    assert_eq!(human.status.code(), Some(1));
    let github = canvas(&["validate", "--format", "github", file]);
    assert_eq!(github.status.code(), Some(1));
    assert_eq!(
        stdout(&github).trim(),
        "::error file=tests/broken/unknown-next.yaml,line=9,col=11,endLine=9,endColumn=20,title=CNV0204::unknown step `wait-bday` (help: did you mean `wait-birthday`?)"
    );
    let json = canvas(&["validate", "--format", "json", file]);
    assert_eq!(json.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json output");
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["diagnostics"][0]["code"], "CNV0204");
    assert_eq!(doc["diagnostics"][0]["line"], 9);
    assert_eq!(doc["diagnostics"][0]["column"], 11);
    assert_eq!(doc["files"][0]["flow"], "unknown-next");
}

#[test]
fn valid_files_report_their_version_in_json() {
    let out = canvas(&["validate", "--format", "json", "flows/birthday-ritual.yaml"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let version = doc["files"][0]["version"].as_str().expect("a version");
    assert_eq!(version.len(), 64);
    let again = canvas(&["validate", "--format", "json", "flows/birthday-ritual.yaml"]);
    let doc2: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(
        doc2["files"][0]["version"], version,
        "the same file gives the same version"
    );
}

#[test]
fn usage_and_io_errors_exit_2() {
    assert_eq!(canvas(&["validate", "no/such/dir"]).status.code(), Some(2));
    assert_eq!(
        canvas(&["validate", "--format", "xml", "flows"])
            .status
            .code(),
        Some(2)
    );
    let empty = tempfile::tempdir().expect("tempdir");
    let out = canvas(&["validate", empty.path().to_str().expect("utf8 path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no flow files"));
}

#[test]
fn human_output_matches_its_snapshot() {
    let out = canvas(&["validate", "tests/broken/unknown-next.yaml"]);
    let snapshot = Path::new("tests/snapshots/unknown-next.human.txt");
    let got = stdout(&out);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all("tests/snapshots").expect("mkdir");
        std::fs::write(snapshot, &got).expect("write snapshot");
    }
    let want =
        std::fs::read_to_string(snapshot).expect("snapshot exists (UPDATE_SNAPSHOTS=1 writes it)");
    assert_eq!(got, want);
    assert!(got.contains("tests/broken/unknown-next.yaml:9:11"));
    assert!(got.contains("did you mean `wait-birthday`?"));
}

#[test]
fn graphs_draw_every_flow_in_both_formats() {
    for f in flow_files() {
        let path = f.to_str().expect("utf8");
        let m = canvas(&["graph", path]);
        assert_eq!(m.status.code(), Some(0), "{path}");
        let text = stdout(&m);
        assert!(text.starts_with("flowchart TD\n"), "{path}");
        let d = canvas(&["graph", path, "--format", "dot"]);
        assert_eq!(d.status.code(), Some(0), "{path}");
        assert!(stdout(&d).starts_with("digraph "), "{path}");
    }
}

#[test]
fn graph_edges_carry_conditions_shares_and_timeouts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("templates");
    std::fs::create_dir_all(&t).expect("mkdir");
    std::fs::write(t.join("hi.txt"), "Hi").expect("write");
    let flow = dir.path().join("edges.yaml");
    std::fs::write(
        &flow,
        "flow: edges\ntrigger:\n  event: order_paid\nsteps:\n  - id: ab\n    split: { pick: 45%, hi: 45%, control: 10% }\n  - id: pick\n    branch:\n      - when: has(customer.wechat_id)\n        next: wait-order\n      - else: hi\n  - id: wait-order\n    wait: { event: order_paid, timeout: 7d }\n    on_timeout: hi\n  - id: done\n    exit: bought\n  - id: hi\n    send: sms\n    template: hi\n",
    )
    .expect("write");
    let out = canvas(&["graph", flow.to_str().expect("utf8")]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "s0 -->|\"45%\"| s1",
        "s0 -->|\"10%\"| end_control",
        "s1 -->|\"has(customer.wechat_id)\"| s2",
        "s1 -->|\"else\"| s4",
        "s2 -->|\"timeout 1w\"| s4",
        "s2 -->|\"event\"| s3",
        "s4 --> end_completed",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    let dot = stdout(&canvas(&[
        "graph",
        flow.to_str().expect("utf8"),
        "--format",
        "dot",
    ]));
    assert!(dot.contains("s0 -> s1 [label=\"45%\"];"), "{dot}");
}

#[test]
fn graph_finds_a_flow_by_id() {
    let out = canvas(&["graph", "rare-surprise", "--flows", "flows"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("use sample"));
    assert_eq!(canvas(&["graph", "no-such-flow"]).status.code(), Some(2));
}

#[test]
fn the_committed_schema_is_current() {
    let out = canvas(&["schema"]);
    let committed =
        std::fs::read_to_string("schema/flow.schema.json").expect("schema/flow.schema.json");
    assert!(
        stdout(&out) == committed,
        "schema/flow.schema.json is stale: run `cargo run -- schema > schema/flow.schema.json`"
    );
}

#[test]
fn the_version_ignores_layout_but_not_meaning_or_templates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("templates");
    std::fs::create_dir_all(&t).expect("mkdir");
    std::fs::write(t.join("hi.txt"), "Hi {{ customer.first_name }}").expect("write");
    let version = |text: &str| {
        let f = dir.path().join("v.yaml");
        std::fs::write(&f, text).expect("write");
        let out = canvas(&["validate", "--format", "json", f.to_str().expect("utf8")]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        doc["files"][0]["version"]
            .as_str()
            .expect("valid")
            .to_owned()
    };
    let base = version(
        "flow: v\ntrigger:\n  event: order_paid\nsteps:\n  - id: hi\n    send: sms\n    template: hi\n",
    );
    let relaid = version(
        "# a comment\nflow: v\ntrigger: { event: order_paid }\nsteps:\n- {id: hi, send: sms, template: hi}\n",
    );
    assert_eq!(base, relaid, "comments and layout are not a new version");
    let changed = version(
        "flow: v\ntrigger:\n  event: order_paid\nsteps:\n  - id: hi\n    send: [push, sms]\n    template: hi\n",
    );
    assert_ne!(base, changed);
    std::fs::write(t.join("hi.txt"), "Hello {{ customer.first_name }}").expect("write");
    let new_text = version(
        "flow: v\ntrigger:\n  event: order_paid\nsteps:\n  - id: hi\n    send: sms\n    template: hi\n",
    );
    assert_ne!(base, new_text, "a template edit is a new version");
}

/// `canvas validate` with a watchdog: a run past `limit` is killed and fails the test.
fn validate_within(dir: &Path, limit: std::time::Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args([
            "validate",
            "--format",
            "json",
            dir.to_str().expect("utf8 path"),
        ])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("canvas runs");
    let started = std::time::Instant::now();
    while child.try_wait().expect("poll").is_none() {
        if started.elapsed() > limit {
            child.kill().expect("kill");
            let _ = child.wait();
            panic!("`canvas validate` still ran after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Regression: two nested 100,000-item loops in a template made `canvas validate` run until
/// killed (and `serve` and hot reload with it).
#[test]
fn validate_of_nested_loops_in_a_template_ends_with_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("templates")).expect("mkdir");
    std::fs::write(
        dir.path().join("templates/loop.txt"),
        "Hi\n{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}.{% endfor %}{% endfor %}\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("loop.yaml"),
        "flow: loop\ntrigger:\n  event: order_paid\nsteps:\n  - id: hi\n    send: sms\n    template: loop\n",
    )
    .expect("write");
    let out = validate_within(dir.path(), std::time::Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let d = &doc["diagnostics"][0];
    assert_eq!(d["code"], "CNV0407", "{doc:#}");
    assert_eq!(d["line"], 2, "{doc:#}");
    assert!(
        d["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("templates/loop.txt")),
        "{doc:#}"
    );
}

#[test]
fn an_included_template_is_part_of_the_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("templates");
    std::fs::create_dir_all(t.join("partials")).expect("mkdir");
    std::fs::write(t.join("hi.txt"), "Hi{% include 'partials/footer.txt' %}").expect("write");
    std::fs::write(
        dir.path().join("v.yaml"),
        "flow: v\ntrigger:\n  event: order_paid\nsteps:\n  - id: hi\n    send: sms\n    template: hi\n",
    )
    .expect("write");
    let version = |footer: &str| {
        std::fs::write(t.join("partials/footer.txt"), footer).expect("write");
        let out = validate_within(dir.path(), std::time::Duration::from_secs(60));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(out.status.code(), Some(0), "{doc:#}");
        doc["files"][0]["version"]
            .as_str()
            .expect("valid")
            .to_owned()
    };
    assert_ne!(
        version(" Bye"),
        version(" Ciao"),
        "a footer edit is a new version"
    );
}

#[test]
fn graph_draws_a_calls_error_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("templates");
    std::fs::create_dir_all(&t).expect("mkdir");
    std::fs::write(t.join("hi.txt"), "Hi").expect("write");
    let flow = dir.path().join("errs.yaml");
    std::fs::write(
        &flow,
        "flow: errs\ntrigger:\n  event: order_paid\nsteps:\n  - id: issue\n    call: { webhook: coupons, timeout: 2h }\n    on_error: sorry\n    next: hi\n  - id: sorry\n    exit: no_coupon\n  - id: hi\n    send: sms\n    template: hi\n  - id: strict\n    call: { webhook: coupons }\n",
    )
    .expect("write");
    // `strict` is unreachable: point `hi` at it.
    let text = std::fs::read_to_string(&flow).expect("read");
    std::fs::write(
        &flow,
        text.replace("template: hi\n", "template: hi\n    next: strict\n"),
    )
    .expect("write");
    let out = canvas(&["graph", flow.to_str().expect("utf8")]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "s0 -->|\"error\"| s1",
        "s0 --> s2",
        "within 2h",
        "s3 -->|\"error\"| end_error",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
}

#[test]
fn a_badly_scripted_failing_call_is_a_clear_error_at_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir("flows").expect("flows") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
        }
    }
    copy_dir("flows/templates", &dir.path().join("templates"));
    let test = dir.path().join("stamp-card.test.yaml");
    let text = std::fs::read_to_string(&test).expect("read");
    let bad = text.replace(
        "coupon-service: { code: STAMP-7Q2K, min_spend: 99 }",
        "coupon-service: { fail: 200 }",
    );
    assert_ne!(bad, text, "the shipped test scripts the coupon service");
    std::fs::write(&test, bad).expect("write");
    let out = canvas(&["test", test.to_str().expect("utf8")]);
    let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("stamp-card.test.yaml:")
            && all.contains("`fail: 200` is not an HTTP error status"),
        "{all}"
    );
}

fn copy_dir(from: &str, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("dir") {
        let p = entry.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(p.to_str().expect("utf8"), &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}
