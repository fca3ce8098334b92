//! The reference under `docs/` keeps up with the code. Each test reads the code (or
//! runs the real binary), lists what it finds, and fails naming whatever `docs/` does
//! not mention:
//!
//! - every flag of `parley serve --help`, on one line of `docs/cli.md` together with
//!   its `PARLEY_*` variable and its default; the commands of `parley --help` and
//!   `parley user --help`, and `parley audit`'s own flags;
//! - every wire error code of `Code::as_str` in `src/error.rs`, on one line with its
//!   HTTP status (and the extra statuses 405 and 415 with theirs);
//! - every audit action the code can write: string literals reaching an `action:
//!   &'static str` parameter or an `AuditEntry { action, .. }` field, followed through
//!   `let` bindings and parameters — a form the scan cannot follow fails the test
//!   rather than being skipped;
//! - every close code in `src/peer.rs`'s `mod close`, and every literal close code
//!   passed to a close call anywhere in `src/`;
//! - every socket frame type a client may send (`ClientMsg`) and every event `type`
//!   the server writes (outside `src/graphql/`, which `docs/graphql.md` covers);
//! - every metric name of `src/metrics.rs`;
//! - in `docs/graphql.md`: every root field of `parley graphql-schema` as its SDL line
//!   (arguments and type included) in a table row, every limit of
//!   `src/graphql/limits.rs` (and the socket's operation cap and `connection_init`
//!   timeout) on a table row with its value, and every close code of GraphQL's own
//!   (`mod code` in `src/graphql/socket.rs`, and `SocketKind::close_code`'s).
//!
//! Two more keep the repository self-contained: no file refers to the old shared
//! protocol notes outside it, and every relative link (and `#anchor`) in the README and
//! `docs/` resolves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `docs/*.md`, by file name.
fn docs() -> BTreeMap<String, String> {
    let dir = root().join("docs");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("docs/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    assert!(
        out.contains_key("reference.md"),
        "docs/reference.md is the index"
    );
    out
}

fn doc(name: &str) -> String {
    docs()
        .remove(name)
        .unwrap_or_else(|| panic!("docs/{name} is missing"))
}

fn all_docs() -> String {
    docs().into_values().collect::<Vec<_>>().join("\n")
}

/// Fails listing every item of `missing`, if any.
#[track_caller]
fn assert_none_missing(what: &str, missing: &[String]) {
    assert!(
        missing.is_empty(),
        "the reference in docs/ lacks {what}:\n  {}",
        missing.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------
// The binary's own help.

/// `parley ARGS`, with no `PARLEY_*` variable set (they would show in the help).
fn help(args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("PARLEY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run parley");
    assert!(out.status.success(), "parley {args:?} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A flag as `--help` shows it.
#[derive(Debug, Default)]
struct Flag {
    name: String,
    env: Option<String>,
    default: Option<String>,
}

/// Every long flag of a `--help` text, with its `[env: ...]` and `[default: ...]`.
fn flags(help: &str) -> Vec<Flag> {
    let mut out: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let t = line.trim();
        let long = t
            .split([' ', ','])
            .find(|w| w.starts_with("--") && w.len() > 2);
        if let Some(name) = long.filter(|_| t.starts_with('-')) {
            out.push(Flag {
                name: name.to_owned(),
                ..Flag::default()
            });
        } else if let Some(f) = out.last_mut() {
            if let Some(rest) = t.strip_prefix("[env: ") {
                f.env = Some(rest.split(['=', ']']).next().unwrap().to_owned());
            } else if let Some(rest) = t.strip_prefix("[default: ") {
                f.default = Some(rest.trim_end_matches(']').to_owned());
            }
        }
    }
    out.retain(|f| f.name != "--help");
    out
}

/// The names listed under `Commands:` (without `help`).
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_serve_flag_is_documented_with_its_variable_and_default() {
    let flags = flags(&help(&["serve", "--help"]));
    assert!(
        flags.len() >= 15 && flags.iter().any(|f| f.name == "--ws-ping"),
        "could not read the flags of `parley serve --help`: {flags:?}"
    );
    let cli = doc("cli.md");
    let mut missing = Vec::new();
    for f in &flags {
        let env = f.env.as_deref().expect("every serve flag has a variable");
        let default = match &f.default {
            Some(d) => format!("`{d}`"),
            None => "none".to_owned(),
        };
        let documented = cli.lines().any(|l| {
            l.contains(&format!("`{}`", f.name))
                && l.contains(&format!("`{env}`"))
                && l.contains(&default)
        });
        if !documented {
            missing.push(format!(
                "a line of docs/cli.md with `{}`, `{env}` and {default}",
                f.name
            ));
        }
    }
    assert_none_missing("serve flags", &missing);
}

#[test]
fn every_command_is_documented() {
    let cli = doc("cli.md");
    let mut missing = Vec::new();
    let top = help(&["--help"]);
    let user = help(&["user", "--help"]);
    let wanted = commands(&top)
        .into_iter()
        .map(|c| format!("parley {c}"))
        .chain(
            commands(&user)
                .into_iter()
                .map(|c| format!("parley user {c}")),
        );
    for c in wanted {
        if !cli.contains(&c) {
            missing.push(c);
        }
    }
    assert!(
        commands(&top).contains(&"check".to_owned()) && commands(&user).len() >= 5,
        "could not read the commands: {top}"
    );
    // Flags of their own: `audit`'s, and `--version` on the top level.
    let serve: BTreeSet<String> = flags(&help(&["serve", "--help"]))
        .into_iter()
        .map(|f| f.name)
        .collect();
    for f in flags(&help(&["audit", "--help"]))
        .into_iter()
        .chain(flags(&top))
    {
        if !serve.contains(&f.name) && !cli.contains(&f.name) {
            missing.push(f.name);
        }
    }
    assert_none_missing("commands or their flags", &missing);
}

// ---------------------------------------------------------------------------------
// A small Rust lexer: enough to find calls, struct literals and match arms without
// being fooled by strings, comments, lifetimes or char literals.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn ident(t: &Token, name: &str) -> bool {
    matches!(&t.tok, Tok::Ident(s) if s == name)
}

fn punct(t: &Token, c: char) -> bool {
    t.tok == Tok::Punct(c)
}

fn lex(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    let at = |j: usize| s.get(j).copied().unwrap_or('\0');
    while i < s.len() {
        let c = s[i];
        let start_line = line;
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(s[i] == '\n');
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let from = i;
            while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
                i += 1;
            }
            let word: String = s[from..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br") && matches!(at(i), '"' | '#');
            if raw {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                i += 1; // the opening quote
                let from = i;
                loop {
                    if i >= s.len() {
                        break;
                    }
                    if s[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                        break;
                    }
                    line += usize::from(s[i] == '\n');
                    i += 1;
                }
                let text: String = s[from..i.min(s.len())].iter().collect();
                i += 1 + hashes;
                out.push(Token {
                    tok: Tok::Str(text),
                    line: start_line,
                });
            } else if word == "b" && at(i) == '"' {
                continue; // the string lexes next; the prefix changes nothing here
            } else if word == "b" && at(i) == '\'' {
                i = skip_char_literal(&s, i);
            } else {
                out.push(Token {
                    tok: Tok::Ident(word),
                    line: start_line,
                });
            }
        } else if c == '"' {
            let mut text = String::new();
            i += 1;
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' {
                    match at(i + 1) {
                        'n' => text.push('\n'),
                        't' => text.push('\t'),
                        '\n' => {
                            line += 1;
                            i += 2;
                            while i < s.len() && s[i].is_whitespace() {
                                line += usize::from(s[i] == '\n');
                                i += 1;
                            }
                            continue;
                        }
                        other => text.push(other),
                    }
                    i += 2;
                } else {
                    line += usize::from(s[i] == '\n');
                    text.push(s[i]);
                    i += 1;
                }
            }
            i += 1;
            out.push(Token {
                tok: Tok::Str(text),
                line: start_line,
            });
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1b}') or a lifetime ('static).
            if at(i + 1) == '\\' || at(i + 2) == '\'' {
                i = skip_char_literal(&s, i);
            } else {
                out.push(Token {
                    tok: Tok::Punct('\''),
                    line,
                });
                i += 1;
            }
        } else if c.is_ascii_digit() {
            let from = i;
            while i < s.len()
                && (s[i].is_alphanumeric()
                    || s[i] == '_'
                    || (s[i] == '.' && at(i + 1).is_ascii_digit()))
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Num(s[from..i].iter().collect()),
                line,
            });
        } else {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    strip_test_modules(out)
}

/// Past a char literal starting at `s[i] == '\''`.
fn skip_char_literal(s: &[char], mut i: usize) -> usize {
    i += 1;
    if s.get(i) == Some(&'\\') {
        i += 2;
    } else {
        i += 1;
    }
    while i < s.len() && s[i] != '\'' {
        i += 1;
    }
    i + 1
}

/// Drops `#[cfg(test)] mod NAME { ... }`: test code writes no audit rows.
fn strip_test_modules(toks: Vec<Token>) -> Vec<Token> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let is_test_mod = toks.len() > i + 9
            && punct(&toks[i], '#')
            && punct(&toks[i + 1], '[')
            && ident(&toks[i + 2], "cfg")
            && punct(&toks[i + 3], '(')
            && ident(&toks[i + 4], "test")
            && punct(&toks[i + 5], ')')
            && punct(&toks[i + 6], ']')
            && ident(&toks[i + 7], "mod")
            && punct(&toks[i + 9], '{');
        if is_test_mod {
            i = matching(&toks, i + 9) + 1;
        } else {
            out.push(toks[i].clone());
            i += 1;
        }
    }
    out
}

/// The index of the bracket closing the one at `open`.
fn matching(toks: &[Token], open: usize) -> usize {
    let mut depth = 0i32;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets after line {}", toks[open].line);
}

/// Splits at top-level commas (`angle`: `<...>` nests too, as in parameter types).
fn split_commas(toks: &[Token], angle: bool) -> Vec<Vec<Token>> {
    let (mut parts, mut cur, mut depth) = (Vec::new(), Vec::new(), 0i32);
    for (j, t) in toks.iter().enumerate() {
        let arrow = j > 0 && punct(&toks[j - 1], '-');
        match t.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct('<') if angle => depth += 1,
            Tok::Punct(')' | ']' | '}') => depth -= 1,
            Tok::Punct('>') if angle && !arrow => depth -= 1,
            Tok::Punct(',') if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(t.clone());
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

fn strings(toks: &[Token]) -> Vec<String> {
    toks.iter()
        .filter_map(|t| match &t.tok {
            Tok::Str(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn show(toks: &[Token]) -> String {
    toks.iter()
        .map(|t| match &t.tok {
            Tok::Ident(s) | Tok::Num(s) => s.clone(),
            Tok::Str(s) => format!("{s:?}"),
            Tok::Punct(c) => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every `.rs` file under `dir`, lexed, by path relative to the repository.
fn sources(dir: &Path) -> BTreeMap<String, Vec<Token>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, lex(&std::fs::read_to_string(&p).unwrap()))
        })
        .collect()
}

fn src() -> BTreeMap<String, Vec<Token>> {
    sources(&root().join("src"))
}

/// The body (inside the braces) of the first `fn name` in `toks`.
fn fn_body<'a>(toks: &'a [Token], name: &str) -> &'a [Token] {
    let at = (0..toks.len().saturating_sub(1))
        .find(|&i| ident(&toks[i], "fn") && ident(&toks[i + 1], name))
        .unwrap_or_else(|| panic!("no fn {name}"));
    let open = (at..toks.len()).find(|&j| punct(&toks[j], '{')).unwrap();
    &toks[open + 1..matching(toks, open)]
}

// ---------------------------------------------------------------------------------
// Error codes.

/// `Code::Variant => <token>` arms of a match.
fn code_arms(body: &[Token]) -> BTreeMap<String, Tok> {
    let mut out = BTreeMap::new();
    for w in body.windows(7) {
        if ident(&w[0], "Code") && punct(&w[1], ':') && punct(&w[2], ':') {
            if let (Tok::Ident(v), true, true) = (&w[3].tok, punct(&w[4], '='), punct(&w[5], '>')) {
                out.insert(v.clone(), w[6].tok.clone());
            }
        }
    }
    out
}

#[test]
fn every_error_code_is_documented_with_its_status() {
    let toks = lex(&std::fs::read_to_string(root().join("src/error.rs")).unwrap());
    let names = code_arms(fn_body(&toks, "as_str"));
    let statuses = code_arms(fn_body(&toks, "http_status"));
    assert!(
        names.len() >= 8,
        "could not read Code::as_str in src/error.rs: {names:?}"
    );
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (variant, name) in &names {
        let (Tok::Str(name), Some(Tok::Num(status))) = (name, statuses.get(variant)) else {
            panic!("Code::{variant}: no wire name and status in src/error.rs");
        };
        wanted.push((name.clone(), status.clone()));
    }
    // Constructors that override the status (405, 415): `status: Some(N)` next to a
    // shorthand such as `Self::bad_request(...)`, whose code is `Self::new(Code::V, ..)`.
    let mut shorthand: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..toks.len().saturating_sub(1) {
        if ident(&toks[i], "fn") {
            if let Tok::Ident(f) = &toks[i + 1].tok {
                let body = fn_body(&toks[i..], f);
                // `Self::new(Code::V` is nine tokens.
                for w in body.windows(9) {
                    let new = ident(&w[0], "Self") && ident(&w[3], "new") && ident(&w[5], "Code");
                    if let (true, Tok::Ident(v)) = (new, &w[8].tok) {
                        shorthand.insert(f.clone(), v.clone());
                    }
                }
            }
        }
    }
    for i in 0..toks.len().saturating_sub(1) {
        if !ident(&toks[i], "fn") {
            continue;
        }
        let Tok::Ident(f) = &toks[i + 1].tok else {
            continue;
        };
        let body = fn_body(&toks[i..], f);
        for w in body.windows(5) {
            let some = ident(&w[0], "status") && punct(&w[1], ':') && ident(&w[2], "Some");
            let Tok::Num(n) = &w[4].tok else { continue };
            if !some {
                continue;
            }
            let code = body
                .windows(4)
                .find_map(|x| match (&x[0].tok, &x[3].tok) {
                    (Tok::Ident(s), Tok::Ident(h)) if s == "Self" && punct(&x[1], ':') => {
                        shorthand.get(h).cloned()
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("fn {f} in src/error.rs: status {n} with which code?"));
            let Some(Tok::Str(name)) = names.get(&code) else {
                panic!("Code::{code} has no wire name");
            };
            wanted.push((name.clone(), n.clone()));
        }
    }
    assert!(
        wanted.iter().any(|(_, s)| s == "415"),
        "could not find the 415 override in src/error.rs: {wanted:?}"
    );
    let docs = all_docs();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, status)| {
            !docs
                .lines()
                .any(|l| l.contains(&format!("`{name}`")) && l.contains(status.as_str()))
        })
        .map(|(name, status)| format!("`{name}` on one line with {status}"))
        .collect();
    assert_none_missing("error codes", &missing);
}

// ---------------------------------------------------------------------------------
// Audit actions.

/// A function with an `action: &str` parameter: calls to it name audit actions.
#[derive(Debug, Clone)]
struct ActionFn {
    /// Called as `x.name(..)` (it takes `self`).
    method: bool,
    /// Which argument (not counting `self`) is the action.
    index: usize,
    /// How many arguments it takes (not counting `self`).
    arity: usize,
}

/// Every function of `src` with an `action: &str` (or `&'static str`) parameter.
fn action_fns(src: &BTreeMap<String, Vec<Token>>) -> BTreeMap<String, Vec<ActionFn>> {
    let mut out: BTreeMap<String, Vec<ActionFn>> = BTreeMap::new();
    for toks in src.values() {
        for i in 0..toks.len().saturating_sub(2) {
            if !ident(&toks[i], "fn") {
                continue;
            }
            let Tok::Ident(name) = &toks[i + 1].tok else {
                continue;
            };
            let Some((open, close)) = param_list(toks, i + 2) else {
                continue;
            };
            let params = split_commas(&toks[open + 1..close], true);
            let method = params
                .first()
                .is_some_and(|p| p.iter().any(|t| ident(t, "self")));
            let skip = usize::from(method);
            for (k, p) in params.iter().enumerate().skip(skip) {
                if is_action_param(p) {
                    out.entry(name.clone()).or_default().push(ActionFn {
                        method,
                        index: k - skip,
                        arity: params.len() - skip,
                    });
                }
            }
        }
    }
    out
}

/// The parentheses of a parameter list starting at `at` (after optional generics).
fn param_list(toks: &[Token], mut at: usize) -> Option<(usize, usize)> {
    if toks.get(at).is_some_and(|t| punct(t, '<')) {
        let mut depth = 0;
        while at < toks.len() {
            let arrow = punct(&toks[at - 1], '-');
            if punct(&toks[at], '<') {
                depth += 1;
            } else if punct(&toks[at], '>') && !arrow {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            at += 1;
        }
        at += 1;
    }
    toks.get(at)
        .filter(|t| punct(t, '('))
        .map(|_| (at, matching(toks, at)))
}

/// `action: &str` or `action: &'static str`.
fn is_action_param(p: &[Token]) -> bool {
    p.len() >= 4
        && ident(&p[0], "action")
        && punct(&p[1], ':')
        && punct(&p[2], '&')
        && ident(p.last().unwrap(), "str")
}

/// The function enclosing token `at`: its index (of `fn`), name and parameter names.
fn enclosing_fn(toks: &[Token], at: usize) -> Option<(usize, String, Vec<Vec<Token>>)> {
    let i = (0..at).rev().find(|&i| ident(&toks[i], "fn"))?;
    let Tok::Ident(name) = &toks[i + 1].tok else {
        return None;
    };
    let (open, close) = param_list(toks, i + 2)?;
    Some((i, name.clone(), split_commas(&toks[open + 1..close], true)))
}

/// What an expression given as an audit action can be. `Ok(actions)`: these string
/// literals (empty: the value is a parameter passed on from a caller the scan checks
/// on its own). `Err`: a form the scan does not know.
fn resolve_action(
    toks: &[Token],
    at: usize,
    expr: &[Token],
    fns: &BTreeMap<String, Vec<ActionFn>>,
) -> Result<Vec<String>, String> {
    let found = strings(expr);
    if !found.is_empty() {
        return Ok(found);
    }
    // `f.action`: a `Fold`'s action, which only `Folds::note(action, ..)` sets.
    if expr.len() >= 2 && ident(expr.last().unwrap(), "action") && punct(&expr[expr.len() - 2], '.')
    {
        return Ok(Vec::new());
    }
    let [t] = expr else {
        return Err(show(expr));
    };
    let Tok::Ident(name) = &t.tok else {
        return Err(show(expr));
    };
    let Some((start, func, params)) = enclosing_fn(toks, at) else {
        return Err(show(expr));
    };
    // `let name = ...;` earlier in the same function.
    let binding = (start..at).rev().find(|&j| {
        ident(&toks[j], "let")
            && (ident(&toks[j + 1], name)
                || (ident(&toks[j + 1], "mut") && ident(&toks[j + 2], name)))
    });
    if let Some(j) = binding {
        let eq = (j..at).find(|&k| punct(&toks[k], '=')).unwrap();
        let mut end = eq;
        let mut depth = 0i32;
        while end < at {
            match toks[end].tok {
                Tok::Punct('(' | '[' | '{') => depth += 1,
                Tok::Punct(')' | ']' | '}') => depth -= 1,
                Tok::Punct(';') if depth == 0 => break,
                _ => {}
            }
            end += 1;
        }
        let found = strings(&toks[eq..end]);
        return if found.is_empty() {
            Err(show(&toks[j..end]))
        } else {
            Ok(found)
        };
    }
    // A parameter of an action function: its callers are checked themselves.
    let is_param = params
        .iter()
        .any(|p| is_action_param(p) && ident(&p[0], name));
    if is_param && fns.contains_key(&func) {
        return Ok(Vec::new());
    }
    Err(show(expr))
}

/// Every audit action string the code in `src` can write, and the places whose
/// action the scan cannot tell (which must be none).
fn audit_actions(src: &BTreeMap<String, Vec<Token>>) -> (BTreeSet<String>, Vec<String>) {
    let fns = action_fns(src);
    let mut found = BTreeSet::new();
    let mut unknown = Vec::new();
    for (file, toks) in src {
        for i in 1..toks.len().saturating_sub(1) {
            // Calls of the action functions.
            if let Tok::Ident(name) = &toks[i].tok {
                let call = punct(&toks[i + 1], '(') && !ident(&toks[i - 1], "fn");
                if let (true, Some(sigs)) = (call, fns.get(name)) {
                    let close = matching(toks, i + 1);
                    let args = split_commas(&toks[i + 2..close], false);
                    let method = punct(&toks[i - 1], '.');
                    for sig in sigs
                        .iter()
                        .filter(|s| s.method == method && s.arity == args.len())
                    {
                        match resolve_action(toks, i, &args[sig.index], &fns) {
                            Ok(v) => found.extend(v),
                            Err(e) => {
                                unknown.push(format!("{file}:{}: {name}(.. {e} ..)", toks[i].line))
                            }
                        }
                    }
                }
            }
            // `AuditEntry { .., action: X, .. }` literals.
            let literal = ident(&toks[i], "AuditEntry")
                && punct(&toks[i + 1], '{')
                && !ident(&toks[i - 1], "struct")
                && !ident(&toks[i - 1], "impl")
                && !ident(&toks[i - 1], "for")
                && !punct(&toks[i - 1], '>');
            if literal {
                let close = matching(toks, i + 1);
                for field in split_commas(&toks[i + 2..close], false) {
                    if !field.first().is_some_and(|t| ident(t, "action")) {
                        continue;
                    }
                    let expr = match field.get(1) {
                        Some(t) if punct(t, ':') => &field[2..],
                        _ => &field[..1],
                    };
                    let at = (i..close).find(|&k| ident(&toks[k], "action")).unwrap();
                    match resolve_action(toks, at, expr, &fns) {
                        Ok(v) => found.extend(v),
                        Err(e) => unknown.push(format!(
                            "{file}:{}: AuditEntry {{ action: {e} }}",
                            toks[i].line
                        )),
                    }
                }
            }
        }
    }
    (found, unknown)
}

#[test]
fn every_audit_action_is_documented() {
    let (actions, unknown) = audit_actions(&src());
    assert!(
        unknown.is_empty(),
        "tests/reference.rs cannot tell which audit action these pass; use a string \
         literal, a `let` in the same function, or teach the scan the new form:\n  {}",
        unknown.join("\n  ")
    );
    for sure in [
        "login",
        "login_failed",
        "ws_rejected",
        "ban",
        "unban",
        "refresh_retry",
    ] {
        assert!(
            actions.contains(sure),
            "the scan of src/ missed the audit action {sure:?}: {actions:?}"
        );
    }
    let audit = doc("audit.md");
    let missing: Vec<String> = actions
        .iter()
        .filter(|a| !audit.contains(&format!("`{a}`")))
        .map(|a| format!("`{a}` in docs/audit.md"))
        .collect();
    assert_none_missing("audit actions", &missing);
}

#[test]
fn the_audit_scan_sees_actions_in_every_form() {
    // The forms the code uses today, and the ways a new action could arrive.
    let code = r#"
        fn audit_by(app: &App, actor: &Actor, action: &'static str, target: Option<&str>) {
            audit(app, Some(&actor.username), action, target);
        }
        fn audit(app: &App, actor: Option<&str>, action: &'static str, target: Option<&str>) {
            app.store.audit(AuditEntry { actor, action, target, ip: None });
        }
        impl Folds {
            fn note(&self, action: &'static str, ip: &str) -> Noted { todo!() }
        }
        fn f(app: &App, banned: bool) {
            audit_by(app, actor, "plain", None);
            let action = if banned { "chosen_a" } else { "chosen_b" };
            audit(app, None, action, None);
            app.folds.note("noted", "10.0.0.1");
            app.trusted.note(&format!("{name}")); // another `note`, one argument
            app.store.audit(AuditEntry { actor: None, action: "literal", target: None });
            store.audit(AuditEntry { action: f.action, ..e });
            // audit_by(app, actor, "in_a_comment", None);
        }
        #[cfg(test)]
        mod tests {
            fn t() { audit_by(app, actor, "in_a_test", None); }
        }
    "#;
    let src = BTreeMap::from([("x.rs".to_owned(), lex(code))]);
    let (got, unknown) = audit_actions(&src);
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        ["chosen_a", "chosen_b", "literal", "noted", "plain"]
    );
    assert!(unknown.is_empty(), "{unknown:?}");
    // A form it cannot follow fails loudly instead of being skipped.
    let bad = r#"
        fn audit_by(app: &App, action: &'static str) {}
        fn g(app: &App) { audit_by(app, pick_one()); }
    "#;
    let src = BTreeMap::from([("y.rs".to_owned(), lex(bad))]);
    let (_, unknown) = audit_actions(&src);
    assert_eq!(
        unknown.len(),
        1,
        "an unknown form must be reported: {unknown:?}"
    );
}

// ---------------------------------------------------------------------------------
// The socket.

#[test]
fn every_close_code_is_documented() {
    let src = src();
    let mut codes = BTreeSet::new();
    let peer = &src["src/peer.rs"];
    let module = (0..peer.len() - 2)
        .find(|&i| {
            ident(&peer[i], "mod") && ident(&peer[i + 1], "close") && punct(&peer[i + 2], '{')
        })
        .expect("src/peer.rs has `mod close`");
    let end = matching(peer, module + 2);
    for w in peer[module..end].windows(6) {
        if ident(&w[0], "const") && ident(&w[3], "u16") && punct(&w[4], '=') {
            if let Tok::Num(n) = &w[5].tok {
                codes.insert(n.clone());
            }
        }
    }
    // Literal codes given to a close call anywhere (`peer.close(1011, ..)`).
    for toks in src.values() {
        for i in 0..toks.len().saturating_sub(1) {
            let Tok::Ident(name) = &toks[i].tok else {
                continue;
            };
            if !name.starts_with("close") || !punct(&toks[i + 1], '(') {
                continue;
            }
            let close = matching(toks, i + 1);
            for arg in split_commas(&toks[i + 2..close], false) {
                if let [Token {
                    tok: Tok::Num(n), ..
                }] = arg.as_slice()
                {
                    if n.len() == 4 {
                        codes.insert(n.clone());
                    }
                }
            }
        }
    }
    for sure in ["1000", "1008", "1011", "4001", "4003"] {
        assert!(
            codes.contains(sure),
            "the scan missed close code {sure}: {codes:?}"
        );
    }
    let socket = doc("socket.md");
    let missing: Vec<String> = codes
        .iter()
        .filter(|c| !socket.contains(&format!("`{c}`")))
        .map(|c| format!("`{c}` in docs/socket.md"))
        .collect();
    assert_none_missing("close codes", &missing);
}

#[test]
fn every_frame_type_is_documented() {
    let src = src();
    let socket = doc("socket.md");
    let mut missing = Vec::new();

    // Client frames: the variants of `ClientMsg`, named as its serde attribute says.
    let proto = &src["src/protocol.rs"];
    let at = (0..proto.len() - 2)
        .find(|&i| ident(&proto[i], "enum") && ident(&proto[i + 1], "ClientMsg"))
        .expect("src/protocol.rs has enum ClientMsg");
    let attrs = strings(&proto[at.saturating_sub(20)..at]);
    assert!(
        attrs.iter().any(|a| a == "lowercase"),
        "ClientMsg is no longer `rename_all = \"lowercase\"`: update tests/reference.rs"
    );
    let open = (at..proto.len()).find(|&j| punct(&proto[j], '{')).unwrap();
    let body = &proto[open..=matching(proto, open)];
    let mut depth = 0;
    let mut client = Vec::new();
    for (k, t) in body.iter().enumerate() {
        match t.tok {
            Tok::Punct('{' | '(' | '[') => depth += 1,
            Tok::Punct('}' | ')' | ']') => depth -= 1,
            Tok::Ident(ref v)
                if depth == 1 && (punct(&body[k - 1], '{') || punct(&body[k - 1], ',')) =>
            {
                client.push(v.to_lowercase());
            }
            _ => {}
        }
    }
    assert!(client.len() >= 10, "could not read ClientMsg: {client:?}");
    for c in &client {
        if !socket.contains(&format!("{{\"type\":\"{c}\"")) {
            missing.push(format!("the client frame {{\"type\":\"{c}\",..}}"));
        }
    }

    // Server events: `"type": "x"` in JSON the code builds, `{"type":"x"` in text it
    // writes by hand, and `event("x", ..)`.
    let mut server = BTreeSet::new();
    for (file, toks) in &src {
        if file.starts_with("src/graphql") {
            continue;
        }
        for (i, t) in toks.iter().enumerate() {
            let Tok::Str(s) = &t.tok else { continue };
            if s == "type" && toks.get(i + 1).is_some_and(|t| punct(t, ':')) {
                if let Some(Tok::Str(v)) = toks.get(i + 2).map(|t| &t.tok) {
                    server.insert(v.clone());
                }
            }
            for part in s.split("\"type\":\"").skip(1) {
                server.insert(part.split('"').next().unwrap().to_owned());
            }
            if i >= 2 && ident(&toks[i - 2], "event") && punct(&toks[i - 1], '(') {
                server.insert(s.clone());
            }
        }
    }
    for sure in ["joined", "message", "dm", "presence_batch", "error", "ack"] {
        assert!(
            server.contains(sure),
            "the scan missed the event {sure:?}: {server:?}"
        );
    }
    for e in &server {
        if !socket.contains(&format!("`{e}`")) {
            missing.push(format!("the server event `{e}`"));
        }
    }
    assert_none_missing("socket frames (in docs/socket.md)", &missing);
}

#[test]
fn every_metric_is_documented() {
    // Every `parley_...` name in a string of src/metrics.rs, format strings included.
    let mut names = BTreeSet::new();
    for s in strings(&src()["src/metrics.rs"]) {
        for part in s.split("parley_").skip(1) {
            let tail: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !tail.is_empty() {
                names.insert(format!("parley_{tail}"));
            }
        }
    }
    assert!(
        names.len() >= 10 && names.contains("parley_upgrades_rejected_total"),
        "could not read the metric names: {names:?}"
    );
    let http = doc("http.md");
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !http.contains(&format!("`{n}`")) && !http.contains(&format!("`{n}{{")))
        .map(|n| format!("`{n}` in docs/http.md"))
        .collect();
    assert_none_missing("metrics", &missing);
}

// ---------------------------------------------------------------------------------
// GraphQL.

/// Every root field of the schema the binary serves, by root type, as its SDL line
/// (`messages(room: String!, before: Int, after: Int, limit: Int): [Message!]!`).
fn graphql_root_fields() -> BTreeMap<String, Vec<String>> {
    let sdl = help(&["graphql-schema"]);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut root, mut doc) = (None::<String>, false);
    for line in sdl.lines() {
        let t = line.trim();
        // Descriptions: `"""` opens or closes one; both on one line leave it closed.
        let quotes = t.matches("\"\"\"").count();
        if quotes > 0 {
            doc ^= quotes % 2 == 1;
            continue;
        }
        if doc {
            continue;
        }
        if let Some(rest) = t.strip_prefix("type ") {
            let name = rest.trim_end_matches('{').trim();
            if ["Query", "Mutation", "Subscription"].contains(&name) {
                root = Some(name.to_owned());
            }
        } else if t == "}" {
            root = None;
        } else if let (Some(r), Some(first)) = (&root, t.chars().next()) {
            assert!(
                first.is_ascii_lowercase() && t.contains(':'),
                "could not read the {r} field line {t:?} of `parley graphql-schema`"
            );
            out.entry(r.clone()).or_default().push(t.to_owned());
        }
    }
    out
}

#[test]
fn every_graphql_root_field_is_documented_with_its_arguments() {
    let fields = graphql_root_fields();
    for (root, at_least) in [("Query", 6), ("Mutation", 9), ("Subscription", 4)] {
        let n = fields.get(root).map_or(0, Vec::len);
        assert!(
            n >= at_least,
            "could not read the {root} fields of `parley graphql-schema`: {fields:?}"
        );
    }
    let graphql = doc("graphql.md");
    let missing: Vec<String> = fields
        .iter()
        .flat_map(|(root, fs)| fs.iter().map(move |f| (root, f)))
        .filter(|(_, f)| {
            !graphql
                .lines()
                .any(|l| l.starts_with('|') && l.contains(&format!("`{f}`")))
        })
        .map(|(root, f)| format!("a table row of docs/graphql.md with the {root} field `{f}`"))
        .collect();
    assert_none_missing("GraphQL root fields", &missing);
}

/// `n` as the docs write it: `10,000`, `1,024`, `32`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether `line` holds `number` on its own (not as a part of `16,384` or `132`).
fn holds_number(line: &str, number: &str) -> bool {
    line.match_indices(number).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + number.len()..].chars().collect::<Vec<_>>();
        let digit_before = before.is_some_and(|c| c.is_ascii_digit() || c == ',' || c == '.');
        let digit_after = match after.as_slice() {
            [c, ..] if c.is_ascii_digit() => true,
            [',' | '.', c, ..] if c.is_ascii_digit() => true,
            _ => false,
        };
        !digit_before && !digit_after
    })
}

/// The numeric `const NAME: TYPE = VALUE;` items of a file: `usize = 10_000` is
/// 10000, `Duration = Duration::from_secs(10)` is 10 seconds.
fn constants(toks: &[Token]) -> BTreeMap<String, Const> {
    let mut out = BTreeMap::new();
    for i in 0..toks.len().saturating_sub(3) {
        let Tok::Ident(name) = &toks[i + 1].tok else {
            continue;
        };
        if !ident(&toks[i], "const") || !punct(&toks[i + 2], ':') {
            continue;
        }
        let eq = (i..toks.len()).find(|&j| punct(&toks[j], '=')).unwrap();
        let semi = (eq..toks.len()).find(|&j| punct(&toks[j], ';')).unwrap();
        let value = &toks[eq + 1..semi];
        let number = value.iter().find_map(|t| match &t.tok {
            Tok::Num(n) => n.replace('_', "").parse::<u64>().ok(),
            _ => None,
        });
        if let Some(value_of) = number {
            let seconds = value.iter().any(|t| ident(t, "from_secs"));
            out.insert(name.clone(), Const { value_of, seconds });
        }
    }
    out
}

/// `toks` without the `mod NAME { ... }` blocks inside it (whose constants may share
/// a name with the file's own: `code::INIT_TIMEOUT`).
fn outside_modules(toks: &[Token]) -> Vec<Token> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        if ident(&toks[i], "mod") && toks.get(i + 2).is_some_and(|t| punct(t, '{')) {
            i = matching(toks, i + 2) + 1;
        } else {
            out.push(toks[i].clone());
            i += 1;
        }
    }
    out
}

/// A numeric constant of the code.
#[derive(Debug, Clone, Copy)]
struct Const {
    value_of: u64,
    /// A `Duration::from_secs`.
    seconds: bool,
}

impl Const {
    /// As the docs write it: `10,000`, `32`, `10 s`.
    fn shown(self) -> String {
        match self.seconds {
            true => format!("{} s", self.value_of),
            false => grouped(self.value_of),
        }
    }
}

#[test]
fn every_graphql_limit_is_documented_with_its_value() {
    let src = src();
    // Each limit, and the words its line of docs/graphql.md holds beside its value.
    let limits = constants(&outside_modules(&src["src/graphql/limits.rs"]));
    let socket = constants(&outside_modules(&src["src/graphql/socket.rs"]));
    let known: [(&str, &BTreeMap<String, Const>, &str); 8] = [
        ("MAX_DEPTH", &limits, "depth"),
        ("MAX_COMPLEXITY", &limits, "complexity"),
        ("MAX_NESTING", &limits, "nest"),
        ("MAX_FIELDS", &limits, "fields in an operation"),
        ("MAX_ALIASES", &limits, "aliases"),
        ("MAX_ROOT_FIELDS", &limits, "root fields"),
        ("MAX_DIRECTIVES", &limits, "directives"),
        ("MAX_OPERATIONS", &socket, "operations running at once"),
    ];
    let listed: BTreeSet<&str> = known.iter().map(|(name, _, _)| *name).collect();
    let unlisted: Vec<&String> = limits
        .keys()
        .filter(|k| k.starts_with("MAX_") && !listed.contains(k.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "src/graphql/limits.rs has limits this test does not know: {unlisted:?}; \
         document them in docs/graphql.md and add them to this test"
    );
    let graphql = doc("graphql.md");
    let mut missing = Vec::new();
    for (name, consts, words) in known {
        let value = consts
            .get(name)
            .unwrap_or_else(|| panic!("no const {name} in src/graphql/: update this test"))
            .shown();
        let documented = graphql.lines().any(|l| {
            l.starts_with('|') && l.to_lowercase().contains(words) && holds_number(l, &value)
        });
        if !documented {
            missing.push(format!(
                "{name}: a table row of docs/graphql.md with {words:?} and {value}"
            ));
        }
    }
    assert_none_missing("GraphQL limits", &missing);
}

#[test]
fn every_graphql_close_code_is_documented() {
    let src = src();
    // The protocol's own codes (`mod code` of src/graphql/socket.rs)...
    let socket = &src["src/graphql/socket.rs"];
    let module = (0..socket.len() - 2)
        .find(|&i| {
            ident(&socket[i], "mod") && ident(&socket[i + 1], "code") && punct(&socket[i + 2], '{')
        })
        .expect("src/graphql/socket.rs has `mod code`");
    let end = matching(socket, module + 2);
    let mut codes: BTreeSet<String> = constants(&socket[module..end])
        .into_values()
        .map(|c| c.value_of.to_string())
        .collect();
    // ...and parley's codes as a GraphQL socket spells them (`SocketKind::close_code`).
    let body = fn_body(&src["src/peer.rs"], "close_code");
    for w in body.windows(3) {
        if let (true, true, Tok::Num(n)) = (punct(&w[0], '='), punct(&w[1], '>'), &w[2].tok) {
            codes.insert(n.clone());
        }
    }
    for sure in ["4400", "4401", "4403", "4408", "4409", "4429"] {
        assert!(
            codes.contains(sure),
            "the scan missed close code {sure}: {codes:?}"
        );
    }
    let graphql = doc("graphql.md");
    let missing: Vec<String> = codes
        .iter()
        .filter(|c| !graphql.contains(&format!("`{c}`")))
        .map(|c| format!("`{c}` in docs/graphql.md"))
        .collect();
    assert_none_missing("GraphQL close codes", &missing);
}

// ---------------------------------------------------------------------------------
// The repository stands on its own.

#[test]
fn nothing_refers_outside_the_repository() {
    // Built from pieces so that this file does not match itself.
    let outside = [
        format!("..{}shared", '/'),
        format!("NOTES{}md", '.'),
        format!("PROTOCOL{}md", '.'),
    ];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            // Build output, installed npm packages, git's own files, and CI's scripts
            // (which run beside the shared notes by design) are not part of what a
            // clone reads.
            if matches!(name.as_str(), "target" | ".git" | ".ci" | "node_modules") {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root(), &mut files);
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue; // binary (chat.db.example)
        };
        for (n, line) in text.lines().enumerate() {
            if outside.iter().any(|o| line.contains(o.as_str())) {
                let rel = f.strip_prefix(root()).unwrap().display().to_string();
                found.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "these refer to files outside the repository; point them at docs/ instead:\n  {}",
        found.join("\n  ")
    );
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    markdown
        .lines()
        .filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced && l.starts_with('#')
        })
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_link_in_the_docs_resolves() {
    let mut pages: Vec<PathBuf> = vec![root().join("README.md")];
    pages.extend(docs().keys().map(|n| root().join("docs").join(n)));
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for chunk in text.split("](").skip(1) {
            let target = chunk.split(')').next().unwrap();
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = match file {
                "" => page.clone(),
                f => page.parent().unwrap().join(f),
            };
            let name = page.strip_prefix(root()).unwrap().display().to_string();
            if !path.exists() {
                broken.push(format!("{name}: {target} (no such file)"));
                continue;
            }
            if !anchor.is_empty() {
                let md = std::fs::read_to_string(&path).unwrap_or_default();
                if !anchors(&md).contains(anchor) {
                    broken.push(format!("{name}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}
