//! How `canvas validate` reports: for people, for tools, for GitHub Actions.

use std::io::Write;

use canvas_engine::Validation;
use canvas_engine::diagnostic::HumanRenderer;
use serde_json::json;

use crate::Format;

pub fn validation(
    out: &mut dyn Write,
    v: &Validation,
    format: Format,
    color: bool,
) -> std::io::Result<()> {
    match format {
        Format::Human => {
            let renderer = HumanRenderer::new(color);
            for d in &v.diagnostics {
                let text = renderer.render(d, v.sources.get(&d.file));
                writeln!(out, "{text}")?;
            }
            let bad = v.files.iter().filter(|f| f.errors > 0).count();
            let errors = v.errors();
            let warnings = match v.warnings() {
                0 => String::new(),
                n => format!(" ({n} warning{})", plural(n)),
            };
            if errors == 0 {
                writeln!(
                    out,
                    "✓ {} flow file{} valid{warnings}",
                    v.files.len(),
                    plural(v.files.len())
                )
            } else {
                // Diagnostics may also point at `canvas.yaml`, which is not a flow file.
                let flow_files: std::collections::BTreeSet<_> =
                    v.files.iter().map(|f| &f.path).collect();
                let other: std::collections::BTreeSet<_> = v
                    .diagnostics
                    .iter()
                    .filter(|d| d.is_error())
                    .map(|d| &d.file)
                    .filter(|f| !flow_files.contains(f))
                    .collect();
                let also = match other.len() {
                    0 => String::new(),
                    _ => format!(
                        " and {}",
                        other
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                writeln!(
                    out,
                    "✗ {errors} error{} in {bad} of {} flow file{}{also}{warnings}",
                    plural(errors),
                    v.files.len(),
                    plural(v.files.len())
                )
            }
        }
        Format::Json => {
            let files: Vec<_> = v
                .files
                .iter()
                .map(|f| {
                    json!({
                        "path": f.path,
                        "flow": f.flow_id,
                        "version": f.flow.as_ref().map(|c| c.hash.0.clone()),
                        "errors": f.errors,
                    })
                })
                .collect();
            let doc = json!({
                "valid": v.is_valid(),
                "files": files,
                "diagnostics": v.diagnostics,
            });
            serde_json::to_writer_pretty(&mut *out, &doc)?;
            writeln!(out)
        }
        Format::Github => {
            for d in &v.diagnostics {
                writeln!(out, "{}", d.github())?;
            }
            Ok(())
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Why a set of flows does not validate, in a line or three: the first diagnostics, each
/// with file:line:col, and how many more there are.
pub fn first_errors(validation: &canvas_engine::Validation) -> String {
    let first: Vec<String> = validation
        .diagnostics
        .iter()
        .take(3)
        .map(|d| d.headline())
        .collect();
    let more = validation.diagnostics.len().saturating_sub(first.len());
    let mut text = first.join("; ");
    if more > 0 {
        text.push_str(&format!(" (and {more} more)"));
    }
    text
}
