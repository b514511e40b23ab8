//! A child session's rights: the intersection of what its own grants give
//! and what its parent may do. A child can never reach, run or pass
//! through the proxy with less governance than any level above it.
//!
//! Network entries are intersected as functions: for every prefix either
//! side names, and every port either side singles out, the child's entry
//! holds the stricter of the two sides' decisions there (deny beats proxy
//! beats allow; no entry is deny). The kernel's lookup (longest prefix, a
//! port entry winning at equal length) then gives, for any destination, the
//! stricter of what each side alone would give.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tollgate_common::{NO_RULE, Verdict};

use super::{
    compile::{Decided, ExecAllow, NetEntry, SessionRoute, SessionRules},
    route::{HostName, Route, RouteTarget, SniRules, name_matches},
};

/// What `inner` (a child's own grants) leaves of `outer` (its parent's
/// effective rules).
pub fn intersect(outer: &SessionRules, inner: SessionRules) -> SessionRules {
    let mut out = SessionRules {
        grants: inner.grants.clone(),
        withdrawn: inner.withdrawn.clone(),
        exec_deny: outer.exec_deny.clone(),
        exec_deny_missing: outer.exec_deny_missing.clone(),
        exec_deny_scripts: outer.exec_deny_scripts.clone(),
        exec_deny_rules: outer.exec_deny_rules.clone(),
        unresolved: outer.unresolved.clone(),
        ..SessionRules::default()
    };
    for (index, (path, id)) in inner.exec_deny.iter().enumerate() {
        if !out.exec_deny.iter().any(|(_, known)| known == id) {
            out.exec_deny.push((path.clone(), *id));
            out.exec_deny_rules.push(inner.exec_deny_rules[index].clone());
        }
    }
    intersect_net(outer, &inner, &mut out);
    // Every level's name rules stay, each under a rule id of the new list.
    for level in outer.names.iter().map(|l| (l, outer)).chain(inner.names.iter().map(|l| (l, &inner))) {
        let (level, from) = level;
        let mut kept = level.clone();
        for rule in &mut kept.rules {
            let decided = from.rules.get(rule.rule_id as usize).cloned().unwrap_or_default();
            rule.rule_id = out.rules.len() as u32;
            out.rules.push(decided);
        }
        out.names.push(kept);
    }
    out.exec_deny_missing.extend(inner.exec_deny_missing.iter().cloned());
    out.exec_deny_scripts.extend(inner.exec_deny_scripts.iter().cloned());
    out.unresolved.extend(inner.unresolved.iter().cloned());
    out.exec_allow = match (&outer.exec_allow, inner.exec_allow) {
        (None, inner) => inner,
        (Some(outer), None) => Some(outer.clone()),
        (Some(outer), Some(inner)) => {
            let mut levels = outer.levels.clone();
            levels.extend(inner.levels);
            let keep: BTreeSet<_> = outer.ids().into_iter().collect();
            let files = inner.files.into_iter().filter(|(_, id, _)| keep.contains(id)).collect();
            Some(ExecAllow { levels, files })
        }
    };
    out
}

type Prefix = (u8, [u8; 16], u32);

fn intersect_net(outer: &SessionRules, inner: &SessionRules, out: &mut SessionRules) {
    let prefixes: BTreeSet<Prefix> =
        outer.net.iter().chain(&inner.net).map(|e| (e.family, masked(&e.addr, e.addr_prefix), e.addr_prefix)).collect();
    let ports: BTreeSet<u16> = outer.net.iter().chain(&inner.net).filter_map(|e| e.port).collect();
    // Entries made of the same pair of rules share one rule id (and route).
    let mut made: BTreeMap<(u32, u32), (Verdict, u32)> = BTreeMap::new();
    for prefix in &prefixes {
        let any_port = combine(outer, inner, lookup(outer, prefix, None), lookup(inner, prefix, None), out, &mut made);
        push(out, prefix, None, any_port);
        for port in &ports {
            let at_port = combine(
                outer,
                inner,
                lookup(outer, prefix, Some(*port)),
                lookup(inner, prefix, Some(*port)),
                out,
                &mut made,
            );
            // Where the port changes nothing, the any-port entry decides.
            if at_port != any_port {
                push(out, prefix, Some(*port), at_port);
            }
        }
    }
}

fn push(
    out: &mut SessionRules,
    (family, addr, addr_prefix): &Prefix,
    port: Option<u16>,
    (verdict, rule_id): (Verdict, u32),
) {
    out.net.push(NetEntry { family: *family, addr: *addr, addr_prefix: *addr_prefix, port, verdict, rule_id });
}

/// The entry of `rules` the kernel would pick for any address in `prefix`
/// at `port` (`None`: a port no entry names).
fn lookup<'a>(rules: &'a SessionRules, (family, addr, bits): &Prefix, port: Option<u16>) -> Option<&'a NetEntry> {
    let covers = |e: &&NetEntry| {
        e.family == *family && e.addr_prefix <= *bits && masked(addr, e.addr_prefix) == masked(&e.addr, e.addr_prefix)
    };
    let best = |p: Option<u16>| rules.net.iter().filter(|e| e.port == p).filter(covers).max_by_key(|e| e.addr_prefix);
    match (best(None), port.and_then(|p| best(Some(p)))) {
        (Some(any), Some(at)) => Some(if at.addr_prefix >= any.addr_prefix { at } else { any }),
        (any, at) => any.or(at),
    }
}

fn rank(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Deny | Verdict::Killed => 2,
        Verdict::Redirect => 1,
        Verdict::Allow => 0,
    }
}

/// The stricter of two sides' entries, as a rule id of `out`.
fn combine(
    outer: &SessionRules,
    inner: &SessionRules,
    o: Option<&NetEntry>,
    i: Option<&NetEntry>,
    out: &mut SessionRules,
    made: &mut BTreeMap<(u32, u32), (Verdict, u32)>,
) -> (Verdict, u32) {
    let (Some(o), Some(i)) = (o, i) else {
        // A side with no entry refuses: the default deny, no rule.
        return (Verdict::Deny, NO_RULE);
    };
    if let Some(known) = made.get(&(o.rule_id, i.rule_id)) {
        return *known;
    }
    let rules_of = |side: &SessionRules, id: u32| side.rules.get(id as usize).cloned().unwrap_or_default();
    let (o_rules, i_rules) = (rules_of(outer, o.rule_id), rules_of(inner, i.rule_id));
    let both = || Decided::new(i_rules.rules().iter().chain(o_rules.rules()).cloned().collect());
    let (verdict, decided, route) = match (rank(o.verdict).max(rank(i.verdict)), o.verdict, i.verdict) {
        // The refusing side decided (the inner one when both refuse).
        (2, _, v) if rank(v) == 2 => (Verdict::Deny, i_rules.clone(), None),
        (2, _, _) => (Verdict::Deny, o_rules.clone(), None),
        (1, Verdict::Redirect, Verdict::Redirect) => {
            match (outer.routes.get(&o.rule_id), inner.routes.get(&i.rule_id)) {
                (Some(a), Some(b)) => match merge(&a.route, &b.route) {
                    Some(route) => {
                        let hits = a.hits.then(&b.hits);
                        (
                            Verdict::Redirect,
                            both(),
                            Some(Arc::new(SessionRoute { grant: b.grant.clone(), route, hits })),
                        )
                    }
                    // The two levels' routes cannot both hold: refuse.
                    None => (Verdict::Deny, both(), None),
                },
                _ => (Verdict::Deny, both(), None),
            }
        }
        (1, Verdict::Redirect, _) => (Verdict::Redirect, both(), outer.routes.get(&o.rule_id).cloned()),
        (1, _, _) => (Verdict::Redirect, both(), inner.routes.get(&i.rule_id).cloned()),
        _ => (Verdict::Allow, both(), None),
    };
    // A redirect whose route is unknown has nowhere to go: refuse.
    let verdict = if verdict == Verdict::Redirect && route.is_none() { Verdict::Deny } else { verdict };
    let rule_id = out.rules.len() as u32;
    out.rules.push(decided);
    if let Some(route) = route {
        out.routes.insert(rule_id, route);
    }
    made.insert((o.rule_id, i.rule_id), (verdict, rule_id));
    (verdict, rule_id)
}

/// One route holding the rules of both levels: blocks, approvals and masks
/// add up; a credential (and upstream TLS) comes from the level that has
/// one, the inner first; hosts and server names must satisfy both. `None`
/// when no request could satisfy both (different protocols or names).
pub fn merge(outer: &Route, inner: &Route) -> Option<Route> {
    if outer.protocol != inner.protocol {
        return None;
    }
    let to = match (&outer.to, &inner.to) {
        (RouteTarget::Host { name: a, .. }, RouteTarget::Host { name: b, .. }) if a != b => return None,
        (RouteTarget::Host { .. }, RouteTarget::Address(_)) => outer.to.clone(),
        _ => inner.to.clone(),
    };
    let names = |hosts: &[HostName]| hosts.iter().map(|h| h.0.clone()).collect::<Vec<_>>();
    let hosts = both_names(&names(&outer.hosts), &names(&inner.hosts))?.into_iter().map(HostName).collect();
    let sni = match (&outer.sni, &inner.sni) {
        (None, None) => None,
        (a, b) => {
            let (a, b) = (a.clone().unwrap_or_default(), b.clone().unwrap_or_default());
            let mut deny = a.deny.clone();
            deny.extend(b.deny.iter().cloned());
            Some(SniRules { allow: both_names(&a.allow, &b.allow)?, deny })
        }
    };
    Some(Route {
        to,
        protocol: inner.protocol,
        credential: inner.credential.clone().or_else(|| outer.credential.clone()),
        block: outer.block.iter().chain(&inner.block).cloned().collect(),
        approve: outer.approve.iter().chain(&inner.approve).cloned().collect(),
        // What runs unseen must be allowed by both levels; lists that differ
        // allow nothing (comparing what two lists of patterns both admit is
        // not decidable in general).
        allow: if same_rules(&outer.allow, &inner.allow) { inner.allow.clone() } else { Vec::new() },
        mask: outer.mask.iter().chain(&inner.mask).cloned().collect(),
        upstream_tls: inner.upstream_tls.clone().or_else(|| outer.upstream_tls.clone()),
        sni,
        upgrade: outer.upgrade && inner.upgrade,
        hosts,
    })
}

/// Do two rule lists say the same, rule for rule?
fn same_rules(a: &[super::route::Matcher], b: &[super::route::Matcher]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_string() == y.to_string())
}

/// Names both lists accept (an empty list accepts any name). `None` when
/// both restrict and no name satisfies both.
fn both_names(a: &[String], b: &[String]) -> Option<Vec<String>> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => Some(b.to_vec()),
        (_, true) => Some(a.to_vec()),
        _ => {
            let mut common = BTreeSet::new();
            for x in a {
                for y in b {
                    // A pattern covering the other leaves the narrower one.
                    if x == y || name_matches(x, y) {
                        common.insert(y.clone());
                    } else if name_matches(y, x) {
                        common.insert(x.clone());
                    }
                }
            }
            (!common.is_empty()).then(|| common.into_iter().collect())
        }
    }
}

fn masked(addr: &[u8; 16], bits: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (index, byte) in addr.iter().enumerate() {
        let start = index as u32 * 8;
        out[index] = if start + 8 <= bits {
            *byte
        } else if start >= bits {
            0
        } else {
            byte & (0xffu8 << (8 - (bits - start)))
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::policy::{Grant, compile::compile, explain::explain};

    fn rules(yaml: &str) -> SessionRules {
        let grant: Grant = serde_yaml_ng::from_str(yaml).expect("grant parses");
        compile([&grant], &BTreeSet::new())
    }

    fn verdict(rules: &SessionRules, to: &str) -> Verdict {
        explain(rules, to.parse::<SocketAddr>().expect("address")).verdict
    }

    #[test]
    fn every_destination_gets_the_stricter_of_both_sides() {
        let parent = rules(
            "name: p\nidentity: i\nnetwork:\n  allow: [\"0.0.0.0/0\"]\n  deny: [\"10.0.0.0/8\", \"192.0.2.0/24:22\"]\n  proxy:\n    - { to: \"127.0.0.1/32:8080\", protocol: http }\n",
        );
        let child = rules(
            "name: c\nidentity: j\nnetwork:\n  allow: [\"10.1.0.0/16\", \"192.0.2.0/24\", \"127.0.0.0/8\", \"198.51.100.7/32:443\"]\n",
        );
        let both = intersect(&parent, child);
        let cases = [
            ("10.1.2.3:80", Verdict::Deny),        // the parent's deny under the child's allow
            ("192.0.2.9:22", Verdict::Deny),       // the parent's port deny under the child's wider allow
            ("192.0.2.9:80", Verdict::Allow),      // both allow
            ("127.0.0.1:8080", Verdict::Redirect), // the parent's proxy under the child's allow
            ("127.0.0.1:9000", Verdict::Allow),
            ("198.51.100.7:443", Verdict::Allow),
            ("198.51.100.7:80", Verdict::Deny), // the child has no entry
            ("203.0.113.1:443", Verdict::Deny), // the child has no entry
        ];
        for (to, want) in cases {
            assert_eq!(verdict(&both, to), want, "{to}");
        }
        let proxied = explain(&both, "127.0.0.1:8080".parse().expect("address"));
        assert_eq!(proxied.rule.as_deref(), Some("c: network.allow 127.0.0.0/8 & p: network.proxy 127.0.0.1/32:8080"));
    }

    #[test]
    fn a_wider_child_gains_nothing() {
        let parent = rules("name: p\nidentity: i\nnetwork:\n  allow: [\"192.0.2.0/24:443\"]\n");
        let child = rules("name: c\nidentity: j\nnetwork:\n  allow: [\"0.0.0.0/0\", \"::/0\"]\n");
        let both = intersect(&parent, child);
        assert_eq!(verdict(&both, "192.0.2.1:443"), Verdict::Allow);
        assert_eq!(verdict(&both, "192.0.2.1:80"), Verdict::Deny);
        assert_eq!(verdict(&both, "[2001:db8::1]:443"), Verdict::Deny);
    }

    #[test]
    fn routes_of_both_levels_add_up() {
        let parent = rules(
            "name: p\nidentity: i\nnetwork:\n  proxy:\n    - to: \"127.0.0.1/32:8080\"\n      protocol: http\n      block: [{ method: DELETE }]\n      hosts: [\"*.example.com\"]\n",
        );
        let child = rules(
            "name: c\nidentity: j\nnetwork:\n  proxy:\n    - to: \"127.0.0.1/32:8080\"\n      protocol: http\n      upgrade: false\n      approve: [{ method: POST }]\n      hosts: [\"api.example.com\", \"other.test\"]\n      credential: { header: Authorization, secret_file: /etc/hostname }\n",
        );
        let both = intersect(&parent, child);
        let entry = both.net.iter().find(|e| e.verdict == Verdict::Redirect && e.addr_prefix == 128).expect("redirect");
        let route = &both.routes[&entry.rule_id].route;
        assert_eq!((route.block.len(), route.approve.len()), (1, 1));
        assert!(route.credential.is_some() && !route.upgrade);
        assert_eq!(route.hosts, vec![HostName("api.example.com".into())]);
    }

    #[test]
    fn routes_that_cannot_both_hold_refuse() {
        let parent = rules(
            "name: p\nidentity: i\nnetwork:\n  proxy:\n    - { to: \"127.0.0.1/32:8080\", protocol: http, hosts: [a.test] }\n",
        );
        let child = rules(
            "name: c\nidentity: j\nnetwork:\n  proxy:\n    - { to: \"127.0.0.1/32:8080\", protocol: http, hosts: [b.test] }\n",
        );
        assert_eq!(verdict(&intersect(&parent, child), "127.0.0.1:8080"), Verdict::Deny);
    }
}
