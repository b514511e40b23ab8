//! Policies: who an identity is and what its sessions may do.
//!
//! Files are loaded and checked here; [`compile`] turns the grants of one
//! session into what the kernel maps hold.

pub mod absolute_path;
pub mod compile;
pub mod destination;
pub mod exec_files;
pub mod explain;
pub mod intersect;
pub mod model;
pub mod route;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
};

pub use absolute_path::AbsolutePath;
pub use destination::Destination;
pub use model::{Grant, Identity, PolicyFile};

use crate::yaml::{self, YamlError};

/// All loaded policy files, merged.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Identities in load order (files sorted by path).
    pub identities: Vec<Identity>,
    /// Grants in load order.
    pub grants: Vec<Grant>,
    /// The files that were read.
    pub files: Vec<PathBuf>,
    /// Each identity and grant as written, by name (for `review --suggest`,
    /// which prints narrowed copies of them).
    pub written: BTreeMap<String, serde_yaml_ng::Value>,
}

/// Why policies did not load.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file had a syntax, type or consistency error.
    #[error(transparent)]
    Yaml(#[from] YamlError),
    /// A configured policy path could not be listed.
    #[error("{path}: cannot read policy directory: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl PolicySet {
    /// Loads every policy file named, or found in a named directory
    /// (`*.yaml`, `*.yml`, sorted by name). Identity and grant names must be
    /// unique across all of them, and grants must name known identities.
    pub fn load(paths: &[PathBuf]) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                let entries =
                    std::fs::read_dir(path).map_err(|source| PolicyError::Directory { path: path.clone(), source })?;
                let mut found: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                    .collect();
                found.sort();
                files.extend(found);
            } else {
                files.push(path.clone());
            }
        }
        let mut set = PolicySet::default();
        let mut sources = Vec::new();
        for file in &files {
            let (policy, source): (PolicyFile, String) = yaml::load(file)?;
            if let Ok(value) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&source) {
                for section in ["identities", "grants"] {
                    let entries = value.get(section).and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
                    for entry in entries {
                        if let Some(name) = entry.get("name").and_then(|n| n.as_str()) {
                            set.written.insert(format!("{section}/{name}"), entry.clone());
                        }
                    }
                }
            }
            sources.push((file.clone(), source, policy.clone()));
            set.identities.extend(policy.identities);
            set.grants.extend(policy.grants);
        }
        set.files = files;
        set.validate(&sources)?;
        Ok(set)
    }

    fn validate(&self, sources: &[(PathBuf, String, PolicyFile)]) -> Result<(), YamlError> {
        let error = |key: &str, value: &str, message: String| {
            // Name the file that holds the offending entry.
            let (path, position) = sources
                .iter()
                .find_map(|(path, source, _)| yaml::locate(source, key, value).map(|p| (path.clone(), Some(p))))
                .unwrap_or_else(|| (sources.first().map(|s| s.0.clone()).unwrap_or_default(), None));
            YamlError { path, position, message }
        };
        let mut identities = HashSet::new();
        for identity in &self.identities {
            if !identities.insert(identity.name.as_str()) {
                return Err(error("name", &identity.name, format!("identity '{}' is defined twice", identity.name)));
            }
            if identity.issuer.is_empty() {
                return Err(error("name", &identity.name, format!("identity '{}' has an empty issuer", identity.name)));
            }
        }
        let mut grants = HashSet::new();
        for grant in &self.grants {
            if !grants.insert(grant.name.as_str()) {
                return Err(error("name", &grant.name, format!("grant '{}' is defined twice", grant.name)));
            }
            if !identities.contains(grant.identity.as_str()) {
                return Err(error(
                    "identity",
                    &grant.identity,
                    format!("grant '{}' names unknown identity '{}'", grant.name, grant.identity),
                ));
            }
        }
        Ok(())
    }

    /// The first identity (in load order) that `issuer` and `claims` satisfy.
    pub fn match_identity(&self, issuer: &str, claims: &BTreeMap<String, serde_json::Value>) -> Option<&Identity> {
        self.identities.iter().find(|identity| identity.issuer == issuer && claims_match(&identity.claims, claims))
    }

    /// The grants of one identity.
    pub fn grants_for<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Grant> + 'a {
        self.grants.iter().filter(move |grant| grant.identity == identity)
    }
}

/// Does every claim of `wanted` hold in `claims` (equal, or a member of an array claim)?
pub fn claims_match(
    wanted: &BTreeMap<String, serde_json::Value>,
    claims: &BTreeMap<String, serde_json::Value>,
) -> bool {
    wanted.iter().all(|(name, wanted)| match claims.get(name) {
        Some(serde_json::Value::Array(items)) => items.iter().any(|item| claim_equals(item, wanted)),
        Some(value) => claim_equals(value, wanted),
        None => false,
    })
}

/// Claims compare as written: a policy's `42` matches a token's `42` or `"42"`,
/// since YAML authors rarely mean the difference.
#[allow(clippy::cmp_owned, reason = "a number's text form is the comparison; claims are few")]
fn claim_equals(token: &serde_json::Value, policy: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (token, policy) {
        (Value::String(a), Value::String(b)) => a == b,
        (Value::String(a), other) | (other, Value::String(a)) => *a == other.to_string(),
        (a, b) => a == b,
    }
}

/// Loads the files for `tollgate policy check`, one error per bad file.
pub fn check(paths: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for path in paths {
        if let Err(e) = PolicySet::load(std::slice::from_ref(path)) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        // Each file alone is fine; cross-file rules (unique names) need all of them.
        if let Err(e) = PolicySet::load(paths) {
            errors.push(e.to_string());
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(yaml: &str) -> PolicySet {
        let dir = std::env::temp_dir().join(format!("tollgate-policy-test-{}-{}", std::process::id(), yaml.len()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("p.yaml");
        std::fs::write(&file, yaml).expect("write policy");
        PolicySet::load(&[file]).expect("policy loads")
    }

    #[test]
    fn claims_match_by_equality_or_array_membership() {
        let set =
            set("identities:\n  - name: bots\n    issuer: iss\n    claims:\n      owner: acme\n      groups: ci\n");
        let claims = |owner: serde_json::Value, groups: serde_json::Value| {
            BTreeMap::from([("owner".to_owned(), owner), ("groups".to_owned(), groups)])
        };
        assert!(set.match_identity("iss", &claims(json!("acme"), json!(["dev", "ci"]))).is_some());
        assert!(set.match_identity("iss", &claims(json!("acme"), json!("ci"))).is_some());
        assert!(set.match_identity("iss", &claims(json!("other"), json!("ci"))).is_none());
        assert!(set.match_identity("iss", &claims(json!("acme"), json!(["dev"]))).is_none());
        assert!(set.match_identity("other-iss", &claims(json!("acme"), json!("ci"))).is_none());
    }
}
