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
    /// A header the proxy adds (HTTP), or the login it uses upstream
    /// (PostgreSQL), from a secret only the daemon can read.
    #[serde(default)]
    pub credential: Option<Credential>,
    /// Requests (statements) refused and never sent upstream.
    #[serde(default)]
    pub block: Vec<Matcher>,
    /// Requests (statements) held until a reviewer approves them.
    #[serde(default)]
    pub approve: Vec<Matcher>,
    /// For `protocol: postgres`: statements whose effect cannot be known
    /// before they run (`DO`, `CALL`, functions that run SQL given as text)
    /// are refused unless one of these matches them.
    #[serde(default)]
    pub allow: Vec<Matcher>,
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
pub(crate) fn is_host_name(name: &str) -> bool {
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
    /// PostgreSQL's wire protocol (v3), statements judged by its own parser.
    Postgres,
}

impl Protocol {
    /// The name policies use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tls => "tls",
            Self::Postgres => "postgres",
        }
    }
}

impl Route {
    /// What in this route its protocol cannot honour: each a sentence.
    /// Fields of another protocol would be silently ignored otherwise.
    pub fn protocol_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let protocol = self.protocol.as_str();
        let sql = self.protocol == Protocol::Postgres;
        for (list, matchers) in [("block", &self.block), ("approve", &self.approve), ("allow", &self.allow)] {
            for (index, matcher) in matchers.iter().enumerate() {
                let (http_fields, sql_fields) = (matcher.http_fields(), matcher.sql_fields());
                if sql && !http_fields.is_empty() {
                    problems.push(format!(
                        "{list}[{index}]: {} applies to HTTP routes, not {protocol}",
                        http_fields.join(", ")
                    ));
                }
                if !sql && !sql_fields.is_empty() {
                    problems.push(format!(
                        "{list}[{index}]: {} applies to postgres routes, not {protocol}",
                        sql_fields.join(", ")
                    ));
                }
            }
        }
        if !sql && !self.allow.is_empty() {
            problems.push(format!("allow applies to postgres routes, not {protocol}"));
        }
        for (index, mask) in self.mask.iter().enumerate() {
            match mask {
                Mask::Column { .. } if !sql => {
                    problems.push(format!("mask[{index}]: column masks apply to postgres routes, not {protocol}"))
                }
                Mask::JsonPath { .. } if sql => {
                    problems.push(format!("mask[{index}]: json_path masks apply to HTTP routes; use column or regex"))
                }
                _ => {}
            }
        }
        match (&self.credential, sql) {
            (Some(Credential::Header { .. }), true) => {
                problems.push("credential: a postgres route logs in with user and password_file".to_owned())
            }
            (Some(Credential::Login { .. }), false) => {
                problems.push(format!("credential: user and password_file apply to postgres routes, not {protocol}"))
            }
            (None, true) if self.mask.iter().any(|m| matches!(m, Mask::Column { .. })) => problems.push(
                "column masks need a credential: the proxy looks up which table column a result column is with it"
                    .to_owned(),
            ),
            _ => {}
        }
        if sql && (self.sni.is_some() || !self.hosts.is_empty()) {
            problems.push("sni and hosts apply to tls and http routes, not postgres".to_owned());
        }
        if !sql && self.upstream_tls.as_ref().is_some_and(|tls| tls.mode.is_some()) {
            problems.push(format!("upstream_tls.mode applies to postgres routes, not {protocol}"));
        }
        problems
    }
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
#[serde(try_from = "RawCredential")]
pub enum Credential {
    /// HTTP: a header the proxy sets.
    Header {
        /// The header to set (a client's own header of that name is dropped).
        header: String,
        /// The file holding the value; must be readable by root only.
        secret_file: AbsolutePath,
    },
    /// PostgreSQL: the role the proxy logs in as upstream.
    Login {
        /// The role.
        user: String,
        /// The file holding its password; must be readable by root only.
        password_file: AbsolutePath,
    },
}

/// A credential as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    header: Option<String>,
    secret_file: Option<AbsolutePath>,
    user: Option<String>,
    password_file: Option<AbsolutePath>,
}

impl TryFrom<RawCredential> for Credential {
    type Error = String;
    fn try_from(raw: RawCredential) -> Result<Self, String> {
        match raw {
            RawCredential { header: Some(header), secret_file: Some(secret_file), user: None, password_file: None } => {
                Ok(Self::Header { header, secret_file })
            }
            RawCredential { header: None, secret_file: None, user: Some(user), password_file: Some(password_file) }
                if !user.is_empty() =>
            {
                Ok(Self::Login { user, password_file })
            }
            _ => Err("a credential is either { header, secret_file } (HTTP) or { user, password_file } (PostgreSQL)"
                .to_owned()),
        }
    }
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
    /// SQL: what a statement does (`delete`, `drop`, ...), anywhere in it.
    pub statement: Vec<StatementKind>,
    /// SQL: only `delete`/`update` (or those of `statement`) with no
    /// condition on a column.
    pub without_where: bool,
    /// SQL: tables touched, `schema.table` globs (`audit.*`); a name
    /// without a schema matches that table in any schema.
    pub table: Vec<NameGlob>,
    /// SQL: functions called, by name (globs, any schema).
    pub function: Vec<NameGlob>,
}

/// What a SQL statement does, as policies name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatementKind(pub String);

/// The statement kinds rules may name; [`StatementKind::of_node`] gives the
/// kind of a parse tree node.
pub const STATEMENT_KINDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "create",
    "alter",
    "drop",
    "truncate",
    "grant",
    "revoke",
    "copy",
    "do",
    "call",
    "set",
    "show",
    "transaction",
    "explain",
    "prepare",
    "execute",
    "deallocate",
    "declare",
    "fetch",
    "close",
    "lock",
    "vacuum",
    "analyze",
    "cluster",
    "reindex",
    "refresh",
    "listen",
    "notify",
    "unlisten",
    "discard",
    "load",
    "checkpoint",
    "comment",
    "security_label",
    "reassign",
    "import",
    "other",
];

impl StatementKind {
    /// The kind of a parse tree node named `node` (`DeleteStmt`, ...), or
    /// `None` when the node is not a statement.
    pub fn of_node(node: &str) -> Option<&'static str> {
        let stem = node.strip_suffix("Stmt")?;
        let kind = match stem {
            "Select" | "SetOperation" => "select",
            "Insert" => "insert",
            "Update" => "update",
            "Delete" => "delete",
            "Merge" => "merge",
            "Truncate" => "truncate",
            "Copy" => "copy",
            "Do" => "do",
            "Call" => "call",
            "VariableSet" | "AlterSystem" => "set",
            "VariableShow" => "show",
            "Transaction" => "transaction",
            "Explain" => "explain",
            "Prepare" => "prepare",
            "Execute" => "execute",
            "Deallocate" => "deallocate",
            "DeclareCursor" => "declare",
            "Fetch" => "fetch",
            "ClosePortal" => "close",
            "Lock" => "lock",
            "Vacuum" => "vacuum",
            "Cluster" => "cluster",
            "Reindex" => "reindex",
            "RefreshMatView" => "refresh",
            "Listen" => "listen",
            "Notify" => "notify",
            "Unlisten" => "unlisten",
            "Discard" => "discard",
            "Load" => "load",
            "CheckPoint" => "checkpoint",
            "Comment" => "comment",
            "SecLabel" => "security_label",
            "ReassignOwned" => "reassign",
            "ImportForeignSchema" => "import",
            "Rename" | "AlterOwner" => "alter",
            "Define" | "Index" | "View" | "Rule" => "create",
            // GRANT and REVOKE share a node; the caller reads `is_grant`.
            "Grant" | "GrantRole" => "grant",
            stem if stem.starts_with("Drop") => "drop",
            stem if stem.starts_with("Alter") => "alter",
            stem if stem.starts_with("Create") => "create",
            _ => "other",
        };
        Some(kind)
    }
}

impl<'de> Deserialize<'de> for StatementKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?.to_ascii_lowercase();
        if STATEMENT_KINDS.contains(&text.as_str()) {
            Ok(Self(text))
        } else {
            Err(de::Error::custom(format!("'{text}' is not a statement kind (one of: {})", STATEMENT_KINDS.join(", "))))
        }
    }
}

/// A name pattern for tables and functions: `*` stands for any run of
/// characters; compared without case (unquoted SQL names fold to lower case,
/// and a wider match only refuses more).
#[derive(Debug, Clone)]
pub struct NameGlob {
    text: String,
    pattern: regex::Regex,
    /// For `schema.table`: the table part alone, for names whose schema is
    /// not known (`None` if that part is no pattern, which covers nothing).
    table_part: Option<regex::Regex>,
}

impl NameGlob {
    /// Parses a glob.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.chars().any(char::is_whitespace) {
            return Err(format!("'{text}' is not a table or function name pattern"));
        }
        let pattern = Self::pattern(text).map_err(|e| format!("'{text}': {e}"))?;
        let table_part = match text.rsplit_once('.') {
            Some((_, table)) if !table.is_empty() && !table.chars().any(char::is_whitespace) => {
                Self::pattern(table).ok()
            }
            _ => None,
        };
        Ok(Self { text: text.to_owned(), pattern, table_part })
    }

    fn pattern(glob: &str) -> Result<regex::Regex, regex::Error> {
        let body: String = glob.split('*').map(regex::escape).collect::<Vec<_>>().join(".*");
        regex::RegexBuilder::new(&format!("^{body}$")).case_insensitive(true).build()
    }

    /// Does the glob cover `name`?
    pub fn matches(&self, name: &str) -> bool {
        self.pattern.is_match(name)
    }

    /// Does the table part of a `schema.table` glob cover `table`, a name
    /// whose schema is not known? False for a glob with no schema.
    pub fn table_part_matches(&self, table: &str) -> bool {
        self.table_part.as_ref().is_some_and(|part| part.is_match(table))
    }

    /// Does the glob name a schema (`schema.table`)?
    pub fn qualified(&self) -> bool {
        self.text.contains('.')
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// One value or a list of them (`statement: drop` or `statement: [drop, alter]`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
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
    #[serde(default)]
    statement: Option<OneOrMany<StatementKind>>,
    #[serde(default)]
    without_where: bool,
    #[serde(default)]
    table: Option<OneOrMany<String>>,
    #[serde(default)]
    function: Option<OneOrMany<String>>,
}

impl TryFrom<RawMatcher> for Matcher {
    type Error = String;
    fn try_from(raw: RawMatcher) -> Result<Self, String> {
        let RawMatcher { method, path, exact_case, header, body, statement, without_where, table, function } = raw;
        let globs = |list: Option<OneOrMany<String>>| -> Result<Vec<NameGlob>, String> {
            list.map(OneOrMany::into_vec).unwrap_or_default().iter().map(|text| NameGlob::new(text)).collect()
        };
        let (table, function) = (globs(table)?, globs(function)?);
        let statement = statement.map(OneOrMany::into_vec).unwrap_or_default();
        let path = path
            .map(|text| {
                regex::RegexBuilder::new(&text)
                    .case_insensitive(!exact_case)
                    .build()
                    .map(Pattern)
                    .map_err(|e| format!("regex '{text}' is not valid: {e}"))
            })
            .transpose()?;
        Ok(Self { method, path, exact_case, header, body, statement, without_where, table, function })
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
        if !self.statement.is_empty() {
            let kinds: Vec<&str> = self.statement.iter().map(|k| k.0.as_str()).collect();
            parts.push(format!("statement {}", kinds.join("|")));
        }
        if self.without_where {
            parts.push("without where".to_owned());
        }
        let globs = |list: &[NameGlob]| list.iter().map(NameGlob::as_str).collect::<Vec<_>>().join("|");
        if !self.table.is_empty() {
            parts.push(format!("table {}", globs(&self.table)));
        }
        if !self.function.is_empty() {
            parts.push(format!("function {}", globs(&self.function)));
        }
        if parts.is_empty() {
            parts.push("every request".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

impl Matcher {
    /// The HTTP fields this matcher uses.
    fn http_fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.method.is_some() {
            fields.push("method");
        }
        if self.path.is_some() {
            fields.push("path");
        }
        if self.header.is_some() {
            fields.push("header");
        }
        if self.body.is_some() {
            fields.push("body");
        }
        fields
    }

    /// The SQL fields this matcher uses.
    fn sql_fields(&self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if !self.statement.is_empty() {
            fields.push("statement");
        }
        if self.without_where {
            fields.push("without_where");
        }
        if !self.table.is_empty() {
            fields.push("table");
        }
        if !self.function.is_empty() {
            fields.push("function");
        }
        fields
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
    /// PostgreSQL: replace the whole value of every result column whose
    /// name (or the table column it reads) the regex matches in full,
    /// without case.
    Column {
        /// The pattern.
        column: ColumnPattern,
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

/// A column name pattern: a regex matched against the whole name, without case.
#[derive(Debug, Clone)]
pub struct ColumnPattern(pub regex::Regex, pub String);

impl<'de> Deserialize<'de> for ColumnPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .case_insensitive(true)
            .build()
            .map(|regex| ColumnPattern(regex, text.clone()))
            .map_err(|e| de::Error::custom(format!("column pattern '{text}' is not a valid regex: {e}")))
    }
}

/// How a PostgreSQL route reaches its upstream over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// TLS is required, and the server's certificate is verified against
    /// `ca_file` (or the system's) for the server name: the proxy never
    /// sends a credential to a server it has not verified.
    Require,
    /// The same as `require` (libpq's name for it).
    VerifyFull,
}

/// Originating TLS to the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PostgreSQL only: `require` (the default) or `verify-full`; both verify.
    #[serde(default)]
    pub mode: Option<TlsMode>,
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
