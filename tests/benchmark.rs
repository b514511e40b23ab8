//! `cargo xtask bench --quick` as a smoke run: every row runs and its numbers are sane. Speed
//! itself is never asserted here (the suite runs tests in parallel on two cores).

use harness::bench::{Nginx, Plan, listening_pids, run};
use harness::free_loopback_port;

#[test]
fn a_quick_benchmark_runs_every_row_with_sane_numbers() {
    let report = run(Plan::QUICK);
    let table = report.table();
    assert_eq!(report.rows.len(), 10, "{table}");
    for row in &report.rows {
        for series in &row.series {
            if series.name.starts_with("CPU") {
                continue;
            }
            assert!(series.median() > 0.0 && series.median().is_finite(), "{}: {}\n{table}", row.what, series.name);
        }
        for ratio in &row.ratios {
            assert!(ratio.value.is_finite(), "{}: {}\n{table}", row.what, ratio.name);
        }
    }
    assert_eq!(report.lost, 0, "nothing lost:\n{table}");
    let ingestion = report.rows.iter().find(|r| r.what == "session log ingestion").expect("the ingestion row");
    let n = Plan::QUICK.connects;
    let every = format!(
        "({n} of {n} stored, fewest of the rounds); and {} of {} execs",
        Plan::QUICK.execs + 1,
        Plan::QUICK.execs
    );
    assert!(ingestion.workload.contains(&every), "every connect and exec (and the shell's own) recorded: {table}");
    let share = ingestion.ratios.iter().find(|r| r.name == "of the loop's own rate").expect("the ceiling's ratio");
    assert!(share.value > 0.0, "ingestion is compared with the loop's own rate: {table}");
}

/// The nginx peers are measured doing a reverse proxy's work only: were one
/// the upstream's process too, its one worker would serve both, and every
/// ratio against it would flatter tollgate. The logging peer writes a line
/// per request.
#[test]
fn the_nginx_peers_proxy_from_processes_of_their_own() {
    let port = || free_loopback_port().expect("a free port");
    let nginx = Nginx::start(&[port(), port()], port(), port());
    let upstream = listening_pids(nginx.upstream_ports[0]);
    for (name, peer_port) in [("peer", nginx.peer_port), ("logging peer", nginx.logging_peer_port)] {
        let peer = listening_pids(peer_port);
        assert!(!peer.is_empty() && !upstream.is_empty(), "listeners found: {name} {peer:?}, upstream {upstream:?}");
        assert!(peer.is_disjoint(&upstream), "the {name}'s processes {peer:?} serve the upstream too ({upstream:?})");
        // And it is a proxy to that upstream: its answer is the upstream's body.
        let through_peer = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", &format!("http://127.0.0.1:{peer_port}/peer-check")])
            .output()
            .expect("curl runs");
        let body = String::from_utf8_lossy(&through_peer.stdout);
        assert!(body.contains("ann@example.com"), "the {name} relays the upstream's body; got {body:?}");
    }
    assert!(
        listening_pids(nginx.peer_port).is_disjoint(&listening_pids(nginx.logging_peer_port)),
        "the two peers are separate processes"
    );
    // nginx writes a request's line once the response is sent: possibly just after curl has it.
    let logged = |log: &str| log.lines().filter(|l| l.contains("\"GET /peer-check HTTP/1.1\" 200")).count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut log = String::new();
    while std::time::Instant::now() < deadline {
        log = std::fs::read_to_string(&nginx.peer_access_log).unwrap_or_default();
        if logged(&log) > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(logged(&log), 1, "the logging peer wrote one line for its one request: {log:?}");
}
