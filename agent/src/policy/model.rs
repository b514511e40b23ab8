//! What a policy file says, as typed values. Bad values are refused while
//! deserializing so the YAML loader can say where they are.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{absolute_path::AbsolutePath, destination::NetTarget, exec_files::ExecPattern, route::Route};

/// One policy file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Who: issuers and claims that name an identity.
    #[serde(default)]
    pub identities: Vec<Identity>,
    /// What each identity may do.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

/// A named identity: tokens from `issuer` whose claims match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Unique name, referred to by grants.
    pub name: String,
    /// The exact `iss` of the token.
    pub issuer: String,
    /// Each claim must equal the value, or contain it when the token's claim is an array.
    #[serde(default)]
    pub claims: BTreeMap<String, serde_json::Value>,
    /// May this identity's sessions run as root? Off unless a policy opts in:
    /// root could detach the programs and leave its cgroup, so a root
    /// session is marked privileged in its record either way.
    #[serde(default)]
    pub allow_root: bool,
    /// The longest a session of this identity may run; past it the
    /// session's processes are killed and the end is recorded.
    #[serde(default, deserialize_with = "crate::yaml::optional_duration")]
    pub max_session: Option<std::time::Duration>,
    /// Must every session of this identity say why it runs (`--reason`)?
    #[serde(default)]
    pub require_reason: bool,
    /// Record the session's terminal output (through a pseudo-terminal the
    /// daemon holds), masked by its routes' regex masks, up to `output_cap_bytes`.
    #[serde(default)]
    pub record_output: bool,
}

/// Rights given to one identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Unique name, shown in records.
    pub name: String,
    /// The identity this grant applies to.
    pub identity: String,
    /// Exec rules.
    #[serde(default)]
    pub exec: ExecRules,
    /// Network rules.
    #[serde(default)]
    pub network: NetworkRules,
    /// Stop honouring this grant once it has gone this long without being
    /// exercised (a reviewer can renew it); what it refuses stays refused.
    #[serde(default, deserialize_with = "crate::yaml::optional_duration")]
    pub expire_unused_after: Option<std::time::Duration>,
}

/// Exec rules of a grant.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRules {
    /// Executables the session may not run (matched by the file, so symlinks
    /// to it are covered; a copy of it elsewhere is another file).
    #[serde(default)]
    pub deny: Vec<AbsolutePath>,
    /// If any grant of an identity has one: the only executables its
    /// sessions may run (files, directories, globs, resolved to the files
    /// they are). A deny of any grant still wins.
    #[serde(default)]
    pub allow: Vec<ExecPattern>,
}

/// Network rules of a grant. A session may connect only where some rule allows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkRules {
    /// Destinations (addresses or names) the session may connect to.
    #[serde(default)]
    pub allow: Vec<NetTarget>,
    /// Destinations refused even when an allow rule covers them; a denied
    /// name's addresses are refused even under a wider address allow.
    #[serde(default)]
    pub deny: Vec<NetTarget>,
    /// Governed destinations: sent to the L7 proxy.
    #[serde(default)]
    pub proxy: Vec<Route>,
}
