//! The module layering, checked on the sources: imports point one way
//! (cli -> api -> domain modules; proxy -> domain modules; daemon wires
//! them) and the top-level modules form no cycle. A new import that breaks
//! this fails here, not in review.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Top-level modules nothing else may import: they sit above the domain.
const TOP: [&str; 3] = ["daemon", "api", "cli"];
/// Allowed upward exceptions: (importer, imported).
const ALLOWED: [(&str, &str); 3] = [("cli", "api"), ("cli", "daemon"), ("daemon", "api")];

/// The first path segment of every `crate::` path in `text`, including each
/// item of `use crate::{a, b::c}`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (1, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        if let Some(name) = first_segment(&group[start..i]) {
                            found.insert(name);
                        }
                        start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        } else if let Some(name) = first_segment(rest) {
            found.insert(name);
        }
    }
    found
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module -> the top-level modules its files import.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let Some(first) = relative.components().next() else { continue };
        let module = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if ["lib", "main", "layering"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("source file");
        let imports: Vec<String> = crate_imports(&text).into_iter().filter(|name| *name != module).collect();
        graph.entry(module).or_default().extend(imports);
    }
    graph
}

#[test]
fn imports_parse_in_every_written_form() {
    let text = "use crate::{a::B, c, d::{e, f}};\nlet x = crate::g::h();";
    let names: Vec<_> = crate_imports(text).into_iter().collect();
    assert_eq!(names, ["a", "c", "d", "g"]);
}

#[test]
fn nothing_below_imports_the_daemon_the_api_or_the_cli() {
    let graph = graph();
    assert!(graph.contains_key("proxy") && graph.contains_key("session"), "the walk found the modules: {graph:?}");
    for (module, imports) in &graph {
        for imported in imports.iter().filter(|name| TOP.contains(&name.as_str())) {
            assert!(
                ALLOWED.contains(&(module.as_str(), imported.as_str())),
                "{module} imports {imported}, which sits above it"
            );
        }
    }
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = graph();
    // Depth-first search; a module met again on the current path closes a cycle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!("import cycle: {} -> {module}", path[at..].join(" -> "));
        }
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }
}
