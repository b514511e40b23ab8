//! The sessions' resolver. The kernel sends a session's DNS traffic (UDP
//! and TCP to port 53, whatever server it names) to a resolver of that
//! session's own, on a port of 127.0.0.1 and ::1 the session's map entry
//! names. The resolver judges each query by the session's name rules:
//! a name no rule could allow is answered REFUSED and never forwarded (so
//! DNS carries nothing out); others go to the host's resolvers, and the
//! addresses in the answer become allowed (or, for a denied name, refused)
//! for that session while the answer lives, with a floor.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::RData,
};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
};
use tollgate_common::Verdict;

use crate::{
    policy::{
        compile::{NetEntry, SessionRules, resolved_entry},
        explain::explain,
        names::{NameVerdict, judge_name},
    },
    session::{Resolvers, Sessions},
    store::{RecordKind, RecordVerdict, SessionLog},
};

/// How long the resolver waits for an upstream server.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest DNS message over UDP the resolver reads.
const MAX_UDP: usize = 4096;
/// Queries of one session answered at once; a UDP query past that is
/// dropped (the client asks again), a TCP one waits.
const IN_FLIGHT_PER_SESSION: usize = 64;

/// The resolver service: a resolver per session, and the entries their answers added.
pub struct Dns {
    me: Weak<Dns>,
    sessions: Arc<Sessions>,
    log: SessionLog,
    upstreams: Vec<SocketAddr>,
    min_ttl: Duration,
    runtime: tokio::runtime::Handle,
    running: Mutex<HashMap<u64, Vec<JoinHandle<()>>>>,
    /// Entries answers added, by session and entry, with when each expires.
    resolved: Mutex<HashMap<(u64, EntryKey), Resolved>>,
}

/// An entry an answer added.
struct Resolved {
    entry: NetEntry,
    until: Instant,
    /// The session's own entry with the same key, which a denied name's
    /// entry replaced for a while: put back when it expires.
    replaced: Option<NetEntry>,
}

type EntryKey = (u8, [u8; 16], u32, Option<u16>);

fn key_of(entry: &NetEntry) -> EntryKey {
    (entry.family, entry.addr, entry.addr_prefix, entry.port)
}

/// The servers `/etc/resolv.conf` names (port 53).
pub fn host_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|address| address.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Dns {
    /// The service; `upstreams` empty means the host's resolvers. Starts
    /// the task that removes expired entries.
    pub fn start(sessions: Arc<Sessions>, log: SessionLog, upstreams: Vec<SocketAddr>, min_ttl: Duration) -> Arc<Dns> {
        let upstreams = if upstreams.is_empty() { host_resolvers() } else { upstreams };
        if upstreams.is_empty() {
            tracing::warn!("no DNS servers (dns.upstream, /etc/resolv.conf): sessions' queries get SERVFAIL");
        }
        let dns = Arc::new_cyclic(|me| Dns {
            me: me.clone(),
            sessions,
            log,
            upstreams,
            min_ttl,
            runtime: tokio::runtime::Handle::current(),
            running: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&dns);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(dns) = weak.upgrade() else { return };
                dns.expire(Instant::now());
            }
        });
        dns
    }

    fn expire(&self, now: Instant) {
        let expired: Vec<(u64, Resolved)> = {
            let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = resolved.iter().filter(|(_, r)| r.until <= now).map(|(k, _)| *k).collect();
            keys.into_iter().filter_map(|key| resolved.remove(&key).map(|r| (key.0, r))).collect()
        };
        for (cgroup_id, resolved) in expired {
            match resolved.replaced {
                Some(own) => {
                    let _ = self.sessions.put_resolved(cgroup_id, &own);
                }
                None => self.sessions.remove_resolved(cgroup_id, &resolved.entry),
            }
        }
    }

    /// Serves one session's UDP socket.
    async fn serve_udp(self: Arc<Self>, cgroup_id: u64, socket: UdpSocket, in_flight: Arc<Semaphore>) {
        let socket = Arc::new(socket);
        let mut buffer = vec![0u8; MAX_UDP];
        loop {
            let Ok((length, from)) = socket.recv_from(&mut buffer).await else { return };
            // A session that floods its resolver loses queries, not the daemon's memory.
            let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
            let query = buffer[..length].to_vec();
            let (dns, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(answer) = dns.answer(cgroup_id, &query, false).await {
                    let _ = socket.send_to(&answer, from).await;
                }
            });
        }
    }

    /// Serves one session's TCP listener (two-byte length before each message).
    async fn serve_tcp(self: Arc<Self>, cgroup_id: u64, listener: TcpListener, in_flight: Arc<Semaphore>) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
            let dns = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                loop {
                    let Ok(length) = stream.read_u16().await else { return };
                    let mut query = vec![0u8; usize::from(length)];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(answer) = dns.answer(cgroup_id, &query, true).await else { return };
                    let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&answer);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Judges and answers one query; `None` when it cannot even be read.
    async fn answer(&self, cgroup_id: u64, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let Ok(request) = Message::from_vec(query) else {
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return Message::error_msg(id, hickory_proto::op::OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        };
        let question = request.queries().first()?.clone();
        let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let record_type = question.query_type();
        let refuse = |code: ResponseCode| {
            let mut response = request.clone();
            response.set_message_type(MessageType::Response).set_response_code(code).set_recursion_available(true);
            response.to_vec().ok()
        };
        let Some(view) = self.sessions.names_of(cgroup_id) else { return refuse(ResponseCode::Refused) };
        let verdict = judge_name(&view.levels, &name);
        let rule_name = |rule_id: u32| view.rules.get(rule_id as usize).cloned().unwrap_or_default();
        let mut detail = Map::new();
        detail.insert("name".into(), name.clone().into());
        detail.insert("type".into(), record_type.to_string().into());
        detail.insert("transport".into(), if tcp { "tcp" } else { "udp" }.into());
        if verdict == NameVerdict::Refuse {
            detail.insert("outcome".into(), "refused".into());
            tracing::info!(session = %view.session, %name, "DNS query refused: no rule could allow the name");
            self.log.decided_for(&view.session, 0, RecordKind::Dns, RecordVerdict::DENY, detail);
            return refuse(ResponseCode::Refused);
        }
        let Some(answer) = self.forward(query, tcp).await else {
            detail.insert("outcome".into(), "upstream-failed".into());
            self.log.decided_for(&view.session, 0, RecordKind::Dns, RecordVerdict::ALLOW, detail);
            return refuse(ResponseCode::ServFail);
        };
        let (addresses, ttl) = match Message::from_vec(&answer) {
            Ok(message) => addresses_of(&message),
            Err(_) => (Vec::new(), 0),
        };
        let lifetime = Duration::from_secs(u64::from(ttl)).max(self.min_ttl);
        let static_rules = SessionRules { net: view.net.clone(), ..SessionRules::default() };
        let (outcome, verdict_record, rule) = match &verdict {
            NameVerdict::Allow { ports, families } => {
                // An answer of a family some level allows only by its address rules stays theirs.
                for address in addresses.iter().filter(|address| families.admits(**address)) {
                    for (port, rule_id) in ports {
                        // An address rule of the policy (deny, proxy or allow) decides alone.
                        if explain(&static_rules, SocketAddr::new(*address, port.unwrap_or(0))).rule.is_some() {
                            continue;
                        }
                        let entry = resolved_entry(*address, *port, Verdict::Allow, *rule_id);
                        self.put(cgroup_id, entry, lifetime, &view.net);
                    }
                }
                ("allowed", RecordVerdict::ALLOW, ports.first().map(|(_, rule_id)| rule_name(*rule_id)))
            }
            NameVerdict::Deny { port, rule_id } => {
                for address in &addresses {
                    let entry = resolved_entry(*address, *port, Verdict::Deny, *rule_id);
                    self.put(cgroup_id, entry, lifetime, &view.net);
                }
                ("denied", RecordVerdict::Block, Some(rule_name(*rule_id)))
            }
            NameVerdict::Open | NameVerdict::Refuse => ("forwarded", RecordVerdict::ALLOW, None),
        };
        detail.insert("outcome".into(), outcome.into());
        detail.insert("answers".into(), json!(addresses.iter().map(ToString::to_string).collect::<Vec<_>>()));
        detail.insert("ttl".into(), ttl.into());
        if let Some(rule) = rule {
            detail.insert("rule".into(), Value::String(rule));
        }
        self.log.decided_for(&view.session, 0, RecordKind::Dns, verdict_record, detail);
        Some(answer)
    }

    /// Adds an entry until `lifetime` from now; a deny is never replaced by
    /// an allow. `own`: the session's compiled entries, one of which a
    /// denied name's entry may replace for its lifetime.
    fn put(&self, cgroup_id: u64, entry: NetEntry, lifetime: Duration, own: &[NetEntry]) {
        let key = (cgroup_id, key_of(&entry));
        let until = Instant::now() + lifetime;
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        let mut replaced = own.iter().find(|e| key_of(e) == key.1).cloned();
        if let Some(existing) = resolved.get_mut(&key) {
            if existing.entry.verdict == Verdict::Deny && entry.verdict == Verdict::Allow {
                return;
            }
            if existing.entry.verdict == entry.verdict {
                existing.until = existing.until.max(until);
                return;
            }
            replaced = existing.replaced.clone();
        }
        match self.sessions.put_resolved(cgroup_id, &entry) {
            Ok(()) => {
                resolved.insert(key, Resolved { entry, until, replaced });
            }
            Err(why) => tracing::warn!(%why, "cannot add an answered address to a session's rules"),
        }
    }

    /// Sends the query to each upstream in turn; the first answer wins.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            let asked = if tcp { forward_tcp(*upstream, query).await } else { forward_udp(*upstream, query).await };
            match asked {
                // A truncated answer over UDP: ask again over TCP, as a client would.
                Some(answer) if !tcp && answer.get(2).is_some_and(|flags| flags & 0x02 != 0) => {
                    if let Some(full) = forward_tcp(*upstream, query).await {
                        return Some(full);
                    }
                    return Some(answer);
                }
                Some(answer) => return Some(answer),
                None => continue,
            }
        }
        None
    }
}

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buffer = vec![0u8; 65535];
    let length = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buffer)).await.ok()?.ok()?;
    buffer.truncate(length);
    Some(buffer)
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.ok()?;
        let length = stream.read_u16().await.ok()?;
        let mut answer = vec![0u8; usize::from(length)];
        stream.read_exact(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await.ok()?
}

/// The A and AAAA addresses of an answer (a CNAME chain's included) and
/// the shortest TTL among them.
fn addresses_of(message: &Message) -> (Vec<IpAddr>, u32) {
    let mut addresses = Vec::new();
    let mut ttl = u32::MAX;
    for record in message.answers() {
        let address = match record.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        ttl = ttl.min(record.ttl());
        addresses.push(address);
    }
    if addresses.is_empty() {
        ttl = 0;
    }
    (addresses, ttl)
}

impl Resolvers for Dns {
    fn open(&self, cgroup_id: u64) -> Result<u16, String> {
        let me = self.me.upgrade().ok_or("the resolver is stopping")?;
        let _entered = self.runtime.enter();
        for _ in 0..16 {
            let udp4 = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let port = udp4.local_addr().map_err(|e| e.to_string())?.port();
            let Ok(tcp4) = std::net::TcpListener::bind(("127.0.0.1", port)) else { continue };
            // IPv6 where the host has it: a session's IPv6 DNS goes to ::1 on the same port.
            let v6 = (|| {
                let udp6 = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).ok()?;
                let tcp6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port)).ok()?;
                Some((udp6, tcp6))
            })();
            let mut tasks = Vec::new();
            let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_PER_SESSION));
            let mut udps = vec![udp4];
            let mut tcps = vec![tcp4];
            if let Some((udp6, tcp6)) = v6 {
                udps.push(udp6);
                tcps.push(tcp6);
            }
            for udp in udps {
                udp.set_nonblocking(true).map_err(|e| e.to_string())?;
                let socket = UdpSocket::from_std(udp).map_err(|e| e.to_string())?;
                tasks.push(self.runtime.spawn(me.clone().serve_udp(cgroup_id, socket, in_flight.clone())));
            }
            for tcp in tcps {
                tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
                let listener = TcpListener::from_std(tcp).map_err(|e| e.to_string())?;
                tasks.push(self.runtime.spawn(me.clone().serve_tcp(cgroup_id, listener, in_flight.clone())));
            }
            self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(cgroup_id, tasks);
            return Ok(port);
        }
        Err("no port free on both 127.0.0.1 and its TCP side".to_owned())
    }

    fn close(&self, cgroup_id: u64) {
        if let Some(tasks) = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&cgroup_id) {
            for task in tasks {
                task.abort();
            }
        }
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<_> = resolved.keys().filter(|(cgroup, _)| *cgroup == cgroup_id).copied().collect();
        let gone: Vec<Resolved> = keys.into_iter().filter_map(|key| resolved.remove(&key)).collect();
        drop(resolved);
        // The session is gone: nothing of it stays in the maps.
        for resolved in gone {
            self.sessions.remove_resolved(cgroup_id, &resolved.entry);
        }
    }
}

/// Resolves `name` (A and AAAA) with `upstreams`, blocking: what a session's
/// query for it would get now (for `policy explain`).
pub fn lookup(upstreams: &[SocketAddr], name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };
    let fqdn = Name::from_ascii(format!("{name}.")).map_err(|e| format!("'{name}' is not a name: {e}"))?;
    let mut found = Vec::new();
    let mut asked = false;
    for record_type in [RecordType::A, RecordType::AAAA] {
        let mut message = Message::new();
        message.set_id(rand::random()).set_recursion_desired(true).add_query(Query::query(fqdn.clone(), record_type));
        let query = message.to_vec().map_err(|e| e.to_string())?;
        for upstream in upstreams {
            let local: SocketAddr =
                if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
            let Ok(socket) = std::net::UdpSocket::bind(local) else { continue };
            let _ = socket.set_read_timeout(Some(UPSTREAM_TIMEOUT));
            if socket.send_to(&query, upstream).is_err() {
                continue;
            }
            let mut buffer = vec![0u8; 65535];
            let Ok(length) = socket.recv(&mut buffer) else { continue };
            asked = true;
            if let Ok(answer) = Message::from_vec(&buffer[..length]) {
                found.extend(addresses_of(&answer).0.into_iter().map(|ip| SocketAddr::new(ip, port)));
            }
            break;
        }
    }
    if !asked {
        return Err("no DNS server answered".to_owned());
    }
    Ok(found)
}
