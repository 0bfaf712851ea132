//! The names a template reads, where: `{{ vars.voucher.code }}` reads
//! `["vars", "voucher", "code"]` at its line and column, for the checks of what a step can
//! see (`crate::scope`).

use minijinja::machinery::{Token, WhitespaceConfig, tokenize};
use minijinja::syntax::SyntaxConfig;

use super::environment;

/// One name a template reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRead {
    /// `vars.voucher.code` as `["vars", "voucher", "code"]`.
    pub path: Vec<String>,
    /// 1-based line and 1-based column of its first use, when the lexer finds it.
    pub at: Option<(u32, u32)>,
    /// The template tests whether its `root.first` part is there somewhere
    /// (`| default(…)`, `is defined`, `is undefined`, `is none`).
    pub guarded: bool,
}

/// Every name `source` reads that it does not set itself (`{% set %}`, loop variables and
/// macro arguments are its own), with attribute lookups: what minijinja's static analysis
/// finds, located with its lexer. Empty when the template does not parse (reported
/// elsewhere).
pub fn reads(source: &str) -> Vec<TemplateRead> {
    let env = environment();
    let Ok(tmpl) = env.template_from_str(source) else {
        return Vec::new();
    };
    let mut names: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
    names.sort();
    let chains = chains(source);
    names
        .into_iter()
        .map(|name| {
            let path: Vec<String> = name.split('.').map(str::to_owned).collect();
            let at = chains
                .iter()
                .find(|c| c.path.starts_with(&path))
                .map(|c| c.at);
            let guarded = chains
                .iter()
                .any(|c| c.guarded && c.path.len() >= 2 && path.starts_with(&c.path[..2]));
            TemplateRead { path, at, guarded }
        })
        .collect()
}

/// A run of `name.name.name` tokens in a tag or an output.
struct Chain {
    path: Vec<String>,
    at: (u32, u32),
    guarded: bool,
}

// `SyntaxConfig` is a unit struct unless minijinja's `custom_syntax` is on.
#[allow(clippy::default_constructed_unit_structs)]
fn chains(source: &str) -> Vec<Chain> {
    let tokens: Vec<(Token<'_>, minijinja::machinery::Span)> = tokenize(
        source,
        false,
        SyntaxConfig::default(),
        WhitespaceConfig::default(),
    )
    .map_while(Result::ok)
    .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (Token::Ident(root), span) = &tokens[i] else {
            i += 1;
            continue;
        };
        // `x.y` after a `.` is part of a longer chain that started earlier.
        if i > 0 && matches!(tokens[i - 1].0, Token::Dot) {
            i += 1;
            continue;
        }
        let mut path = vec![(*root).to_owned()];
        let mut j = i + 1;
        while j + 1 < tokens.len()
            && matches!(tokens[j].0, Token::Dot)
            && let Token::Ident(field) = tokens[j + 1].0
        {
            path.push(field.to_owned());
            j += 2;
        }
        let word = |k: usize| match tokens.get(k) {
            Some((Token::Ident(w), _)) => Some(*w),
            _ => None,
        };
        let guarded = match tokens.get(j).map(|t| &t.0) {
            Some(Token::Pipe) => matches!(word(j + 1), Some("default" | "d")),
            Some(Token::Ident("is")) => {
                let k = if word(j + 1) == Some("not") {
                    j + 2
                } else {
                    j + 1
                };
                matches!(word(k), Some("defined" | "undefined" | "none"))
            }
            _ => false,
        };
        out.push(Chain {
            path,
            at: (u32::from(span.start_line), u32::from(span.start_col) + 1),
            guarded,
        });
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_their_place_and_guards() {
        let src = "Hi {{ customer.first_name | default('there') }},\n\
                   {% for v in vars.vouchers %}{{ v.code }}{% endfor %}\n  \
                   your code {{ vars.voucher.code }}{% if vars.gift.name is defined %}\
                   {{ vars.gift.name }}{% endif %} {{ event.data.size }}";
        let r = reads(src);
        type Found = (String, Option<(u32, u32)>, bool);
        let got: Vec<Found> = r
            .into_iter()
            .map(|r| (r.path.join("."), r.at, r.guarded))
            .collect();
        assert_eq!(
            got,
            vec![
                ("customer.first_name".to_owned(), Some((1, 7)), true),
                ("event.data.size".to_owned(), Some((3, 105)), false),
                ("vars.gift.name".to_owned(), Some((3, 42)), true),
                ("vars.voucher.code".to_owned(), Some((3, 16)), false),
                ("vars.vouchers".to_owned(), Some((2, 13)), false),
            ]
        );
    }
}
