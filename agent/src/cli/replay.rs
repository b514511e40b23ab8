//! `tollgate replay`: a session and its child sessions as they happened,
//! with their timing: as text (paced by `--speed`, or at once), as JSON
//! lines, or as asciicast v2 (the terminal output, for the asciinema player).

use std::{
    io::Write,
    time::{Duration, SystemTime},
};

use serde_json::{Map, Value, json};

use super::output::event_text;

/// Which records a replay shows (`--only`).
pub fn category_of(kind: &str) -> &'static str {
    match kind {
        "exec" | "fork" | "exit" => "exec",
        "connect" | "socket" | "dns" => "network",
        "http" | "tls" => "http",
        "sql" => "sql",
        "approval" => "approval",
        "output" => "output",
        _ => "session",
    }
}

/// The categories `--only` accepts.
pub const CATEGORIES: [&str; 6] = ["exec", "network", "http", "sql", "approval", "output"];

/// How to pace a text replay.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Sleep the recorded gaps, divided by this.
    Speed(f64),
    /// No waiting.
    Instant,
}

fn offset_secs(first: SystemTime, at: &str) -> f64 {
    humantime::parse_rfc3339(at).ok().and_then(|t| t.duration_since(first).ok()).map_or(0.0, |d| d.as_secs_f64())
}

fn start_of(timeline: &Value) -> SystemTime {
    timeline["sessions"][0]["started_at"]
        .as_str()
        .and_then(|at| humantime::parse_rfc3339(at).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The events a replay shows, in order.
fn shown<'a>(timeline: &'a Value, only: &[String]) -> Vec<&'a Value> {
    timeline["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            let category = category_of(e["kind"].as_str().unwrap_or_default());
            if only.is_empty() { true } else { only.iter().any(|o| o == category) }
        })
        .collect()
}

/// Text, one line per record, paced like the session was.
pub fn text(timeline: &Value, only: &[String], pace: Pace) -> anyhow::Result<()> {
    let first = start_of(timeline);
    let mut stdout = std::io::stdout().lock();
    for session in timeline["sessions"].as_array().into_iter().flatten() {
        let depth = session["depth"].as_u64().unwrap_or(0) as usize;
        writeln!(
            stdout,
            "{}session {} identity {} (subject {}){}{}",
            "  ".repeat(depth),
            session["id"].as_str().unwrap_or("-"),
            session["identity"].as_str().unwrap_or("-"),
            session["subject"].as_str().unwrap_or("-"),
            session["parent"].as_str().map_or(String::new(), |p| format!(" child of {p}")),
            session["reason"].as_str().map_or(String::new(), |r| format!(": {r}")),
        )?;
    }
    let mut clock = 0.0;
    for event in shown(timeline, only) {
        let at = offset_secs(first, event["at"].as_str().unwrap_or_default());
        if let Pace::Speed(speed) = pace
            && at > clock
        {
            // Long quiet stretches are cut to a second: a replay is for reading.
            std::thread::sleep(Duration::from_secs_f64(((at - clock) / speed).min(1.0)));
            clock = at;
        }
        let depth = event["depth"].as_u64().unwrap_or(0) as usize;
        let verdict = event.get("verdict").and_then(Value::as_str).map_or(String::new(), |v| format!(" [{v}]"));
        writeln!(
            stdout,
            "+{at:>9.3}s {}{:<8} {:>7} {}{verdict}",
            "  ".repeat(depth),
            event["kind"].as_str().unwrap_or_default(),
            event["pid"],
            event_text(event),
        )?;
        stdout.flush()?;
    }
    Ok(())
}

/// One JSON object per line: each record with its offset from the start.
pub fn json_lines(timeline: &Value, only: &[String]) -> anyhow::Result<()> {
    let first = start_of(timeline);
    let mut stdout = std::io::stdout().lock();
    for event in shown(timeline, only) {
        let mut line = Map::new();
        line.insert("offset_secs".into(), json!(offset_secs(first, event["at"].as_str().unwrap_or_default())));
        if let Value::Object(fields) = event {
            line.extend(fields.clone());
        }
        writeln!(stdout, "{}", Value::Object(line))?;
    }
    Ok(())
}

/// asciicast v2: a header, then `[time, "o", data]` for each piece of output.
pub fn asciicast(timeline: &Value) -> anyhow::Result<()> {
    let first = start_of(timeline);
    let top = &timeline["sessions"][0];
    let mut stdout = std::io::stdout().lock();
    let header = json!({
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": first.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "title": format!("tollgate session {}", top["id"].as_str().unwrap_or_default()),
        "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
    });
    writeln!(stdout, "{header}")?;
    for event in shown(timeline, &["output".to_owned()]) {
        let at = offset_secs(first, event["at"].as_str().unwrap_or_default());
        let data = event["data"].as_str().unwrap_or_default();
        writeln!(stdout, "{}", json!([at, "o", data]))?;
    }
    Ok(())
}
