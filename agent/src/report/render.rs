//! A report as Markdown or as one self-contained HTML page (inline CSS, no
//! scripts, nothing fetched): findings on top, a timeline of sessions, a
//! table per identity. Both say exactly what the JSON says.

use std::fmt::Write;

use super::{Report, SessionEntry};

/// Markdown.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let t = &report.totals;
    let _ = writeln!(out, "# tollgate report: {}\n", report.host);
    let _ = writeln!(out, "Period {} to {}, generated {}.\n", report.since, report.until, report.generated_at);
    let _ = writeln!(out, "| sessions | records | denials | blocked | held | masked | lost events |");
    let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let _ = writeln!(
        out,
        "| {} | {} | {} | {} | {} | {} | {} |\n",
        t.sessions, t.records, t.denials, t.blocked, t.held, t.masked, t.lost_events
    );
    let _ = writeln!(out, "## Findings ({})\n", report.findings.len());
    for finding in &report.findings {
        let about: Vec<String> = [("identity", &finding.identity), ("grant", &finding.grant), ("rule", &finding.rule)]
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key} `{v}`")))
            .collect();
        let _ = writeln!(out, "- **{}** {}: {}", finding.kind, about.join(", "), finding.action);
    }
    for identity in &report.identities {
        let _ = writeln!(out, "\n## Identity `{}`\n", identity.identity);
        let _ = writeln!(out, "| session | depth | parent | reason | started | ended | records | lost |");
        let _ = writeln!(out, "| --- | ---: | --- | --- | --- | --- | ---: | ---: |");
        for session in &identity.sessions {
            let r = &session.record;
            let _ = writeln!(
                out,
                "| {}{} | {} | {} | {} | {} | {} | {} | {} |",
                "└ ".repeat(r.depth.min(1) as usize),
                r.id,
                r.depth,
                r.parent.as_ref().map_or("-", |p| p.as_str()),
                r.reason.as_deref().unwrap_or("-"),
                r.started_at,
                r.ended_at.as_deref().unwrap_or("running"),
                session.records_by_kind.values().sum::<u64>(),
                session.lost_events
            );
        }
        if !identity.exercised.is_empty() {
            let _ = writeln!(out, "\nExercised:\n");
            for (rule, count) in &identity.exercised {
                let _ = writeln!(out, "- `{rule}`: {count}");
            }
        }
        if !identity.denials.is_empty() {
            let _ = writeln!(out, "\nDenials:\n");
            for (rule, count) in &identity.denials {
                let _ = writeln!(out, "- `{rule}`: {count}");
            }
        }
    }
    if !report.held_requests.is_empty() {
        let _ = writeln!(out, "\n## Held requests\n");
        let _ = writeln!(out, "| session | identity | request | destination | decision | by | waited (s) |");
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | ---: |");
        for held in &report.held_requests {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.1} |",
                held.session, held.identity, held.request, held.destination, held.decision, held.by, held.waited_secs
            );
        }
    }
    if let Some(head) = &report.head {
        let _ = writeln!(
            out,
            "\nChain head: record {} `{}`, signed {} by `{}`.",
            head.n, head.hash, head.signed_at, head.public_key
        );
    }
    if let Some(signature) = &report.signature {
        let _ = writeln!(out, "Report signature: `{signature}` (check the JSON form with `tollgate verify --report`).");
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Seconds since the epoch of an RFC 3339 time.
fn epoch(at: &str) -> Option<f64> {
    humantime::parse_rfc3339(at).ok()?.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
}

/// One self-contained HTML page.
pub fn html(report: &Report) -> String {
    let t = &report.totals;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tollgate report: {host}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.finding {{ border-left: 4px solid #c60; padding: 0.2em 0.8em; margin: 0.4em 0; background: #fff6ee; }}
.timeline {{ position: relative; border: 1px solid #ccc; margin: 0.5em 0 1.5em; }}
.lane {{ position: relative; height: 18px; border-bottom: 1px solid #eee; }}
.bar {{ position: absolute; height: 14px; top: 2px; background: #37a; border-radius: 3px; min-width: 2px; }}
.bar.child {{ background: #7ab; }}
.label {{ position: absolute; left: 4px; font-size: 11px; color: #333; }}
.summary {{ font-size: 28px; font-weight: bold; margin: 0.3em 0; }}
</style></head><body>
<h1>tollgate report: {host}</h1>
<p>Period {since} to {until}, generated {generated}.</p>
<p class="summary"><span id="session-count">{sessions}</span> sessions, <span id="denial-count">{denials}</span> denials, <span id="finding-count">{findings}</span> findings</p>
<table><tr><th>sessions</th><th>records</th><th>denials</th><th>blocked</th><th>held</th><th>masked</th><th>lost events</th></tr>
<tr><td>{sessions}</td><td>{records}</td><td>{denials}</td><td>{blocked}</td><td>{held}</td><td>{masked}</td><td>{lost}</td></tr></table>
<h2>Findings ({findings})</h2>
"#,
        host = escape(&report.host),
        since = escape(&report.since),
        until = escape(&report.until),
        generated = escape(&report.generated_at),
        sessions = t.sessions,
        records = t.records,
        denials = t.denials,
        blocked = t.blocked,
        held = t.held,
        masked = t.masked,
        lost = t.lost_events,
        findings = report.findings.len(),
    );
    for finding in &report.findings {
        let about: Vec<String> = [("identity", &finding.identity), ("grant", &finding.grant), ("rule", &finding.rule)]
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key} <code>{}</code>", escape(v))))
            .collect();
        let _ = writeln!(
            out,
            "<div class=\"finding\"><b>{}</b> {}<br>{}</div>",
            escape(&finding.kind),
            about.join(", "),
            escape(&finding.action)
        );
    }
    // The timeline: one lane per session, a bar from its start to its end.
    let all: Vec<&SessionEntry> = report.identities.iter().flat_map(|i| i.sessions.iter()).collect();
    let (start, end) = (epoch(&report.since).unwrap_or(0.0), epoch(&report.until).unwrap_or(1.0));
    let span = (end - start).max(1.0);
    let _ = writeln!(out, "<h2>Timeline</h2>\n<div class=\"timeline\">");
    for session in &all {
        let r = &session.record;
        let from = epoch(&r.started_at).unwrap_or(start);
        let to = r.ended_at.as_deref().and_then(epoch).unwrap_or(end);
        let left = ((from - start) / span * 100.0).clamp(0.0, 100.0);
        let width = ((to - from) / span * 100.0).clamp(0.0, 100.0 - left);
        let class = if r.depth > 0 { "bar child" } else { "bar" };
        let _ = writeln!(
            out,
            "<div class=\"lane\"><div class=\"{class}\" style=\"left:{left:.3}%;width:{width:.3}%\" title=\"{}\"></div><span class=\"label\">{}{} ({})</span></div>",
            escape(&format!("{} {} .. {}", r.id, r.started_at, r.ended_at.as_deref().unwrap_or("running"))),
            "&nbsp;&nbsp;".repeat(r.depth as usize),
            escape(r.id.as_str()),
            escape(&r.identity),
        );
    }
    let _ = writeln!(out, "</div>");
    for identity in &report.identities {
        let _ = writeln!(out, "<h2>Identity <code>{}</code></h2>", escape(&identity.identity));
        let _ = writeln!(
            out,
            "<table><tr><th>session</th><th>depth</th><th>parent</th><th>reason</th><th>started</th><th>ended</th><th>records</th><th>lost</th></tr>"
        );
        for session in &identity.sessions {
            let r = &session.record;
            let _ = writeln!(
                out,
                "<tr class=\"session\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(r.id.as_str()),
                r.depth,
                escape(r.parent.as_ref().map_or("-", |p| p.as_str())),
                escape(r.reason.as_deref().unwrap_or("-")),
                escape(&r.started_at),
                escape(r.ended_at.as_deref().unwrap_or("running")),
                session.records_by_kind.values().sum::<u64>(),
                session.lost_events
            );
        }
        let _ = writeln!(out, "</table>");
        for (title, map) in [("Exercised", &identity.exercised), ("Denials", &identity.denials)] {
            if map.is_empty() {
                continue;
            }
            let _ = writeln!(out, "<h3>{title}</h3><table>");
            for (rule, count) in map {
                let _ = writeln!(out, "<tr><td><code>{}</code></td><td>{count}</td></tr>", escape(rule));
            }
            let _ = writeln!(out, "</table>");
        }
    }
    if !report.held_requests.is_empty() {
        let _ = writeln!(
            out,
            "<h2>Held requests</h2><table><tr><th>session</th><th>identity</th><th>request</th><th>destination</th><th>decision</th><th>by</th><th>waited (s)</th></tr>"
        );
        for held in &report.held_requests {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
                escape(&held.session),
                escape(&held.identity),
                escape(&held.request),
                escape(&held.destination),
                escape(&held.decision),
                escape(&held.by),
                held.waited_secs
            );
        }
        let _ = writeln!(out, "</table>");
    }
    if let Some(head) = &report.head {
        let _ = writeln!(
            out,
            "<p>Chain head: record {} <code>{}</code>, signed {} by <code>{}</code>.</p>",
            head.n,
            escape(&head.hash),
            escape(&head.signed_at),
            escape(&head.public_key)
        );
    }
    let _ = writeln!(out, "</body></html>");
    out
}
