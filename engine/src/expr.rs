//! Expressions: CEL, plus duration literals (`2d`) and the date helpers of the flow language.
//!
//! Every expression is parsed and its names are checked at validate time, against what the
//! place it is written in can see: a segment condition has no `event`, only steps have `vars`.

use std::fmt;
use std::sync::Arc;

use cel::common::ast::{Expr as Ast, IdedExpr, LiteralValue};

use crate::duration::{Duration, TimeOfDay};

/// Which roots an expression may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub event: bool,
    pub vars: bool,
}

impl Scope {
    /// `customer`, `now` only: segment conditions and schedule audiences.
    pub const PROFILE: Scope = Scope {
        event: false,
        vars: false,
    };
    /// `customer`, `event`, `now`: trigger and goal conditions.
    pub const EVENT: Scope = Scope {
        event: true,
        vars: false,
    };
    /// Everything: conditions inside steps.
    pub const STEP: Scope = Scope {
        event: true,
        vars: true,
    };
    /// `customer`, `vars`, `now`: profile exit conditions checked while a run waits.
    pub const RUN: Scope = Scope {
        event: false,
        vars: true,
    };

    fn roots(self) -> Vec<&'static str> {
        let mut r = vec!["customer", "now"];
        if self.event {
            r.push("event");
        }
        if self.vars {
            r.push("vars");
        }
        r
    }
}

/// The flow language's own functions and how many arguments each takes.
pub const HELPERS: &[(&str, usize, &str)] = &[
    (
        "days_since",
        1,
        "whole days from a timestamp or date to now",
    ),
    ("hours_since", 1, "whole hours from a timestamp to now"),
    (
        "days_until",
        1,
        "whole days from now to a timestamp or date",
    ),
    (
        "at",
        2,
        "the given day at a local clock time: at(t, \"09:00\")",
    ),
    ("birthday_this_year", 1, "this year's date of a birthday"),
    ("start_of_month", 1, "the first day of the month, 00:00"),
    ("end_of_month", 1, "the last day of the month, 00:00"),
    (
        "start_of_next_month",
        1,
        "the first day of the next month, 00:00",
    ),
    ("month", 1, "the month number, 1-12"),
    ("year", 1, "the year"),
    ("day", 1, "the day of the month, 1-31"),
    ("weekday", 1, "the day of the week: \"mon\" … \"sun\""),
];

/// CEL's standard functions and macros that flows may use.
const CEL_FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "timestamp",
    "duration",
    "dyn",
    "type",
    "max",
    "min",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
];

/// Fields of `event`.
pub const EVENT_FIELDS: &[&str] = &["id", "name", "data", "occurred_at", "customer_id"];

/// A parsed, checked expression.
#[derive(Clone)]
pub struct Expr {
    source: String,
    program: Arc<cel::Program>,
}

impl Expr {
    /// The text as the operator wrote it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The compiled CEL program (duration literals already rewritten).
    pub fn program(&self) -> &cel::Program {
        &self.program
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What is wrong with an expression; `offset` counts characters into the source as written.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprIssue {
    pub syntax: bool,
    pub offset: Option<usize>,
    pub message: String,
    pub help: Option<String>,
}

/// Parse and check `source` for use where `scope` holds.
pub fn compile(source: &str, scope: Scope) -> Result<Expr, Vec<ExprIssue>> {
    if source.trim().is_empty() {
        return Err(vec![ExprIssue {
            syntax: true,
            offset: None,
            message: "the expression is empty".to_owned(),
            help: None,
        }]);
    }
    let (rewritten, shifts) = rewrite_durations(source);
    let program = match cel::Program::compile(&rewritten) {
        Ok(p) => p,
        Err(errors) => {
            return Err(errors
                .errors
                .iter()
                .map(|e| ExprIssue {
                    syntax: true,
                    offset: line_col_offset(&rewritten, e.pos).map(|o| back(&shifts, o)),
                    message: format!("cannot parse expression: {}", e.msg),
                    help: syntax_hint(source),
                })
                .collect());
        }
    };
    let mut checker = Checker {
        scope,
        bound: Vec::new(),
        issues: Vec::new(),
        info: program.source_info(),
        shifts: &shifts,
    };
    checker.walk(program.expression());
    if checker.issues.is_empty() {
        Ok(Expr {
            source: source.to_owned(),
            program: Arc::new(program),
        })
    } else {
        Err(checker.issues)
    }
}

/// A hint for an expression that does not parse, where a habit from another language is
/// the likely cause: `=` to compare, `and` / `or` / `not` for `&&` / `||` / `!`.
fn syntax_hint(source: &str) -> Option<String> {
    // The text outside string literals, where operators are.
    let mut code = String::with_capacity(source.len());
    let mut quote = None;
    let mut escaped = false;
    for c in source.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                code.push(' ');
            }
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                code.push(' ');
            }
            None => code.push(c),
        }
    }
    let mut hints = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let lone_equals = chars.iter().enumerate().any(|(i, &c)| {
        c == '='
            && !matches!(chars.get(i + 1), Some('='))
            && !matches!(
                i.checked_sub(1).and_then(|j| chars.get(j)),
                Some('=' | '!' | '<' | '>')
            )
    });
    if lone_equals {
        hints.push("compare with `==`, not `=`".to_owned());
    }
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .collect();
    for (word, op) in [("and", "&&"), ("or", "||"), ("not", "!")] {
        if words.contains(&word) {
            hints.push(format!("CEL writes `{op}` for `{word}`"));
        }
    }
    (!hints.is_empty()).then(|| hints.join("; "))
}

/// A name an expression reads: `vars.coupon.code` is `["vars", "coupon", "code"]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NameRead {
    pub path: Vec<String>,
    /// Characters into the source as written, at the root name.
    pub offset: Option<usize>,
    /// Inside `has(…)`: the expression tests whether it is there.
    pub guarded: bool,
}

/// Every chain of field selections rooted at `customer`, `event`, `vars`, `flow` or `now`
/// in `source` (names bound by a macro such as `exists(t, …)` are not roots). Empty when
/// the expression does not parse; [`compile`] reports that.
pub fn reads(source: &str) -> Vec<NameRead> {
    let (rewritten, shifts) = rewrite_durations(source);
    let Ok(program) = cel::Program::compile(&rewritten) else {
        return Vec::new();
    };
    let info = program.source_info();
    let mut out = Vec::new();
    let mut bound = Vec::new();
    collect_reads(program.expression(), info, &shifts, &mut bound, &mut out);
    out
}

fn collect_reads(
    e: &IdedExpr,
    info: &cel::common::ast::SourceInfo,
    shifts: &[(usize, usize)],
    bound: &mut Vec<String>,
    out: &mut Vec<NameRead>,
) {
    let offset = |e: &IdedExpr| {
        info.offset_for(e.id)
            .map(|(start, _)| back(shifts, start as usize))
    };
    match &e.expr {
        Ast::Ident(name) => {
            if !bound.iter().any(|b| b == name) {
                out.push(NameRead {
                    path: vec![name.clone()],
                    offset: offset(e),
                    guarded: false,
                });
            }
        }
        Ast::Select(sel) => {
            // A chain `root.a.b`: one read; anything else, look inside.
            let mut fields = vec![sel.field.clone()];
            let mut guarded = sel.test;
            let mut ptr = &sel.operand;
            loop {
                match &ptr.expr {
                    Ast::Select(inner) => {
                        fields.push(inner.field.clone());
                        guarded |= inner.test;
                        ptr = &inner.operand;
                    }
                    Ast::Ident(root) if !bound.iter().any(|b| b == root) => {
                        fields.push(root.clone());
                        fields.reverse();
                        out.push(NameRead {
                            path: fields,
                            offset: offset(ptr),
                            guarded,
                        });
                        return;
                    }
                    _ => break,
                }
            }
            collect_reads(&sel.operand, info, shifts, bound, out);
        }
        Ast::Call(call) => {
            if let Some(t) = &call.target {
                collect_reads(t, info, shifts, bound, out);
            }
            for a in &call.args {
                collect_reads(a, info, shifts, bound, out);
            }
        }
        Ast::Comprehension(c) => {
            collect_reads(&c.iter_range, info, shifts, bound, out);
            collect_reads(&c.accu_init, info, shifts, bound, out);
            let before = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.iter().cloned());
            bound.push(c.accu_var.clone());
            collect_reads(&c.loop_cond, info, shifts, bound, out);
            collect_reads(&c.loop_step, info, shifts, bound, out);
            collect_reads(&c.result, info, shifts, bound, out);
            bound.truncate(before);
        }
        Ast::List(list) => {
            for item in &list.elements {
                collect_reads(item, info, shifts, bound, out);
            }
        }
        Ast::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    cel::common::ast::EntryExpr::StructField(f) => {
                        collect_reads(&f.value, info, shifts, bound, out)
                    }
                    cel::common::ast::EntryExpr::MapEntry(m) => {
                        collect_reads(&m.key, info, shifts, bound, out);
                        collect_reads(&m.value, info, shifts, bound, out);
                    }
                }
            }
        }
        Ast::Struct(st) => {
            for entry in &st.entries {
                if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                    collect_reads(&f.value, info, shifts, bound, out);
                }
            }
        }
        Ast::Literal(_) | Ast::Unspecified => {}
    }
}

/// CEL has no `2d`: rewrite duration literals outside strings to `duration("172800s")`, and
/// remember where the text moved so errors point at what the operator wrote.
fn rewrite_durations(src: &str) -> (String, Vec<(usize, usize)>) {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len() + 16);
    // (position in output chars, position in input chars) where the offset changed.
    let mut shifts = Vec::new();
    let mut out_len = 0usize;
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            let quote = c;
            out.push(c);
            out_len += 1;
            i += 1;
            while i < chars.len() {
                let d = chars[i];
                out.push(d);
                out_len += 1;
                i += 1;
                if d == '\\' && i < chars.len() {
                    out.push(chars[i]);
                    out_len += 1;
                    i += 1;
                } else if d == quote {
                    break;
                }
            }
            continue;
        }
        let starts_number =
            c.is_ascii_digit() && (i == 0 || !(ident(chars[i - 1]) || chars[i - 1] == '.'));
        if starts_number {
            let mut j = i;
            // Read a run of `<digits><unit>` pairs; only a complete run is a duration.
            while j < chars.len() && chars[j].is_ascii_digit() {
                let mut k = j;
                while k < chars.len() && chars[k].is_ascii_digit() {
                    k += 1;
                }
                if k < chars.len() && matches!(chars[k], 's' | 'm' | 'h' | 'd' | 'w') {
                    j = k + 1;
                } else {
                    break;
                }
            }
            let complete = j > i && (j == chars.len() || !(ident(chars[j]) || chars[j] == '.'));
            if complete {
                let text: String = chars[i..j].iter().collect();
                if let Ok(d) = Duration::parse(&text) {
                    let lit = format!("duration(\"{}s\")", d.as_secs());
                    out_len += lit.chars().count();
                    out.push_str(&lit);
                    i = j;
                    shifts.push((out_len, i));
                    continue;
                }
            }
        }
        out.push(c);
        out_len += 1;
        i += 1;
    }
    (out, shifts)
}

/// Map a character offset in the rewritten text back to the source.
fn back(shifts: &[(usize, usize)], offset: usize) -> usize {
    let mut delta: isize = 0;
    for &(out_pos, in_pos) in shifts {
        if out_pos <= offset {
            delta = in_pos as isize - out_pos as isize;
        } else {
            break;
        }
    }
    (offset as isize + delta).max(0) as usize
}

fn line_col_offset(text: &str, (line, col): (isize, isize)) -> Option<usize> {
    if line < 1 || col < 0 {
        return None;
    }
    let mut offset = 0usize;
    for (n, l) in text.split('\n').enumerate() {
        if n as isize + 1 == line {
            return Some(offset + col as usize);
        }
        offset += l.chars().count() + 1;
    }
    None
}

struct Checker<'a> {
    scope: Scope,
    bound: Vec<String>,
    issues: Vec<ExprIssue>,
    info: &'a cel::common::ast::SourceInfo,
    shifts: &'a [(usize, usize)],
}

impl Checker<'_> {
    fn offset(&self, e: &IdedExpr) -> Option<usize> {
        self.info
            .offset_for(e.id)
            .map(|(start, _)| back(self.shifts, start as usize))
    }

    fn issue(&mut self, e: &IdedExpr, message: String, help: Option<String>) {
        let offset = self.offset(e);
        self.issues.push(ExprIssue {
            syntax: false,
            offset,
            message,
            help,
        });
    }

    fn walk(&mut self, e: &IdedExpr) {
        match &e.expr {
            Ast::Ident(name) => self.ident(e, name),
            Ast::Select(sel) => {
                if let Ast::Ident(root) = &sel.operand.expr
                    && !self.bound.iter().any(|b| b == root)
                {
                    {
                        if root == "event"
                            && self.scope.event
                            && !EVENT_FIELDS.contains(&sel.field.as_str())
                        {
                            let hint = crate::diagnostic::did_you_mean(
                                &sel.field,
                                EVENT_FIELDS.iter().copied(),
                            )
                            .map(|s| format!("did you mean `event.{s}`?"))
                            .unwrap_or_else(|| {
                                format!(
                                    "an event has {}; its payload is under `event.data`",
                                    crate::diagnostic::quote_list(EVENT_FIELDS)
                                )
                            });
                            self.issue(
                                e,
                                format!("`event` has no field `{}`", sel.field),
                                Some(hint),
                            );
                        } else if root == "now" {
                            self.issue(
                                e,
                                "`now` is a timestamp and has no fields".to_owned(),
                                Some(
                                    "use a helper such as `month(now)` or `weekday(now)`"
                                        .to_owned(),
                                ),
                            );
                        }
                    }
                }
                self.walk(&sel.operand);
            }
            Ast::Call(call) => {
                self.call(e, call);
                if let Some(t) = &call.target {
                    self.walk(t);
                }
                for a in &call.args {
                    self.walk(a);
                }
            }
            Ast::Comprehension(c) => {
                self.walk(&c.iter_range);
                self.walk(&c.accu_init);
                self.bound.push(c.iter_var.clone());
                if let Some(v2) = &c.iter_var2 {
                    self.bound.push(v2.clone());
                }
                self.bound.push(c.accu_var.clone());
                self.walk(&c.loop_cond);
                self.walk(&c.loop_step);
                self.walk(&c.result);
                self.bound.pop();
                if c.iter_var2.is_some() {
                    self.bound.pop();
                }
                self.bound.pop();
            }
            Ast::List(list) => {
                for item in &list.elements {
                    self.walk(item);
                }
            }
            Ast::Map(map) => {
                for entry in &map.entries {
                    match &entry.expr {
                        cel::common::ast::EntryExpr::StructField(f) => self.walk(&f.value),
                        cel::common::ast::EntryExpr::MapEntry(m) => {
                            self.walk(&m.key);
                            self.walk(&m.value);
                        }
                    }
                }
            }
            Ast::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        self.walk(&f.value);
                    }
                }
            }
            Ast::Literal(_) | Ast::Unspecified => {}
        }
    }

    fn ident(&mut self, e: &IdedExpr, name: &str) {
        if name.starts_with('@') || self.bound.iter().any(|b| b == name) {
            return;
        }
        let roots = self.scope.roots();
        if roots.contains(&name) {
            return;
        }
        let message = match name {
            "event" => "`event` is not available here: this condition is not evaluated on an event"
                .to_owned(),
            "vars" => {
                "`vars` is not available here: only steps of a run have run variables".to_owned()
            }
            _ => format!("unknown name `{name}`"),
        };
        let help = crate::diagnostic::did_you_mean(name, roots.iter().copied())
            .map(|s| format!("did you mean `{s}`?"))
            .unwrap_or_else(|| {
                format!(
                    "expressions here can use {}",
                    crate::diagnostic::quote_list(&roots)
                )
            });
        self.issue(e, message, Some(help));
    }

    fn call(&mut self, e: &IdedExpr, call: &cel::common::ast::CallExpr) {
        let name = call.func_name.as_str();
        // Operators are calls too (`_&&_`, `@in`, `!_`): only named functions are checked.
        if !name.chars().next().is_some_and(|c| c.is_alphabetic()) {
            return;
        }
        if let Some((_, arity, _)) = HELPERS.iter().find(|(n, _, _)| *n == name) {
            if call.target.is_some() {
                self.issue(
                    e,
                    format!("`{name}` is a function, not a method"),
                    Some(format!("write `{name}(x)` instead of `x.{name}()`")),
                );
            } else if call.args.len() != *arity {
                self.issue(
                    e,
                    format!(
                        "`{name}` takes {arity} argument{}, got {}",
                        if *arity == 1 { "" } else { "s" },
                        call.args.len()
                    ),
                    HELPERS
                        .iter()
                        .find(|(n, _, _)| *n == name)
                        .map(|(n, _, what)| format!("`{n}`: {what}")),
                );
            } else if name == "at" {
                self.check_clock_arg(&call.args[1]);
            }
            return;
        }
        if CEL_FUNCTIONS.contains(&name) {
            return;
        }
        let all = HELPERS
            .iter()
            .map(|(n, _, _)| *n)
            .chain(CEL_FUNCTIONS.iter().copied());
        let help = crate::diagnostic::did_you_mean(name, all)
            .map(|s| format!("did you mean `{s}`?"))
            .unwrap_or_else(|| {
                "see the list of functions in docs/language.md#expressions".to_owned()
            });
        self.issue(e, format!("unknown function `{name}`"), Some(help));
    }

    fn check_clock_arg(&mut self, arg: &IdedExpr) {
        match &arg.expr {
            Ast::Literal(LiteralValue::String(s)) if TimeOfDay::parse(s.inner()).is_some() => {}
            Ast::Literal(LiteralValue::String(s)) => {
                let text = s.inner().to_owned();
                self.issue(
                    arg,
                    format!("`{text}` is not a clock time"),
                    Some("write a 24-hour time like \"09:00\"".to_owned()),
                );
            }
            _ => self.issue(
                arg,
                "the clock time of `at` must be a string literal like \"09:00\"".to_owned(),
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(src: &str, scope: Scope) -> Vec<String> {
        match compile(src, scope) {
            Ok(_) => Vec::new(),
            Err(issues) => issues.into_iter().map(|i| i.message).collect(),
        }
    }

    #[test]
    fn design_card_expressions_compile() {
        for src in [
            "customer.member && month(customer.birthday) == month(now)",
            "at(birthday_this_year(customer.birthday), \"09:00\")",
            "at(end_of_month(now) - 2d, \"10:00\")",
            "has(customer.wechat_id)",
            "days_since(customer.last_visit_at) >= 20",
            "customer.tags.exists(t, t == 'vip')",
            "now + 1d12h > timestamp('2026-01-01T00:00:00Z')",
            "'3d' == '3d'",
        ] {
            assert_eq!(issues(src, Scope::STEP), Vec::<String>::new(), "{src}");
        }
    }

    #[test]
    fn names_are_checked_against_the_scope() {
        assert_eq!(
            issues("event.data.amount > 10", Scope::PROFILE),
            vec!["`event` is not available here: this condition is not evaluated on an event"]
        );
        assert_eq!(
            issues("custmer.member", Scope::STEP),
            vec!["unknown name `custmer`"]
        );
        assert_eq!(
            issues("days_snce(now) > 1", Scope::STEP),
            vec!["unknown function `days_snce`"]
        );
        assert_eq!(
            issues("month(now, now) == 1", Scope::STEP),
            vec!["`month` takes 1 argument, got 2"]
        );
        assert_eq!(
            issues("at(now, \"9am\") > now", Scope::STEP),
            vec!["`9am` is not a clock time"]
        );
        assert_eq!(
            issues("event.payload.x", Scope::EVENT),
            vec!["`event` has no field `payload`"]
        );
    }

    #[test]
    fn errors_point_into_the_source_as_written() {
        let err = compile("now - 2d > custmer.x", Scope::STEP).expect_err("unknown name");
        assert_eq!(err[0].offset, Some(11));
        let err = compile("customer.a &&", Scope::STEP).expect_err("syntax");
        assert!(err[0].syntax);
    }

    /// Regression: a CEL parse error gave no hint for the usual slips from other languages.
    #[test]
    fn cel_parse_error_hints_at_equals_and_word_operators() {
        let help = |src: &str| {
            compile(src, Scope::STEP)
                .expect_err("does not parse")
                .into_iter()
                .find_map(|i| i.help)
                .unwrap_or_default()
        };
        assert!(
            help("customer.tier = 'gold'").contains("compare with `==`, not `=`"),
            "{}",
            help("customer.tier = 'gold'")
        );
        let h = help("customer.member and customer.tier == 'gold' or not customer.vip");
        assert!(h.contains("CEL writes `&&` for `and`"), "{h}");
        assert!(h.contains("`||` for `or`"), "{h}");
        assert!(h.contains("`!` for `not`"), "{h}");
        // Inside a string, a word or a `=` is text.
        assert_eq!(syntax_hint("x == 'a = b and c'"), None);
        assert_eq!(syntax_hint("a >= 1 && b != 2 && c <= 3"), None);
    }

    #[test]
    fn reads_finds_chains_guards_and_bound_names() {
        let r = reads(
            "has(vars.coupon) && vars.coupon.amount > 2 && now - 2d < now && customer.tags.exists(t, t == vars.tag)",
        );
        let paths: Vec<(String, bool)> = r.iter().map(|n| (n.path.join("."), n.guarded)).collect();
        assert_eq!(
            paths,
            vec![
                ("vars.coupon".to_owned(), true),
                ("vars.coupon.amount".to_owned(), false),
                ("now".to_owned(), false),
                ("now".to_owned(), false),
                ("customer.tags".to_owned(), false),
                ("vars.tag".to_owned(), false),
            ]
        );
        assert_eq!(r[1].offset, Some(20));
    }

    #[test]
    fn duration_literals_are_rewritten_outside_strings() {
        assert_eq!(
            rewrite_durations("now - 2d").0,
            "now - duration(\"172800s\")"
        );
        assert_eq!(rewrite_durations("x == '2d'").0, "x == '2d'");
        assert_eq!(rewrite_durations("a2d + 1.5 + v2").0, "a2d + 1.5 + v2");
    }
}
