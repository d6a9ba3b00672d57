//! `cargo xtask cycles` (part of `just check`): the module import graph of the driver
//! (`kmod/`) and of the device crates (`zapguard-model/src/`, `zapguard-dev/src/`) must have no
//! cycle beyond the ones listed in [`KNOWN`], which are being taken apart (#26). A new cycle
//! fails; a listed one that is gone fails too, so that the list only shrinks.
//!
//! A file `a.rs` depends on module `b` when it names `crate::b` (in a `use` or a path); comment
//! lines are skipped. Modules are the files of the directory, one level deep.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Cycles that exist today (each a strongly connected component, sorted), per crate directory:
/// the device model is one object spread over four files. (kmod has none: its hardware layer
/// reports to contexts through `device::AsidOwner`.)
const KNOWN: &[(&str, &[&str])] = &[(
    "zapguard-model/src",
    &["cmdq", "device", "dma_engine", "inject", "testkit"],
)];

/// The crate directories checked.
const DIRS: [&str; 3] = ["kmod", "zapguard-model/src", "zapguard-dev/src"];

/// Module -> the modules of the same crate it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The import graph of the `.rs` files directly in `dir`.
pub fn graph(dir: &Path) -> Result<Graph, String> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.extension().is_some_and(|x| x == "rs") {
            let stem = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let mut text =
                std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            // A module's children (`NAME/*.rs` beside `NAME.rs`) are part of its node.
            text.push_str(&children_text(&dir.join(&stem))?);
            files.insert(stem, text);
        }
    }
    let names: BTreeSet<String> = files.keys().cloned().collect();
    Ok(files
        .iter()
        .map(|(m, text)| (m.clone(), uses(text, &names, m)))
        .collect())
}

/// The text of every `.rs` file below `dir` (none when it does not exist).
fn children_text(dir: &Path) -> Result<String, String> {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(text);
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            text.push_str(&children_text(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs") {
            text.push('\n');
            text.push_str(
                &std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            );
        }
    }
    Ok(text)
}

/// The modules among `names` (other than `me`) that `text` names as `crate::NAME`, directly or
/// in a `use crate::{..}` group (which may span lines).
fn uses(text: &str, names: &BTreeSet<String>, me: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    let mut add = |w: String| {
        if w != me && names.contains(&w) {
            out.insert(w);
        }
    };
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            // Each top-level item of the group (depth 0 inside the braces).
            Some(group) => {
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    if item_start && depth == 0 {
                        add(ident(&group[i..]));
                        item_start = false;
                    }
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        _ => {}
                    }
                }
            }
            None => add(ident(rest)),
        }
    }
    out
}

/// The strongly connected components with more than one module (Tarjan), each sorted.
pub fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out.sort();
    t.out
}

/// Checks every crate directory of [`KNOWN`]; prints what it found and returns whether the
/// cycles are exactly the listed ones.
pub fn check(root: &Path) -> Result<bool, String> {
    let mut ok = true;
    for dir in DIRS {
        let found = cycles(&graph(&root.join(dir))?);
        let known: Vec<Vec<String>> = KNOWN
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, c)| c.iter().map(|s| s.to_string()).collect())
            .collect();
        for c in &found {
            let listed = known.contains(c);
            println!(
                "{dir}: cycle {} ({})",
                c.join(" <-> "),
                if listed {
                    "known, to take apart"
                } else {
                    "NEW"
                }
            );
            ok &= listed;
        }
        for k in known.iter().filter(|k| !found.contains(k)) {
            println!(
                "{dir}: listed cycle {} is gone or changed: update KNOWN",
                k.join(" <-> ")
            );
            ok = false;
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    }

    #[test]
    fn finds_cycles_and_only_cycles() {
        let c = cycles(&g(&[
            ("a", "b"),
            ("b", "c"),
            ("c", "a"),
            ("c", "d"),
            ("e", "d"),
        ]));
        assert_eq!(c, vec![vec!["a", "b", "c"]]);
        assert!(cycles(&g(&[("a", "b"), ("b", "c")])).is_empty());
    }

    #[test]
    fn reads_paths_braces_and_skips_comments() {
        let names: BTreeSet<String> = ["a", "b", "c", "me"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let text =
            "use crate::{a::{Y, Z}, b::X};\n// crate::c in a comment\nlet x = crate::me::y;\n";
        let u = uses(text, &names, "me");
        assert_eq!(u.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        let multi = "use crate::{\n    c::D,\n    a,\n};\n";
        let u = uses(multi, &names, "me");
        assert_eq!(u.into_iter().collect::<Vec<_>>(), ["a", "c"]);
    }

    #[test]
    fn the_tree_has_only_the_known_cycles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert!(check(&root).unwrap());
    }
}
