//! `tollgate policy explain`: the decision the kernel would make for one
//! identity and destination, and the entry that made it. Mirrors the
//! programs' lookup: longest prefix of the destination's family; at equal
//! length a port-specific entry wins; no entry means deny.

use std::net::{IpAddr, SocketAddr};

use tollgate_common::{Verdict, family_of, loopback_for_unspecified, v4_mapped};

use super::compile::{FileId, NetEntry, SessionRules};

/// One line per answer of `policy explain` for `identity` under `set`:
/// an exec (`exec`), or a destination (`to`: `ADDR:PORT` or `HOST:PORT`, a
/// name answered for each address it resolves to now). Grants in
/// `withdrawn` count as a session would see them. Blocking (resolves, stats).
pub fn explain_lines(
    set: &super::PolicySet,
    withdrawn: &std::collections::BTreeSet<String>,
    identity: &str,
    to: Option<&str>,
    exec: Option<&std::path::Path>,
    sql: Option<&str>,
    resolve: &Resolve<'_>,
) -> Result<Vec<String>, String> {
    if !set.identities.iter().any(|i| i.name == identity) {
        return Err(format!("no identity '{identity}' in the policies"));
    }
    let rules = super::compile::compile(set.grants_for(identity), withdrawn);
    if let Some(path) = exec {
        let decision = explain_exec(&rules, path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let verdict = if decision.allowed { "allow" } else { "deny" };
        return Ok(vec![match (decision.rule, &rules.exec_allow) {
            (Some(rule), _) => format!("{verdict} ({rule})"),
            (None, Some(_)) => format!("{verdict} (not on any allow list: the default with one)"),
            (None, None) => format!("{verdict} (no exec rule matches: the default)"),
        }]);
    }
    let to = to.ok_or("give --to ADDR:PORT or --exec PATH")?;
    let line = |decision: Decision| {
        let verdict = match decision.verdict {
            Verdict::Allow => "allow",
            Verdict::Redirect => "proxy",
            _ => "deny",
        };
        match decision.rule {
            Some(rule) => format!("{verdict} ({rule})"),
            None => format!("{verdict} (no entry matches: the default)"),
        }
    };
    if let Some(sql) = sql {
        let address = to.parse::<SocketAddr>().map_err(|_| "--sql needs --to ADDR:PORT".to_owned())?;
        let decision = explain(&rules, address);
        let route = decision.route.and_then(|id| rules.routes.get(&id));
        let Some(route) = route.filter(|r| r.route.protocol == super::route::Protocol::Postgres) else {
            return Err(format!("{to} is not governed by a postgres route for '{identity}' ({})", line(decision)));
        };
        return Ok(vec![line(decision.clone()), explain_statement(&route.route, sql)]);
    }
    if let Ok(address) = to.parse::<SocketAddr>() {
        return Ok(vec![line(explain(&rules, address))]);
    }
    let (name, port) = to
        .rsplit_once(':')
        .and_then(|(name, port)| Some((name.trim_end_matches('.').to_ascii_lowercase(), port.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("'{to}' is neither ADDR:PORT nor HOST:PORT"))?;
    // What the session's resolver does with a query for the name.
    let rule_text = |rule_id: u32| rules.rules.get(rule_id as usize).map(ToString::to_string).unwrap_or_default();
    let verdict = super::names::judge_name(&rules.names, &name);
    let name_denies = matches!(verdict, super::names::NameVerdict::Deny { .. });
    let refused = verdict == super::names::NameVerdict::Refuse;
    let mut name_families = super::names::Families::BOTH;
    let by_name = match verdict {
        super::names::NameVerdict::Allow { ref ports, families } => {
            name_families = families;
            match ports.iter().find(|(p, _)| p.is_none() || *p == Some(port)) {
                Some((_, rule_id)) => Some(format!("allow ({}), while its answers live", rule_text(*rule_id))),
                None => Some(format!("deny (a name rule allows {name} on other ports only)")),
            }
        }
        super::names::NameVerdict::Deny { rule_id, .. } => Some(format!("deny ({})", rule_text(rule_id))),
        super::names::NameVerdict::Open => None,
        super::names::NameVerdict::Refuse => None,
    };
    let mut lines = Vec::new();
    match (&by_name, refused) {
        (Some(by_name), _) => lines.push(format!("{name}: {by_name}")),
        (None, true) => lines.push(format!(
            "{name}: refused (no rule could allow the name: its sessions' DNS queries for it are answered REFUSED)"
        )),
        (None, false) => {}
    }
    let addresses = resolve(&name, port).map_err(|e| format!("'{to}' does not resolve now: {e}"))?;
    if addresses.is_empty() {
        return Err(format!("'{to}' resolves to no address"));
    }
    for address in addresses {
        let decided = explain(&rules, address);
        // An address rule decides alone; otherwise the name's rule does.
        // A denied name's addresses are refused even under an address allow.
        let text = match (&by_name, decided.rule.is_some()) {
            (Some(by_name), false) if name_families.admits(address.ip()) => by_name.clone(),
            (Some(by_name), true) if name_denies => by_name.clone(),
            _ => line(decided),
        };
        lines.push(format!("{address}: {text}"));
    }
    Ok(lines)
}

/// How `explain` resolves a name: a name and port to the addresses it has now.
pub type Resolve<'a> = dyn Fn(&str, u16) -> Result<Vec<SocketAddr>, String> + 'a;

/// Resolves a name with the host's resolver (libc), for `explain` without a daemon.
pub fn resolve_with_libc(name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    (name, port).to_socket_addrs().map(Iterator::collect).map_err(|e| e.to_string())
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// allow, deny or redirect (to the proxy).
    pub verdict: Verdict,
    /// The rule that decided, or `None` for the default deny.
    pub rule: Option<String>,
    /// For a redirect: the route's id in the rules.
    pub route: Option<u32>,
}

/// What a postgres route's rules say about `sql`, with unqualified names
/// resolved as PostgreSQL's default search path does (a connection's own
/// path can differ; the proxy reads it when the connection opens).
fn explain_statement(route: &super::route::Route, sql: &str) -> String {
    use super::sql::{SearchPath, Verdict, analyze, judge};
    let analysis = match analyze(sql) {
        Ok(analysis) => analysis,
        Err(e) => return format!("statement: refused (it does not parse: {e})"),
    };
    let kinds: Vec<&str> = analysis.kinds.iter().map(String::as_str).collect();
    let what = format!("{} statement(s): {}", analysis.statements, kinds.join(", "));
    let default_path = SearchPath(Some(vec!["pg_catalog".to_owned(), "public".to_owned()]));
    match judge(route, &analysis, &default_path) {
        Verdict::Pass => format!("statement: passes ({what})"),
        Verdict::Hold(rule) => format!("statement: held for approval ({rule}; {what})"),
        Verdict::Refuse(rule) => format!("statement: refused ({rule}; {what})"),
    }
}

/// What `rules` decide for a connect to `to`.
pub fn explain(rules: &SessionRules, to: SocketAddr) -> Decision {
    // The address as the programs see it: IPv6 bytes, IPv4 mapped, the
    // unspecified address as the loopback it reaches.
    let addr = loopback_for_unspecified(match to.ip() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    });
    let family = family_of(&addr);
    let covers = |entry: &&NetEntry| entry.family == family && prefix_matches(&entry.addr, &addr, entry.addr_prefix);
    let best =
        |port: Option<u16>| rules.net.iter().filter(|e| e.port == port).filter(covers).max_by_key(|e| e.addr_prefix);
    let chosen = match (best(None), best(Some(to.port()))) {
        (Some(any), Some(port)) => Some(if port.addr_prefix >= any.addr_prefix { port } else { any }),
        (any, port) => any.or(port),
    };
    match chosen {
        Some(entry) => Decision {
            verdict: entry.verdict,
            rule: rules.rules.get(entry.rule_id as usize).filter(|d| !d.rules().is_empty()).map(ToString::to_string),
            route: (entry.verdict == Verdict::Redirect).then_some(entry.rule_id),
        },
        None => Decision { verdict: Verdict::Deny, rule: None, route: None },
    }
}

/// What `rules` decide for an exec of `path`: the deny entry that refuses
/// it, or the allow entry that lets it run, or the default (allowed with no
/// allow list, refused with one). The file is what `path` resolves to now.
pub fn explain_exec(rules: &SessionRules, path: &std::path::Path) -> Result<ExecDecision, std::io::Error> {
    let id = FileId::of(path)?;
    if let Some(index) = rules.exec_deny.iter().position(|(_, denied)| *denied == id) {
        return Ok(ExecDecision { allowed: false, rule: rules.exec_deny_rules.get(index).map(ToString::to_string) });
    }
    let Some(allow) = &rules.exec_allow else {
        return Ok(ExecDecision { allowed: true, rule: None });
    };
    let rule = allow.files.iter().find(|(_, file, _)| *file == id).map(|(_, _, rule)| rule.to_string());
    Ok(ExecDecision { allowed: rule.is_some(), rule })
}

/// An exec decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecDecision {
    /// May it run?
    pub allowed: bool,
    /// The entry that decided, or `None` for the default.
    pub rule: Option<String>,
}

fn prefix_matches(net: &[u8; 16], addr: &[u8; 16], bits: u32) -> bool {
    let full = (bits / 8) as usize;
    if net[..full] != addr[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[full] & mask == addr[full] & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;

    fn rules(yaml: &str) -> SessionRules {
        let grant: crate::policy::Grant = serde_yaml_ng::from_str(yaml).expect("grant parses");
        compile([&grant], &Default::default())
    }

    #[test]
    fn the_most_specific_entry_decides_and_is_named() {
        let rules = rules(
            "name: g\nidentity: i\nnetwork:\n  allow: [\"0.0.0.0/0\", \"::/0\"]\n  deny: [\"10.0.0.0/8\", \"169.254.169.254/32:80\"]\n  proxy:\n    - { to: \"127.0.0.1/32:18080\", protocol: http }\n",
        );
        let at = |text: &str| explain(&rules, text.parse().expect("socket address"));
        assert_eq!(
            at("169.254.169.254:80"),
            Decision {
                verdict: Verdict::Deny,
                rule: Some("g: network.deny 169.254.169.254/32:80".into()),
                route: None
            }
        );
        assert_eq!(at("169.254.169.254:443").verdict, Verdict::Allow);
        assert_eq!(at("10.1.2.3:22").rule.as_deref(), Some("g: network.deny 10.0.0.0/8"));
        assert_eq!(at("127.0.0.1:18080").verdict, Verdict::Redirect);
        assert_eq!(at("[::ffff:127.0.0.1]:18080").verdict, Verdict::Redirect);
        assert_eq!(at("0.0.0.0:18080").verdict, Verdict::Redirect, "the unspecified address is loopback");
        assert_eq!(at("127.0.0.2:18080").verdict, Verdict::Redirect, "every loopback address reaches the server");
        assert_eq!(at("[::1]:18080").verdict, Verdict::Redirect);
        assert_eq!(at("[2001:db8::1]:443").rule.as_deref(), Some("g: network.allow ::/0"));
    }

    #[test]
    fn no_entry_means_deny() {
        let rules = rules("name: g\nidentity: i\nnetwork:\n  allow: [\"::/0\"]\n");
        assert_eq!(
            explain(&rules, "192.0.2.1:80".parse().expect("addr")),
            Decision { verdict: Verdict::Deny, rule: None, route: None }
        );
    }
}
