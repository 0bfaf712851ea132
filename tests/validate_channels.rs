//! `canvas validate` against the `channels:` section of `canvas.yaml`: a folder that
//! validates is one `canvas serve` starts on, and an SMS template's fixed text fits the
//! configured number of segments.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn canvas(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("CANVAS_API_TOKEN", "write-token-1")
        .env("CANVAS_API_READ_TOKEN", "read-token-1")
        .output()
        .expect("canvas runs")
}

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

const FLOW: &str = "flow: uses-channels
name: U
timezone: UTC
trigger: { event: go }
steps:
  - id: text
    send: sms
    template: t/hello
  - id: notify
    send: [push, wecom]
    template: t/hello
  - id: coupon
    call: { webhook: crm }
  - id: associate
    task: { assign: customer.associate, text: Call her }
";

/// A flows folder whose `canvas.yaml` has `channels:` with `sms` only.
fn project(channels: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "flows/u.yaml", FLOW);
    write(dir.path(), "flows/templates/t/hello.txt", "Hello\n");
    write(
        dir.path(),
        "flows/canvas.yaml",
        &format!("timezone: UTC\nchannels:\n{channels}"),
    );
    dir
}

const SMS_ONLY: &str = "  sms:\n    type: webhook\n    url: http://127.0.0.1:9/sms\n";

fn diagnostics(out: &Output) -> Vec<Value> {
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    doc["diagnostics"].as_array().expect("diagnostics").clone()
}

/// Regression: flows sent on channels `canvas.yaml` did not configure (`push`, `wecom`, a
/// `call` webhook, `task`); `validate` said all was well and `serve` exited 2.
#[test]
fn validate_reports_channels_canvas_yaml_does_not_configure() {
    let dir = project(SMS_ONLY);
    let out = canvas(&["validate", "flows", "--format", "json"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let found: Vec<(String, u64, u64, String)> = diagnostics(&out)
        .iter()
        .map(|d| {
            (
                d["code"].as_str().unwrap_or("").to_owned(),
                d["line"].as_u64().unwrap_or(0),
                d["column"].as_u64().unwrap_or(0),
                d["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let at: Vec<(&str, u64, u64)> = found
        .iter()
        .map(|(c, l, col, _)| (c.as_str(), *l, *col))
        .collect();
    // `send: [push, wecom]` on line 10, the webhook name on line 13, `task:` on line 15.
    assert_eq!(
        at,
        vec![
            ("CNV0409", 10, 11),
            ("CNV0409", 10, 11),
            ("CNV0409", 13, 22),
            ("CNV0409", 15, 11),
        ],
        "{found:#?}"
    );
    for (name, (_, _, _, message)) in ["push", "wecom", "crm", "task"].iter().zip(&found) {
        assert!(message.contains(&format!("`{name}`")), "{message}");
        assert!(message.contains("does not configure it"), "{message}");
    }

    // What `serve` refuses is what `validate` reported.
    let serve = canvas(
        &[
            "serve",
            "--flows",
            "flows",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite://c.db",
        ],
        dir.path(),
    );
    assert_eq!(serve.status.code(), Some(2));
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(err.contains("`crm`, `push`, `task`, `wecom`"), "{err}");
}

#[test]
fn validate_passes_when_every_channel_is_configured() {
    let dir = project(&format!(
        "{SMS_ONLY}  push:\n    type: webhook\n    url: http://127.0.0.1:9/push\n  \
         wecom:\n    type: wechat\n    url: http://127.0.0.1:9/wecom\n  \
         crm:\n    type: webhook\n    url: http://127.0.0.1:9/crm\n  \
         task:\n    type: webhook\n    url: http://127.0.0.1:9/task\n"
    ));
    let out = canvas(&["validate", "flows"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Regression: nothing checked an SMS template against the segments it may cost.
#[test]
fn validate_checks_sms_templates_against_max_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(
        d,
        "flows/s.yaml",
        "flow: texts\nname: T\ntimezone: UTC\ntrigger: { event: go }\nsteps:\n  \
         - { id: short, send: sms, template: t/short }\n  \
         - { id: long, send: sms, template: t/long }\n  \
         - { id: chat, send: wechat, template: t/long }\n",
    );
    // 71 Chinese characters of fixed text: two UCS-2 segments, whatever the name is.
    write(
        d,
        "flows/templates/t/long.txt",
        &format!("{{{{ customer.name }}}}{}\n", "生".repeat(71)),
    );
    // 160 GSM-7 characters plus a long value: the value is not counted, nor the newline.
    write(
        d,
        "flows/templates/t/short.txt",
        &format!("{}{{{{ customer.name }}}}\n", "a".repeat(160)),
    );
    write(
        d,
        "flows/canvas.yaml",
        "timezone: UTC\nchannels:\n  sms:\n    type: sms\n    url: http://127.0.0.1:9/sms\n    \
         max_segments: 1\n  wechat:\n    type: wechat\n    url: http://127.0.0.1:9/wx\n",
    );
    let out = canvas(&["validate", "flows", "--format", "json"], d);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let diags = diagnostics(&out);
    assert_eq!(diags.len(), 1, "{diags:#?}");
    let d0 = &diags[0];
    assert_eq!(d0["code"], "CNV0410");
    assert!(
        d0["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("templates/t/long.txt")),
        "{d0}"
    );
    let message = d0["message"].as_str().unwrap_or("");
    assert!(message.contains("is 2 SMS segments"), "{message}");
    assert!(message.contains("allows 1"), "{message}");
    let related = d0["related"].as_array().expect("related");
    assert_eq!(related[0]["line"], 6, "{related:?}");

    // `max_segments` belongs to the SMS channel only.
    write(
        d,
        "flows/canvas.yaml",
        "timezone: UTC\nchannels:\n  sms:\n    type: sms\n    url: http://127.0.0.1:9/sms\n  \
         wechat:\n    type: wechat\n    url: http://127.0.0.1:9/wx\n    max_segments: 1\n",
    );
    let out = canvas(&["validate", "flows"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("it goes under the `sms` channel"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Regression: the shipped flows use channels (`task`, `push`, `wecom`) that
/// docs/channels.md never explained how to configure.
#[test]
fn docs_channels_explains_every_catalogue_channel() {
    let docs = std::fs::read_to_string("docs/channels.md").expect("docs/channels.md");
    let registry = canvas_nodes::catalogue();
    let mut names: Vec<&str> = registry.channels().map(|c| c.name.as_str()).collect();
    names.push(canvas_engine::flow::TASK_CHANNEL);
    for name in names {
        assert!(
            docs.contains(&format!("### `{name}`")),
            "docs/channels.md has no `### `{name}`` section"
        );
    }
}

/// Regression: a typo in a gateway's `body:` template (`{{ too }}` for `{{ to }}`) passed
/// `canvas validate` and failed the first send.
#[test]
fn validate_rejects_a_typo_in_a_gateway_body() {
    let dir = project(
        "  sms:\n    type: sms\n    url: http://127.0.0.1:9/sms\n    \
         body: '{\"to\": {{ too | tojson }}, \"text\": {{ text | tojson }}}'\n  \
         wecom:\n    type: wechat\n    url: http://127.0.0.1:9/send?to={{ to }}&k={{ kye }}\n",
    );
    let out = canvas(&["validate", "flows", "--format", "json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let typos: Vec<(u64, String)> = diagnostics(&out)
        .iter()
        .filter(|d| d["code"] == "CNV0103")
        .map(|d| {
            (
                d["line"].as_u64().unwrap_or(0),
                d["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(typos.len(), 2, "{typos:#?}");
    assert_eq!(typos[0].0, 6, "{typos:#?}");
    assert!(
        typos[0]
            .1
            .contains("channel `sms`: `body`: unknown name `too`"),
        "{typos:#?}"
    );
    assert_eq!(typos[1].0, 9, "{typos:#?}");
    assert!(
        typos[1]
            .1
            .contains("channel `wecom`: `url`: unknown name `kye`"),
        "{typos:#?}"
    );
}

/// Every channel as a `sandbox` validates; a sandbox with a gateway's key does not, and
/// `validate` names the key.
#[test]
fn validate_checks_sandbox_channels() {
    let all = "  sms: { type: sandbox }\n  push: { type: sandbox }\n  wecom: { type: sandbox }\n  \
               crm: { type: sandbox, response: { ok: true } }\n  task: { type: sandbox }\n";
    let dir = project(all);
    let out = canvas(&["validate", "flows"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let typo = all.replace("push: { type: sandbox }", "push: { type: sandbox, url: x }");
    let dir = project(&typo);
    let out = canvas(&["validate", "flows"], dir.path());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("unknown key `url`"), "{said}");
    assert!(said.contains("`response` or `max_segments`"), "{said}");
}
