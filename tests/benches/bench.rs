//! `cargo xtask bench [--quick]`: every row of the benchmark (see
//! `harness::bench`), printed as a table and written as JSON to `target/bench/`.

use harness::bench::{Plan, json_path, run};

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let report = run(if quick { Plan::QUICK } else { Plan::FULL });
    println!("{}", report.table());
    let path = json_path(&harness::workspace_root());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("target/bench");
    }
    let json = serde_json::to_string_pretty(&report.json()).expect("JSON");
    std::fs::write(&path, &json).expect("writing the JSON");
    std::fs::write(path.with_file_name("latest.json"), json).expect("writing latest.json");
    println!("written to {}", path.display());
}
