//! What a session's name rules say about a DNS query: every level of a
//! session's chain must allow a name, a deny at any level wins, and a name
//! no rule could allow is refused before it is forwarded.

use std::collections::BTreeSet;

use tollgate_common::Verdict;

use super::compile::NameLevel;

/// The resolver's decision for one queried name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Allowed by name: the answer's addresses become allowed, on each
    /// `(port, rule_id)` (`None`: every port).
    Allow(Vec<(Option<u16>, u32)>),
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
    for level in levels {
        let rules = covering(level, Verdict::Allow);
        if rules.is_empty() {
            if level.allows_everything {
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
    NameVerdict::Allow(allowed.into_iter().map(|port| (port, rule_for(port))).collect())
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

    fn level(rules: &[(&str, Option<u16>, Verdict)], everything: bool) -> NameLevel {
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
            allows_everything: everything,
        }
    }

    #[test]
    fn every_level_must_allow_and_a_deny_anywhere_wins() {
        let top = level(&[("github.com", Some(443), Verdict::Allow), ("*.evil.test", None, Verdict::Deny)], false);
        let child = level(&[("github.com", None, Verdict::Allow)], false);
        assert_eq!(judge_name(&[top.clone(), child.clone()], "github.com"), NameVerdict::Allow(vec![(Some(443), 0)]));
        assert_eq!(judge_name(std::slice::from_ref(&top), "GitHub.com."), NameVerdict::Allow(vec![(Some(443), 0)]));
        assert_eq!(judge_name(&[top.clone(), child], "x.evil.test"), NameVerdict::Deny { port: None, rule_id: 1 });
        assert_eq!(judge_name(std::slice::from_ref(&top), "exfil-data.attacker.test"), NameVerdict::Refuse);
        let open = level(&[], true);
        assert_eq!(judge_name(std::slice::from_ref(&open), "anything.test"), NameVerdict::Open);
        assert_eq!(judge_name(&[top, open], "other.test"), NameVerdict::Refuse, "the top level still decides");
        assert_eq!(judge_name(&[], "github.com"), NameVerdict::Refuse);
    }
}
