//! What SREs install: the systemd unit is sandboxed as far as the daemon's work allows, scored by
//! `systemd-analyze security`, and says why for each protection it cannot use.

use std::time::Duration;

use harness::{run_with_timeout, workspace_root};

/// `systemd-analyze security` rates the unit at most 5.0 ("OK"), and every protection it turns
/// off or leaves at a weaker setting is explained by a comment right above it.
#[test]
fn the_unit_is_hardened_and_explains_what_it_cannot_use() {
    let unit = workspace_root().join("packaging/systemd/tollgate.service");
    let mut analyze = std::process::Command::new("systemd-analyze");
    analyze.args(["security", "--offline=true"]).arg(&unit);
    let out = run_with_timeout(&mut analyze, Duration::from_secs(60)).expect("systemd-analyze runs");
    let score: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.split("Overall exposure level for tollgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level: {out}"));
    assert!(score <= 5.0, "exposure {score} is above 5.0: {out}");

    let text = std::fs::read_to_string(&unit).expect("the unit");
    let lines: Vec<&str> = text.lines().collect();
    let weakened = ["=no", "ProtectProc=default"];
    for (index, line) in lines.iter().enumerate() {
        if weakened.iter().any(|w| line.ends_with(w)) {
            assert!(index > 0 && lines[index - 1].starts_with('#'), "`{line}` has no comment saying why:\n{text}");
        }
    }
    for needed in [
        "Type=notify",
        "ExecReload=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
}
