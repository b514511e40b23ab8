//! Printing answers for people (text) or programs (JSON).

use serde_json::Value;
use tollgate_common::EventKind;

use crate::store::RecordKind;

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// `tollgate sessions`.
pub fn sessions(sessions: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(sessions);
    }
    println!("{:<20} {:<16} {:<20} {:>6} {:<32} ENDED", "SESSION", "IDENTITY", "SUBJECT", "UID", "STARTED");
    for s in sessions.as_array().into_iter().flatten() {
        // A root session could have undone its own confinement: say so on its line.
        let uid = match s.get("uid").and_then(Value::as_u64) {
            Some(uid) if s["privileged"] == true => format!("{uid}!"),
            Some(uid) => uid.to_string(),
            None => "-".into(),
        };
        let ended = s.get("ended_at").and_then(Value::as_str).unwrap_or("running");
        println!(
            "{:<20} {:<16} {:<20} {:>6} {:<32} {}",
            text(s, "id"),
            text(s, "identity"),
            text(s, "subject"),
            uid,
            text(s, "started_at"),
            ended
        );
    }
    if sessions.as_array().into_iter().flatten().any(|s| s["privileged"] == true) {
        println!("! PRIVILEGED: ran as root, and could have left its cgroup or unloaded the programs");
    }
    Ok(())
}

/// `tollgate show`.
pub fn show(detail: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(detail);
    }
    let session = &detail["session"];
    println!("session   {}", text(session, "id"));
    println!(
        "identity  {} (subject {}, issuer {})",
        text(session, "identity"),
        text(session, "subject"),
        text(session, "issuer")
    );
    let privileged = if session["privileged"] == true {
        "  PRIVILEGED: runs as root, and could have left its cgroup or unloaded the programs"
    } else {
        ""
    };
    println!("uid       {}{privileged}", session["uid"]);
    println!("started   {}", text(session, "started_at"));
    println!("ended     {}", session.get("ended_at").and_then(Value::as_str).unwrap_or("running"));
    println!("\nprocesses");
    for p in detail["processes"].as_array().into_iter().flatten() {
        let end = match (p["exit_code"].as_u64(), p.get("signal").and_then(Value::as_u64)) {
            (_, Some(sig)) => format!("signal {sig}"),
            (Some(code), _) => format!("exit {code}"),
            _ => "running".to_owned(),
        };
        println!("  {:>7} <- {:<7} {}  {end}", p["pid"], p["ppid"], text(p, "filename"));
    }
    println!("\nevents");
    for e in detail["events"].as_array().into_iter().flatten() {
        let what = match RecordKind::from_name(text(e, "kind")) {
            Some(RecordKind::Kernel(EventKind::Exec)) => {
                let argv: Vec<&str> = e["argv"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let cut = if e["argv_truncated"] == true { " [arguments cut]" } else { "" };
                format!("{} {}{cut}", text(e, "filename"), argv.join(" "))
            }
            Some(RecordKind::Kernel(EventKind::Fork)) => format!("-> {}", e["child_pid"]),
            Some(RecordKind::Kernel(EventKind::Exit)) => match e["signal"].as_u64() {
                Some(sig) => format!("signal {sig}"),
                None => format!("code {}", e["exit_code"]),
            },
            Some(RecordKind::Kernel(EventKind::Connect)) => match e.get("rule").and_then(Value::as_str) {
                Some(rule) => format!("{} {}:{} ({rule})", text(e, "protocol"), text(e, "addr"), e["port"]),
                None => format!("{} {}:{} (no rule)", text(e, "protocol"), text(e, "addr"), e["port"]),
            },
            Some(RecordKind::Kernel(EventKind::Socket)) => {
                format!("family {} type {} protocol {}", e["family"], e["type"], e["protocol"])
            }
            Some(RecordKind::Http) => format!(
                "{} {}{} -> {} ({}){}",
                text(e, "method"),
                text(e, "host"),
                text(e, "path"),
                e["status"],
                text(e, "destination"),
                e["rules"].as_array().filter(|r| !r.is_empty()).map_or(String::new(), |r| format!(
                    " rules: {}",
                    r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; ")
                ))
            ),
            Some(RecordKind::Approval) => format!(
                "{} {} {} ({}){}",
                text(e, "id"),
                text(e, "method"),
                text(e, "path"),
                text(e, "rule"),
                e.get("by").and_then(Value::as_str).map_or(String::new(), |by| format!(" by {by}"))
            ),
            Some(RecordKind::Lost) => {
                format!("{} {} event(s) not delivered ({})", e["count"], text(e, "lost_kind"), text(e, "reason"))
            }
            Some(RecordKind::Session) => {
                let by = e.get("by").and_then(Value::as_str).map_or(String::new(), |by| format!("by {by}"));
                let reason = e.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(" ({r})"));
                let limit = e.get("max_session_secs").map_or(String::new(), |s| format!("max_session {s}s"));
                format!("{by}{reason}{limit}")
            }
            _ => String::new(),
        };
        let verdict = e.get("verdict").and_then(Value::as_str).map_or(String::new(), |v| format!(" [{v}]"));
        println!("  {:>5} {} {:<7} {:>7} {what}{verdict}", e["seq"], text(e, "at"), text(e, "kind"), e["pid"]);
    }
    Ok(())
}

/// `tollgate status`.
pub fn status(status: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(status);
    }
    println!("exec enforcement  {}", text(status, "exec_enforcement"));
    if let Some(why) = status.get("lsm_unavailable").and_then(Value::as_str) {
        println!("                  ({why})");
    }
    match status.get("pinning_unavailable").and_then(Value::as_str) {
        None if status["enforcement_survives_daemon"] == true => {
            println!("survives daemon   yes (programs and maps pinned in bpffs)");
        }
        why => println!("survives daemon   NO: sessions end with the daemon ({})", why.unwrap_or("not pinned")),
    }
    println!("active sessions   {}", status["sessions_active"]);
    println!("events lost       {}", status["events_lost"]);
    println!("cgroup            {}", text(status, "cgroup"));
    println!(
        "policies          {} file(s), {} identities, {} grants",
        status["policy_files"], status["identities"], status["grants"]
    );
    Ok(())
}

/// `tollgate approvals`.
pub fn approvals(pending: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(pending);
    }
    println!("{:<8} {:<20} {:<14} {:<7} {:<30} EXPIRES", "ID", "SESSION", "IDENTITY", "METHOD", "PATH");
    for p in pending.as_array().into_iter().flatten() {
        // Approving an upgrade opens a tunnel no rule sees into: say so.
        let upgrade = p.get("upgrade").and_then(Value::as_str).map_or(String::new(), |u| format!("  UPGRADE to {u}"));
        println!(
            "{:<8} {:<20} {:<14} {:<7} {:<30} {}{upgrade}",
            text(p, "id"),
            text(p, "session"),
            text(p, "identity"),
            text(p, "method"),
            text(p, "path"),
            text(p, "expires_at")
        );
    }
    Ok(())
}

/// `tollgate approve` / `deny`: what was decided, by whom.
pub fn decision(answer: &Value) {
    println!("{} {} by {}", text(answer, "approval"), text(answer, "decision"), text(answer, "by"));
}

/// `tollgate revoke`.
pub fn revoked(answer: &Value) {
    println!("revoked {} (by {}); its processes are being killed", text(answer, "session"), text(answer, "by"));
}
