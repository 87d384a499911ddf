//! The house's shape, checked: imports between the top-level modules of `src/` (and of
//! the emulator's `src/`) point one way. A cycle is printed with the imports that make
//! it, so whoever adds one sees where.
//!
//! `cargo nextest run --test architecture -- --nocapture` also prints the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name as `crate::…`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let first = relative
                .components()
                .next()
                .expect("a file")
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if first == "main" || first == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let edges = graph.entry(first.clone()).or_default();
            for line in text.lines() {
                let code = line.split("//").next().unwrap_or("");
                for (at, _) in code.match_indices("crate::") {
                    let rest = &code[at + "crate::".len()..];
                    let names: Vec<&str> = match rest.strip_prefix('{') {
                        // `use crate::{a::X, b}`: every name in the braces on this line.
                        Some(group) => group
                            .split(',')
                            .filter_map(|part| part.trim().split("::").next())
                            .collect(),
                        None => rest.split("::").next().into_iter().collect(),
                    };
                    for name in names {
                        let name: String = name
                            .chars()
                            .take_while(|c| {
                                c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()
                            })
                            .collect();
                        if !name.is_empty() && name != first {
                            edges.insert(name);
                        }
                    }
                }
            }
        }
    }
    graph
}

/// The cycles of `graph`, each as the list of its modules (strongly connected
/// components of more than one module).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules share a cycle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(at) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut found: Vec<Vec<String>> = Vec::new();
    for module in graph.keys() {
        if found.iter().any(|c| c.contains(module)) {
            continue;
        }
        let cycle: Vec<String> = graph
            .keys()
            .filter(|other| {
                *other == module
                    || (reached[module].contains(*other) && reached[*other].contains(module))
            })
            .cloned()
            .collect();
        if cycle.len() > 1 {
            found.push(cycle);
        }
    }
    found
}

fn assert_no_cycle(src: &Path) {
    let graph = module_graph(src);
    for (module, uses) in &graph {
        println!(
            "{module} -> {}",
            uses.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let found = cycles(&graph);
    let shown: Vec<String> = found
        .iter()
        .map(|cycle| {
            cycle
                .iter()
                .map(|m| {
                    let inside: Vec<&String> =
                        graph[m].iter().filter(|n| cycle.contains(n)).collect();
                    format!("{m} -> {inside:?}")
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(
        found.is_empty(),
        "import cycles in {}: {shown:#?}",
        src.display()
    );
}

#[test]
fn the_archivers_modules_import_one_way() {
    assert_no_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}

#[test]
fn the_emulators_modules_import_one_way() {
    assert_no_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/kvs-emulator/src"));
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, uses)| (m.to_string(), uses.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
}
