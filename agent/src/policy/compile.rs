//! From the grants of one session to the entries the kernel maps hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, ToSocketAddrs},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use serde_json::value::RawValue;
use tollgate_common::{FAMILY_V4, FAMILY_V6, Verdict, v4_mapped};

use super::{
    Destination, Grant, NetTarget,
    exec_files::{ExecPattern, resolve},
    route::{Route, RouteTarget},
};

/// A file as the kernel identifies it in an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// Device in the kernel's encoding (`MAJOR << 20 | MINOR`).
    pub dev: u32,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    /// The file `path` resolves to (following symlinks).
    pub fn of(path: &std::path::Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let dev = meta.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        Ok(Self { dev: (major << 20) | minor, ino: meta.ino() })
    }
}

/// A rule of a grant, as records, usage counts and reviews name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct RuleRef {
    /// The grant that holds it.
    pub grant: String,
    /// The rule within the grant (`network.allow 10.0.0.0/8`).
    pub rule: String,
}

impl RuleRef {
    /// Rule `rule` of grant `grant`.
    pub fn new(grant: &str, rule: impl Into<String>) -> Self {
        Self { grant: grant.to_owned(), rule: rule.into() }
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.grant, self.rule)
    }
}

/// The rules that made one kernel entry: one in a top session; in a child
/// session, one per level of the chain that had a say (innermost first).
/// Shared, with its text and JSON made once: the reader of kernel events
/// names it in the record of every connect it decided.
#[derive(Debug, Clone)]
pub struct Decided(Arc<DecidedRules>);

#[derive(Debug)]
struct DecidedRules {
    rules: Vec<RuleRef>,
    text: String,
    text_json: Box<RawValue>,
    rules_json: Box<RawValue>,
}

impl Decided {
    /// The entry made by `rules`.
    pub fn new(rules: Vec<RuleRef>) -> Self {
        let names: Vec<String> = rules.iter().map(RuleRef::to_string).collect();
        let text = names.join(" & ");
        Self(Arc::new(DecidedRules { text_json: raw_json(&text), rules_json: raw_json(&rules), text, rules }))
    }

    /// The rules, innermost first.
    pub fn rules(&self) -> &[RuleRef] {
        &self.0.rules
    }

    /// As a record names it: `grant: rule`, levels joined by ` & `.
    pub fn text(&self) -> &str {
        &self.0.text
    }

    /// [`Decided::text`] as a JSON string.
    pub fn text_json(&self) -> &RawValue {
        &self.0.text_json
    }

    /// [`Decided::rules`] as a JSON array of `{grant, rule}`.
    pub fn rules_json(&self) -> &RawValue {
        &self.0.rules_json
    }
}

/// `value` as JSON text. Strings and string pairs always serialize.
fn raw_json<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

impl Default for Decided {
    /// No rule: its text empty, its JSON `""` and `[]` as for any other.
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl PartialEq for Decided {
    fn eq(&self, other: &Self) -> bool {
        self.rules() == other.rules()
    }
}

impl Eq for Decided {}

impl fmt::Display for Decided {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// One network rule in kernel form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetEntry {
    /// 4 or 6: IPv4 rules match only IPv4 (and IPv4-mapped) destinations.
    pub family: u8,
    /// The prefix as IPv6 (IPv4 mapped into `::ffff:0:0/96`).
    pub addr: [u8; 16],
    /// Prefix length over the 128-bit address.
    pub addr_prefix: u32,
    /// `None` for every port.
    pub port: Option<u16>,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Index into [`SessionRules::rules`].
    pub rule_id: u32,
}

/// What the kernel enforces for one session.
#[derive(Debug, Clone, Default)]
pub struct SessionRules {
    /// Names of the grants that apply at this session's own level.
    pub grants: Vec<String>,
    /// Grants of this level that are no longer honoured (expired or revoked):
    /// what they allowed is gone, what they refused still is.
    pub withdrawn: Vec<String>,
    /// Denied executables that exist now, with the path that named them.
    pub exec_deny: Vec<(PathBuf, FileId)>,
    /// Denied paths that do not exist (nothing to match; reported).
    pub exec_deny_missing: Vec<PathBuf>,
    /// Denied paths that are `#!` scripts: only BPF LSM can stop those (by
    /// the time the exec tracepoint runs, the file is the interpreter).
    pub exec_deny_scripts: Vec<PathBuf>,
    /// The deny rules, by index into `exec_deny`.
    pub exec_deny_rules: Vec<RuleRef>,
    /// The allow list, when a grant has one: only these files may run.
    pub exec_allow: Option<ExecAllow>,
    /// Network rules, at most one per (prefix, port).
    pub net: Vec<NetEntry>,
    /// The rules behind each entry, indexed by `NetEntry::rule_id`.
    pub rules: Vec<Decided>,
    /// Governed destinations, by the rule id their redirect entries carry
    /// (shared: each connection the proxy takes holds its route).
    pub routes: BTreeMap<u32, Arc<SessionRoute>>,
    /// Host names of routes that did not resolve (nothing is redirected for them).
    pub unresolved: Vec<String>,
    /// Name rules, one level per session of the chain (outermost first):
    /// what the session's resolver judges queries by.
    pub names: Vec<NameLevel>,
}

/// One level's name rules.
#[derive(Debug, Clone, Default)]
pub struct NameLevel {
    /// `network.allow` and `network.deny` entries that are names.
    pub rules: Vec<NameRule>,
    /// The address families of which the level allows every address
    /// (`0.0.0.0/0`, `::/0` on every port): for them any name may resolve,
    /// and only denied names are judged.
    pub open: super::names::Families,
}

/// A name in `allow` or `deny`.
#[derive(Debug, Clone)]
pub struct NameRule {
    /// The name and port.
    pub target: super::NameDestination,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Index into [`SessionRules::rules`].
    pub rule_id: u32,
}

/// An exec allow list: what the grants name, and the files that is now.
/// A child session has one level per session up the chain that has a list:
/// a file runs only if every level lists it.
#[derive(Debug, Clone, Default)]
pub struct ExecAllow {
    /// Per level (outermost first), each grant's patterns with their rule.
    pub levels: Vec<Vec<(RuleRef, ExecPattern)>>,
    /// The files they stand for now, with the innermost rule that lists each.
    pub files: Vec<(PathBuf, FileId, RuleRef)>,
}

impl ExecAllow {
    /// Resolves `levels` to the files every level lists now.
    pub fn resolve(levels: Vec<Vec<(RuleRef, ExecPattern)>>) -> Self {
        let files = Self::files_of(&levels);
        Self { levels, files }
    }

    /// The files every level of `levels` lists now (blocking: walks the patterns).
    pub fn files_of(levels: &[Vec<(RuleRef, ExecPattern)>]) -> Vec<(PathBuf, FileId, RuleRef)> {
        let mut common: Option<BTreeMap<FileId, (PathBuf, RuleRef)>> = None;
        for level in levels {
            let mut listed: BTreeMap<FileId, (PathBuf, RuleRef)> = BTreeMap::new();
            for (rule, pattern) in level {
                for (path, id) in resolve(std::slice::from_ref(pattern)).files {
                    listed.entry(id).or_insert_with(|| (path, rule.clone()));
                }
            }
            common = Some(match common {
                None => listed,
                // The innermost level names the rule; every level must list the file.
                Some(outer) => listed.into_iter().filter(|(id, _)| outer.contains_key(id)).collect(),
            });
        }
        common.unwrap_or_default().into_iter().map(|(id, (path, rule))| (path, id, rule)).collect()
    }

    /// The file ids on the list.
    pub fn ids(&self) -> Vec<FileId> {
        self.files.iter().map(|(_, id, _)| *id).collect()
    }
}

/// A governed destination of one session.
#[derive(Debug, Clone)]
pub struct SessionRoute {
    /// The grant it came from.
    pub grant: String,
    /// Its rules.
    pub route: Route,
    /// The grant rule behind each of its block and approve rules (a route
    /// merged across a chain holds rules of several grants).
    pub hits: RouteHits,
}

impl SessionRoute {
    /// `route` of `grant`, every rule its own.
    pub fn of(grant: &str, route: Route) -> Self {
        Self { grant: grant.to_owned(), hits: RouteHits::of(grant, &route), route }
    }

    /// The grant rule a hit names (`block[2]: ...`, `approve[0]: ...`), if
    /// it is one of the route's block or approve rules.
    pub fn rule_of_hit(&self, hit: &str) -> Option<&RuleRef> {
        let (list, rest) = match hit.split_once('[')? {
            ("block", rest) => (&self.hits.block, rest),
            ("approve", rest) => (&self.hits.approve, rest),
            _ => return None,
        };
        list.get(rest.split_once(']')?.0.parse::<usize>().ok()?)
    }
}

/// Which grant rule each block and approve rule of a route is, in order.
#[derive(Debug, Clone, Default)]
pub struct RouteHits {
    /// One per `route.block`.
    pub block: Vec<RuleRef>,
    /// One per `route.approve`.
    pub approve: Vec<RuleRef>,
}

impl RouteHits {
    /// The rules of `route`, all of `grant`.
    pub fn of(grant: &str, route: &Route) -> Self {
        Self {
            block: route.block.iter().map(|m| RuleRef::new(grant, proxy_rule_name("block", route, m))).collect(),
            approve: route.approve.iter().map(|m| RuleRef::new(grant, proxy_rule_name("approve", route, m))).collect(),
        }
    }

    /// The rules of an outer level followed by an inner one's (the order a merged route lists them).
    pub fn then(&self, inner: &Self) -> Self {
        Self {
            block: self.block.iter().chain(&inner.block).cloned().collect(),
            approve: self.approve.iter().chain(&inner.approve).cloned().collect(),
        }
    }
}

/// A route's block or approve rule as a grant rule: `proxy.block 10.0.0.5:80 DELETE /admin/*`.
fn proxy_rule_name(kind: &str, route: &Route, rule: &super::route::Matcher) -> String {
    format!("proxy.{kind} {} {rule}", route.to)
}

/// Ranks entries with the same prefix and port: deny beats proxy beats allow.
fn rank(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Deny | Verdict::Killed => 2,
        Verdict::Redirect => 1,
        Verdict::Allow => 0,
    }
}

/// Turns grants into kernel entries. Where two rules have the same prefix
/// and port, deny beats proxy beats allow. Grants named in `withdrawn`
/// (expired or revoked) keep only what they refuse: their denies stay,
/// their allows go, their governed destinations become refused (rather than
/// reachable around the proxy through a wider allow), and their exec allow
/// list still makes the session one with a list, only without their files.
/// Withdrawing a grant therefore never widens what a session may do.
pub fn compile<'a>(grants: impl IntoIterator<Item = &'a Grant>, withdrawn: &BTreeSet<String>) -> SessionRules {
    let mut out = SessionRules::default();
    let mut net: BTreeMap<(u8, [u8; 16], u32, Option<u16>), NetEntry> = BTreeMap::new();
    let mut allow_patterns = Vec::new();
    let mut has_allow_list = false;
    let mut names = NameLevel::default();
    for grant in grants {
        let honoured = !withdrawn.contains(&grant.name);
        if honoured {
            out.grants.push(grant.name.clone());
        } else {
            out.withdrawn.push(grant.name.clone());
        }
        for path in &grant.exec.deny {
            match FileId::of(&path.0) {
                Ok(id) => {
                    if is_script(&path.0) {
                        out.exec_deny_scripts.push(path.0.clone());
                    }
                    out.exec_deny.push((path.0.clone(), id));
                    out.exec_deny_rules.push(RuleRef::new(&grant.name, format!("exec.deny {}", path.0.display())));
                }
                Err(_) => out.exec_deny_missing.push(path.0.clone()),
            }
        }
        has_allow_list |= !grant.exec.allow.is_empty();
        if honoured {
            allow_patterns.extend(
                grant
                    .exec
                    .allow
                    .iter()
                    .map(|pattern| (RuleRef::new(&grant.name, format!("exec.allow {pattern}")), pattern.clone())),
            );
        }
        let allows = grant.network.allow.iter().filter(|_| honoured);
        let targets = allows
            .map(|d| (d, Verdict::Allow, "allow"))
            .chain(grant.network.deny.iter().map(|d| (d, Verdict::Deny, "deny")));
        let mut entries = Vec::new();
        for (target, verdict, word) in targets {
            match target {
                NetTarget::Address(destination) => entries.push((destination, verdict, word)),
                NetTarget::Name(name) => {
                    let rule_id = out.rules.len() as u32;
                    out.rules.push(Decided::new(vec![RuleRef::new(&grant.name, format!("network.{word} {name}"))]));
                    names.rules.push(NameRule { target: name.clone(), verdict, rule_id });
                }
            }
        }
        let mut add = |out: &mut SessionRules, destination: &Destination, verdict: Verdict, rule_id: u32| {
            let (family, addr, addr_prefix) = mapped(destination);
            let key = (family, addr, addr_prefix, destination.port);
            let entry = NetEntry { family, addr, addr_prefix, port: destination.port, verdict, rule_id };
            match net.get(&key) {
                Some(existing) if rank(existing.verdict) >= rank(verdict) => {}
                _ => {
                    net.insert(key, entry);
                }
            }
            let _ = out;
        };
        for (destination, verdict, word) in entries {
            let rule_id = out.rules.len() as u32;
            out.rules.push(Decided::new(vec![RuleRef::new(&grant.name, format!("network.{word} {destination}"))]));
            add(&mut out, destination, verdict, rule_id);
        }
        for route in &grant.network.proxy {
            let rule_id = out.rules.len() as u32;
            let rule = RuleRef::new(&grant.name, format!("network.proxy {}", route.to));
            out.rules.push(Decided::new(vec![rule]));
            let verdict = if honoured {
                out.routes.insert(rule_id, Arc::new(SessionRoute::of(&grant.name, route.clone())));
                Verdict::Redirect
            } else {
                Verdict::Deny
            };
            for destination in route_destinations(&route.to, &mut out.unresolved) {
                add(&mut out, &destination, verdict, rule_id);
            }
        }
    }
    out.net = net.into_values().collect();
    let allows_all_of = |family: u8, prefix: u32| {
        out.net.iter().any(|entry| {
            entry.verdict == Verdict::Allow
                && entry.port.is_none()
                && entry.family == family
                && entry.addr_prefix == prefix
        })
    };
    names.open = super::names::Families { v4: allows_all_of(FAMILY_V4, 96), v6: allows_all_of(FAMILY_V6, 0) };
    out.names = vec![names];
    // Any grant's allow list restricts the session: the lists add up, and a
    // withdrawn grant's list still counts (with none of its files).
    if has_allow_list {
        out.exec_allow = Some(ExecAllow::resolve(vec![allow_patterns]));
    }
    out
}

fn is_script(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut start = [0u8; 2];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut start)).is_ok() && &start == b"#!"
}

/// The addresses a route covers: its prefix, or what its host name resolves
/// to now. A route on a loopback address covers all of loopback at its port
/// (127.0.0.0/8 and ::1): a server listening on a wildcard address answers
/// on every one of them, and the route must not be reachable around.
fn route_destinations(target: &RouteTarget, unresolved: &mut Vec<String>) -> Vec<Destination> {
    let with_loopback = |destinations: Vec<Destination>| -> Vec<Destination> {
        let mut out = destinations.clone();
        for d in destinations {
            if d.net.network().is_loopback() && d.port.is_some() {
                for net in ["127.0.0.0/8", "::1/128"] {
                    if let Ok(net) = net.parse() {
                        out.push(Destination { net, port: d.port });
                    }
                }
            }
        }
        out.sort_by_key(|d| (d.net.to_string(), d.port));
        out.dedup();
        out
    };
    with_loopback(match target {
        RouteTarget::Address(destination) => vec![*destination],
        RouteTarget::Host { name, port } => match (name.as_str(), *port).to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| Destination { net: ipnet::IpNet::from(a.ip()), port: Some(*port) }).collect(),
            Err(_) => {
                unresolved.push(format!("{name}:{port}"));
                Vec::new()
            }
        },
    })
}

/// A destination's family and prefix in the IPv6 space the kernel programs use.
/// The kernel entry for one resolved address of a name rule.
pub fn resolved_entry(address: IpAddr, port: Option<u16>, verdict: Verdict, rule_id: u32) -> NetEntry {
    let (family, addr, addr_prefix) = mapped(&Destination { net: ipnet::IpNet::from(address), port });
    NetEntry { family, addr, addr_prefix, port, verdict, rule_id }
}

fn mapped(destination: &Destination) -> (u8, [u8; 16], u32) {
    match destination.net.network() {
        IpAddr::V4(v4) => (FAMILY_V4, v4_mapped(v4.octets()), 96 + u32::from(destination.net.prefix_len())),
        // An IPv4-mapped prefix is an IPv4 rule: the kernel looks mapped
        // destinations up as IPv4.
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && destination.net.prefix_len() >= 96 => {
            (FAMILY_V4, v6.octets(), u32::from(destination.net.prefix_len()))
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets(), u32::from(destination.net.prefix_len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{ExecRules, NetworkRules};

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    fn grant(allow: &[&str], deny: &[&str]) -> Grant {
        let parse =
            |list: &[&str]| -> Vec<NetTarget> { list.iter().map(|d| d.parse().expect("destination")).collect() };
        Grant {
            name: "g".into(),
            identity: "i".into(),
            exec: ExecRules::default(),
            network: NetworkRules { allow: parse(allow), deny: parse(deny), proxy: Vec::new() },
            expire_unused_after: None,
        }
    }

    #[test]
    fn deny_beats_allow_for_the_same_prefix_and_port() {
        let rules = compile(
            [&grant(&["10.0.0.0/8"], &[]), &grant(&[], &["10.0.0.0/8"]), &grant(&["10.0.0.0/8"], &[])],
            &none(),
        );
        assert_eq!(rules.net.len(), 1);
        assert_eq!(rules.net[0].verdict, Verdict::Deny);
        assert_eq!(rules.net[0].addr_prefix, 104);
    }

    #[test]
    fn at_equal_prefix_deny_beats_proxy_beats_allow() {
        let route =
            |to: &str| -> Route { serde_yaml_ng::from_str(&format!("to: \"{to}\"\nprotocol: http\n")).expect("route") };
        let mut g = grant(&["127.0.0.1/32:80"], &[]);
        g.network.proxy = vec![route("127.0.0.1/32:80"), route("127.0.0.2/32:80")];
        let with_deny = grant(&[], &["127.0.0.2/32:80"]);
        let rules = compile([&g, &with_deny], &none());
        let verdict_of = |last: u8| rules.net.iter().find(|e| e.addr[15] == last).map(|e| e.verdict);
        assert_eq!(verdict_of(1), Some(Verdict::Redirect));
        assert_eq!(verdict_of(2), Some(Verdict::Deny));
        assert_eq!(rules.routes.len(), 2);
    }

    #[test]
    fn loopback_routes_cover_all_of_loopback_and_mapped_prefixes_are_ipv4() {
        let mut g = grant(&[], &["::ffff:10.0.0.0/104"]);
        g.network.proxy = vec![serde_yaml_ng::from_str("to: \"127.0.0.1/32:80\"\nprotocol: http\n").expect("route")];
        let rules = compile([&g], &none());
        let redirects: Vec<(u8, u32)> =
            rules.net.iter().filter(|e| e.verdict == Verdict::Redirect).map(|e| (e.family, e.addr_prefix)).collect();
        assert!(
            redirects.contains(&(4, 128)) && redirects.contains(&(4, 104)) && redirects.contains(&(6, 128)),
            "{redirects:?}"
        );
        let deny = rules.net.iter().find(|e| e.verdict == Verdict::Deny).expect("deny entry");
        assert_eq!((deny.family, deny.addr_prefix), (4, 104));
    }

    #[test]
    fn ipv6_rules_are_kept_apart_from_ipv4() {
        let rules = compile([&grant(&["::/0"], &[])], &none());
        assert_eq!((rules.net[0].family, rules.net[0].addr_prefix), (6, 0));
        let rules = compile([&grant(&["0.0.0.0/0"], &[])], &none());
        assert_eq!((rules.net[0].family, rules.net[0].addr_prefix), (4, 96));
    }

    #[test]
    fn port_rules_stay_apart_from_address_rules() {
        let rules = compile([&grant(&["0.0.0.0/0", "::/0"], &["169.254.169.254/32:80"])], &none());
        assert_eq!(rules.net.len(), 3);
        let port_rule = rules.net.iter().find(|e| e.port == Some(80)).expect("port rule");
        assert_eq!((port_rule.verdict, port_rule.addr_prefix), (Verdict::Deny, 128));
        assert_eq!(rules.rules[port_rule.rule_id as usize].to_string(), "g: network.deny 169.254.169.254/32:80");
    }

    #[test]
    fn missing_exec_paths_are_reported_not_dropped() {
        let mut g = grant(&[], &[]);
        g.exec.deny = vec![
            crate::policy::AbsolutePath("/bin/sh".into()),
            crate::policy::AbsolutePath("/nonexistent/tool".into()),
        ];
        let rules = compile([&g], &none());
        assert_eq!(rules.exec_deny.len(), 1);
        assert_eq!(rules.exec_deny_missing, vec![PathBuf::from("/nonexistent/tool")]);
    }
}
