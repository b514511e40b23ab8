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

/// An RFC 3339 time as local time, to the second (JSON keeps RFC 3339).
pub fn local_time(at: &str) -> String {
    let Ok(time) = humantime::parse_rfc3339(at) else { return at.to_owned() };
    let Ok(since_epoch) = time.duration_since(std::time::UNIX_EPOCH) else { return at.to_owned() };
    let seconds = since_epoch.as_secs() as libc::time_t;
    // SAFETY: localtime_r fills the tm we pass; the time is ours.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&seconds, &mut tm) }.is_null() {
        return at.to_owned();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// How long ago an RFC 3339 time was, roughly (`2m ago`).
pub fn age(at: &str) -> String {
    let Ok(time) = humantime::parse_rfc3339(at) else { return String::new() };
    let Ok(ago) = std::time::SystemTime::now().duration_since(time) else { return "just now".into() };
    let seconds = ago.as_secs();
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// An argument as a shell would need it written (quoted when it has to be).
pub fn quoted(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain { arg.to_owned() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

/// `tollgate sessions`.
pub fn sessions(sessions: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(sessions);
    }
    println!("{:<24} {:<16} {:<20} {:>6} {:<30} ENDED", "SESSION", "IDENTITY", "SUBJECT", "UID", "STARTED");
    for s in tree_order(sessions) {
        // A root session could have undone its own confinement: say so on its line.
        let uid = match s.get("uid").and_then(Value::as_u64) {
            Some(uid) if s["privileged"] == true => format!("{uid}!"),
            Some(uid) => uid.to_string(),
            None => "-".into(),
        };
        let ended = s.get("ended_at").and_then(Value::as_str).map_or_else(|| "running".to_owned(), local_time);
        let started = text(s, "started_at");
        let started = format!("{} ({})", local_time(started), age(started));
        // Child sessions sit indented under their parent.
        let depth = s.get("depth").and_then(Value::as_u64).unwrap_or(0) as usize;
        let id = if depth == 0 {
            text(s, "id").to_owned()
        } else {
            format!("{}└ {}", "  ".repeat(depth - 1), text(s, "id"))
        };
        println!(
            "{:<24} {:<16} {:<20} {:>6} {:<30} {}",
            id,
            text(s, "identity"),
            text(s, "subject"),
            uid,
            started,
            ended
        );
    }
    if sessions.as_array().into_iter().flatten().any(|s| s["privileged"] == true) {
        println!("! PRIVILEGED: ran as root, and could have left its cgroup or unloaded the programs");
    }
    Ok(())
}

/// Sessions in tree order: each top session (newest first) followed by its
/// child sessions, depth first. A child whose parent is not listed stands
/// as a top.
fn tree_order(sessions: &Value) -> Vec<&Value> {
    let all: Vec<&Value> = sessions.as_array().into_iter().flatten().collect();
    let listed = |id: &str| all.iter().any(|s| text(s, "id") == id);
    let is_top = |s: &&Value| s.get("parent").and_then(Value::as_str).is_none_or(|p| !listed(p));
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = all.iter().copied().filter(is_top).rev().collect();
    while let Some(session) = stack.pop() {
        out.push(session);
        let id = text(session, "id");
        let children = all.iter().copied().filter(|s| s.get("parent").and_then(Value::as_str) == Some(id));
        stack.extend(children.collect::<Vec<_>>().into_iter().rev());
    }
    out
}

/// `tollgate grants`.
pub fn grants(grants: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(grants);
    }
    println!("{:<24} {:<16} {:<8} {:>6} {:<32} EXPIRES", "GRANT", "IDENTITY", "STATE", "USES", "LAST EXERCISED");
    for g in grants.as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<16} {:<8} {:>6} {:<32} {}",
            text(g, "name"),
            text(g, "identity"),
            text(g, "state"),
            g["count"],
            g.get("last_exercised")
                .and_then(Value::as_str)
                .map_or_else(|| "never".to_owned(), |at| format!("{} ({})", local_time(at), age(at))),
            g.get("expires_at").and_then(Value::as_str).map_or_else(|| "-".to_owned(), local_time),
        );
        for rule in g["rule_use"].as_array().into_iter().flatten() {
            let last = rule
                .get("last_used")
                .and_then(Value::as_str)
                .map_or_else(|| "never used".to_owned(), |at| format!("last {} ({})", local_time(at), age(at)));
            println!("    {:>6}  {:<48} {last}", rule["count"], text(rule, "rule"));
        }
        if let Some(event) = g.get("last_event").filter(|e| !e.is_null()) {
            let by = event.get("by").and_then(Value::as_str).map_or(String::new(), |by| format!(" by {by}"));
            let why = event.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(": {r}"));
            println!("    {} at {}{by}{why}", text(event, "action"), local_time(text(event, "at")));
        }
    }
    Ok(())
}

/// `tollgate review`.
pub fn review(review: &Value, suggest: bool, json: bool) -> anyhow::Result<()> {
    if suggest && !json {
        print!("{}", review.get("suggested_policy").and_then(Value::as_str).unwrap_or_default());
        return Ok(());
    }
    if json {
        return print_json(review);
    }
    let findings = review["findings"].as_array().cloned().unwrap_or_default();
    println!("review {} .. {}: {} finding(s)", text(review, "since"), text(review, "until"), findings.len());
    for f in &findings {
        let about: Vec<String> = ["identity", "grant", "rule"]
            .iter()
            .filter_map(|key| f.get(*key).and_then(Value::as_str).map(|v| format!("{key} {v}")))
            .collect();
        println!(
            "
{}  {}",
            text(f, "kind"),
            about.join(", ")
        );
        println!("  evidence  {}", f["evidence"]);
        println!("  action    {}", text(f, "action"));
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
    println!("started   {}", local_time(text(session, "started_at")));
    if let Some(reason) = session.get("reason").and_then(Value::as_str) {
        println!("reason    {reason}");
    }
    if let Some(ttl) = session.get("ttl_secs").and_then(Value::as_u64) {
        println!("ttl       {ttl}s");
    }
    let chain = detail["chain"].as_array().cloned().unwrap_or_default();
    if !chain.is_empty() {
        println!("delegated by (innermost first)");
        for link in &chain {
            println!(
                "  {} depth {}: identity {} (subject {}){}",
                text(link, "id"),
                link["depth"],
                text(link, "identity"),
                text(link, "subject"),
                link.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(", reason: {r}"))
            );
        }
    }
    println!(
        "ended     {}",
        session.get("ended_at").and_then(Value::as_str).map_or_else(|| "running".to_owned(), local_time)
    );
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
        let what = event_text(e);
        let verdict = e.get("verdict").and_then(Value::as_str).map_or(String::new(), |v| format!(" [{v}]"));
        println!(
            "  {:>5} {} {:<7} {:>7} {what}{verdict}",
            e["seq"],
            local_time(text(e, "at")),
            text(e, "kind"),
            e["pid"]
        );
    }
    Ok(())
}

/// One record in words: what happened, without its time, kind and verdict.
pub fn event_text(e: &Value) -> String {
    match RecordKind::from_name(text(e, "kind")) {
        Some(RecordKind::Kernel(EventKind::Exec)) => {
            let argv: Vec<String> =
                e["argv"].as_array().into_iter().flatten().filter_map(Value::as_str).map(quoted).collect();
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
        Some(RecordKind::Dns) => {
            let answers: Vec<&str> = e["answers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let rule = e.get("rule").and_then(Value::as_str).map_or(String::new(), |rule| format!(" ({rule})"));
            format!("{} {} -> {} [{}]{rule}", text(e, "type"), text(e, "name"), text(e, "outcome"), answers.join(" "))
        }
        Some(RecordKind::Sql) => {
            let what = match text(e, "event") {
                "statement" => text(e, "sql").to_owned(),
                "connect" => format!("connect as {} to {}", text(e, "user"), text(e, "database")),
                other => other.to_owned(),
            };
            let rows = e["rows"].as_u64().map_or(String::new(), |rows| format!(", {rows} row(s)"));
            let error = e.get("error").and_then(Value::as_str).map_or(String::new(), |why| format!(": {why}"));
            let rules = e["rules"].as_array().filter(|r| !r.is_empty()).map_or(String::new(), |r| {
                format!(" rules: {}", r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
            });
            format!("{what} -> {} ({}){rows}{error}{rules}", text(e, "outcome"), text(e, "destination"))
        }
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
        Some(RecordKind::Grant) => format!(
            "grant {}{}{}",
            text(e, "grant"),
            e.get("by").and_then(Value::as_str).map_or(String::new(), |by| format!(" by {by}")),
            e.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(": {r}"))
        ),
        Some(RecordKind::Output) => format!("{:?}", text(e, "data")),
        Some(RecordKind::Session) => {
            let by = e.get("by").and_then(Value::as_str).map_or(String::new(), |by| format!("by {by}"));
            let reason = e.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(" ({r})"));
            let limit = e.get("max_session_secs").map_or(String::new(), |s| format!("max_session {s}s"));
            let ttl = e.get("ttl_secs").map_or(String::new(), |s| format!("ttl {s}s"));
            let with = e
                .get("ended_with")
                .and_then(Value::as_str)
                .map_or(String::new(), |p| format!(" (with its parent {p})"));
            let gap = e.get("outcome").and_then(Value::as_str).map_or(String::new(), |o| format!("no daemon: {o}"));
            format!("{by}{reason}{limit}{ttl}{with}{gap}")
        }
        _ => String::new(),
    }
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
    println!(
        "policies loaded   {} ({})",
        local_time(text(status, "policies_loaded_at")),
        age(text(status, "policies_loaded_at"))
    );
    for file in status["policy_file_paths"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        println!("                  {file}");
    }
    println!("ledger key        {}", text(status, "ledger_public_key"));
    if let Some(otlp) = status.get("otlp").filter(|o| !o.is_null()) {
        println!(
            "otlp              {} (sent through record {}, {} waiting, {} skipped)",
            text(otlp, "endpoint"),
            otlp["exported_through"],
            otlp["backlog"],
            otlp["skipped"]
        );
    }
    if status["child_ptrace_confined"] != true {
        println!("child sessions    could ptrace their parents (Yama ptrace_scope is 0 or absent)");
    }
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell (the last one unpadded).
fn aligned(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| if i == last { (*cell).to_owned() } else { format!("{cell:<0$}", widths[i]) })
            .collect();
        padded.join("  ")
    };
    std::iter::once(line(header.to_vec()))
        .chain(rows.iter().map(|row| line(row.iter().map(String::as_str).collect())))
        .collect()
}

/// `tollgate approvals`.
pub fn approvals(pending: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(pending);
    }
    let pending: Vec<&Value> = pending.as_array().into_iter().flatten().collect();
    let rows: Vec<Vec<String>> = pending
        .iter()
        .map(|p| {
            // Approving an upgrade opens a tunnel no rule sees into: say so.
            let upgrade =
                p.get("upgrade").and_then(Value::as_str).map_or(String::new(), |u| format!(" UPGRADE to {u}"));
            vec![
                text(p, "id").to_owned(),
                text(p, "session").to_owned(),
                format!("{} ({})", text(p, "identity"), text(p, "subject")),
                text(p, "destination").to_owned(),
                text(p, "method").to_owned(),
                format!("{}{upgrade}", text(p, "path")),
                local_time(text(p, "expires_at")),
            ]
        })
        .collect();
    let lines = aligned(&["ID", "SESSION", "IDENTITY (SUBJECT)", "TO", "METHOD", "PATH", "EXPIRES"], &rows);
    println!("{}", lines[0]);
    for (p, line) in pending.iter().zip(&lines[1..]) {
        println!("{line}");
        println!("    held by {} ({})", text(p, "grant"), text(p, "rule"));
        if let Some(body) = p.get("body_start").and_then(Value::as_str) {
            println!("    body: {body:?}");
        }
        // A child session's request: who delegated to it, under which identity, why.
        for link in p["chain"].as_array().into_iter().flatten().skip(1) {
            println!(
                "    delegated by {} ({}, subject {}){}",
                text(link, "session"),
                text(link, "identity"),
                text(link, "subject"),
                link.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(": {r}"))
            );
        }
    }
    Ok(())
}

/// `tollgate windows`.
pub fn windows(windows: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(windows);
    }
    println!("{:<12} {:<20} {:<12} {:<19} RULE", "WINDOW", "SESSION", "BY", "UNTIL");
    for w in windows.as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<20} {:<12} {:<19} {}",
            text(w, "id"),
            text(w, "session"),
            text(w, "by"),
            local_time(text(w, "until")),
            text(w, "rule")
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

/// `tollgate verify`: what was checked, or the first thing that does not
/// fit. Returns the exit code: 0 when everything fits, 1 when not.
pub fn verification(result: &Value, json: bool) -> anyhow::Result<i32> {
    let problem = result.get("problem").and_then(Value::as_str);
    if json {
        print_json(result)?;
    } else if let Some(problem) = problem {
        println!("NOT VERIFIED: {problem}");
    } else {
        println!("verified {} record(s) in {} session(s)", result["records"], result["sessions"]);
        if let Some(head) = result.get("head").filter(|h| !h.is_null()) {
            println!(
                "chain head: record {} {}, signed {} by {}",
                head["n"],
                text(head, "hash"),
                text(head, "signed_at"),
                text(head, "public_key")
            );
        }
        for checkpoint in result["checkpoints"].as_array().into_iter().flatten() {
            println!(
                "checkpoint: {} session(s) and {} record(s) pruned until {} (record {})",
                checkpoint["pruned_sessions"],
                checkpoint["pruned_records"],
                text(checkpoint, "pruned_until"),
                checkpoint["n"]
            );
        }
    }
    Ok(if problem.is_some() { 1 } else { 0 })
}

/// `tollgate verify --report`: what the report covers, once its signatures hold.
pub fn report_verified(checked: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(checked);
    }
    println!(
        "report verified: host {}, {} to {}, {} session(s), signed by the key given",
        text(checked, "host"),
        text(checked, "since"),
        text(checked, "until"),
        checked["sessions"]
    );
    Ok(())
}

/// A report in `format` (md, json, html).
pub fn report(report: Value, format: &str) -> anyhow::Result<String> {
    if format == "json" {
        // As the host signed it: a reviewer checks this text offline.
        return Ok(format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    let report: crate::report::Report = serde_json::from_value(report)?;
    Ok(match format {
        "html" => crate::report::render::html(&report),
        _ => crate::report::render::markdown(&report),
    })
}
