//! TLS on governed routes.
//!
//! - Passthrough (`protocol: tls`): the agent's own TLS goes through
//!   untouched after the ClientHello's server name (SNI) passes the route's
//!   allow and deny lists; a refused name gets a TLS `access_denied` alert
//!   and nothing reaches the upstream.
//! - Origination (`upstream_tls`): the proxy speaks TLS to the upstream so
//!   the agent can speak plain HTTP to a governed name.

use std::{path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde_json::Value;
use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions, parse_tls_plaintext};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{Governed, ProxyCtx, file_cache::FileCache, record::ProxyRecord};
use crate::{
    policy::route::{RouteTarget, SniRules, UpstreamTls, name_matches},
    store::{FieldList, RecordKind, RecordVerdict},
};

/// Where the system keeps its CA bundle (Debian, Ubuntu, Alpine, Arch).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A ClientHello fits in one record of at most this many bytes.
const MAX_RECORD: usize = 5 + (1 << 14);
/// TLS alert record: fatal, access_denied.
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// Why a passthrough connection was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SniRefusal {
    /// The client sent no server name.
    #[error("the ClientHello names no server (SNI is required on governed TLS routes)")]
    Missing,
    /// The name is on the deny list.
    #[error("server name '{0}' is denied")]
    Denied(String),
    /// There is an allow list and the name is not on it.
    #[error("server name '{0}' is not allowed")]
    NotAllowed(String),
}

/// Checks a server name against a route: deny beats allow; a host route
/// allows only its own name.
pub fn check_sni(target: &RouteTarget, rules: Option<&SniRules>, sni: Option<&str>) -> Result<String, SniRefusal> {
    // Names compare without case and without the root's trailing dot.
    let name = sni.ok_or(SniRefusal::Missing)?.trim_end_matches('.').to_ascii_lowercase();
    if let RouteTarget::Host { name: host, .. } = target
        && &name != host
    {
        return Err(SniRefusal::NotAllowed(name));
    }
    if let Some(rules) = rules {
        if rules.deny.iter().any(|p| name_matches(p, &name)) {
            return Err(SniRefusal::Denied(name));
        }
        if !rules.allow.is_empty() && !rules.allow.iter().any(|p| name_matches(p, &name)) {
            return Err(SniRefusal::NotAllowed(name));
        }
    }
    Ok(name)
}

/// The server name in a ClientHello record, if the bytes hold one.
pub fn client_hello_sni(record: &[u8]) -> Option<String> {
    let (_, plaintext) = parse_tls_plaintext(record).ok()?;
    plaintext.msg.iter().find_map(|message| match message {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) => {
            let (_, extensions) = parse_tls_extensions(hello.ext?).ok()?;
            extensions.iter().find_map(|extension| match extension {
                TlsExtension::SNI(names) => names
                    .iter()
                    .find(|(kind, _)| *kind == SNIType::HostName)
                    .and_then(|(_, name)| std::str::from_utf8(name).ok().map(str::to_owned)),
                _ => None,
            })
        }
        _ => None,
    })
}

/// Reads the first TLS record (the ClientHello) from the client.
async fn read_first_record(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; 5];
    client.read_exact(&mut buffer).await?;
    let length = usize::from(u16::from_be_bytes([buffer[3], buffer[4]]));
    if buffer[0] != 0x16 || 5 + length > MAX_RECORD {
        return Ok(buffer); // not a handshake record: no SNI will be found
    }
    buffer.resize(5 + length, 0);
    client.read_exact(&mut buffer[5..]).await?;
    Ok(buffer)
}

/// Serves one passthrough connection.
pub async fn passthrough(ctx: Arc<ProxyCtx>, governed: Governed, mut client: TcpStream) {
    let route = &governed.route.route;
    let mut record = ProxyRecord::new(RecordKind::Tls, &governed, FieldList::new());
    let deny = |mut record: ProxyRecord, key: &'static str, why: String| {
        record.set(key, why);
        record.finish(&ctx.log, &governed, RecordVerdict::DENY);
    };
    let first = match tokio::time::timeout(Duration::from_secs(10), read_first_record(&mut client)).await {
        Ok(Ok(bytes)) => bytes,
        _ => return deny(record, "error", "no ClientHello within 10 s".into()),
    };
    let sni = client_hello_sni(&first);
    record.set("sni", sni.clone().map_or(Value::Null, Value::from));
    let name = match check_sni(&route.to, route.sni.as_ref(), sni.as_deref()) {
        Ok(name) => name,
        Err(refusal) => {
            tracing::info!(%refusal, "TLS connection refused");
            deny(record, "reason", refusal.to_string());
            let _ = client.write_all(&ACCESS_DENIED_ALERT).await;
            return;
        }
    };
    let mut upstream = match TcpStream::connect(governed.destination).await {
        Ok(stream) => stream,
        Err(e) => return deny(record, "error", format!("upstream unreachable: {e}")),
    };
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (up, down) = copied.unwrap_or((0, 0));
    record.set("sni", name);
    record.set("bytes_up", up + first.len() as u64);
    record.set("bytes_down", down);
    record.finish(&ctx.log, &governed, RecordVerdict::ALLOW);
}

/// rustls client configurations by CA file, made once and again when the file changes.
pub struct UpstreamConfigs {
    configs: FileCache<ClientConfig>,
}

impl Default for UpstreamConfigs {
    fn default() -> Self {
        Self { configs: FileCache::new("CA file", client_config) }
    }
}

fn client_config(ca_file: &Path, _: &std::fs::Metadata) -> Result<ClientConfig, String> {
    let roots = load_roots(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // One configuration serves every session: resuming TLS sessions across
    // them would let an upstream link one session's connections to another's.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Opens TLS to the upstream, verifying its certificate for the route's
/// name (or `server_name`, or the destination address).
pub async fn connect_upstream(
    ctx: &ProxyCtx,
    governed: &Governed,
    tls: &UpstreamTls,
    stream: TcpStream,
) -> Result<TlsStream<TcpStream>, String> {
    let config = ctx.upstream_tls.configs.get(tls.ca_file.as_deref().unwrap_or(Path::new(SYSTEM_CA_BUNDLE))).await?;
    let name = match (&tls.server_name, &governed.route.route.to) {
        (Some(name), _) => ServerName::try_from(name.clone()).map_err(|e| format!("server_name '{name}': {e}"))?,
        (None, RouteTarget::Host { name, .. }) => {
            ServerName::try_from(name.clone()).map_err(|e| format!("host '{name}': {e}"))?
        }
        (None, RouteTarget::Address(_)) => ServerName::IpAddress(governed.destination.ip().into()),
    };
    TlsConnector::from(config).connect(name, stream).await.map_err(|e| format!("TLS to the upstream failed: {e}"))
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certificates =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
        roots.add(certificate).map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {} holds no certificates", path.display()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> SniRules {
        SniRules {
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny: deny.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn sni_rules_deny_beats_allow_and_wildcards_match_subdomains_only() {
        let any: RouteTarget = "127.0.0.1/32:443".parse().expect("target");
        let r = rules(&["*.example.com", "api.test"], &["bad.example.com"]);
        assert_eq!(check_sni(&any, Some(&r), Some("a.example.com")), Ok("a.example.com".into()));
        assert_eq!(
            check_sni(&any, Some(&r), Some("bad.example.com")),
            Err(SniRefusal::Denied("bad.example.com".into()))
        );
        assert_eq!(check_sni(&any, Some(&r), Some("example.com")), Err(SniRefusal::NotAllowed("example.com".into())));
        assert_eq!(check_sni(&any, Some(&r), None), Err(SniRefusal::Missing));
        assert_eq!(
            check_sni(&any, Some(&r), Some("Bad.Example.com.")),
            Err(SniRefusal::Denied("bad.example.com".into()))
        );
        let upper = rules(&["*.Example.COM"], &[]);
        assert!(check_sni(&any, Some(&upper), Some("a.example.com")).is_ok(), "patterns compare without case");
        let host: RouteTarget = "api.test:443".parse().expect("target");
        assert!(check_sni(&host, None, Some("other.test")).is_err());
    }

    #[test]
    fn the_server_name_is_read_from_a_real_client_hello() {
        // A ClientHello as rustls writes it, captured through an in-memory connection.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from("api.internal.example").expect("name");
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).expect("hello");
        assert_eq!(client_hello_sni(&hello).as_deref(), Some("api.internal.example"));
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
