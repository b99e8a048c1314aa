//! The one place kiln parses and renders a project's templates (`*.tera` overlays, seed
//! templates): a tera engine that sees only the values kiln passes in, and limits that turn
//! runaway templates into errors.
//!
//! - No host access: `get_env` is replaced by a function that refuses (tera would read the
//!   build host's environment); `now` and `get_random` do not exist (tera is built without
//!   its `builtins` feature); `include`, `import` and `extends` are refused (a template is
//!   rendered alone, so they could only name the template itself).
//! - No recursion: the macro call graph (`self::name()` calls) must be acyclic and at most
//!   [`MAX_CALL_DEPTH`] deep, and tags nest at most [`MAX_NESTING`] deep. tera has no recursion
//!   limit of its own: a recursive macro overflows the stack and aborts the process.
//! - Bounded size: a template is at most [`MAX_TEMPLATE`] bytes, its output at most the bound
//!   the caller gives (rendering stops there), and `range()` makes at most [`MAX_RANGE`] values
//!   per call and [`MAX_RANGE_TOTAL`] per render.
//!
//! tera stays (rather than minijinja, which has fuel and a recursion limit) because the
//! templates users have are tera: `is containing()`, `json_encode()`, `self::` macros. The
//! checks walk tera's parsed AST (`tera::ast`, public but outside its semver promise), so
//! Cargo.toml pins tera's exact version.

use super::error::{RecipeError, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use tera::ast::{Expr, ExprVal, Node};

/// The largest template kiln reads (bytes).
pub const MAX_TEMPLATE: u64 = 1 << 20;
/// The deepest chain of macro calls a template may make.
pub const MAX_CALL_DEPTH: usize = 16;
/// The deepest nesting of tags (`if`, `for`, `macro`, `filter`, …) a template may have.
pub const MAX_NESTING: usize = 32;
/// The most values one `range()` call makes.
pub const MAX_RANGE: usize = 100_000;
/// The most values all `range()` calls of one render make together: nested loops over
/// `range()` that print nothing are bounded too (the output bound cannot see them).
pub const MAX_RANGE_TOTAL: usize = 1_000_000;

thread_local! {
    /// What is left of [`MAX_RANGE_TOTAL`] in the render running on this thread.
    static RANGE_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_RANGE_TOTAL) };
}
/// The deepest nesting of `(`, `[` and `{` in a template's text, checked before tera parses
/// it (its parser recurses once per level).
const MAX_BRACKETS: usize = 64;
/// The deepest nesting of block tags in a template's text, checked before tera parses it (the
/// AST check then holds templates to [`MAX_NESTING`]).
const MAX_TAG_TEXT_NESTING: usize = 64;
/// The most operators one `{{ }}` or `{% %}` may hold: tera builds `1 + 1 + …` as a tree as
/// deep as the chain, and parsing, checking or dropping 60 000 of them overflows the stack.
const MAX_OPERATORS: usize = 512;

/// The name a template is known by inside the engine (tera shows it in some messages).
const NAME: &str = "template";

/// Parses `text` (the template at `file`) and runs the static checks: a syntax error, an
/// include/import/extends, a recursive macro or too deep a nesting is a [`RecipeError`].
pub fn check(file: &Path, text: &str) -> Result<()> {
    parse(file, "(template)", text).map(|_| ())
}

/// Renders the template `text` (at `file`) with `ctx`; the output must stay within
/// `max_output` bytes. `key` and `fix` go into the error of a failed render (the key names
/// what was being rendered, the fix what the template sees).
pub fn render(
    file: &Path,
    key: &str,
    text: &str,
    ctx: &tera::Context,
    max_output: usize,
    fix: &str,
) -> Result<String> {
    let tera = parse(file, key, text)?;
    RANGE_LEFT.with(|l| l.set(MAX_RANGE_TOTAL));
    let mut out = Bounded {
        buf: Vec::new(),
        max: max_output,
        over: false,
    };
    let res = tera.render_to(NAME, ctx, &mut out);
    if out.over {
        return Err(RecipeError::new(
            file,
            key,
            format!("the template renders more than {max_output} bytes"),
            "make the template smaller (check loops over range() and nested loops)",
        ));
    }
    res.map_err(|e| {
        RecipeError::new(
            file,
            key,
            format!("cannot render: {}", short(&error_chain(&e))),
            fix,
        )
    })?;
    String::from_utf8(out.buf).map_err(|_| {
        RecipeError::new(
            file,
            key,
            "the template rendered bytes that are not UTF-8",
            fix,
        )
    })
}

/// A tera error and the errors under it, joined with `: `.
pub fn error_chain(e: &tera::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `s`, cut to a length a terminal can show (tera quotes the offending line whole).
fn short(s: &str) -> String {
    const MAX: usize = 1000;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

/// Output that refuses to grow past `max` bytes (rendering stops at the first write past it).
struct Bounded {
    buf: Vec<u8>,
    max: usize,
    over: bool,
}

impl Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("template output bound reached"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The engine with the template `text` added and checked.
fn parse(file: &Path, key: &str, text: &str) -> Result<tera::Tera> {
    let bad = |problem: String, fix: &str| RecipeError::new(file, key, problem, fix);
    if text.len() as u64 > MAX_TEMPLATE {
        return Err(bad(
            format!(
                "the template is {} bytes, more than {MAX_TEMPLATE}",
                text.len()
            ),
            "split it, or drop the .tera suffix to copy the file verbatim",
        ));
    }
    if bracket_depth(text) > MAX_BRACKETS {
        return Err(bad(
            format!("brackets nest more than {MAX_BRACKETS} deep"),
            "simplify the expressions",
        ));
    }
    // tera's parser recurses once per nested block tag: thousands of nested `{% if %}` overflow
    // the stack before the AST check below could count them.
    if tag_depth(text) > MAX_TAG_TEXT_NESTING {
        return Err(bad(
            format!("block tags (if, for, macro, filter, block) nest more than {MAX_TAG_TEXT_NESTING} deep"),
            "flatten the template (kiln allows 32 levels)",
        ));
    }
    if let Some(n) = max_operators(text).filter(|n| *n > MAX_OPERATORS) {
        return Err(bad(
            format!("one tag holds {n} operators, more than {MAX_OPERATORS}"),
            "split the expression (set intermediate values with {% set %})",
        ));
    }
    let mut tera = engine();
    tera.add_raw_template(NAME, text).map_err(|e| {
        bad(
            format!("template syntax error: {}", short(&error_chain(&e))),
            "fix the tera syntax (https://keats.github.io/tera/docs/), or drop the .tera suffix to copy the file verbatim",
        )
    })?;
    let t = tera.get_template(NAME).expect("just added");
    check_ast(&t.ast, &t.macros).map_err(|p| {
        bad(
            p,
            "kiln renders each template alone: no include/import/extends, no recursive macros (see docs/guide/recipes.md#templates)",
        )
    })?;
    Ok(tera)
}

/// tera without access to the host: `get_env` refuses, `range` is bounded.
fn engine() -> tera::Tera {
    let mut t = tera::Tera::default();
    t.register_function(
        "get_env",
        |_: &HashMap<String, tera::Value>| -> tera::Result<tera::Value> {
            Err(tera::Error::msg(
                "get_env is not available: kiln templates see only the values kiln passes in",
            ))
        },
    );
    t.register_function("range", range);
    t
}

/// tera's `range(end, start=0, step_by=1)`, refusing more than [`MAX_RANGE`] values.
fn range(args: &HashMap<String, tera::Value>) -> tera::Result<tera::Value> {
    let num = |k: &str, default: Option<usize>| -> tera::Result<usize> {
        match args.get(k) {
            Some(v) => tera::from_value::<usize>(v.clone()).map_err(|_| {
                tera::Error::msg(format!(
                    "range() received {k}={v}, but {k} must be a non-negative integer"
                ))
            }),
            None => default.ok_or_else(|| tera::Error::msg("range() needs an `end` argument")),
        }
    };
    let (start, end, step) = (
        num("start", Some(0))?,
        num("end", None)?,
        num("step_by", Some(1))?,
    );
    if start > end {
        return Err(tera::Error::msg(format!(
            "range() received start={start} > end={end}"
        )));
    }
    if step == 0 {
        return Err(tera::Error::msg("range() received step_by=0"));
    }
    let n = (end - start).div_ceil(step);
    if n > MAX_RANGE {
        return Err(tera::Error::msg(format!(
            "range() would make {n} values, more than kiln's limit of {MAX_RANGE}"
        )));
    }
    let left = RANGE_LEFT.with(|l| l.get());
    if n > left {
        return Err(tera::Error::msg(format!(
            "range() calls would make more than {MAX_RANGE_TOTAL} values in all in one \
             render (nested loops over range()?)"
        )));
    }
    RANGE_LEFT.with(|l| l.set(left - n));
    Ok(tera::to_value(
        (start..end).step_by(step).collect::<Vec<_>>(),
    )?)
}

/// The most operators in one `{{ … }}` or `{% … %}` of `text` (None for a template without
/// tags). String literals are skipped, so a `"}}"` inside one does not end the tag early; a
/// `==` counts twice, which only makes it stricter.
fn max_operators(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut max = None;
    let mut i = 0;
    while i + 1 < b.len() {
        let close = match (b[i], b[i + 1]) {
            (b'{', b'{') => b'}',
            (b'{', b'%') => b'%',
            _ => {
                i += 1;
                continue;
            }
        };
        i += 2;
        let (mut ops, mut word) = (0usize, String::new());
        let count_word = |w: &mut String, ops: &mut usize| {
            if matches!(w.as_str(), "and" | "or" | "not" | "in" | "is") {
                *ops += 1;
            }
            w.clear();
        };
        while i < b.len() {
            let c = b[i];
            if c == close && b.get(i + 1) == Some(&b'}') {
                i += 2;
                break;
            }
            match c {
                b'"' | b'\'' | b'`' => {
                    count_word(&mut word, &mut ops);
                    i += 1;
                    while i < b.len() && b[i] != c {
                        i += 1;
                    }
                }
                b'+' | b'-' | b'*' | b'/' | b'%' | b'~' | b'<' | b'>' | b'=' | b'!' => {
                    count_word(&mut word, &mut ops);
                    ops += 1;
                }
                c if c.is_ascii_alphanumeric() || c == b'_' => word.push(c as char),
                _ => count_word(&mut word, &mut ops),
            }
            i += 1;
        }
        count_word(&mut word, &mut ops);
        max = max.max(Some(ops));
    }
    max
}

/// The deepest nesting of block tags in `text`, counted on the text before tera parses it (a
/// cheap bound on its parser's recursion; tags in comments count too, which only makes it
/// stricter).
fn tag_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut rest = text;
    while let Some(i) = rest.find("{%") {
        rest = &rest[i + 2..];
        let body = rest.trim_start_matches(['-', '+']).trim_start();
        let word: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        match word.as_str() {
            "if" | "for" | "macro" | "filter" | "block" => {
                depth += 1;
                max = max.max(depth);
            }
            "endif" | "endfor" | "endmacro" | "endfilter" | "endblock" => {
                depth = depth.saturating_sub(1)
            }
            // Everything up to `endraw` is text, tags included.
            "raw" => match rest.find("endraw") {
                Some(j) => rest = &rest[j..],
                None => break,
            },
            _ => {}
        }
    }
    max
}

/// The deepest nesting of `(`, `[`, `{` in `text` (a cheap bound on the parser's recursion;
/// brackets in plain text count too, which only makes it stricter).
fn bracket_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The static checks on a parsed template; the problem on failure.
fn check_ast(
    ast: &[Node],
    macros: &HashMap<String, tera::ast::MacroDefinition>,
) -> std::result::Result<(), String> {
    let mut top = Calls::default();
    walk(ast, 0, &mut top)?;
    let mut graph: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut functions = top.functions;
    for (name, m) in macros {
        let mut c = Calls::default();
        walk(&m.body, 0, &mut c)?;
        for e in m.args.values().flatten() {
            expr(e, &mut c);
        }
        graph.insert(name, c.macros);
        functions.extend(c.functions);
    }
    if functions.contains("get_env") {
        // Also refused when called (see `engine`); here so it stops a build before anything
        // is written.
        return Err(
            "get_env() is not available: kiln templates see only the values kiln passes in".into(),
        );
    }
    // Depth-first from every macro: a macro met again on the current path is a cycle.
    fn depth<'a>(
        name: &'a str,
        graph: &'a BTreeMap<&'a str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        memo: &mut BTreeMap<&'a str, usize>,
    ) -> std::result::Result<usize, String> {
        if let Some(d) = memo.get(name) {
            return Ok(*d);
        }
        if path.contains(&name) {
            path.push(name);
            return Err(format!(
                "recursive macro: {} (tera has no recursion limit)",
                path.join(" → ")
            ));
        }
        path.push(name);
        let mut d = 0;
        for callee in graph.get(name).into_iter().flatten() {
            if graph.contains_key(callee.as_str()) {
                d = d.max(depth(callee, graph, path, memo)?);
            }
        }
        path.pop();
        memo.insert(name, d + 1);
        Ok(d + 1)
    }
    let mut memo = BTreeMap::new();
    for name in graph.keys() {
        let d = depth(name, &graph, &mut Vec::new(), &mut memo)?;
        if d > MAX_CALL_DEPTH {
            return Err(format!(
                "macro {name} calls macros {d} deep, more than {MAX_CALL_DEPTH}"
            ));
        }
    }
    Ok(())
}

/// What a part of a template calls.
#[derive(Default)]
struct Calls {
    /// `self::` macros.
    macros: BTreeSet<String>,
    /// Functions.
    functions: BTreeSet<String>,
}

/// Walks `nodes` (at nesting `level`): refuses include/import/extends and too deep nesting,
/// and collects the macro calls of every expression.
fn walk(nodes: &[Node], level: usize, c: &mut Calls) -> std::result::Result<(), String> {
    if level > MAX_NESTING {
        return Err(format!("tags nest more than {MAX_NESTING} deep"));
    }
    for n in nodes {
        match n {
            Node::Include(_, names, _) => {
                return Err(format!("{{% include {:?} %}} is not supported", names))
            }
            Node::ImportMacro(_, f, _) => {
                return Err(format!("{{% import {f:?} %}} is not supported"))
            }
            Node::Extends(_, f) => return Err(format!("{{% extends {f:?} %}} is not supported")),
            Node::VariableBlock(_, e) => expr(e, c),
            Node::Set(_, s) => expr(&s.value, c),
            // Macro bodies are walked on their own (the call graph); their nesting counts
            // from the macro.
            Node::MacroDefinition(_, m, _) => walk(&m.body, level + 1, &mut Calls::default())?,
            Node::FilterSection(_, f, _) => {
                f.filter.args.values().for_each(|e| expr(e, c));
                walk(&f.body, level + 1, c)?;
            }
            Node::Block(_, b, _) => walk(&b.body, level + 1, c)?,
            Node::Forloop(_, f, _) => {
                expr(&f.container, c);
                walk(&f.body, level + 1, c)?;
                if let Some(b) = &f.empty_body {
                    walk(b, level + 1, c)?;
                }
            }
            Node::If(i, _) => {
                for (_, e, body) in &i.conditions {
                    expr(e, c);
                    walk(body, level + 1, c)?;
                }
                if let Some((_, b)) = &i.otherwise {
                    walk(b, level + 1, c)?;
                }
            }
            Node::Super
            | Node::Text(_)
            | Node::Raw(..)
            | Node::Break(_)
            | Node::Continue(_)
            | Node::Comment(..) => {}
        }
    }
    Ok(())
}

/// Collects the macro calls in `e`.
fn expr(e: &Expr, c: &mut Calls) {
    for f in &e.filters {
        f.args.values().for_each(|a| expr(a, c));
    }
    val(&e.val, c);
}

fn val(v: &ExprVal, c: &mut Calls) {
    match v {
        ExprVal::MacroCall(m) => {
            c.macros.insert(m.name.clone());
            m.args.values().for_each(|a| expr(a, c));
        }
        ExprVal::FunctionCall(f) => {
            c.functions.insert(f.name.clone());
            f.args.values().for_each(|a| expr(a, c));
        }
        ExprVal::Math(m) => {
            expr(&m.lhs, c);
            expr(&m.rhs, c);
        }
        ExprVal::Logic(l) => {
            expr(&l.lhs, c);
            expr(&l.rhs, c);
        }
        ExprVal::In(i) => {
            expr(&i.lhs, c);
            expr(&i.rhs, c);
        }
        ExprVal::Test(t) => t.args.iter().for_each(|a| expr(a, c)),
        ExprVal::Array(a) => a.iter().for_each(|x| expr(x, c)),
        ExprVal::StringConcat(s) => s.values.iter().for_each(|x| val(x, c)),
        ExprVal::String(_)
        | ExprVal::Int(_)
        | ExprVal::Float(_)
        | ExprVal::Bool(_)
        | ExprVal::Ident(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> tera::Context {
        let mut c = tera::Context::new();
        c.insert("name", "w-1");
        c
    }

    fn render_err(text: &str) -> String {
        render(
            Path::new("t.tera"),
            "(template)",
            text,
            &ctx(),
            1 << 16,
            "fix",
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn renders_what_kiln_passes_in() {
        let t = "{% macro m(x) %}<{{ x }}>{% endmacro m %}{{ self::m(x=name) }}\
                 {% for i in range(end=3) %}{{ i }}{% endfor %}{{ name is containing(\"w\") }}";
        let out = render(Path::new("t.tera"), "k", t, &ctx(), 1 << 16, "fix").unwrap();
        assert_eq!(out, "<w-1>012true");
    }

    #[test]
    fn get_env_is_refused() {
        std::env::set_var("KILN_TEMPLATE_TEST_SECRET", "host-secret");
        let e = render_err("{{ get_env(name=\"KILN_TEMPLATE_TEST_SECRET\") }}");
        assert!(e.contains("get_env() is not available"), "{e}");
        assert!(!e.contains("host-secret"), "{e}");
        let e = render_err(
            "{% macro m() %}{{ get_env(name=\"PATH\", default=\"x\") }}{% endmacro m %}",
        );
        assert!(e.contains("get_env() is not available"), "{e}");
        // The engine refuses it too, whatever the static check misses.
        let mut ctx = tera::Context::new();
        ctx.insert("x", "y");
        let err = engine()
            .render_str("{{ get_env(name=\"KILN_TEMPLATE_TEST_SECRET\") }}", &ctx)
            .unwrap_err();
        assert!(error_chain(&err).contains("get_env is not available"));
        for f in ["now()", "get_random(end=10)"] {
            let e = render_err(&format!("{{{{ {f} }}}}"));
            assert!(e.contains("cannot render"), "{f}: {e}");
        }
    }

    #[test]
    fn recursive_macros_are_refused_before_rendering() {
        let direct = "{% macro r(n) %}{{ self::r(n=n) }}{% endmacro r %}{{ self::r(n=1) }}";
        let e = render_err(direct);
        assert!(e.contains("recursive macro: r → r"), "{e}");
        let mutual = "{% macro a() %}{% if true %}{{ 1 + self::b() | length }}{% endif %}{% endmacro a %}\
                      {% macro b() %}{% for x in [self::a()] %}{% endfor %}{% endmacro b %}{{ self::a() }}";
        let e = check(Path::new("t.tera"), mutual).unwrap_err().to_string();
        assert!(e.contains("recursive macro"), "{e}");
        // A chain deeper than the bound.
        let mut chain = String::new();
        for i in 0..=MAX_CALL_DEPTH {
            chain.push_str(&format!(
                "{{% macro m{i}() %}}{{{{ self::m{}() }}}}{{% endmacro m{i} %}}",
                i + 1
            ));
        }
        chain.push_str(&format!(
            "{{% macro m{}() %}}x{{% endmacro m{} %}}",
            MAX_CALL_DEPTH + 1,
            MAX_CALL_DEPTH + 1
        ));
        let e = check(Path::new("t.tera"), &chain).unwrap_err().to_string();
        assert!(e.contains("deep"), "{e}");
    }

    #[test]
    fn include_import_extends_are_refused() {
        for t in [
            "{% include \"template\" %}",
            "{% import \"template\" as m %}",
            "{% extends \"template\" %}",
        ] {
            let e = check(Path::new("t.tera"), t).unwrap_err().to_string();
            assert!(
                e.contains("not supported") || e.contains("Circular"),
                "{t}: {e}"
            );
        }
    }

    #[test]
    fn output_and_range_are_bounded() {
        let e = render_err("{% for i in range(end=1000) %}{% for j in range(end=1000) %}xxxxxxxx{% endfor %}{% endfor %}");
        assert!(e.contains("renders more than 65536 bytes"), "{e}");
        let e = render_err("{% for i in range(end=100000000) %}{% endfor %}");
        assert!(e.contains("more than kiln's limit"), "{e}");
        // Nested loops that print nothing: 10^15 iterations, refused at the 11th inner range.
        let e = render_err(
            "{% for i in range(end=100000) %}{% for j in range(end=100000) %}\
             {% for k in range(end=100000) %}{% endfor %}{% endfor %}{% endfor %}",
        );
        assert!(e.contains("values in all in one render"), "{e}");
        // The budget is per render: the next render starts afresh.
        let ok = render(
            Path::new("t.tera"),
            "k",
            "{% for i in range(end=100000) %}{% endfor %}ok",
            &tera::Context::new(),
            1 << 16,
            "fix",
        )
        .unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let parens = format!("{{{{ {}1{} }}}}", "(".repeat(100_000), ")".repeat(100_000));
        let e = check(Path::new("t.tera"), &parens).unwrap_err().to_string();
        assert!(e.contains("brackets nest"), "{e}");
        let ifs = |n| format!("{}x{}", "{% if true %}".repeat(n), "{% endif %}".repeat(n));
        let e = check(Path::new("t.tera"), &ifs(MAX_NESTING + 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nest more than"), "{e}");
        check(Path::new("t.tera"), &ifs(MAX_NESTING)).unwrap();
        // Thousands of nested tags are refused before tera's parser, which recurses per level
        // (in a release build 5000 levels overflowed a test thread's stack).
        for n in [5000, 40_000] {
            let e = check(Path::new("t.tera"), &ifs(n)).unwrap_err().to_string();
            assert!(e.contains("block tags") && e.len() < 4000, "{e:.200}");
        }
        let fors = format!(
            "{}x{}",
            "{%- for i in [1] -%}".repeat(5000),
            "{% endfor %}".repeat(5000)
        );
        let e = check(Path::new("t.tera"), &fors).unwrap_err().to_string();
        assert!(e.contains("block tags"), "{e}");
        // Long operator chains are refused before tera builds them (60 000 `+` overflowed an
        // 8 MiB stack), also behind a string holding the closing delimiter.
        for text in [
            format!("{{{{ 1{} }}}}", " + 1".repeat(60_000)),
            format!("{{{{ true{} }}}}", " and true".repeat(60_000)),
            format!(
                "{{% if \"%}}\" == \"x\"{} %}}x{{% endif %}}",
                " or true".repeat(60_000)
            ),
        ] {
            let e = check(Path::new("t.tera"), &text).unwrap_err().to_string();
            assert!(e.contains("operators, more than"), "{e:.200}");
        }
        // Ordinary expressions are far below the bound.
        assert_eq!(
            max_operators("{{ a + 1 }}{% if a == b and not c %}{% endif %}"),
            Some(4)
        );
        // Tags inside raw are text.
        let raw = format!("{{% raw %}}{}{{% endraw %}}", "{% if true %}".repeat(100));
        check(Path::new("t.tera"), &raw).unwrap();
    }
}
