//! Rendering within bounds: fuel for the work, a cap on the output, and a loader that serves
//! only the files a render was validated with.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use minijinja::{Environment, ErrorKind};

use super::include_name_problem;

/// The work one render may do, in minijinja "fuel": about one unit per instruction, so a
/// loop costs a few units per item. A message template over real data needs a few thousand;
/// two nested 100,000-item loops would need billions and would hold a worker until killed.
pub const TEMPLATE_FUEL: u64 = 100_000;

/// Largest text one render may produce: as large as a template file may be, so any file that
/// fits renders as plain text, and well past what an SMS, an e-mail or a webhook body needs.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;

/// Templates a template pulls in (transitively), by path under `templates/` → text.
pub type Includes = Arc<BTreeMap<String, Arc<String>>>;

/// Why a render that used up its fuel failed, in the operator's terms.
pub fn out_of_fuel_reason() -> String {
    format!(
        "rendering needs more than {TEMPLATE_FUEL} steps (the template limit): a loop that \
         runs too long, or loops nested too deep"
    )
}

/// Why a render that produced too much text failed.
pub fn too_large_reason() -> String {
    format!("the rendered text is larger than {MAX_RENDERED_BYTES} bytes (the template limit)")
}

thread_local! {
    /// The files the render running on this thread may pull in. The environment is shared
    /// by every flow version, so its loader looks here rather than at any folder.
    static INCLUDES: RefCell<Includes> = RefCell::default();
    /// Files the loader has handed this thread's environments since the last reset.
    static LOADED: Cell<usize> = const { Cell::new(0) };
}

/// How many included files the loader has handed out on this thread (each stays compiled
/// in the environment that asked, like the templates added to it).
pub fn loaded_count() -> usize {
    LOADED.with(Cell::get)
}

/// Start counting loaded files again (the environment's templates were cleared).
pub fn reset_loaded_count() {
    LOADED.with(|n| n.set(0));
}

/// The prefix of a name the loader refuses (outside the folder, or not validated).
const REFUSED: &str = "!refused:";

/// A minijinja environment with the template bounds: fuel for the work, and a loader that
/// serves only the files the current render was validated with. Undefined names render
/// empty (`Chainable`), so a template is guarded with `default` rather than failing.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env.set_fuel(Some(TEMPLATE_FUEL));
    // The key an included file is kept under leads with a hash of its text, as the top-level
    // templates' keys do, so two versions of a file never share a compiled template.
    env.set_path_join_callback(|name, _parent| {
        INCLUDES.with(|inc| {
            let inc = inc.borrow();
            match inc.get(name) {
                Some(src) if include_name_problem(name).is_none() => {
                    Cow::Owned(format!("{:016x}:{name}", source_hash(src)))
                }
                _ => Cow::Owned(format!("{REFUSED}{name}")),
            }
        })
    });
    env.set_loader(|key| {
        // Not `TemplateNotFound`: minijinja would replace the reason with its own, and
        // `ignore missing` would hide a refusal.
        let refused = |why: String| Err(minijinja::Error::new(ErrorKind::InvalidOperation, why));
        if let Some(name) = key.strip_prefix(REFUSED) {
            return refused(include_name_problem(name).unwrap_or_else(|| {
                format!("`{name}` is not a template file this flow version was validated with")
            }));
        }
        let Some((hash, name)) = key.split_once(':') else {
            return Ok(None);
        };
        INCLUDES.with(|inc| match inc.borrow().get(name) {
            Some(src) if format!("{:016x}", source_hash(src)) == hash => {
                LOADED.with(|n| n.set(n.get() + 1));
                Ok(Some(src.as_str().to_owned()))
            }
            _ => Ok(None),
        })
    });
    env
}

/// A cache key for a template text: the same text always gives the same key in a process.
pub fn source_hash(source: &str) -> u64 {
    // SipHash with fixed keys: stable within the process, which is all a cache key needs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    h.finish()
}

/// Why a bounded render failed.
#[derive(Debug)]
pub enum RenderError {
    /// The render used up [`TEMPLATE_FUEL`]; `line` is where, in the template rendered.
    OutOfFuel { line: Option<usize> },
    /// The output passed [`MAX_RENDERED_BYTES`].
    TooLarge,
    /// Any other error minijinja reports.
    Engine(minijinja::Error),
}

/// Whether `e`, or an error it wraps (an include's `BadInclude` wraps the included file's
/// error), is running out of fuel.
fn out_of_fuel(e: &minijinja::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<minijinja::Error>()
            .is_some_and(|m| m.kind() == ErrorKind::OutOfFuel)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Collects the output and refuses to grow past [`MAX_RENDERED_BYTES`], which stops the
/// render at that write.
#[derive(Default)]
struct Bounded {
    out: Vec<u8>,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > MAX_RENDERED_BYTES {
            self.over = true;
            return Err(std::io::Error::other(too_large_reason()));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render `tmpl` (from [`environment`]) within the bounds, letting it pull in `includes`.
pub fn render_bounded(
    tmpl: &minijinja::Template<'_, '_>,
    ctx: &minijinja::Value,
    includes: &Includes,
) -> Result<String, RenderError> {
    let previous = INCLUDES.with(|inc| inc.replace(Arc::clone(includes)));
    let mut out = Bounded::default();
    let result = tmpl.render_captured_to(ctx, &mut out).map(drop);
    INCLUDES.with(|inc| *inc.borrow_mut() = previous);
    match result {
        Err(_) if out.over => Err(RenderError::TooLarge),
        Err(e) if out_of_fuel(&e) => Err(RenderError::OutOfFuel { line: e.line() }),
        Err(e) => Err(RenderError::Engine(e)),
        // minijinja writes whole `str`s, so the bytes are UTF-8.
        Ok(()) => String::from_utf8(out.out).map_err(|_| {
            RenderError::Engine(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "the output is not UTF-8",
            ))
        }),
    }
}
