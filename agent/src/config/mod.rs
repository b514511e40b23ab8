//! The daemon's configuration file.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use crate::identity::IssuerConfig;
use crate::yaml::{self, YamlError};

/// Where a packaged install keeps its configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tollgate/config.yaml";
/// The control socket when neither `--socket`, `TOLLGATE_SOCKET` nor a config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tollgate/control.sock";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Session log, dev issuer key and other state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The control socket clients connect to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Policy files, or directories of `*.yaml` / `*.yml` policy files.
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// OIDC issuers whose tokens open sessions.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Trust tokens from `tollgate token mint` (for trying tollgate out and
    /// for tests; off in packaged configs).
    #[serde(default)]
    pub dev_issuer: bool,
    /// Name of the daemon's cgroup subtree under the cgroup v2 mount.
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Milliseconds between commits of batched events to the session log.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// Size of the kernel-to-daemon event ring buffer in KiB: a power of two,
    /// at least 16. Events that find it full are counted as lost, per session.
    #[serde(default = "default_event_buffer_kib")]
    pub event_buffer_kib: u32,
    /// Records queued for the session log's writer at most. Past three
    /// quarters of it the daemon stops taking kernel events out of the ring
    /// buffer, where the kernel's per-session share decides what waits and
    /// what is counted lost; the rest is room for the proxy's records.
    #[serde(default = "default_log_queue_records")]
    pub log_queue_records: usize,
    /// The L7 proxy listens on 127.0.0.1 and ::1 at this port; governed
    /// connects are redirected there. 0: no proxy, governed connects are refused.
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    /// Who may approve or deny held requests over the control socket.
    #[serde(default)]
    pub reviewers: Reviewers,
    /// How long a held request waits for a reviewer before it is denied.
    #[serde(default = "default_approval_timeout", deserialize_with = "humantime_serde_compat::deserialize")]
    pub approval_timeout: Duration,
    /// POSTed a JSON notice of each pending approval (https, or http to loopback).
    #[serde(default)]
    pub approval_webhook: Option<String>,
    /// Bytes of each (masked) response body kept in the session log.
    #[serde(default = "default_record_body_bytes")]
    pub record_body_bytes: usize,
    /// `text` (plain, coloured only on a terminal; journal priorities under
    /// systemd) or `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Nested sessions (agents that start agents).
    #[serde(default)]
    pub delegation: Delegation,
    /// The sessions' resolver.
    #[serde(default)]
    pub dns: Dns,
    /// Sessions that ended longer ago than this are pruned from the log
    /// (a signed checkpoint marks the pruned range). Kept forever when absent.
    #[serde(default, deserialize_with = "crate::yaml::optional_duration")]
    pub retention: Option<Duration>,
    /// Where reviewers pull reports over HTTPS (`/v1/...`, `/metrics`); off when absent.
    #[serde(default)]
    pub report_listen: Option<std::net::SocketAddr>,
    /// The certificate and key the report listener serves.
    #[serde(default)]
    pub report_tls: Option<ReportTls>,
    /// An OpenTelemetry collector (OTLP/HTTP, e.g. `http://127.0.0.1:4318`)
    /// that gets every record as a log; off when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Terminal output recorded per session at most (identities with `record_output`).
    #[serde(default = "default_output_cap_bytes")]
    pub output_cap_bytes: usize,
    /// Pruning waits for the OTLP exporter unless it is this many records behind.
    #[serde(default = "default_otlp_backlog_max")]
    pub otlp_backlog_max: u64,
}

fn default_output_cap_bytes() -> usize {
    1024 * 1024
}

fn default_otlp_backlog_max() -> u64 {
    1_000_000
}

/// How the daemon writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `report_tls:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportTls {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// A token that may pull reports: from this issuer, carrying these claims.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtReviewer {
    /// The token's `iss` (an issuer of `issuers`, or the dev issuer).
    pub issuer: String,
    /// Each must equal the token's claim, or be in it when that is an array.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The resolver each session's DNS traffic goes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Off: DNS follows each session's rules like any other traffic, and
    /// names in `allow`/`deny` never resolve into entries.
    #[serde(default = "default_dns_enabled")]
    pub enabled: bool,
    /// Servers queries go to (`ADDR:PORT`); the host's `/etc/resolv.conf` when empty.
    #[serde(default)]
    pub upstream: Vec<std::net::SocketAddr>,
    /// The shortest time an answered address stays allowed, whatever the answer's TTL.
    #[serde(default = "default_dns_min_ttl", deserialize_with = "humantime_serde_compat::deserialize")]
    pub min_ttl: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Self { enabled: default_dns_enabled(), upstream: Vec::new(), min_ttl: default_dns_min_ttl() }
    }
}

fn default_dns_enabled() -> bool {
    true
}

fn default_dns_min_ttl() -> Duration {
    Duration::from_secs(30)
}

/// Limits and review thresholds of delegation chains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    /// The most sessions a chain may hold, counting the top one.
    #[serde(default = "default_max_depth")]
    pub max_depth: u32,
    /// `tollgate review` reports chains with more levels below the top than this.
    #[serde(default = "default_review_depth")]
    pub review_depth: u32,
}

impl Default for Delegation {
    fn default() -> Self {
        Self { max_depth: default_max_depth(), review_depth: default_review_depth() }
    }
}

fn default_max_depth() -> u32 {
    8
}
fn default_review_depth() -> u32 {
    2
}

/// Reviewers allowed over the control socket, by unix user or group.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reviewers {
    /// User names.
    #[serde(default)]
    pub unix_users: Vec<String>,
    /// Group names; members (primary or supplementary) may review.
    #[serde(default)]
    pub unix_groups: Vec<String>,
    /// Tokens that may pull reports from the report listener.
    #[serde(default)]
    pub jwt: Vec<JwtReviewer>,
}

fn default_proxy_port() -> u16 {
    15080
}
fn default_approval_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_record_body_bytes() -> usize {
    4096
}

/// `5m`, `30s`, `1h 30m` as a [`Duration`].
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| de::Error::custom(format!("duration '{text}' is not valid: {e}")))
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tollgate")
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_cgroup() -> String {
    "tollgate".to_owned()
}
fn default_flush_ms() -> u64 {
    200
}
fn default_event_buffer_kib() -> u32 {
    4096
}
fn default_log_queue_records() -> usize {
    100_000
}

impl Config {
    /// Loads and validates a configuration file.
    /// Relative paths in the file are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, YamlError> {
        let (mut config, source): (Config, String) = yaml::load(path)?;
        config.validate(path, &source)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let absolute = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        absolute(&mut config.state_dir);
        absolute(&mut config.socket);
        config.policies.iter_mut().for_each(absolute);
        config.issuers.iter_mut().filter_map(|i| i.jwks_file.as_mut()).for_each(absolute);
        Ok(config)
    }

    /// The built-in defaults: what a packaged install uses when its config
    /// file names nothing else.
    pub fn embedded() -> Self {
        serde_yaml_ng::from_str("{}").expect("an empty config deserializes to the defaults")
    }

    fn validate(&self, path: &Path, source: &str) -> Result<(), YamlError> {
        let error = |key: &str, value: &str, message: String| YamlError {
            path: path.to_owned(),
            position: yaml::locate(source, key, value),
            message,
        };
        let kib = self.event_buffer_kib;
        if kib < 16 || !kib.is_power_of_two() || kib > 1 << 20 {
            return Err(error(
                "event_buffer_kib",
                &kib.to_string(),
                format!("event_buffer_kib {kib} must be a power of two between 16 and 1048576"),
            ));
        }
        let queue = self.log_queue_records;
        if !(16..=10_000_000).contains(&queue) {
            return Err(error(
                "log_queue_records",
                &queue.to_string(),
                format!("log_queue_records {queue} must be between 16 and 10000000"),
            ));
        }
        if self.cgroup.is_empty() || self.cgroup.contains('/') || self.cgroup.starts_with('.') {
            return Err(error(
                "cgroup",
                &self.cgroup,
                format!("cgroup '{}' must be a plain directory name", self.cgroup),
            ));
        }
        if let (Some(listen), None) = (&self.report_listen, &self.report_tls) {
            return Err(error(
                "report_listen",
                &listen.to_string(),
                "report_listen needs report_tls (cert_file and key_file): reports are served over HTTPS only".into(),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !url::Url::parse(endpoint).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        {
            return Err(error(
                "otlp_endpoint",
                endpoint,
                format!("otlp_endpoint '{endpoint}' must be an http or https URL"),
            ));
        }
        if self.delegation.max_depth == 0 {
            return Err(error("max_depth", "0", "delegation.max_depth must be at least 1".into()));
        }
        if let Some(url) = &self.approval_webhook
            && let Err(why) = crate::identity::jwks::check_https_url(url, "approval_webhook")
        {
            return Err(error("approval_webhook", url, why));
        }
        for issuer in &self.issuers {
            match (&issuer.jwks_url, &issuer.jwks_file) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(error(
                        "issuer",
                        &issuer.issuer,
                        format!("issuer '{}' needs exactly one of jwks_url or jwks_file", issuer.issuer),
                    ));
                }
                (Some(url), None) => {
                    if let Err(why) = crate::identity::jwks::check_url(url) {
                        return Err(error("jwks_url", url, why));
                    }
                }
                (None, Some(_)) => {}
            }
            if issuer.issuer == crate::identity::dev::DEV_ISSUER {
                return Err(error(
                    "issuer",
                    &issuer.issuer,
                    format!("issuer '{}' is reserved for the dev issuer (dev_issuer: true)", issuer.issuer),
                ));
            }
        }
        Ok(())
    }

    /// How often the session log writer commits a batch.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms.max(10))
    }

    /// The state directory's dev issuer key.
    pub fn dev_key_path(state_dir: &Path) -> PathBuf {
        state_dir.join("dev-issuer.pk8")
    }

    /// The key that signs the session log's chain (its public half is `<path>.pub`).
    pub fn ledger_key_path(state_dir: &Path) -> PathBuf {
        state_dir.join("ledger-key.pk8")
    }

    /// Where the OTLP exporter keeps how far it got.
    pub fn otlp_cursor_path(state_dir: &Path) -> PathBuf {
        state_dir.join("otlp-cursor")
    }

    /// The session log database.
    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("sessions.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, YamlError> {
        let dir = std::env::temp_dir().join(format!("tollgate-config-test-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, text).expect("write config");
        Config::load(&path)
    }

    /// The config from the spine issue, unchanged.
    #[test]
    fn the_documented_example_loads() {
        let config = load(
            "state_dir: /var/lib/tollgate\nsocket: /run/tollgate/control.sock\npolicies: [/etc/tollgate/policies]\nissuers:\n  - issuer: https://token.actions.githubusercontent.com\n    audience: tollgate\n    jwks_url: https://token.actions.githubusercontent.com/.well-known/jwks\n  - issuer: https://idp.internal.example\n    audience: tollgate\n    jwks_file: /etc/tollgate/jwks/internal.json\n",
        )
        .expect("example config loads");
        assert_eq!(config.issuers.len(), 2);
        assert!(!config.dev_issuer, "the dev issuer is off unless asked for");
        assert_eq!(config.cgroup, "tollgate");
    }

    /// The reviewer settings from the redirect issue, unchanged.
    #[test]
    fn the_documented_reviewer_settings_load() {
        let config =
            load("reviewers:\n  unix_users: [root]\n  unix_groups: [tollgate-reviewers]\napproval_timeout: 5m\n")
                .expect("reviewer settings load");
        assert_eq!(config.reviewers.unix_users, vec!["root"]);
        assert_eq!(config.approval_timeout, Duration::from_secs(300));
        let error = load("approval_timeout: soon\n").expect_err("bad duration");
        assert!(error.message.contains("soon") && error.position.is_some_and(|(line, _)| line == 1), "{error}");
    }

    #[test]
    fn bad_configs_name_the_line_and_the_problem() {
        let error = load("state_dir: /x\nissuers:\n  - issuer: https://a\n    audience: t\n").expect_err("no jwks");
        assert_eq!(error.position, Some((3, 13)));
        assert!(error.message.contains("exactly one of jwks_url or jwks_file"), "{error}");
        let error = load("sockett: /x\n").expect_err("unknown field");
        assert!(error.message.contains("sockett") && error.position == Some((1, 1)), "{error}");
        let error = load("issuers:\n  - issuer: https://a\n    audience: t\n    jwks_url: http://idp.example/jwks\n")
            .expect_err("plain http");
        assert!(error.message.contains("https") && error.position == Some((4, 15)), "{error}");
    }

    #[test]
    fn the_log_queue_is_bounded_both_ways() {
        assert_eq!(load("{}\n").expect("defaults").log_queue_records, 100_000);
        assert_eq!(load("log_queue_records: 64\n").expect("small").log_queue_records, 64);
        for bad in ["0", "15", "10000001"] {
            let error = load(&format!("flush_interval_ms: 200\nlog_queue_records: {bad}\n")).expect_err(bad);
            assert!(error.message.contains("log_queue_records") && error.message.contains(bad), "{bad}: {error}");
            assert_eq!(error.position.map(|(line, _)| line), Some(2), "{bad}: {error}");
        }
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let config = load("state_dir: state\npolicies: [p]\n").expect("loads");
        assert!(config.state_dir.is_absolute() && config.state_dir.ends_with("state"));
        assert!(config.policies[0].is_absolute());
    }
}
