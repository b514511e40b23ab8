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
pub mod names;
pub mod route;
pub mod sql;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
};

pub use absolute_path::AbsolutePath;
pub use destination::{Destination, NameDestination, NetTarget};
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
        let files = expand(paths)?;
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
        match self.problems(sources).into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    /// Every consistency problem across the files: names defined twice,
    /// grants of unknown identities, empty issuers.
    fn problems(&self, sources: &[(PathBuf, String, PolicyFile)]) -> Vec<YamlError> {
        let mut found = Vec::new();
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
                found.push(error("name", &identity.name, format!("identity '{}' is defined twice", identity.name)));
            }
            if identity.issuer.is_empty() {
                found.push(error("name", &identity.name, format!("identity '{}' has an empty issuer", identity.name)));
            }
        }
        let mut grants = HashSet::new();
        for grant in &self.grants {
            if !grants.insert(grant.name.as_str()) {
                found.push(error("name", &grant.name, format!("grant '{}' is defined twice", grant.name)));
            }
            for route in &grant.network.proxy {
                for problem in route.protocol_problems() {
                    found.push(error(
                        "to",
                        &route.to.to_string(),
                        format!("grant '{}', route to {}: {problem}", grant.name, route.to),
                    ));
                }
            }
            if !identities.contains(grant.identity.as_str()) {
                found.push(error(
                    "identity",
                    &grant.identity,
                    format!("grant '{}' names unknown identity '{}'", grant.name, grant.identity),
                ));
            }
        }
        found
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

/// The policy files `paths` name: files as given, directories' `*.yaml`
/// and `*.yml` sorted by name.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
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
    Ok(files)
}

/// What `tollgate policy check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Every error, `FILE:LINE:COLUMN: message`.
    pub errors: Vec<String>,
    /// Things that load but will not do what they seem to (`FILE:LINE:COLUMN: warning: ...`).
    pub warnings: Vec<String>,
}

/// Checks the files together (identities in one file, grants in another)
/// and reports every error found, not only the first: each file's first
/// error where the YAML parser stopped, then each other entry that does not
/// load on its own, then every problem across the files.
pub fn check(paths: &[PathBuf]) -> CheckReport {
    let mut report = CheckReport::default();
    let files = match expand(paths) {
        Ok(files) => files,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    let mut set = PolicySet::default();
    let mut sources = Vec::new();
    for file in &files {
        let source = match std::fs::read_to_string(file) {
            Ok(source) => source,
            Err(e) => {
                report.errors.push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        match yaml::parse::<PolicyFile>(file, &source) {
            Ok(policy) => {
                set.identities.extend(policy.identities.iter().cloned());
                set.grants.extend(policy.grants.iter().cloned());
                sources.push((file.clone(), source, policy));
            }
            Err(first) => {
                let first_line = first.position.map(|(line, _)| line);
                report.errors.push(first.to_string());
                let (errors, sound) = entry_errors(file, &source, first_line);
                report.errors.extend(errors);
                // The entries that do load still take part in the checks across files.
                set.identities.extend(sound.identities.iter().cloned());
                set.grants.extend(sound.grants.iter().cloned());
                sources.push((file.clone(), source, sound));
            }
        }
    }
    report.errors.extend(set.problems(&sources).into_iter().map(|e| e.to_string()));
    for grant in &set.grants {
        let located = |key: &str, value: &str| {
            sources
                .iter()
                .find_map(|(path, source, _)| {
                    yaml::locate(source, key, value).map(|(l, c)| format!("{}:{l}:{c}", path.display()))
                })
                .unwrap_or_default()
        };
        for path in &grant.exec.deny {
            if !path.0.exists() {
                report.warnings.push(format!(
                    "{}: warning: grant '{}' denies {}, which does not exist (nothing to match)",
                    located("name", &grant.name),
                    grant.name,
                    path.0.display()
                ));
            }
        }
        for pattern in &grant.exec.allow {
            if exec_files::resolve(std::slice::from_ref(pattern)).files.is_empty() {
                report.warnings.push(format!(
                    "{}: warning: grant '{}' allows {pattern}, which names no executable file owned by root",
                    located("name", &grant.name),
                    grant.name
                ));
            }
        }
    }
    report
}

/// Errors of each identity or grant of a file that does not load on its
/// own, but for the one holding `first_line` (already reported); and the
/// entries that do load.
fn entry_errors(file: &std::path::Path, source: &str, first_line: Option<usize>) -> (Vec<String>, PolicyFile) {
    let mut sound = PolicyFile::default();
    let Ok(value) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(source) else { return (Vec::new(), sound) };
    let mut errors = Vec::new();
    for section in ["identities", "grants"] {
        let entries = value.get(section).and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
        let starts: Vec<Option<usize>> = entries
            .iter()
            .map(|e| {
                e.get("name").and_then(|n| n.as_str()).and_then(|n| yaml::locate(source, "name", n)).map(|(l, _)| l)
            })
            .collect();
        for (index, entry) in entries.iter().enumerate() {
            let loaded = if section == "identities" {
                serde_yaml_ng::from_value::<Identity>(entry.clone()).map(|i| sound.identities.push(i)).err()
            } else {
                serde_yaml_ng::from_value::<Grant>(entry.clone()).map(|g| sound.grants.push(g)).err()
            };
            let Some(error) = loaded else { continue };
            let start = starts[index];
            let end = starts.get(index + 1).copied().flatten();
            let holds_first = match (start, first_line) {
                (Some(start), Some(first)) => first >= start && end.is_none_or(|end| first < end),
                _ => false,
            };
            if holds_first {
                continue;
            }
            let position = start.map_or(String::new(), |line| format!("{line}:1:"));
            errors.push(format!("{}:{position} {section}[{index}]: {error}", file.display()));
        }
    }
    (errors, sound)
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
