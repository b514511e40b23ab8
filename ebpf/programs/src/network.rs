//! Network programs: every connect and unconnected send of a session is
//! allowed, refused or redirected to the proxy by the session's rules, and
//! socket kinds that would bypass them are refused at creation.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    macros::{cgroup_sock, cgroup_sock_addr},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockContext},
};
use tollgate_common::{
    ConnectEvent, DNS_PORT, DNS_RULE, EventKind, NET_ANY_PORT_FIXED_BITS, NET_PORT_FIXED_BITS, NO_RULE, SocketEvent,
    Verdict, family_of, loopback_for_unspecified, net_any_port_key, net_port_key, v4_mapped,
};

use crate::{
    AF_INET, AF_INET6, NET_ANY_PORT, NET_PORT, PROXY, emit, header, is_governed, redirect::redirect, session_dns_port,
    words_to_bytes,
};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, true)
}

/// Returns 1 to allow, 0 to refuse with EPERM. These programs are attached to
/// the sessions parent cgroup, so a cgroup below it with no session (one
/// being torn down, say) is refused: fail closed.
#[inline(always)]
fn decide(ctx: &SockAddrContext, ipv6: bool, send: bool) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; 4-byte
    // reads of the fields this attach type may read (v4 programs may not
    // touch user_ip6 and the reverse, so the branch is on the program, not
    // on user_family).
    let (family, protocol, port_be, addr) = unsafe {
        let addr = if ipv6 {
            words_to_bytes([(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]])
        } else {
            v4_mapped((*sa).user_ip4.to_ne_bytes())
        };
        (if ipv6 { AF_INET6 } else { AF_INET }, (*sa).protocol, (*sa).user_port as u16, addr)
    };
    let addr = loopback_for_unspecified(addr);
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(port_be);

    let (mut rule_verdict, mut rule_id) =
        if is_governed(cgroup_id) { lookup_rule(cgroup_id, port, &addr) } else { (Verdict::Deny as u32, NO_RULE) };
    let mut verdict = if rule_verdict == Verdict::Allow as u32 { Verdict::Allow } else { Verdict::Deny };
    // DNS, whatever server it names, goes to the session's resolver (UDP
    // and TCP alike): names are judged there, and nothing leaves unjudged.
    let dns_port = if port == DNS_PORT { session_dns_port(cgroup_id) } else { 0 };
    if dns_port != 0 {
        rule_id = DNS_RULE;
        rule_verdict = Verdict::Deny as u32;
        verdict = Verdict::Deny;
        if (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP)
            && redirect(ctx, ipv6, &addr, port, cgroup_id, DNS_RULE, dns_port)
        {
            verdict = Verdict::Redirect;
        }
    }
    // Only TCP connects go to the proxy; a UDP send or connect to a governed
    // destination has nowhere safe to go, so it is refused.
    if rule_verdict == Verdict::Redirect as u32 && !send && protocol == IPPROTO_TCP && dns_port == 0 {
        // SAFETY: read-only global.
        let proxy = unsafe { core::ptr::read_volatile(&PROXY) };
        if proxy.port != 0 && redirect(ctx, ipv6, &addr, port, cgroup_id, rule_id, proxy.port) {
            verdict = Verdict::Redirect;
        }
    }

    let event = ConnectEvent {
        header: header(EventKind::Connect, cgroup_id),
        uid: bpf_get_current_uid_gid() as u32,
        verdict: verdict as u32,
        family: if family == AF_INET6 { 6 } else { 4 },
        protocol,
        port: port as u32,
        send: send as u32,
        rule_id,
        reserved: 0,
        addr,
    };
    emit(cgroup_id, EventKind::Connect, &event);
    (verdict == Verdict::Allow || verdict == Verdict::Redirect) as i32
}

/// The verdict and rule id of the most specific rule for (cgroup, port,
/// address): the longer address prefix wins; at equal length the
/// port-specific rule wins. Rules with the same prefix and port were merged
/// by the agent (deny beats allow). No rule: deny.
#[inline(always)]
fn lookup_rule(cgroup_id: u64, port: u16, addr: &[u8; 16]) -> (u32, u32) {
    // IPv4 (and IPv4-mapped IPv6) destinations match only IPv4 rules.
    let family = family_of(addr);
    let any = net_any_port_key(cgroup_id, family, addr);
    let with_port = net_port_key(cgroup_id, family, port, addr);
    // Compare through references into map memory: copying Option<NetRule>
    // out lets the compiler read undefined padding, which the verifier refuses.
    let any_rule = NET_ANY_PORT.get(&Key::new(NET_ANY_PORT_FIXED_BITS + 128, any));
    let port_rule = NET_PORT.get(&Key::new(NET_PORT_FIXED_BITS + 128, with_port));
    match (any_rule, port_rule) {
        (Some(a), Some(p)) => {
            if p.addr_prefix >= a.addr_prefix {
                (p.verdict, p.rule_id)
            } else {
                (a.verdict, a.rule_id)
            }
        }
        (Some(a), None) => (a.verdict, a.rule_id),
        (None, Some(p)) => (p.verdict, p.rule_id),
        (None, None) => (Verdict::Deny as u32, NO_RULE),
    }
}

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_IP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// IPv4 and IPv6 sockets of a session are TCP or UDP (governed by the
/// programs above); raw and ICMP "ping" sockets would reach the network
/// without a connect or send those programs see. The kernel runs this hook
/// for inet sockets only; packet sockets need CAP_NET_RAW, which a session
/// has only when privileged.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context is valid for the program's run; 4-byte reads.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let inet_ok = (family == AF_INET || family == AF_INET6)
        && ((sock_type == SOCK_STREAM && (protocol == IPPROTO_IP || protocol == IPPROTO_TCP))
            || (sock_type == SOCK_DGRAM && (protocol == IPPROTO_IP || protocol == IPPROTO_UDP)));
    if inet_ok || (family != AF_INET && family != AF_INET6) {
        return 1;
    }
    // Read only for a refusal: this runs for every socket a session creates.
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let event = SocketEvent {
        header: header(EventKind::Socket, cgroup_id),
        uid: bpf_get_current_uid_gid() as u32,
        verdict: Verdict::Deny as u32,
        family,
        sock_type,
        protocol,
        reserved: 0,
    };
    emit(cgroup_id, EventKind::Socket, &event);
    0
}
