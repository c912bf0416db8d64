//! `nw_sockops`: hands a redirected connection's original destination to
//! the agent once it is established, and files the client of each agent hop
//! into a pod while the hop connects, removing it when the hop closes.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    maps::LruHashMap,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use nodeward_common::{OUTBOUND_PORT, SockAddr, SockKey, map_v4, names};

use crate::helpers::{AF_INET, read_ip6, symbol_is};
use crate::maps::{HOP_PEER, INBOUND_PEER, ORIG_DST, PENDING, PODS};

#[sock_ops]
pub fn nw_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: ctx is the kernel's bpf_sock_ops for this callback.
        unsafe { publish_orig_dst(&ctx) };
    } else if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: as above.
        unsafe { file_hop_peer(&ctx) };
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // Only hops ask for state callbacks (see `file_hop_peer`).
        // SAFETY: as above.
        let _ = INBOUND_PEER.remove(&unsafe { local_key(&ctx, remote_port(&ctx)) });
    }
    1
}

/// A redirected app connection is established: its original destination
/// moves from the socket cookie to the app's endpoint.
#[inline(always)]
unsafe fn publish_orig_dst(ctx: &SockOpsContext) {
    if let Some(orig) = take_by_cookie(ctx, &PENDING) {
        let key = unsafe { local_key(ctx, 0) };
        if let Err(e) = ORIG_DST.insert(&key, &orig, 0) {
            error!(
                ctx,
                "capture: ORIG_DST insert failed (error {}) for the connection from port {}: the agent will refuse it",
                e,
                key.port
            );
        }
    } else if remote_port(ctx) == OUTBOUND_PORT {
        // A pod's connection to the agent's outbound listener with no
        // original destination: evicted from PENDING, or the app dialled
        // the listener itself. Only this port's connections pay the lookup.
        // SAFETY: the helper only reads the socket behind the kernel's context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: presence test only.
        if unsafe { PODS.get(&netns) }.is_some() {
            error!(
                ctx,
                "capture: a connection to the agent's outbound listener from port {} of the pod in netns {} has no original destination: the agent will refuse it",
                ctx.local_port(),
                netns
            );
        }
    }
}

/// An agent hop into a pod has its port and has not sent its SYN: its
/// client moves from the socket cookie to (hop endpoint, app port), and the
/// socket asks for state callbacks so the entry goes when the hop closes.
#[inline(always)]
unsafe fn file_hop_peer(ctx: &SockOpsContext) {
    if let Some(client) = take_by_cookie(ctx, &HOP_PEER) {
        // A failed insert leaves no entry; the agent checks and refuses the hop.
        let key = unsafe { local_key(ctx, remote_port(ctx)) };
        if let Err(e) = INBOUND_PEER.insert(&key, &client, 0) {
            error!(
                ctx,
                "capture: INBOUND_PEER insert failed (error {}) for the agent's hop to port {}: the agent will refuse it",
                e,
                key.app_port
            );
        }
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// Removes and returns this socket's entry of a cookie-keyed map.
#[inline(always)]
fn take_by_cookie(ctx: &SockOpsContext, map: &LruHashMap<u64, SockAddr>) -> Option<SockAddr> {
    // SAFETY: the helper only reads the socket behind the kernel's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let value = *unsafe { map.get(&cookie) }?;
    let _ = map.remove(&cookie);
    Some(value)
}

/// The remote port of a sock_ops socket, host byte order. The kernel keeps
/// it in network order, in the upper half of the word on little-endian.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let raw = ctx.remote_port();
    let be = if raw > 0xffff { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be)
}

/// The socket's local endpoint in its namespace, with `app_port`.
#[inline(always)]
unsafe fn local_key(ctx: &SockOpsContext, app_port: u16) -> SockKey {
    // Read both forms unconditionally: a branch-selected context offset is
    // something the verifier refuses.
    let ops = unsafe { &*ctx.ops };
    let ip4 = unsafe { read_volatile(&ops.local_ip4) };
    let ip6 = unsafe { read_ip6(&ops.local_ip6) };
    let addr = if unsafe { read_volatile(&ops.family) } == AF_INET {
        map_v4(ip4)
    } else {
        ip6
    };
    SockKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port: ctx.local_port() as u16,
        app_port,
        pad: [0; 4],
    }
}

symbol_is!(nw_sockops, names::NW_SOCKOPS);
