//! Every name a template or an expression reads is checked at validate time: `vars.NAME`
//! against the calls on the paths to the step, `event` against the trigger and the event
//! waits, template variables at their line and column in the template file.

use std::path::Path;
use std::process::{Command, Output};

use canvas_engine::diagnostic::{Diagnostic, Severity};
use canvas_engine::project::validate_paths;

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// Validate a folder holding `flow.yaml` and the given templates.
fn validate(flow: &str, templates: &[(&str, &str)]) -> (tempfile::TempDir, Vec<Diagnostic>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "flow.yaml", flow);
    for (name, text) in templates {
        write(dir.path(), &format!("templates/{name}"), text);
    }
    let v =
        validate_paths(&[dir.path().to_path_buf()], &canvas_nodes::catalogue()).expect("validate");
    (dir, v.diagnostics)
}

fn canvas(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_canvas"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("canvas runs")
}

/// Two arms, one through the call that saves `coupon`, meeting at `send`.
fn some_paths_flow(read: &str) -> String {
    format!(
        "flow: some-paths
trigger: {{ event: order_paid }}
steps:
  - id: pick
    branch:
      - when: customer.vip == true
        next: issue
      - else: send
  - id: issue
    call: {{ webhook: coupons, save_as: coupon }}
  - id: send
    branch:
      - when: {read}
        next: thanks
      - else: thanks
  - id: thanks
    send: sms
    template: thanks
"
    )
}

/// Regression: `vars.coupon` read after a branch that only sometimes passes the call
/// validated silently, and rendered or evaluated as nothing at run time.
#[test]
fn vars_set_on_only_some_paths_is_a_warning() {
    let (dir, diags) = validate(
        &some_paths_flow("vars.coupon.amount > 10"),
        &[("thanks.txt", "Thanks")],
    );
    let [d] = diags.as_slice() else {
        panic!("{diags:#?}")
    };
    assert_eq!(d.code.as_str(), "CNV0307");
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!(d.location.map(|l| (l.line, l.column)), Some((13, 15)));
    assert!(
        d.message
            .contains("`vars.coupon.amount` in step `send` is set on some paths to it but not all"),
        "{}",
        d.message
    );
    // A warning does not fail validation.
    let out = canvas(&["validate", "."], dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("warning[CNV0307]"), "{text}");
    assert!(text.contains("valid (1 warning)"), "{text}");

    // Guarded, it is fine.
    let (_dir, diags) = validate(
        &some_paths_flow("has(vars.coupon) && vars.coupon.amount > 10"),
        &[("thanks.txt", "Thanks")],
    );
    assert!(diags.is_empty(), "{diags:#?}");
}

/// Regression: a template variable no path sets (`{{ vars.voucher.code }}` where the call
/// saves `vouchers`) passed validation; the diagnostic must point into the template file and
/// name the step.
#[test]
fn template_vars_never_set_point_at_the_template_line_and_column() {
    let flow = "flow: voucher
trigger: { event: signed_up }
steps:
  - id: issue
    call: { webhook: coupons, save_as: vouchers }
  - id: hello
    send: [wechat, sms]
    template: welcome/hello
";
    let (dir, diags) = validate(
        flow,
        &[
            (
                "welcome/hello.txt",
                "Welcome {{ customer.first_name | default('friend') }}!\n  Your code: {{ vars.voucher.code }}\n",
            ),
            (
                "welcome/hello.wechat.txt",
                "{% include 'partials/code.txt' %}",
            ),
            (
                "partials/code.txt",
                "{{ vars.vouchers.code }} {{ event.dat.x }}",
            ),
        ],
    );
    type Found<'a> = (String, Option<(u32, u32)>, &'a str, &'a str);
    let found: Vec<Found<'_>> = diags
        .iter()
        .map(|d| {
            (
                d.file
                    .strip_prefix(dir.path())
                    .expect("inside")
                    .display()
                    .to_string(),
                d.location.map(|l| (l.line, l.column)),
                d.code.as_str(),
                d.message.as_str(),
            )
        })
        .collect();
    assert_eq!(found.len(), 2, "{diags:#?}");
    // The included file's typo of an event field, at its place.
    assert_eq!(found[0].0, "templates/partials/code.txt");
    assert_eq!(found[0].1, Some((1, 29)));
    assert_eq!(found[0].2, "CNV0404");
    assert!(
        found[0].3.contains("`event` has no field `dat`"),
        "{}",
        found[0].3
    );
    // The SMS file's `vars.voucher`, at line 2, column 17.
    assert_eq!(found[1].0, "templates/welcome/hello.txt");
    assert_eq!(found[1].1, Some((2, 17)));
    assert_eq!(found[1].2, "CNV0307");
    assert!(
        found[1].3.contains(
            "`vars.voucher.code` in template `welcome/hello` of step `hello` is never set"
        ),
        "{}",
        found[1].3
    );
    assert_eq!(
        diags[1].help.as_deref(),
        Some("did you mean `vars.vouchers`?")
    );
    assert_eq!(diags[1].related[0].message, "used by step `hello`");
    assert!(diags.iter().all(|d| d.severity == Severity::Error));
}

/// Regression: a flow that starts on a schedule read `event.*` in a step no event wait
/// precedes; it validated and the condition failed for every customer.
#[test]
fn event_read_where_no_path_has_an_event_is_an_error() {
    let flow = "flow: monthly
trigger: { schedule: \"0 9 1 * *\" }
steps:
  - id: wait-order
    wait: { event: order_paid, where: event.data.amount > 0, timeout: 7d }
    on_timeout: thanks
  - id: big
    branch:
      - when: event.data.amount > 100
        next: thanks
      - else: thanks
  - id: thanks
    send: sms
    template: thanks
";
    // `big` follows the event; `thanks` is reached with one (through `big`) or without one
    // (the timeout): a warning there, unguarded.
    let (_dir, diags) = validate(
        flow,
        &[("thanks.txt", "Thanks for order {{ event.data.id }}")],
    );
    let got: Vec<(&str, Severity, Option<u32>)> = diags
        .iter()
        .map(|d| (d.code.as_str(), d.severity, d.location.map(|l| l.line)))
        .collect();
    assert_eq!(
        got,
        vec![("CNV0308", Severity::Warning, Some(1))],
        "{diags:#?}"
    );

    let (_dir, diags) = validate(
        &flow.replace("  - id: wait-order\n    wait: { event: order_paid, where: event.data.amount > 0, timeout: 7d }\n    on_timeout: thanks\n", ""),
        &[("thanks.txt", "Thanks")],
    );
    let [d] = diags.as_slice() else {
        panic!("{diags:#?}")
    };
    assert_eq!(d.code.as_str(), "CNV0308");
    assert_eq!(d.severity, Severity::Error);
    assert!(
        d.message.contains("there is no event here"),
        "{}",
        d.message
    );
}

/// A call's answer reaches the steps after it on its success edge; a later call saving
/// another name does not hide it, and names inside a loop or a `set` are the template's own.
#[test]
fn vars_saved_on_every_path_and_template_locals_pass() {
    let flow = "flow: fine
trigger: { event: order_paid }
steps:
  - id: first
    call: { webhook: coupons, save_as: coupon }
  - id: second
    call:
      webhook: crm
      body: { code: \"{{ vars.coupon.code }}\" }
  - id: hello
    send: sms
    template: hello
";
    let (_dir, diags) = validate(
        flow,
        &[(
            "hello.txt",
            "{% set c = vars.coupon %}{{ c.code }} {% for x in vars.second.items %}{{ x.name }}{% endfor %}",
        )],
    );
    assert!(diags.is_empty(), "{diags:#?}");
}

#[test]
fn the_shipped_flows_have_no_warnings() {
    let v = validate_paths(&["flows".into()], &canvas_nodes::catalogue()).expect("flows");
    assert!(v.diagnostics.is_empty(), "{:#?}", v.diagnostics);
}

/// Regression (found merging `on_error` with the scope check): a step reached both by a
/// call's answer and by its `on_error` path was taken to always have `vars.<save_as>`, so a
/// read of it there validated silently although the failure path has none.
#[test]
fn vars_read_after_a_calls_on_error_path_is_a_warning() {
    let flow = "flow: on-error-paths
trigger: { event: order_paid }
steps:
  - id: issue
    call: { webhook: coupons, save_as: coupon }
    on_error: send
  - id: send
    branch:
      - when: vars.coupon.amount > 10
        next: thanks
      - else: thanks
  - id: thanks
    send: sms
    template: thanks
";
    let (_dir, diags) = validate(flow, &[("thanks.txt", "Thanks")]);
    let [d] = diags.as_slice() else {
        panic!("{diags:#?}")
    };
    assert_eq!(
        (d.code.as_str(), d.severity),
        ("CNV0307", Severity::Warning)
    );
    assert!(
        d.message.contains("is set on some paths to it but not all"),
        "{}",
        d.message
    );
    // A step only the failure path reaches has no `vars.coupon` at all: an error.
    let only_on_error = flow.replace(
        "    on_error: send\n  - id: send",
        "    on_error: send\n  - id: ok\n    exit: issued\n  - id: send",
    );
    let (_dir, diags) = validate(&only_on_error, &[("thanks.txt", "Thanks")]);
    assert!(
        diags
            .iter()
            .any(|d| d.code.as_str() == "CNV0307" && d.severity == Severity::Error),
        "{diags:#?}"
    );
}
