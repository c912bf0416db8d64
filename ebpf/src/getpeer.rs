//! `nw_getpeer4`/`nw_getpeer6`: `getpeername()` and `accept()` show apps
//! the peers they would see without the mesh (the original destination of a
//! captured connection, the client behind an agent hop).

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use nodeward_common::{SockAddr, SockKey, is_v4_loopback, is_v4_mapped, is_v6_loopback, map_v4, names};

use crate::helpers::{AF_INET, AF_INET6, PROCEED, SOCK_STREAM, read_ip6, socket_mark, symbol_is};
use crate::maps::{INBOUND_PEER, ORIG_DST, PODS};

#[cgroup_sock_addr(getpeername4)]
pub fn nw_getpeer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe {
        if let Some(peer) = real_peer(&ctx, AF_INET) {
            let sa = &mut *ctx.sock_addr;
            if is_v4_mapped(&peer.addr) {
                sa.user_ip4 = peer.addr[3];
                sa.user_port = u32::from(peer.port.to_be());
            }
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn nw_getpeer6(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe {
        if let Some(peer) = real_peer(&ctx, AF_INET6) {
            let sa = &mut *ctx.sock_addr;
            sa.user_ip6[0] = peer.addr[0];
            sa.user_ip6[1] = peer.addr[1];
            sa.user_ip6[2] = peer.addr[2];
            sa.user_ip6[3] = peer.addr[3];
            sa.user_port = u32::from(peer.port.to_be());
        }
    }
    PROCEED
}

/// The peer an app socket would have without the mesh, if it differs.
#[inline(always)]
unsafe fn real_peer(ctx: &SockAddrContext, family: u32) -> Option<SockAddr> {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if unsafe { (*sk).mark } == socket_mark() {
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { PODS.get(&netns) }?;
    // Outbound: the app's own endpoint names its captured connection.
    let src4 = unsafe { read_volatile(&(*sk).src_ip4) };
    let src6 = unsafe { read_ip6(&(*sk).src_ip6) };
    let local = if family == AF_INET { map_v4(src4) } else { src6 };
    let local_port = unsafe { (*sk).src_port } as u16;
    let key = SockKey {
        netns,
        addr: local,
        port: local_port,
        app_port: 0,
        pad: [0; 4],
    };
    if let Some(orig) = unsafe { ORIG_DST.get(&key) } {
        return Some(*orig);
    }
    // Inbound: the peer is the agent's hop; show the client behind it. Hops
    // only connect to the pod's own address, never to loopback, so the
    // pod's loopback connections are never mistaken for one.
    if (is_v4_mapped(&local) && is_v4_loopback(local[3])) || is_v6_loopback(&local) {
        return None;
    }
    let peer = if family == AF_INET {
        map_v4(unsafe { read_volatile(&sa.user_ip4) })
    } else {
        unsafe { read_ip6(&sa.user_ip6) }
    };
    let key = SockKey {
        netns,
        addr: peer,
        port: u16::from_be(sa.user_port as u16),
        app_port: local_port,
        pad: [0; 4],
    };
    unsafe { INBOUND_PEER.get(&key) }.copied()
}

symbol_is!(nw_getpeer4, names::NW_GETPEER4);
symbol_is!(nw_getpeer6, names::NW_GETPEER6);
