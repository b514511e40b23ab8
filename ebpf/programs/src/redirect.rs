//! Governed connections: a redirected connect saves where it was going
//! (by socket cookie), sockops re-keys that by the connection's addresses
//! once established so the proxy can find it, and getpeername shows the
//! application the peer it asked for.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, generated::bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use tollgate_common::{ConnectionKey, DNS_RULE, OriginalDst, is_v4_mapped, v4_mapped};

use crate::{AF_INET6, ORIGINAL_BY_CONNECTION, ORIGINAL_BY_COOKIE, session_dns_port, words_to_bytes};

/// Saves where the socket was going and points it at the proxy instead.
/// Returns false (and the connect is refused) if the socket has no cookie slot.
#[inline(always)]
pub(crate) fn redirect(
    ctx: &SockAddrContext,
    ipv6: bool,
    addr: &[u8; 16],
    port: u16,
    cgroup_id: u64,
    rule_id: u32,
    proxy_port: u32,
) -> bool {
    // SAFETY: the context is a socket address context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    let original = OriginalDst { addr: *addr, cgroup_id, port: port as u32, rule_id, pid, reserved: 0 };
    if ORIGINAL_BY_COOKIE.insert(&cookie, &original, 0).is_err() {
        return false;
    }
    let sa = ctx.sock_addr;
    let proxy_port_be = (proxy_port as u16).to_be() as u32;
    // SAFETY: writes to the fields this attach type may write.
    unsafe {
        if ipv6 {
            if is_v4_mapped(addr) {
                // ::ffff:127.0.0.1, so a dual-stack socket stays on IPv4.
                (*sa).user_ip6 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])];
            } else {
                (*sa).user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
            }
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        }
        (*sa).user_port = proxy_port_be;
    }
    true
}

/// Once a redirected connection is established, keys its original
/// destination by the addresses the proxy will see on accept.
#[sock_ops]
pub fn track_established(ctx: SockOpsContext) -> u32 {
    const ACTIVE_ESTABLISHED: u32 = 4;
    let ops = ctx.ops;
    // Read every context field up front, straight from the context pointer:
    // the verifier refuses context reads through a pointer the compiler has
    // offset and kept in a register.
    // SAFETY: the context is valid for the program's run; 4-byte reads.
    let (op, family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).op),
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
            core::ptr::read_volatile(&(*ops).remote_port),
        )
    };
    if op != ACTIVE_ESTABLISHED {
        return 1;
    }
    // SAFETY: a sock_ops context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before any other map call.
    let Some(original) = (unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    // local_port is in host order. remote_port is in network order, and
    // little-endian kernels put it in the upper 16 bits (the kernel shifts
    // the be16 left by 16); take whichever half holds it.
    let remote_be = if remote_port >> 16 != 0 { (remote_port >> 16) as u16 } else { remote_port as u16 };
    let mut key = ConnectionKey {
        peer: [0; 16],
        local: [0; 16],
        peer_port: local_port,
        local_port: u16::from_be(remote_be) as u32,
    };
    if family == AF_INET6 {
        key.peer = words_to_bytes(local_ip6);
        key.local = words_to_bytes(remote_ip6);
    } else {
        key.peer = v4_mapped(local_ip4.to_ne_bytes());
        key.local = v4_mapped(remote_ip4.to_ne_bytes());
    }
    let _ = ORIGINAL_BY_CONNECTION.insert(&key, &original, 0);
    1
}

/// The application sees the peer it asked for, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    1
}

/// DNS answers from the session's resolver read as coming from the server
/// the query was sent to (resolvers ignore answers from anyone else).
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, true);
    1
}

#[inline(always)]
fn restore_dns_source(ctx: &SockAddrContext, ipv6: bool) {
    // SAFETY: a socket address context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(original) = (unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    if original.rule_id != DNS_RULE {
        return;
    }
    // SAFETY: no arguments; a 4-byte read of the context.
    let (cgroup_id, port_be) = unsafe { (bpf_get_current_cgroup_id(), (*ctx.sock_addr).user_port as u16) };
    // Only what the resolver sent: its port is the session's.
    if u32::from(u16::from_be(port_be)) != session_dns_port(cgroup_id) {
        return;
    }
    write_original(ctx, ipv6, &original);
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, ipv6: bool) {
    // SAFETY: a socket address context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(original) = (unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    write_original(ctx, ipv6, &original);
}

/// Writes `original` as the context's address and port.
#[inline(always)]
fn write_original(ctx: &SockAddrContext, ipv6: bool, original: &OriginalDst) {
    let a = original.addr;
    let sa = ctx.sock_addr;
    // SAFETY: writes to the fields this attach type may write.
    unsafe {
        if ipv6 {
            (*sa).user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        }
        (*sa).user_port = (original.port as u16).to_be() as u32;
    }
}
