//! Imports run one way: each module of the crate may use modules of its own
//! layer or below, never above. The layers, lowest first, are the table
//! below; a new module must be placed in it. Test code (after
//! `#[cfg(test)]`) may use anything.

use std::collections::BTreeMap;
use std::path::Path;

/// The crate's modules by layer, lowest first. `lib` is the crate root
/// (`run`, `serve`); `Error` lives in `error`.
const LAYERS: &[&[&str]] = &[
    // Pure leaves: name rules, the quote parser, the SMA window, one
    // socket's queue, and helpers that know nothing of the bridge.
    &[
        "names",
        "quote",
        "sma",
        "outbox",
        "backoff",
        "shutdown",
        "telemetry",
    ],
    // Wire formats, counters, the pub/sub seam.
    &["protocol", "stats", "broker"],
    // Every channel and key name, from plain names.
    &["topology"],
    // Settings: loaded, checked, explained.
    &["config"],
    // The parts the bridge is made of.
    &["error", "auth", "pipeline", "hub", "metrics"],
    // The tasks that run them.
    &[
        "publisher",
        "listener",
        "stream",
        "session",
        "sse",
        "server",
        "probe",
        "tail",
    ],
    // Commands and the crate root.
    &["producer", "demo", "bench", "cli", "lib"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The files of the module `name`: `src/{name}.rs` and everything under
/// `src/{name}/`.
fn files_of(src: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut files = vec![src.join(format!("{name}.rs"))];
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.retain(|f| f.is_file());
    files
}

/// The crate modules `code` names as `crate::module` (or `crate::Error`).
fn used_modules(code: &str) -> Vec<String> {
    let mut used = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let module = match name.as_str() {
            "Error" => "error".to_owned(),
            "run" | "serve" => "lib".to_owned(),
            _ => name,
        };
        used.push(module);
    }
    // `use crate::{a, b}` names several.
    for (at, _) in code.match_indices("crate::{") {
        let group = &code[at + "crate::{".len()..];
        let group = &group[..group.find('}').unwrap_or(group.len())];
        for item in group.split(',') {
            let name = item.trim().split("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                used.push(match name {
                    "Error" => "error".into(),
                    "run" | "serve" => "lib".into(),
                    other => other.to_owned(),
                });
            }
        }
    }
    used.retain(|m| !m.is_empty());
    used
}

#[test]
fn imports_run_from_higher_layers_to_lower_ones_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let mut declared: Vec<String> = lib
        .lines()
        .filter_map(|line| {
            let line = line
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            line.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_owned)
        })
        .collect();
    declared.push("lib".into());

    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for module in &declared {
        let own = layer_of(module)
            .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"));
        let files = if module == "lib" {
            vec![src.join("lib.rs")]
        } else {
            files_of(&src, module)
        };
        assert!(!files.is_empty(), "no source for module {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            // Test code may reach anything.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for used in used_modules(code) {
                if used == *module {
                    continue;
                }
                let Some(theirs) = layer_of(&used) else {
                    // A type or function of the root re-exported (none today).
                    panic!(
                        "{}: uses crate::{used}, which is in no layer",
                        file.display()
                    );
                };
                if theirs > own {
                    upward
                        .entry(format!("{module} (layer {own})"))
                        .or_default()
                        .push(format!("{used} (layer {theirs}) in {}", file.display()));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "lower layers import higher ones: {upward:#?}"
    );
}

/// The pub/sub seam stands alone: it could be its own crate.
#[test]
fn the_broker_imports_nothing_from_the_crate() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in files_of(&src, "broker") {
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let used: Vec<String> = used_modules(code)
            .into_iter()
            .filter(|m| m != "broker")
            .collect();
        assert!(used.is_empty(), "{} uses crate::{used:?}", file.display());
    }
}
