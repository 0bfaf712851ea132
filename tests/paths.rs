//! Paths work however they are spelled: from inside a subfolder, relative without `./`,
//! absolute; and every "cannot" says why.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn canvas_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const TEST: &str = "flow: welcome
start: 2026-03-02T09:00:00Z
run_until: 2026-03-03T00:00:00Z
customers:
  - id: c1
    attributes: { phone: \"+1\", first_name: Ann }
events:
  - { at: 2026-03-02T10:00:00Z, customer: c1, name: signed_up }
expect:
  - customer: c1
    sent:
      - { at: 2026-03-02T10:00Z, channel: sms, template: w/hello }
    waiting_at: wait-order
";

/// `root/flows/templates/w/*.txt`, `root/flows/canvas.yaml` and the welcome flow with its
/// test one level down, in `root/flows/seasonal/`.
fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let flows = root.path().join("flows");
    common::write_flows(&flows, "");
    let seasonal = flows.join("seasonal");
    std::fs::create_dir_all(&seasonal).unwrap();
    std::fs::rename(flows.join("welcome.yaml"), seasonal.join("welcome.yaml")).unwrap();
    std::fs::write(seasonal.join("welcome.test.yaml"), TEST).unwrap();
    root
}

#[test]
fn validate_missed_the_templates_folder_above_the_first_path_component() {
    let root = project();
    let flows = root.path().join("flows");
    let seasonal = flows.join("seasonal");
    let absolute = seasonal.join("welcome.yaml");
    for (dir, arg) in [
        (&seasonal, "welcome.yaml"),
        (&seasonal, "."),
        (&seasonal, "./welcome.yaml"),
        (&flows, "seasonal"),
        (&flows, "seasonal/welcome.yaml"),
        (&flows, "seasonal/../seasonal"),
        (&root.path().to_path_buf(), "flows/seasonal"),
        (&root.path().to_path_buf(), absolute.to_str().unwrap()),
    ] {
        let out = canvas_in(dir, &["validate", arg]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "`canvas validate {arg}` in {}: {}",
            dir.display(),
            text(&out)
        );
    }
}

#[test]
fn test_in_a_subfolder_said_only_no_valid_flow_next_to_this_file() {
    let root = project();
    let flows = root.path().join("flows");
    let seasonal = flows.join("seasonal");
    for (dir, arg) in [
        (&seasonal, "welcome.test.yaml"),
        (&seasonal, "."),
        (&flows, "seasonal/welcome.test.yaml"),
        (&flows, "seasonal"),
        (&root.path().to_path_buf(), "flows"),
    ] {
        let out = canvas_in(dir, &["test", arg]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "`canvas test {arg}` in {}: {}",
            dir.display(),
            text(&out)
        );
        assert!(text(&out).contains("PASS"), "{}", text(&out));
    }

    // A flow that does not validate: the test says which file and why.
    let flow = seasonal.join("welcome.yaml");
    let good = std::fs::read_to_string(&flow).unwrap();
    std::fs::write(&flow, good.replace("w/thanks", "w/no-such-template")).unwrap();
    let out = canvas_in(&flows, &["test", "seasonal/welcome.test.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("flow `welcome` (seasonal/welcome.yaml) does not validate")
            && said.contains("w/no-such-template")
            && said.contains("run `canvas validate seasonal/welcome.yaml`"),
        "{said}"
    );
    std::fs::write(&flow, good).unwrap();

    // A test naming a flow that is not there: which flows were found, and a suggestion.
    let test = seasonal.join("welcome.test.yaml");
    std::fs::write(&test, TEST.replace("flow: welcome", "flow: welcom")).unwrap();
    let out = canvas_in(&seasonal, &["test", "welcome.test.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("no flow `welcom` in . (searched recursively): found `welcome`")
            && said.contains("did you mean `welcome`?"),
        "{said}"
    );
}

#[test]
fn validate_on_a_test_file_did_not_say_to_run_canvas_test() {
    let root = project();
    let seasonal = root.path().join("flows/seasonal");
    let out = canvas_in(&seasonal, &["validate", "welcome.test.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let said = text(&out);
    assert!(
        said.contains(
            "welcome.test.yaml is a flow test, not a flow: run `canvas test welcome.test.yaml`"
        ),
        "{said}"
    );
}

#[test]
fn canvas_yaml_above_a_subfolder_was_not_found_from_inside_it() {
    // The policy in `flows/canvas.yaml` turns quiet hours off; from inside `flows/seasonal`
    // a sign-up at 23:00 UTC is greeted at once only if that file is found.
    let root = project();
    let seasonal = root.path().join("flows/seasonal");
    let flow = seasonal.join("welcome.yaml");
    let marketing = std::fs::read_to_string(&flow)
        .unwrap()
        .replace("    priority: transactional\n", "");
    std::fs::write(&flow, marketing).unwrap();
    let night = TEST
        .replace(
            "2026-03-02T10:00:00Z, customer",
            "2026-03-02T23:00:00Z, customer",
        )
        .replace("2026-03-02T10:00Z, channel", "2026-03-02T23:00Z, channel")
        .replace(
            "run_until: 2026-03-03T00:00:00Z",
            "run_until: 2026-03-03T01:00:00Z",
        );
    std::fs::write(seasonal.join("welcome.test.yaml"), night).unwrap();
    let out = canvas_in(&seasonal, &["test", "welcome.test.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn run_and_simulate_on_a_broken_flow_did_not_say_why() {
    let root = project();
    let flow = root.path().join("flows/seasonal/welcome.yaml");
    let good = std::fs::read_to_string(&flow).unwrap();
    std::fs::write(&flow, good.replace("on_timeout: done", "on_timeout: dne")).unwrap();
    let out = canvas_in(
        root.path(),
        &["run", "--flows", "flows", "--database", "sqlite://c.db"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("flows has errors: ")
            && said.contains("welcome.yaml:")
            && said.contains("unknown step `dne`"),
        "{said}"
    );
    let out = canvas_in(
        root.path(),
        &[
            "simulate",
            "flows/seasonal/welcome.yaml",
            "--timeline",
            "flows/seasonal/welcome.test.yaml",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("does not validate: ") && said.contains("unknown step `dne`"),
        "{said}"
    );
}
