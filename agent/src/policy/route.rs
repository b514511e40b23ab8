//! Governed destinations (`network.proxy`): connections the kernel sends to
//! the daemon's L7 proxy, and what the proxy does with each request.

use std::{fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Deserializer, de};

use super::{absolute_path::AbsolutePath, destination::Destination};

/// One governed destination of a grant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Where: an address prefix with a port, or a host name with a port
    /// (matched on the HTTP `Host` header or the TLS SNI; connect sees only
    /// addresses, so the name is resolved when a session opens).
    pub to: RouteTarget,
    /// How the proxy speaks to both sides.
    pub protocol: Protocol,
    /// A header the proxy adds from a secret only the daemon can read.
    #[serde(default)]
    pub credential: Option<Credential>,
    /// Requests answered with 403 and never sent upstream.
    #[serde(default)]
    pub block: Vec<Matcher>,
    /// Requests held until a reviewer approves them.
    #[serde(default)]
    pub approve: Vec<Matcher>,
    /// Response data rewritten before the client sees it.
    #[serde(default)]
    pub mask: Vec<Mask>,
    /// Originate TLS to the upstream (the agent speaks plain HTTP).
    #[serde(default)]
    pub upstream_tls: Option<UpstreamTls>,
    /// For `protocol: tls` (passthrough): which server names may be reached.
    #[serde(default)]
    pub sni: Option<SniRules>,
    /// May requests upgrade the connection (WebSocket, `kubectl exec`)? On
    /// by default; routes with masks refuse upgrades whatever this says (a
    /// tunnel cannot be masked).
    #[serde(default = "upgrade_default")]
    pub upgrade: bool,
    /// For `protocol: http`: the names (`api.example.com`, `*.example.com`)
    /// requests may give as their Host. A request for another host is
    /// refused, so the credential is never sent on its behalf.
    #[serde(default)]
    pub hosts: Vec<HostName>,
}

fn upgrade_default() -> bool {
    true
}

/// A host name a route serves, lowercase; `*.` matches subdomains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName(pub String);

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        if is_host_name(bare) {
            Ok(Self(name))
        } else {
            Err(de::Error::custom(format!("host '{text}' is not a host name")))
        }
    }
}

/// Dot-separated labels of letters, digits and `-`, each 1 to 63 long.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Does `pattern` (a name, or `*.suffix` for its subdomains) cover `name`?
/// Both compare without case and without the root's trailing dot.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1 && name.ends_with(suffix) && name[..name.len() - suffix.len()].ends_with('.')
        }
        None => pattern == name,
    }
}

/// The protocol spoken on a governed destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 in the clear between agent and proxy.
    Http,
    /// TLS from the agent, passed through after an SNI check.
    Tls,
}

/// `to:` of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// An address prefix; a port is required.
    Address(Destination),
    /// A host name and port.
    Host {
        /// The name.
        name: String,
        /// The port.
        port: u16,
    },
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(destination) => write!(f, "{destination}"),
            Self::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl FromStr for RouteTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(destination) = text.parse::<Destination>() {
            if destination.port.is_none() {
                return Err(format!("proxy destination '{text}' needs a port (ADDRESS/PREFIX:PORT)"));
            }
            return Ok(Self::Address(destination));
        }
        let (name, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("proxy destination '{text}' needs a port (HOST:PORT or ADDRESS/PREFIX:PORT)"))?;
        let port = port.parse::<u16>().map_err(|_| format!("proxy destination '{text}' has a bad port"))?;
        if !is_host_name(name) {
            return Err(format!("proxy destination '{text}' is neither an address nor a host name"));
        }
        Ok(Self::Host { name: name.to_ascii_lowercase(), port })
    }
}

impl<'de> Deserialize<'de> for RouteTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(de::Error::custom)
    }
}

/// `credential:` of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The header to set (a client's own header of that name is dropped).
    pub header: String,
    /// The file holding the value; must be readable by root only.
    pub secret_file: AbsolutePath,
}

/// A request pattern; every field given must match.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawMatcher")]
pub struct Matcher {
    /// HTTP method, case-insensitive.
    pub method: Option<String>,
    /// Regex on the normalized path (with query); case-insensitive unless
    /// `exact_case`, since many servers read paths without case.
    pub path: Option<Pattern>,
    /// `path` compares case as written.
    pub exact_case: bool,
    /// A header, by name, whose value matches a regex.
    pub header: Option<HeaderMatch>,
    /// Regex on the request body (read up to the proxy's body limit).
    pub body: Option<Pattern>,
}

/// A matcher as written, before its path regex is built.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatcher {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    exact_case: bool,
    #[serde(default)]
    header: Option<HeaderMatch>,
    #[serde(default)]
    body: Option<Pattern>,
}

impl TryFrom<RawMatcher> for Matcher {
    type Error = String;
    fn try_from(raw: RawMatcher) -> Result<Self, String> {
        let RawMatcher { method, path, exact_case, header, body } = raw;
        let path = path
            .map(|text| {
                regex::RegexBuilder::new(&text)
                    .case_insensitive(!exact_case)
                    .build()
                    .map(Pattern)
                    .map_err(|e| format!("regex '{text}' is not valid: {e}"))
            })
            .transpose()?;
        Ok(Self { method, path, exact_case, header, body })
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(method) = &self.method {
            parts.push(format!("method {method}"));
        }
        if let Some(path) = &self.path {
            let case = if self.exact_case { " (exact case)" } else { "" };
            parts.push(format!("path ~ {}{case}", path.0.as_str()));
        }
        if let Some(header) = &self.header {
            parts.push(format!("header {} ~ {}", header.name, header.value.0.as_str()));
        }
        if let Some(body) = &self.body {
            parts.push(format!("body ~ {}", body.0.as_str()));
        }
        if parts.is_empty() {
            parts.push("every request".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

/// A header condition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// Regex on its value.
    pub value: Pattern,
}

/// A response rewrite.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Mask {
    /// Replace the values a JSONPath selects (RFC 9535), e.g. `$.users[*].email`.
    JsonPath {
        /// The path.
        json_path: JsonPathText,
        /// The replacement (default `****`).
        #[serde(default = "default_replacement")]
        replace: String,
    },
    /// Replace every match of a regex in the body.
    Regex {
        /// The pattern.
        regex: Pattern,
        /// The replacement (default `****`); `$1` and friends refer to groups.
        #[serde(default = "default_replacement")]
        replace: String,
    },
}

fn default_replacement() -> String {
    "****".to_owned()
}

/// Originating TLS to the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name to verify the upstream's certificate for (default: the route's host, or its address).
    pub server_name: Option<String>,
    /// PEM file of the CA certificates to trust (default: the system's, from /etc/ssl/certs).
    pub ca_file: Option<PathBuf>,
}

/// Server names a TLS passthrough route may reach. Deny beats allow; with an
/// allow list, names not on it are refused. `*.example.com` matches subdomains.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRules {
    /// Names allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Names refused.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A compiled regex that remembers its text.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        regex::Regex::new(&text)
            .map(Pattern)
            .map_err(|e| de::Error::custom(format!("regex '{text}' is not valid: {e}")))
    }
}

/// A JSONPath, checked when the policy loads.
#[derive(Debug, Clone)]
pub struct JsonPathText(pub serde_json_path::JsonPath, pub String);

impl<'de> Deserialize<'de> for JsonPathText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json_path::JsonPath::parse(&text)
            .map(|path| JsonPathText(path, text.clone()))
            .map_err(|e| de::Error::custom(format!("json_path '{text}' is not valid: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route from the redirect issue, unchanged.
    #[test]
    fn the_documented_route_parses() {
        let yaml = r#"
to: "127.0.0.1/32:18080"
protocol: http
credential: { header: Authorization, secret_file: /etc/tollgate/secrets/api-token }
block:
  - { method: DELETE }
  - { path: "^/admin/" }
approve:
  - { method: POST, path: "^/deploy" }
mask:
  - { json_path: "$.users[*].email" }
  - { regex: "\\b\\d{4}-\\d{4}-\\d{4}-\\d{4}\\b", replace: "****-****-****-****" }
"#;
        let route: Route = serde_yaml_ng::from_str(yaml).expect("route parses");
        assert_eq!(route.to.to_string(), "127.0.0.1/32:18080");
        assert_eq!((route.block.len(), route.approve.len(), route.mask.len()), (2, 1, 2));
        assert!(matches!(&route.mask[1], Mask::Regex { replace, .. } if replace == "****-****-****-****"));
    }

    #[test]
    fn targets_need_a_port_and_a_real_name() {
        assert!(matches!("api.internal:80".parse(), Ok(RouteTarget::Host { port: 80, .. })));
        assert!("10.0.0.0/8".parse::<RouteTarget>().expect_err("no port").contains("needs a port"));
        assert!("bad host!:80".parse::<RouteTarget>().is_err());
    }
}
