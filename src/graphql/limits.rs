//! What one GraphQL document may ask for, checked before async-graphql runs it, so
//! that any query costs bounded CPU and memory and a bad one is a GraphQL error, never
//! a crash.
//!
//! The text is at most 64 KiB (the body limit, and the socket's message limit). Before
//! parsing, one linear scan refuses brackets nested deeper than [`MAX_NESTING`] (the
//! parser, the checks and dropping the parsed tree all recurse). After parsing, one
//! walk that visits each fragment once refuses fragment cycles, more than
//! [`MAX_FIELDS`] fields once fragments are expanded (async-graphql's own checks walk
//! every spread again, so a chain of fragments each spreading the next twice would be
//! exponential for them), more than [`MAX_ALIASES`] aliases and more than
//! [`MAX_ROOT_FIELDS`] root fields. async-graphql then checks depth
//! ([`MAX_DEPTH`]), complexity ([`MAX_COMPLEXITY`]: one per field, a list field its
//! `limit` times its selection) and directives per field ([`MAX_DIRECTIVES`]).

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, OperationType, Selection,
    SelectionSet,
};
use async_graphql::{Request, ServerError};
use std::collections::{HashMap, HashSet};

/// Deepest field nesting. The standard introspection query (graphql-js 16) is 13 deep.
pub const MAX_DEPTH: usize = 16;
/// Most complexity points: a field costs 1, a list field `limit` × its selection.
pub const MAX_COMPLEXITY: usize = 10_000;
/// Deepest bracket nesting in the text, and the recursion limit async-graphql is given.
pub const MAX_NESTING: usize = 32;
/// Most fields in an operation, with fragments expanded.
pub const MAX_FIELDS: usize = 1_000;
/// Most aliased fields in an operation, with fragments expanded.
pub const MAX_ALIASES: usize = 30;
/// Most root fields in an operation (each root mutation field is one write).
pub const MAX_ROOT_FIELDS: usize = 20;
/// Most directives on one field.
pub const MAX_DIRECTIVES: usize = 8;

/// What the checks learned about the operation a request will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Query, mutation or subscription.
    pub kind: OperationType,
    /// Its root fields, fragments expanded.
    pub root_fields: usize,
}

/// Parses the request's document (keeping the parse for execution) and checks it
/// against the limits above. The errors are GraphQL request errors.
pub fn check(request: &mut Request) -> Result<Checked, Vec<ServerError>> {
    let fail = |msg: String| vec![ServerError::new(msg, None)];
    if nesting(&request.query) > MAX_NESTING {
        return Err(fail(format!(
            "the document nests brackets more than {MAX_NESTING} deep"
        )));
    }
    let operation_name = request.operation_name.clone();
    let variables = request.variables.clone();
    let doc = request.parsed_query().map_err(|e| vec![e])?;
    let mut walk = Walk {
        doc,
        fragments: HashMap::new(),
        visiting: HashSet::new(),
    };
    let operations: Vec<(Option<&str>, &OperationDefinition)> = match &doc.operations {
        DocumentOperations::Single(op) => vec![(None, &op.node)],
        DocumentOperations::Multiple(map) => map
            .iter()
            .map(|(name, op)| (Some(name.as_str()), &op.node))
            .collect(),
    };
    let mut chosen = None;
    for (name, op) in &operations {
        let set = &op.selection_set.node;
        let cost = walk.set(set, 0).map_err(fail)?;
        if cost.fields > MAX_FIELDS {
            return Err(fail(format!(
                "an operation may select at most {MAX_FIELDS} fields (fragments expanded)"
            )));
        }
        if cost.aliases > MAX_ALIASES {
            return Err(fail(format!(
                "an operation may use at most {MAX_ALIASES} aliases"
            )));
        }
        let root_fields = walk.root_fields(set, 0);
        if root_fields > MAX_ROOT_FIELDS {
            return Err(fail(format!(
                "an operation may have at most {MAX_ROOT_FIELDS} root fields"
            )));
        }
        let wanted = match (&operation_name, name) {
            (None, _) => operations.len() == 1,
            (Some(want), Some(name)) => want == name,
            (Some(_), None) => false,
        };
        if wanted {
            // A required variable left out is a request error (the spec's variable
            // coercion); async-graphql would only report it at the field using it.
            for v in &op.variable_definitions {
                let v = &v.node;
                let given = variables
                    .get(&v.name.node)
                    .is_some_and(|value| *value != async_graphql::Value::Null);
                if !v.var_type.node.nullable && v.default_value.is_none() && !given {
                    return Err(fail(format!(
                        "variable ${} of required type {} was not provided",
                        v.name.node, v.var_type.node
                    )));
                }
            }
            chosen = Some(Checked {
                kind: op.ty,
                root_fields,
            });
        }
    }
    // Fragments no operation uses are walked too: validation will reject them, but
    // only after its own walk.
    let names: Vec<&str> = doc.fragments.keys().map(|n| n.as_str()).collect();
    for name in names {
        walk.fragment(name, 0).map_err(fail)?;
    }
    chosen.ok_or_else(|| match &operation_name {
        Some(name) => fail(format!("unknown operation named {name:?}")),
        None => fail("operation name required in request".into()),
    })
}

/// The deepest nesting of `{`, `[` and `(` outside strings and comments.
fn nesting(text: &str) -> usize {
    let bytes = text.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while let Some(&b) = bytes.get(i) {
        match b {
            b'#' => {
                while bytes.get(i).is_some_and(|&c| c != b'\n' && c != b'\r') {
                    i += 1;
                }
            }
            b'"' if bytes.get(i..i + 3) == Some(b"\"\"\"") => {
                i += 3;
                while i < bytes.len() && bytes.get(i..i + 3) != Some(b"\"\"\"") {
                    // An escaped triple quote inside a block string.
                    i += if bytes.get(i..i + 4) == Some(b"\\\"\"\"") {
                        4
                    } else {
                        1
                    };
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while let Some(&c) = bytes.get(i) {
                    match c {
                        b'\\' => i += 1,
                        b'"' | b'\n' | b'\r' => break,
                        _ => {}
                    }
                    i += 1;
                }
            }
            b'{' | b'[' | b'(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// Fields and aliases of a selection, fragments expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    fields: usize,
    aliases: usize,
}

impl Cost {
    fn add(&mut self, other: Cost) {
        self.fields = self.fields.saturating_add(other.fields);
        self.aliases = self.aliases.saturating_add(other.aliases);
    }
}

/// One pass over a document that expands each fragment once (memoized).
struct Walk<'a> {
    doc: &'a ExecutableDocument,
    fragments: HashMap<&'a str, Cost>,
    visiting: HashSet<&'a str>,
}

impl<'a> Walk<'a> {
    /// `depth` counts the selection sets and spreads entered, as async-graphql's
    /// recursion limit does, and is held to the same [`MAX_NESTING`].
    fn set(&mut self, set: &'a SelectionSet, depth: usize) -> Result<Cost, String> {
        if depth > MAX_NESTING {
            return Err(format!(
                "the document nests selections and fragments more than {MAX_NESTING} deep"
            ));
        }
        let mut cost = Cost::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    cost.add(Cost {
                        fields: 1,
                        aliases: usize::from(f.node.alias.is_some()),
                    });
                    let sub = &f.node.selection_set.node;
                    if !sub.items.is_empty() {
                        cost.add(self.set(sub, depth + 1)?);
                    }
                }
                Selection::InlineFragment(i) => {
                    cost.add(self.set(&i.node.selection_set.node, depth + 1)?);
                }
                Selection::FragmentSpread(s) => {
                    cost.add(self.fragment(s.node.fragment_name.node.as_str(), depth + 1)?);
                }
            }
            if cost.fields > MAX_FIELDS {
                // No need to count further: refused either way.
                return Ok(cost);
            }
        }
        Ok(cost)
    }

    fn fragment(&mut self, name: &'a str, depth: usize) -> Result<Cost, String> {
        if let Some(cost) = self.fragments.get(name) {
            return Ok(*cost);
        }
        let Some(fragment) = self.doc.fragments.get(name) else {
            // Unknown: validation reports it.
            return Ok(Cost::default());
        };
        if !self.visiting.insert(name) {
            return Err(format!("fragment {name:?} spreads itself"));
        }
        let cost = self.set(&fragment.node.selection_set.node, depth);
        self.visiting.remove(name);
        let cost = cost?;
        self.fragments.insert(name, cost);
        Ok(cost)
    }

    /// Root fields of an operation, counting through fragments at the top level.
    /// Only runs after [`set`](Self::set) accepted the operation (no cycles).
    fn root_fields(&self, set: &SelectionSet, depth: usize) -> usize {
        if depth > MAX_NESTING {
            return usize::MAX;
        }
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(_) => 1,
                Selection::InlineFragment(i) => {
                    self.root_fields(&i.node.selection_set.node, depth + 1)
                }
                Selection::FragmentSpread(s) => self
                    .doc
                    .fragments
                    .get(&s.node.fragment_name.node)
                    .map_or(0, |f| {
                        self.root_fields(&f.node.selection_set.node, depth + 1)
                    }),
            })
            .fold(0, usize::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(query: &str) -> Result<Checked, String> {
        let mut rq = Request::new(query);
        check(&mut rq).map_err(|e| e[0].message.clone())
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        assert_eq!(nesting("{ a(x: \"{{{{\") # {{{{\n }"), 2);
        assert_eq!(nesting("{ a(x: \"\"\"{{ \\\"\"\" {{\"\"\") }"), 2);
        assert_eq!(nesting(&"[".repeat(40)), 40);
    }

    #[test]
    fn each_limit_is_enforced() {
        assert!(run("{ me { id } }").is_ok());
        let deep = format!("{{ me(x: {}1{}) }}", "[".repeat(40), "]".repeat(40));
        assert!(run(&deep).unwrap_err().contains("nests"));
        let cycle = "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
        assert!(run(cycle).unwrap_err().contains("spreads itself"));
        // Each fragment spreads the next twice: 2^30 fields once expanded.
        let mut bomb = String::from("query { ...F0 }");
        for i in 0..30 {
            bomb.push_str(&format!(
                " fragment F{i} on Query {{ ...F{} ...F{} }}",
                i + 1,
                i + 1
            ));
        }
        bomb.push_str(" fragment F30 on Query { me { id } }");
        let e = run(&bomb).unwrap_err();
        assert!(e.contains("fields"), "{e}");
        let aliases: String = (0..31).map(|i| format!(" a{i}: me {{ id }}")).collect();
        assert!(run(&format!("{{{aliases} }}"))
            .unwrap_err()
            .contains("aliases"));
        let roots = "{ me { id } ...R } fragment R on Query { rooms { name } }";
        assert_eq!(run(roots).unwrap().root_fields, 2);
        let many: String = (0..21).map(|_| " me { id }").collect();
        assert!(run(&format!("{{{many} }}"))
            .unwrap_err()
            .contains("root fields"));
    }

    #[test]
    fn the_operation_is_chosen_by_name() {
        let doc = "query A { me { id } } mutation B { kick(user: \"x\") }";
        assert!(run(doc).unwrap_err().contains("operation name required"));
        let mut rq = Request::new(doc).operation_name("B");
        assert_eq!(check(&mut rq).unwrap().kind, OperationType::Mutation);
        let mut rq = Request::new(doc).operation_name("C");
        assert!(check(&mut rq).is_err());
    }
}
