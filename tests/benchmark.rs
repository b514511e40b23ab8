//! `cargo xtask bench --quick` as a smoke run: every row runs and its numbers are sane. Speed
//! itself is never asserted here (the suite runs tests in parallel on two cores).

use harness::bench::{Nginx, Plan, listening_pids, run};
use harness::free_loopback_port;

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

/// The nginx peer is measured doing a reverse proxy's work only: were it the
/// upstream's process too, its one worker would serve both, and every ratio
/// against it would flatter tollgate.
#[test]
fn the_nginx_peer_proxies_from_a_process_of_its_own() {
    let port = || free_loopback_port().expect("a free port");
    let nginx = Nginx::start(&[port(), port()], port());
    let peer = listening_pids(nginx.peer_port);
    let upstream = listening_pids(nginx.upstream_ports[0]);
    assert!(!peer.is_empty() && !upstream.is_empty(), "listeners found: peer {peer:?}, upstream {upstream:?}");
    assert!(peer.is_disjoint(&upstream), "the peer's processes {peer:?} serve the upstream too ({upstream:?})");
    // And it is a proxy to that upstream: its answer is the upstream's body.
    let through_peer = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", &format!("http://127.0.0.1:{}/", nginx.peer_port)])
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&through_peer.stdout);
    assert!(body.contains("ann@example.com"), "the peer relays the upstream's body; got {body:?}");
}
