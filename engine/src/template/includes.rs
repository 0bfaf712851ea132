//! What a template pulls in with `{% include %}`, `{% import %}`, `{% from %}` and
//! `{% extends %}`: the names, read with minijinja's own lexer, and which names are allowed.

use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
use minijinja::syntax::SyntaxConfig;

use super::{IssueKind, TemplateIssue};

/// How deep `{% include %}`, `{% import %}` and `{% extends %}` may nest.
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// The tags whose argument names another template.
const INCLUDING_TAGS: &[&str] = &["include", "import", "from", "extends"];

/// A template another one pulls in: `{% include "partials/footer.txt" %}` on `line`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reference {
    pub(super) tag: &'static str,
    pub(super) name: String,
    pub(super) line: usize,
}

/// The templates `source` includes, imports or extends. Each must be named by one quoted
/// string: a name computed while rendering could not be checked here.
///
/// The lexer (not a text search) finds them, so `{% raw %}` blocks and comments are skipped
/// and a tag inside an `{% if %}` is found although a dry run would not reach it.
// `SyntaxConfig` is a unit struct unless minijinja's `custom_syntax` is on; `default()`
// builds it either way.
#[allow(clippy::default_constructed_unit_structs)]
pub(super) fn references(source: &str) -> Result<Vec<Reference>, TemplateIssue> {
    let mut tokens = tokenize(
        source,
        false,
        SyntaxConfig::default(),
        WhitespaceConfig::default(),
    );
    let mut out = Vec::new();
    let mut after_block_start = false;
    while let Some(item) = tokens.next() {
        let (token, span) = item.map_err(|e| {
            TemplateIssue::new(
                IssueKind::Syntax,
                e.line(),
                e.detail().unwrap_or("syntax error"),
            )
        })?;
        let starts_tag = after_block_start;
        after_block_start = matches!(token, Token::BlockStart);
        let Token::Ident(word) = token else { continue };
        let Some(tag) = INCLUDING_TAGS.iter().find(|t| **t == word).copied() else {
            continue;
        };
        if !starts_tag {
            continue;
        }
        let line = usize::from(span.start_line);
        let name = match tokens.next() {
            Some(Ok((Token::Str(s), _))) => Some(s.to_owned()),
            Some(Ok((Token::String(s), _))) => Some(s.into_string()),
            _ => None,
        };
        // What may follow the name: the end of the tag, `ignore missing`, `with context`,
        // `as NAME`, `import NAMES`. An operator (`~`, `+`, `[`…) would compute the name.
        let literal = name.is_some()
            && match tokens.next() {
                Some(Ok((Token::BlockEnd, _))) => true,
                Some(Ok((Token::Ident(w), _))) => {
                    matches!(w, "ignore" | "with" | "without" | "as" | "import")
                }
                _ => false,
            };
        match name {
            Some(name) if literal => out.push(Reference { tag, name, line }),
            _ => {
                return Err(TemplateIssue::new(
                    IssueKind::Include,
                    Some(line),
                    format!(
                        "`{tag}` takes one quoted template file name, such as \
                         `{{% {tag} \"partials/footer.txt\" %}}`: a name computed while \
                         rendering cannot be checked"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Why `name` cannot be a template another one pulls in, if it cannot: it must be a path
/// inside the templates folder, written with `/`.
pub fn include_name_problem(name: &str) -> Option<String> {
    let outside = || {
        Some(format!(
            "`{name}` is outside the templates folder: name a file under templates/, such as \
             `partials/footer.txt`"
        ))
    };
    if name.is_empty() {
        return Some("the template name is empty".to_owned());
    }
    if name.starts_with('/') || name.contains('\\') || name.contains(':') {
        return outside();
    }
    if name
        .split('/')
        .any(|seg| seg.is_empty() || seg.starts_with('.'))
    {
        return outside();
    }
    None
}
