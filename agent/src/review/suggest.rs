//! `review --suggest`: a policy that gives each identity what its sessions
//! actually exercised in the window and nothing more: the files they ran
//! (as an exec allow list), the destinations they reached, the proxy routes
//! they used (copied as written, with their rules), and every deny of the
//! original grants.

use std::collections::BTreeSet;

use serde_json::Value;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::{Window, connect_target};
use crate::policy::PolicySet;

/// The suggested policy as YAML, for the identities in `scope` that opened
/// sessions in the window.
pub fn policy(policies: &PolicySet, window: &Window, scope: &BTreeSet<String>) -> String {
    let mut identities = Vec::new();
    let mut grants = Vec::new();
    for identity in policies.identities.iter().filter(|i| scope.contains(&i.name)) {
        if !window.sessions.iter().any(|s| s.identity == identity.name) {
            continue;
        }
        let Some(written) = policies.written.get(&format!("identities/{}", identity.name)) else { continue };
        identities.push(written.clone());
        grants.push(observed_grant(policies, window, &identity.name));
    }
    let mut file = Mapping::new();
    file.insert("identities".into(), Yaml::Sequence(identities));
    file.insert("grants".into(), Yaml::Sequence(grants));
    let body = serde_yaml_ng::to_string(&Yaml::Mapping(file)).unwrap_or_default();
    format!(
        "# Suggested by `tollgate review --suggest` for {} .. {}: only what was exercised.\n{body}",
        window_bound(window, true),
        window_bound(window, false)
    )
}

fn window_bound(window: &Window, first: bool) -> String {
    let starts = window.sessions.iter().map(|s| s.started_at.clone());
    (if first { starts.min() } else { starts.max() }).unwrap_or_default()
}

fn observed_grant(policies: &PolicySet, window: &Window, identity: &str) -> Yaml {
    let (mut execs, mut reached, mut routes) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for decision in &window.decisions {
        let (kind, verdict, detail) = (&decision.kind, &decision.verdict, &decision.detail);
        if decision.identity != identity {
            continue;
        }
        match (kind.as_str(), verdict.as_str()) {
            ("exec", "allow") => {
                if let Some(file) = detail.get("filename").and_then(Value::as_str).filter(|f| f.starts_with('/')) {
                    execs.insert(file.to_owned());
                }
            }
            ("connect", "allow") => {
                // Where a name rule let the connect through, the name is what
                // the workload needs, not the address it had that day.
                if let Some(name) = allowed_by_name(detail) {
                    reached.insert(name);
                } else if let Some(target) = connect_target(detail) {
                    reached.insert(as_destination(&target));
                }
            }
            ("connect", "redirect") => {
                let rules = detail.get("grant_rules").and_then(Value::as_array).cloned().unwrap_or_default();
                for rule in rules {
                    let (Some(grant), Some(name)) =
                        (rule.get("grant").and_then(Value::as_str), rule.get("rule").and_then(Value::as_str))
                    else {
                        continue;
                    };
                    if let Some(to) = name.strip_prefix("network.proxy ") {
                        routes.insert((grant.to_owned(), to.to_owned()));
                    }
                }
            }
            _ => {}
        }
    }
    let originals: Vec<&Yaml> =
        policies.grants_for(identity).filter_map(|g| policies.written.get(&format!("grants/{}", g.name))).collect();
    let denies = |section: &str| -> Vec<Yaml> {
        let mut out: Vec<Yaml> = Vec::new();
        for grant in &originals {
            let list =
                grant.get(section).and_then(|s| s.get("deny")).and_then(Yaml::as_sequence).cloned().unwrap_or_default();
            for item in list {
                if !out.contains(&item) {
                    out.push(item);
                }
            }
        }
        out
    };
    let mut proxy = Vec::new();
    for (grant, to) in routes {
        let written = policies.written.get(&format!("grants/{grant}"));
        let list = written.and_then(|g| g.get("network")).and_then(|n| n.get("proxy")).and_then(Yaml::as_sequence);
        // The route whose `to:` reads the same as the rule it was recorded under.
        let found = list
            .into_iter()
            .flatten()
            .find(|route| route.get("to").and_then(Yaml::as_str).is_some_and(|t| same_target(t, &to)));
        if let Some(route) = found
            && !proxy.contains(route)
        {
            proxy.push(route.clone());
        }
    }
    let strings = |set: BTreeSet<String>| Yaml::Sequence(set.into_iter().map(Yaml::String).collect());
    let mut exec = Mapping::new();
    exec.insert("allow".into(), strings(execs));
    exec.insert("deny".into(), Yaml::Sequence(denies("exec")));
    let mut network = Mapping::new();
    network.insert("allow".into(), strings(reached));
    network.insert("deny".into(), Yaml::Sequence(denies("network")));
    network.insert("proxy".into(), Yaml::Sequence(proxy));
    let mut grant = Mapping::new();
    grant.insert("name".into(), format!("{identity}-observed").into());
    grant.insert("identity".into(), identity.into());
    grant.insert("exec".into(), Yaml::Mapping(exec));
    grant.insert("network".into(), Yaml::Mapping(network));
    Yaml::Mapping(grant)
}

/// The name rule (`network.allow github.com:443`) that let a connect through, if one did.
fn allowed_by_name(detail: &Value) -> Option<String> {
    let rules = detail.get("grant_rules").and_then(Value::as_array)?;
    rules.iter().find_map(|rule| {
        let target = rule.get("rule").and_then(Value::as_str)?.strip_prefix("network.allow ")?;
        matches!(target.parse::<crate::policy::NetTarget>(), Ok(crate::policy::NetTarget::Name(_)))
            .then(|| target.to_owned())
    })
}

/// `1.2.3.4:80` as a one-address destination (`1.2.3.4/32:80`, `[::1]/128:80`).
fn as_destination(target: &str) -> String {
    match target.rsplit_once(':') {
        Some((addr, port)) if addr.starts_with('[') => format!("{addr}/128:{port}"),
        Some((addr, port)) => format!("{addr}/32:{port}"),
        None => target.to_owned(),
    }
}

/// Do a route's written `to:` and a recorded rule's target name the same place?
fn same_target(written: &str, recorded: &str) -> bool {
    let parse = |text: &str| text.parse::<crate::policy::route::RouteTarget>().ok();
    match (parse(written), parse(recorded)) {
        (Some(a), Some(b)) => a == b,
        _ => written == recorded,
    }
}
