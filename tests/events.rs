//! Event delivery: events that find the kernel ring buffer full are counted,
//! reported and recorded; none disappear silently.

use harness::{Daemon, session_log::events_of_kind};

const POLICY: &str = r#"identities:
  - name: flood-bots
    issuer: tollgate-dev
    allow_root: true
grants:
  - name: flood-bots-egress
    identity: flood-bots
    network:
      allow: ["0.0.0.0/0"]
      deny: ["127.0.0.2/32"]
"#;

/// Denied connects a session makes in a tight loop: each one is a kernel event.
const ATTEMPTS: u64 = 4000;

#[test]
fn a_full_ring_buffer_loses_events_visibly_and_accounts_for_every_one() {
    // One page of ring buffer holds a few dozen connect events; a tight loop
    // of connects outruns the reader, so some must be lost.
    let daemon = Daemon::builder().policy(POLICY).config_line("event_buffer_kib: 4").start();
    let token = daemon.mint("flood-bot", &[]);
    let script = format!(
        "import socket\nfor _ in range({ATTEMPTS}):\n    s = socket.socket()\n    try:\n        s.connect(('127.0.0.2', 9))\n    except PermissionError:\n        pass\n    else:\n        raise SystemExit('connect to a denied address succeeded')\n    s.close()\n"
    );
    let out = daemon.run(&token, &["python3", "-c", &script]);
    assert_eq!(out.code(), Some(0), "the flood did not run as expected: {out}");
    let id = daemon.last_session_id();

    // Every attempt is either recorded or counted as lost: poll until the
    // lost counter (sampled once a second) and the log add up.
    let mut last = (0, 0);
    for _ in 0..50 {
        let show = daemon.show(&id);
        let recorded = events_of_kind(&show, "connect").len() as u64;
        let status = daemon.status();
        let lost = status["events_lost_by_kind"]["connect"]
            .as_u64()
            .unwrap_or_else(|| panic!("no per-kind lost count: {status}"));
        last = (recorded, lost);
        if recorded + lost == ATTEMPTS {
            assert!(lost > 0, "a 4 KiB ring buffer kept up with {ATTEMPTS} connects; the test proves nothing");
            assert!(
                status["events_lost"].as_u64().is_some_and(|total| total >= lost),
                "the total does not include the connect losses: {status}"
            );
            assert!(daemon.log().contains("kernel events lost"), "the loss was not logged:\n{}", daemon.log());
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!(
        "{} recorded + {} lost != {ATTEMPTS} attempts: events went missing silently\n{}",
        last.0,
        last.1,
        daemon.log()
    );
}
