//! Sends every record of the session log to an OpenTelemetry collector as
//! OTLP/HTTP logs (JSON). The session log itself is the backlog: the
//! exporter keeps how far the collector has acknowledged (a cursor file in
//! the state directory) and sends on from there, so a collector outage or a
//! daemon restart loses nothing; pruning waits for the exporter (up to
//! `otlp_backlog_max` records behind).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::store::Reader;

/// Records sent per request.
const BATCH: usize = 500;

/// Where the exporter stands, for `status` and for pruning.
#[derive(Debug, Default)]
pub struct Progress {
    /// The last ledger place the collector acknowledged.
    pub exported_through: AtomicI64,
    /// Places written but not yet acknowledged.
    pub backlog: AtomicI64,
    /// Places pruned before they could be sent (only past `otlp_backlog_max`).
    pub skipped: AtomicI64,
}

/// Reads the cursor file (0 when there is none).
pub fn read_cursor(path: &std::path::Path) -> i64 {
    std::fs::read_to_string(path).ok().and_then(|text| text.trim().parse().ok()).unwrap_or(0)
}

fn write_cursor(path: &std::path::Path, n: i64) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{n}\n"))?;
    std::fs::rename(temporary, path)
}

fn attribute(key: &str, value: Value) -> Value {
    let value = match value {
        Value::Number(n) if n.is_i64() => json!({"intValue": n.to_string()}),
        Value::String(s) => json!({"stringValue": s}),
        Value::Null => json!({"stringValue": ""}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": value})
}

/// One OTLP `ExportLogsServiceRequest` (JSON) for `entries` of the ledger.
pub fn logs_request(host: &str, entries: &[Value]) -> Value {
    let records: Vec<Value> = entries
        .iter()
        .map(|entry| {
            let nanos = entry["at"]
                .as_str()
                .and_then(|at| humantime::parse_rfc3339(at).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let record = &entry["record"];
            let verdict = record.get("verdict").cloned().unwrap_or(Value::Null);
            json!({
                "timeUnixNano": nanos.to_string(),
                "severityText": if matches!(verdict.as_str(), Some("deny" | "killed" | "block" | "denied")) { "WARN" } else { "INFO" },
                "body": {"stringValue": entry.to_string()},
                "attributes": [
                    attribute("tollgate.n", entry["n"].clone()),
                    attribute("tollgate.entry", entry["entry"].clone()),
                    attribute("tollgate.session", entry["session"].clone()),
                    attribute("tollgate.identity", entry["identity"].clone()),
                    attribute("tollgate.kind", record.get("kind").cloned().unwrap_or(Value::Null)),
                    attribute("tollgate.verdict", verdict),
                    attribute("tollgate.hash", entry["hash"].clone()),
                ],
            })
        })
        .collect();
    json!({"resourceLogs": [{
        "resource": {"attributes": [attribute("service.name", json!("tollgate")), attribute("host.name", json!(host))]},
        "scopeLogs": [{"scope": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")}, "logRecords": records}],
    }]})
}

/// Sends the log to `endpoint` (`.../v1/logs` is appended) for as long as
/// the daemon runs, retrying with backoff while the collector is away.
pub async fn run(
    reader: Reader,
    endpoint: String,
    cursor: PathBuf,
    host: String,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/logs", endpoint.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let mut after = read_cursor(&cursor);
    progress.exported_through.store(after, Ordering::Relaxed);
    let mut backoff = Duration::from_millis(500);
    loop {
        let (reader_, agent_, url_, host_) = (reader.clone(), agent.clone(), url.clone(), host.clone());
        let step = tokio::task::spawn_blocking(move || -> anyhow::Result<(i64, i64, i64)> {
            let head = reader_.signed_head()?.map_or(0, |h| h.n);
            let entries = reader_.ledger_after(after, None, BATCH)?;
            let Some(last) = entries.last().and_then(|e| e["n"].as_i64()) else { return Ok((after, head, 0)) };
            // Places pruned before the exporter reached them.
            let skipped = entries.first().and_then(|e| e["n"].as_i64()).map_or(0, |first| (first - after - 1).max(0));
            let body = logs_request(&host_, &entries);
            agent_
                .post(&url_)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((last, head, skipped))
        })
        .await?;
        match step {
            Ok((last, head, skipped)) => {
                backoff = Duration::from_millis(500);
                if skipped > 0 {
                    progress.skipped.fetch_add(skipped, Ordering::Relaxed);
                    tracing::error!(skipped, "records were pruned before the OTLP exporter could send them");
                }
                let moved = last != after;
                if moved {
                    if let Err(e) = write_cursor(&cursor, last) {
                        tracing::warn!(error = %e, "cannot save the OTLP exporter's position");
                    }
                    after = last;
                }
                progress.exported_through.store(after, Ordering::Relaxed);
                progress.backlog.store((head - after).max(0), Ordering::Relaxed);
                if !moved {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, endpoint, "OTLP collector did not take the records; retrying");
                if let Ok(Some(head)) = reader.signed_head().map(|h| h.map(|h| h.n)) {
                    progress.backlog.store((head - after).max(0), Ordering::Relaxed);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
