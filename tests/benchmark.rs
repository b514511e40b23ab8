//! `cargo xtask bench --quick` as a smoke run: every row runs and its numbers are sane. Speed
//! itself is never asserted here (the suite runs tests in parallel on two cores).

use harness::bench::{Plan, run};

#[test]
fn a_quick_benchmark_runs_every_row_with_sane_numbers() {
    let report = run(Plan::QUICK);
    let table = report.table();
    assert_eq!(report.rows.len(), 9, "{table}");
    for row in &report.rows {
        for series in &row.series {
            if series.name.starts_with("CPU") {
                continue;
            }
            assert!(series.median() > 0.0 && series.median().is_finite(), "{}: {}\n{table}", row.what, series.name);
        }
    }
    assert_eq!(report.lost, 0, "nothing lost:\n{table}");
    let ingestion = report.rows.iter().find(|r| r.what == "session log ingestion").expect("the ingestion row");
    let n = Plan::QUICK.connects;
    let every = format!("({n} of {n} stored); and {} of {} execs", Plan::QUICK.execs + 1, Plan::QUICK.execs);
    assert!(ingestion.workload.contains(&every), "every connect and exec (and the shell's own) recorded: {table}");
}
