//! What a session's name rules say about a DNS query: every level of a
//! session's chain must allow a name, a deny at any level wins, and a name
//! no rule could allow is refused before it is forwarded.

use std::{collections::BTreeSet, net::IpAddr};

use tollgate_common::Verdict;

use super::compile::NameLevel;

/// Address families, as a level leaves them open or a name's answers may use them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    /// IPv4 (and IPv4-mapped IPv6).
    pub v4: bool,
    /// IPv6.
    pub v6: bool,
}

impl Families {
    /// Both families.
    pub const BOTH: Self = Self { v4: true, v6: true };

    /// Is `address` of one of these families? A v4-mapped IPv6 address is IPv4.
    pub fn admits(self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }

    fn any(self) -> bool {
        self.v4 || self.v6
    }

    fn meet(self, other: Self) -> Self {
        Self { v4: self.v4 && other.v4, v6: self.v6 && other.v6 }
    }
}

/// The resolver's decision for one queried name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Allowed by name: the answer's addresses of `families` become allowed,
    /// on each `(port, rule_id)` of `ports` (`None`: every port). A level
    /// that lets the name through only because it allows every address of
    /// one family allows no answer of the other.
    Allow {
        /// The ports every level allows, each with the innermost rule that does.
        ports: Vec<(Option<u16>, u32)>,
        /// The families answers may be of.
        families: Families,
    },
    /// Every level allows every address: forwarded, nothing to add.
    Open,
    /// A deny rule names it: its addresses become refused (on `port`).
    Deny {
        /// The port the rule names, or every port.
        port: Option<u16>,
        /// The rule.
        rule_id: u32,
    },
    /// No rule of some level could allow it: refused, never forwarded.
    Refuse,
}

/// Judges a query for `name` by the levels of a session's chain (outermost first).
pub fn judge_name(levels: &[NameLevel], name: &str) -> NameVerdict {
    let covering = |level: &NameLevel, verdict: Verdict| -> Vec<(Option<u16>, u32)> {
        level
            .rules
            .iter()
            .filter(|rule| rule.verdict == verdict && rule.target.covers(name))
            .map(|rule| (rule.target.port, rule.rule_id))
            .collect()
    };
    for level in levels.iter().rev() {
        if let Some((port, rule_id)) = covering(level, Verdict::Deny).first() {
            return NameVerdict::Deny { port: *port, rule_id: *rule_id };
        }
    }
    if levels.is_empty() {
        return NameVerdict::Refuse;
    }
    // The ports every level allows (`None` in the set: any port).
    let mut allowed: Option<BTreeSet<Option<u16>>> = None;
    let mut innermost_rules = None;
    let mut families = Families::BOTH;
    for level in levels {
        let rules = covering(level, Verdict::Allow);
        if rules.is_empty() {
            families = families.meet(level.open);
            if families.any() {
                continue;
            }
            return NameVerdict::Refuse;
        }
        innermost_rules = Some(rules.clone());
        let ports: BTreeSet<Option<u16>> = rules.iter().map(|(port, _)| *port).collect();
        allowed = Some(match allowed {
            None => ports,
            Some(before) => meet(&before, &ports),
        });
    }
    let (Some(allowed), Some(rules)) = (allowed, innermost_rules) else {
        return NameVerdict::Open;
    };
    if allowed.is_empty() {
        return NameVerdict::Refuse;
    }
    let rule_for = |port: Option<u16>| {
        rules.iter().find(|(p, _)| *p == port || p.is_none()).map_or(rules[0].1, |(_, rule_id)| *rule_id)
    };
    NameVerdict::Allow { ports: allowed.into_iter().map(|port| (port, rule_for(port))).collect(), families }
}

/// Ports both sets allow, `None` standing for every port.
fn meet(a: &BTreeSet<Option<u16>>, b: &BTreeSet<Option<u16>>) -> BTreeSet<Option<u16>> {
    match (a.contains(&None), b.contains(&None)) {
        (true, _) => b.clone(),
        (_, true) => a.clone(),
        _ => a.intersection(b).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{NameDestination, compile::NameRule};

    fn level(rules: &[(&str, Option<u16>, Verdict)], open: Families) -> NameLevel {
        NameLevel {
            rules: rules
                .iter()
                .enumerate()
                .map(|(index, (name, port, verdict))| NameRule {
                    target: NameDestination { name: (*name).to_owned(), port: *port },
                    verdict: *verdict,
                    rule_id: index as u32,
                })
                .collect(),
            open,
        }
    }

    const CLOSED: Families = Families { v4: false, v6: false };

    fn allow(ports: Vec<(Option<u16>, u32)>, families: Families) -> NameVerdict {
        NameVerdict::Allow { ports, families }
    }

    #[test]
    fn every_level_must_allow_and_a_deny_anywhere_wins() {
        let top = level(&[("github.com", Some(443), Verdict::Allow), ("*.evil.test", None, Verdict::Deny)], CLOSED);
        let child = level(&[("github.com", None, Verdict::Allow)], CLOSED);
        let github = allow(vec![(Some(443), 0)], Families::BOTH);
        assert_eq!(judge_name(&[top.clone(), child.clone()], "github.com"), github);
        assert_eq!(judge_name(std::slice::from_ref(&top), "GitHub.com."), github);
        assert_eq!(judge_name(&[top.clone(), child], "x.evil.test"), NameVerdict::Deny { port: None, rule_id: 1 });
        assert_eq!(judge_name(std::slice::from_ref(&top), "exfil-data.attacker.test"), NameVerdict::Refuse);
        let open = level(&[], Families::BOTH);
        assert_eq!(judge_name(std::slice::from_ref(&open), "anything.test"), NameVerdict::Open);
        assert_eq!(judge_name(&[top, open], "other.test"), NameVerdict::Refuse, "the top level still decides");
        assert_eq!(judge_name(&[], "github.com"), NameVerdict::Refuse);
    }

    /// A level open to one family only lets a name through for answers of that family: a child's
    /// name rule under a parent that allows every IPv6 address opens no IPv4 answer.
    #[test]
    fn a_level_open_to_one_family_passes_only_that_familys_answers() {
        let v6_only = Families { v4: false, v6: true };
        let parent = level(&[], v6_only);
        let child = level(&[("api.example", Some(443), Verdict::Allow)], CLOSED);
        let verdict = judge_name(&[parent.clone(), child.clone()], "api.example");
        assert_eq!(verdict, allow(vec![(Some(443), 0)], v6_only));
        let NameVerdict::Allow { families, .. } = verdict else { unreachable!() };
        assert!(!families.admits("203.0.113.5".parse().expect("address")));
        assert!(!families.admits("::ffff:203.0.113.5".parse().expect("address")), "a mapped address is IPv4");
        assert!(families.admits("2001:db8::5".parse().expect("address")));
        let v4_only = level(&[], Families { v4: true, v6: false });
        assert_eq!(judge_name(&[parent, v4_only, child], "api.example"), NameVerdict::Refuse, "no family is left");
    }
}
