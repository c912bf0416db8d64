//! `nw_connect4`/`nw_connect6`: a managed pod's `connect()` goes to the
//! agent's outbound listener on the pod's loopback, its original destination
//! kept in `PENDING`; the node's own connections to its pods are bound to
//! the probe source. The agent's own sockets are left alone when they carry
//! its mark and their cookie is in `AGENT_SOCKETS` (the mark alone is
//! settable by any process with `CAP_NET_RAW`).

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, sockaddr},
    helpers::generated::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{error, warn};
use nodeward_common::{
    DIRECTION_OUTBOUND, OUTBOUND_PORT, POD_HAS_IPV4, POD_HAS_IPV6, PROBE_SOURCE_V4, PROBE_SOURCE_V6, SockAddr,
    ip6_words, is_v4_loopback, is_v4_mapped, is_v6_loopback, map_v4, names,
};

use crate::helpers::{
    AF_INET, AF_INET6, PROCEED, SOCK_STREAM, agent_socket, ip6_bytes, node_netns_cookie, port_excluded, read_ip6,
    socket_mark, symbol_is,
};
use crate::maps::{PENDING, POD_ADDRS, PODS};

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sock_addr(connect4)]
pub fn nw_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe { connect4(&ctx) };
    PROCEED
}

#[inline(always)]
unsafe fn connect4(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let marked = unsafe { (*sk).mark } == socket_mark();
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == node_netns_cookie() {
        // In the node's namespace the mark only opts out of the probe
        // source, an exemption: anyone may decline it.
        if !marked {
            unsafe { bind_probe_source4(ctx, sk) };
        }
        return;
    }
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if marked && agent_socket(cookie) {
        return;
    }
    let dst = sa.user_ip4;
    if is_v4_loopback(dst) || (pod.flags & POD_HAS_IPV4 != 0 && dst == pod.ipv4) {
        return;
    }
    let port = u16::from_be(sa.user_port as u16);
    if port_excluded(netns, port, DIRECTION_OUTBOUND) {
        return;
    }
    let orig = SockAddr {
        addr: map_v4(dst),
        port,
        pad: [0; 6],
    };
    // A failed insert still redirects: the agent then refuses the connection
    // for want of a destination, which fails closed.
    if let Err(e) = PENDING.insert(&cookie, &orig, 0) {
        error!(
            ctx,
            "capture: no PENDING entry for a connect() to {:i}:{} (error {}): the agent will refuse it",
            u32::from_be(dst),
            port,
            e
        );
    }
    sa.user_ip4 = u32::to_be(0x7f00_0001);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
}

#[cgroup_sock_addr(connect6)]
pub fn nw_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe { connect6(&ctx) };
    PROCEED
}

#[inline(always)]
unsafe fn connect6(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let marked = unsafe { (*sk).mark } == socket_mark();
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == node_netns_cookie() {
        // In the node's namespace the mark only opts out of the probe
        // source, an exemption: anyone may decline it.
        if !marked {
            unsafe { bind_probe_source6(ctx, sk) };
        }
        return;
    }
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if marked && agent_socket(cookie) {
        return;
    }
    let dst = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let mapped = is_v4_mapped(&dst);
    if mapped {
        if is_v4_loopback(dst[3]) || (pod.flags & POD_HAS_IPV4 != 0 && dst[3] == pod.ipv4) {
            return;
        }
    } else if is_v6_loopback(&dst) || (pod.flags & POD_HAS_IPV6 != 0 && dst == pod.ipv6) {
        return;
    }
    let port = u16::from_be(sa.user_port as u16);
    if port_excluded(netns, port, DIRECTION_OUTBOUND) {
        return;
    }
    let orig = SockAddr {
        addr: dst,
        port,
        pad: [0; 6],
    };
    // A failed insert still redirects: the agent then refuses the connection
    // for want of a destination, which fails closed.
    if let Err(e) = PENDING.insert(&cookie, &orig, 0) {
        error!(
            ctx,
            "capture: no PENDING entry for a connect() to [{:i}]:{} (error {}): the agent will refuse it",
            ip6_bytes(&dst),
            port,
            e
        );
    }
    let lo = if mapped {
        map_v4(u32::to_be(0x7f00_0001))
    } else {
        [0, 0, 0, u32::to_be(1)]
    };
    sa.user_ip6[0] = lo[0];
    sa.user_ip6[1] = lo[1];
    sa.user_ip6[2] = lo[2];
    sa.user_ip6[3] = lo[3];
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
}

/// A TCP `connect()` in the node's namespace to one of this node's pods
/// (IPv4 socket): bind it to the probe source, unless the caller bound it.
#[inline(always)]
unsafe fn bind_probe_source4(ctx: &SockAddrContext, sk: *mut bpf_sock) {
    let sa = unsafe { &*ctx.sock_addr };
    // SAFETY: presence test only.
    if unsafe { POD_ADDRS.get(&map_v4(sa.user_ip4)) }.is_none() || unsafe { bound(sk, false) } {
        return;
    }
    let mut addr = SockaddrIn {
        family: AF_INET as u16,
        port: 0,
        addr: u32::to_be(PROBE_SOURCE_V4),
        zero: [0; 8],
    };
    // A failed bind (the address is missing from the node) leaves the node's
    // own address as source, which sk_lookup treats as any plaintext client.
    let ret = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&mut addr as *mut SockaddrIn).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn>() as i32,
        )
    };
    if ret != 0 {
        warn!(
            ctx,
            "probe source: bind failed (error {}); the node's connection to {:i} leaves from its own address",
            ret,
            u32::from_be(sa.user_ip4)
        );
    }
}

/// [`bind_probe_source4`] for IPv6 sockets, IPv4-mapped destinations
/// included (bound to the mapped IPv4 probe source).
#[inline(always)]
unsafe fn bind_probe_source6(ctx: &SockAddrContext, sk: *mut bpf_sock) {
    let sa = unsafe { &*ctx.sock_addr };
    let dst = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    // SAFETY: presence test only.
    if unsafe { POD_ADDRS.get(&dst) }.is_none() || unsafe { bound(sk, true) } {
        return;
    }
    let source = if is_v4_mapped(&dst) {
        map_v4(u32::to_be(PROBE_SOURCE_V4))
    } else {
        ip6_words(&PROBE_SOURCE_V6)
    };
    let mut addr = SockaddrIn6 {
        family: AF_INET6 as u16,
        port: 0,
        flowinfo: 0,
        addr: source,
        scope_id: 0,
    };
    // As for IPv4, a failed bind fails closed.
    let ret = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&mut addr as *mut SockaddrIn6).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn6>() as i32,
        )
    };
    if ret != 0 {
        warn!(
            ctx,
            "probe source: bind failed (error {}); the node's connection to {:i} leaves from its own address",
            ret,
            ip6_bytes(&dst)
        );
    }
}

/// Whether the application bound the socket itself (an address, or a port):
/// its choice stands, and the connection is then not a probe.
#[inline(always)]
unsafe fn bound(sk: *mut bpf_sock, v6: bool) -> bool {
    let ip4 = unsafe { read_volatile(&(*sk).src_ip4) };
    let ip6 = unsafe { read_ip6(&(*sk).src_ip6) };
    let port = unsafe { read_volatile(&(*sk).src_port) };
    let addr = if v6 { ip6 != [0; 4] } else { ip4 != 0 };
    addr || port != 0
}

symbol_is!(nw_connect4, names::NW_CONNECT4);
symbol_is!(nw_connect6, names::NW_CONNECT6);
