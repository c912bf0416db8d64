//! `nw_sockops`: hands a redirected connection's original destination to
//! the agent once it is established, and files the client of each agent hop
//! into a pod while the hop connects, removing it when the hop closes.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    maps::LruHashMap,
    programs::SockOpsContext,
};
use aya_log_ebpf::error;
use nodeward_common::{LegKey, OUTBOUND_PORT, SockAddr, SockKey, map_v4, names};

use crate::helpers::{AF_INET, ctx_remote_port, local_redirect, read_ip6, symbol_is};
use crate::maps::{HOP_PEER, INBOUND_PEER, LOCAL_LEGS, ORIG_DST, PENDING, PODS};

#[sock_ops]
pub fn nw_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: ctx is the kernel's bpf_sock_ops for this callback.
        let captured = unsafe { publish_orig_dst(&ctx) };
        if local_redirect() {
            // SAFETY: as above.
            unsafe { file_active_leg(&ctx, captured) };
        }
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        if local_redirect() {
            // SAFETY: as above.
            unsafe { file_passive_leg(&ctx) };
        }
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
/// moves from the socket cookie to the app's endpoint. Returns whether the
/// socket is such a connection.
#[inline(always)]
unsafe fn publish_orig_dst(ctx: &SockOpsContext) -> bool {
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
        return true;
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
    false
}

/// The active end of a pod-local leg is established: the app's captured
/// connection to the agent's outbound listener, or the agent's hop into a
/// pod (its client is on file under its endpoint). Either is filed.
#[inline(always)]
unsafe fn file_active_leg(ctx: &SockOpsContext, captured: bool) {
    // SAFETY: presence test only; the key reads the kernel's context.
    if captured || unsafe { INBOUND_PEER.get(&local_key(ctx, remote_port(ctx))) }.is_some() {
        unsafe { file_leg(ctx) };
    }
}

/// The passive end of a pod-local leg is established: the agent's accepted
/// socket of a captured app connection (the app's endpoint has an original
/// destination), or the app's accepted socket of an agent hop (the hop's
/// endpoint has a client on file). Only a managed pod's sockets pay the
/// lookups.
#[inline(always)]
unsafe fn file_passive_leg(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket behind the kernel's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: presence test only.
    if unsafe { PODS.get(&netns) }.is_none() {
        return;
    }
    let peer = unsafe { remote_key(ctx, netns, 0) };
    let hop = unsafe { remote_key(ctx, netns, ctx.local_port() as u16) };
    // SAFETY: presence tests only.
    if unsafe { ORIG_DST.get(&peer) }.is_some() || unsafe { INBOUND_PEER.get(&hop) }.is_some() {
        unsafe { file_leg(ctx) };
    }
}

/// Files this socket in `LOCAL_LEGS` under its own 4-tuple. A socket that
/// cannot be filed (map full) stays on TCP, where its peer's bytes find it.
#[inline(always)]
unsafe fn file_leg(ctx: &SockOpsContext) {
    let local = unsafe { local_key(ctx, 0) };
    let remote = unsafe { remote_key(ctx, local.netns, 0) };
    let mut key = LegKey {
        netns: local.netns,
        local: local.addr,
        remote: remote.addr,
        local_port: local.port,
        remote_port: remote.port,
        pad: [0; 4],
    };
    // SAFETY: the kernel's bpf_sock_ops of an established socket.
    if let Err(e) = LOCAL_LEGS.update(&mut key, unsafe { &mut *ctx.ops }, 0) {
        error!(
            ctx,
            "capture: LOCAL_LEGS insert failed (error {}) for the pod-local socket on port {}: it stays on TCP",
            e,
            key.local_port
        );
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

/// The remote port of a sock_ops socket, host byte order.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    ctx_remote_port(ctx.remote_port())
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

/// The socket's remote endpoint in namespace `netns`, with `app_port`.
#[inline(always)]
unsafe fn remote_key(ctx: &SockOpsContext, netns: u64, app_port: u16) -> SockKey {
    // Both forms read unconditionally, as in `local_key`.
    let ops = unsafe { &*ctx.ops };
    let ip4 = unsafe { read_volatile(&ops.remote_ip4) };
    let ip6 = unsafe { read_ip6(&ops.remote_ip6) };
    let addr = if unsafe { read_volatile(&ops.family) } == AF_INET {
        map_v4(ip4)
    } else {
        ip6
    };
    SockKey {
        netns,
        addr,
        port: remote_port(ctx),
        app_port,
        pad: [0; 4],
    }
}

symbol_is!(nw_sockops, names::NW_SOCKOPS);
