//! A room's online list, kept rendered.
//!
//! Every `joined` reply (but those of sockets that take counts) carries the room's
//! whole online list, and clients page it with `online` requests. Rendering it name by
//! name on each join made a reconnect storm quadratic in small copies (5,000 users
//! joining one room rendered 12.5 million names); [`OnlineList`] keeps the JSON array
//! up to date as users come and go, so a join copies it in one piece. A room whose
//! sockets all take counts never asks for the array, and never pays for it. Used by
//! [`crate::hub`] under its lock (where it holds the users online on any node); it runs
//! no threads.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};

/// Distinct usernames, sorted, with their JSON array (`["a","b"]`) rendered the first
/// time someone asks for it and kept up to date from then on.
///
/// Until then a change costs a tree insert: sockets that take counts never ask for the
/// array, so a storm of them into one room does not copy it on every join.
#[derive(Debug, Default)]
pub struct OnlineList {
    /// Each name, and how many bytes it takes in the array (quoted and escaped: a
    /// name written into the file by hand may hold anything).
    names: BTreeMap<String, usize>,
    /// The array, once asked for.
    json: Option<String>,
}

impl OnlineList {
    /// The list as a JSON array of strings, sorted.
    pub fn json(&mut self) -> &str {
        let names = &self.names;
        self.json.get_or_insert_with(|| {
            let quoted: Vec<String> = names.keys().map(|n| quote(n)).collect();
            format!("[{}]", quoted.join(","))
        })
    }

    /// How many names the list holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Adds `name`; a name already there is left alone.
    pub fn insert(&mut self, name: &str) {
        if self.names.contains_key(name) {
            return;
        }
        let quoted = quote(name);
        let width = quoted.len();
        if let Some(json) = &mut self.json {
            let (at, text) = if self.names.is_empty() {
                (1, quoted)
            } else if self
                .names
                .range::<str, _>((Excluded(name), Unbounded))
                .next()
                .is_some()
            {
                (offset(&self.names, name), quoted + ",")
            } else {
                // After the last name: the comma goes first, where the `]` is.
                (json.len() - 1, format!(",{quoted}"))
            };
            json.insert_str(at, &text);
        }
        self.names.insert(name.to_owned(), width);
    }

    /// Removes `name`, if it is there.
    pub fn remove(&mut self, name: &str) {
        let Some(width) = self.names.remove(name) else {
            return;
        };
        let Some(json) = &mut self.json else {
            return;
        };
        let at = offset(&self.names, name);
        let range = if self.names.is_empty() {
            at..at + width
        } else if at + width < json.len() - 1 {
            at..at + width + 1
        } else {
            // The last name takes the comma before it along.
            at - 1..at + width
        };
        json.replace_range(range, "");
    }

    /// Up to `limit` names in order, starting after `after` (from the first without).
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<String> {
        let from = after.map_or(Unbounded, Excluded);
        self.names
            .range::<str, _>((from, Unbounded))
            .take(limit)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn quote(name: &str) -> String {
    serde_json::Value::from(name).to_string()
}

/// Where `name` starts (its opening quote) in the array of `names` (which does not
/// hold it): after the `[`, each name before it takes its width plus a comma.
fn offset(names: &BTreeMap<String, usize>, name: &str) -> usize {
    1 + names
        .range::<str, _>((Unbounded, Excluded(name)))
        .map(|(_, w)| w + 1)
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn rendered(set: &BTreeSet<String>) -> String {
        serde_json::to_string(&set.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn stays_equal_to_a_fresh_rendering() {
        let mut list = OnlineList::default();
        let mut set = BTreeSet::new();
        assert_eq!(list.json(), "[]");
        // A fixed pseudo-random walk over 40 names: inserts and removes at the front,
        // the middle and the end, repeats, and emptying the list more than once.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let name = format!("u{}", x % 40);
            if x % 3 == 0 {
                list.remove(&name);
                set.remove(&name);
            } else {
                list.insert(&name);
                set.insert(name);
            }
            assert_eq!(list.json(), rendered(&set), "after step {step}");
        }
        for name in set.clone() {
            list.remove(&name);
            set.remove(&name);
            assert_eq!(list.json(), rendered(&set));
        }
        assert_eq!(list.json(), "[]");
    }

    #[test]
    fn a_list_first_asked_for_late_renders_what_it_holds() {
        let mut list = OnlineList::default();
        for n in ["dan", "bob", "eve", "ann", "cat"] {
            list.insert(n);
        }
        list.remove("eve");
        assert_eq!(list.json(), r#"["ann","bob","cat","dan"]"#);
        list.insert("eve");
        list.remove("ann");
        assert_eq!(list.json(), r#"["bob","cat","dan","eve"]"#);
    }

    #[test]
    fn pages_continue_after_a_name_present_or_not() {
        let mut list = OnlineList::default();
        for n in ["dan", "bob", "eve", "ann", "cat"] {
            list.insert(n);
        }
        assert_eq!(list.page(None, 2), ["ann", "bob"]);
        assert_eq!(list.page(Some("bob"), 2), ["cat", "dan"]);
        assert_eq!(list.page(Some("bz"), 10), ["cat", "dan", "eve"]);
        assert_eq!(list.page(Some("eve"), 10), Vec::<String>::new());
        assert_eq!(list.page(Some(""), 1), ["ann"]);
    }

    #[test]
    fn absent_names_and_repeats_change_nothing() {
        let mut list = OnlineList::default();
        list.remove("nobody");
        list.insert("bob");
        list.insert("alice");
        list.insert("bob");
        list.remove("carol");
        assert_eq!(list.json(), r#"["alice","bob"]"#);
    }

    #[test]
    fn a_name_written_by_hand_is_escaped() {
        let mut list = OnlineList::default();
        list.insert("b\"ob");
        list.insert("a\nl");
        list.insert("zed");
        let parsed: Vec<String> = serde_json::from_str(list.json()).unwrap();
        assert_eq!(parsed, ["a\nl", "b\"ob", "zed"]);
        list.remove("b\"ob");
        assert_eq!(list.json(), r#"["a\nl","zed"]"#);
    }
}
