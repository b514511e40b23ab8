//! `tollgate report --from`: several hosts' reports pulled over HTTPS,
//! each host's signature checked, merged into one with a section per host.

use std::{path::Path, sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::{Report, render, verify_report};

/// Pulls one host's JSON report from its report listener at `base`
/// (`https://HOST:PORT`), trusting `ca` (PEM) or the system's roots.
pub fn pull(base: &str, token: &str, ca: Option<&Path>, query: &[(&str, &str)]) -> Result<String, String> {
    let mut builder = ureq::AgentBuilder::new().timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        let certs =
            CertificateDer::pem_file_iter(ca).map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("CA file {}: {e}", ca.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder = builder.tls_config(Arc::new(config));
    }
    let url = format!("{}/v1/report", base.trim_end_matches('/'));
    let mut request = builder.build().get(&url).set("Authorization", &format!("Bearer {token}"));
    for (key, value) in query {
        request = request.query(key, value);
    }
    match request.call() {
        Ok(response) => response.into_string().map_err(|e| format!("{url}: {e}")),
        Err(ureq::Error::Status(code, response)) => {
            Err(format!("{url}: HTTP {code}: {}", response.into_string().unwrap_or_default().trim()))
        }
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// Checks a pulled report: its signatures hold under the key it names, and
/// that key is one of `trusted` when any are given.
pub fn check(base: &str, text: &str, trusted: &[String]) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("{base}: not a JSON report: {e}"))?;
    let key = value["head"]["public_key"].as_str().ok_or_else(|| format!("{base}: the report has no signed head"))?;
    if !trusted.is_empty() && !trusted.iter().any(|t| t.trim() == key) {
        return Err(format!("{base}: the report is signed by {key}, which is not among the keys given"));
    }
    verify_report(text, key).map_err(|why| format!("{base}: {why}"))?;
    Ok(value)
}

/// Several checked reports as one: each host labelled, totals added up.
pub fn merge(reports: Vec<(String, Value)>) -> Value {
    let mut totals = serde_json::Map::new();
    for (_, report) in &reports {
        for (key, count) in report["totals"].as_object().into_iter().flatten() {
            let sum = totals.get(key).and_then(Value::as_u64).unwrap_or(0) + count.as_u64().unwrap_or(0);
            totals.insert(key.clone(), sum.into());
        }
    }
    json!({
        "version": super::REPORT_VERSION,
        "generated_at": crate::store::rfc3339(std::time::SystemTime::now()),
        "totals": totals,
        "hosts": reports.into_iter().map(|(from, report)| json!({"from": from, "host": report["host"], "report": report})).collect::<Vec<_>>(),
    })
}

/// A merged report in `format` (md, json, html).
pub fn render(merged: &Value, format: &str) -> Result<String, String> {
    if format == "json" {
        return serde_json::to_string_pretty(merged).map(|t| format!("{t}\n")).map_err(|e| e.to_string());
    }
    let hosts = merged["hosts"].as_array().cloned().unwrap_or_default();
    let mut sections = Vec::new();
    for host in &hosts {
        let report: Report = serde_json::from_value(host["report"].clone()).map_err(|e| e.to_string())?;
        let label = format!("{} (from {})", host["host"].as_str().unwrap_or("?"), host["from"].as_str().unwrap_or("?"));
        sections.push((label, report));
    }
    let totals = &merged["totals"];
    Ok(match format {
        "html" => {
            let mut out = format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>tollgate fleet report</title></head><body>\n<h1>tollgate fleet report</h1>\n<p>{} host(s), <span id=\"session-count\">{}</span> session(s) in all.</p>\n",
                sections.len(),
                totals["sessions"].as_u64().unwrap_or(0)
            );
            for (label, report) in &sections {
                let page = render::html(report);
                let body =
                    page.split_once("<body>").and_then(|(_, rest)| rest.rsplit_once("</body>")).map_or("", |(b, _)| b);
                // Each host's page keeps its own styles inside its section.
                let style =
                    page.split_once("<style>").and_then(|(_, rest)| rest.split_once("</style>")).map_or("", |(s, _)| s);
                out.push_str(&format!(
                    "<section class=\"host\"><h1>Host {}</h1><style>{style}</style>{body}</section>\n",
                    escape(label)
                ));
            }
            out.push_str("</body></html>\n");
            out
        }
        _ => {
            let mut out = format!(
                "# tollgate fleet report\n\n{} host(s), {} session(s) in all.\n",
                sections.len(),
                totals["sessions"].as_u64().unwrap_or(0)
            );
            for (label, report) in &sections {
                out.push_str(&format!("\n# Host {label}\n\n"));
                // One level down: each host's headings sit under its own.
                for line in render::markdown(report).lines() {
                    if line.starts_with('#') {
                        out.push('#');
                    }
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out
        }
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
