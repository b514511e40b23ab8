//! Counts of what the session log recorded since the daemon started, for
//! `/metrics`: decisions by kind and verdict, proxy requests by outcome,
//! and how long proxied requests took.

use std::{collections::BTreeMap, fmt::Write, sync::Mutex};

/// Upper bounds (seconds) of the proxy latency histogram's buckets.
const BUCKETS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

#[derive(Default)]
struct Inner {
    decisions: BTreeMap<(&'static str, &'static str), u64>,
    proxy: BTreeMap<String, u64>,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// How a request through the proxy ended: its record's `outcome` and
/// `duration_ms`.
pub struct Exchange<'a> {
    /// forwarded, blocked, refused...
    pub outcome: &'a str,
    /// How long it took, if it was timed.
    pub duration_ms: Option<f64>,
}

/// What was recorded, counted.
#[derive(Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Stats {
    /// Counts one record: its decision, if it is one, and how a request
    /// through the proxy ended, if it is one (under one lock, so a scrape
    /// never sees the one without the other).
    pub fn record(&self, kind: &'static str, verdict: Option<&'static str>, exchange: Option<Exchange<'_>>) {
        if verdict.is_none() && exchange.is_none() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(verdict) = verdict {
            *inner.decisions.entry((kind, verdict)).or_default() += 1;
        }
        let Some(Exchange { outcome, duration_ms }) = exchange else { return };
        match inner.proxy.get_mut(outcome) {
            Some(count) => *count += 1,
            None => {
                inner.proxy.insert(outcome.to_owned(), 1);
            }
        }
        if let Some(ms) = duration_ms {
            let secs = ms / 1000.0;
            inner.sum += secs;
            inner.count += 1;
            for (bucket, bound) in BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    inner.buckets[bucket] += 1;
                }
            }
        }
    }

    /// The counters in Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tollgate_decisions_total Decisions recorded since the daemon started, by record kind and verdict."
        );
        let _ = writeln!(out, "# TYPE tollgate_decisions_total counter");
        for ((kind, verdict), count) in &inner.decisions {
            let _ = writeln!(out, "tollgate_decisions_total{{kind=\"{kind}\",verdict=\"{verdict}\"}} {count}");
        }
        let _ = writeln!(out, "# HELP tollgate_proxy_requests_total Requests through the L7 proxy, by outcome.");
        let _ = writeln!(out, "# TYPE tollgate_proxy_requests_total counter");
        for (outcome, count) in &inner.proxy {
            let _ = writeln!(out, "tollgate_proxy_requests_total{{outcome=\"{outcome}\"}} {count}");
        }
        let _ = writeln!(out, "# HELP tollgate_proxy_request_duration_seconds How long proxied requests took.");
        let _ = writeln!(out, "# TYPE tollgate_proxy_request_duration_seconds histogram");
        for (bucket, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tollgate_proxy_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                inner.buckets[bucket]
            );
        }
        let _ = writeln!(out, "tollgate_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {}", inner.count);
        let _ = writeln!(out, "tollgate_proxy_request_duration_seconds_sum {}", inner.sum);
        let _ = writeln!(out, "tollgate_proxy_request_duration_seconds_count {}", inner.count);
        out
    }
}
