//! `nw_sk_lookup`: one instance per pod, attached to its network namespace,
//! steers every inbound TCP connection to the agent's listeners and drops
//! it when the agent is not there (fail closed); and, for pods that opt in,
//! drops inbound UDP from outside the pod.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_SK_LOOKUP_F_NO_REUSEPORT, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::warn;
use nodeward_common::{
    DIRECTION_INBOUND, LOOPBACK_IFINDEX, ListenerKey, OUTBOUND_PORT, POD_DROP_INBOUND_UDP, POD_HAS_IPV4, POD_HAS_IPV6,
    SLOT_INBOUND_V4, SLOT_INBOUND_V6, SLOT_OUTBOUND_V4, SLOT_OUTBOUND_V6, SLOT_TUNNEL_V4, SLOT_TUNNEL_V6, TUNNEL_PORT,
    is_v4_loopback, is_v4_mapped, is_v6_loopback, map_v4, names,
};

use crate::helpers::{
    AF_INET, IPPROTO_TCP, IPPROTO_UDP, ip6_bytes, netns_cookie_const, port_excluded, read_ip6, symbol_is,
};
use crate::maps::{LISTENERS, PODS, PROBE_SOURCES};

/// Every listener is bound with `SO_REUSEPORT`, so that an agent taking
/// over can bind beside the one it replaces; the socket in the map is the
/// one meant, never another of its reuseport group (which a process in
/// the pod could join by binding the same port).
const NO_REUSEPORT: u64 = BPF_SK_LOOKUP_F_NO_REUSEPORT as u64;

#[sk_lookup]
pub fn nw_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: ctx points at the kernel's bpf_sk_lookup for this lookup.
    unsafe { steer(&ctx) }
}

#[inline(always)]
unsafe fn steer(ctx: &SkLookupContext) -> u32 {
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol == IPPROTO_UDP {
        return unsafe { udp(ctx) };
    }
    if lk.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let netns = netns_cookie_const();
    let v4 = lk.family == AF_INET;
    let remote4 = unsafe { read_volatile(&lk.remote_ip4) };
    let remote6 = unsafe { read_ip6(&lk.remote_ip6) };
    let remote = if v4 { map_v4(remote4) } else { remote6 };
    // The outbound listener: the connect hooks sent the app's connection
    // to the pod's own loopback, port 15001. It is steered to the listener
    // in the outbound slot, exactly as inbound ones are to theirs, so that
    // a new agent takes over with one map update; with no listener there,
    // the connection is refused, as it was when 15001 was unbound.
    if lk.ingress_ifindex == LOOPBACK_IFINDEX && lk.local_port as u16 == OUTBOUND_PORT {
        let local4 = unsafe { read_volatile(&lk.local_ip4) };
        let local6 = unsafe { read_ip6(&lk.local_ip6) };
        let to_loopback = if v4 {
            is_v4_loopback(local4)
        } else {
            is_v6_loopback(&local6)
        };
        if to_loopback {
            let slot = if v4 { SLOT_OUTBOUND_V4 } else { SLOT_OUTBOUND_V6 };
            let key = ListenerKey { netns, slot, pad: 0 };
            return match LISTENERS.redirect_sk_lookup(ctx, key, NO_REUSEPORT) {
                Ok(()) => sk_action::SK_PASS,
                Err(_) => sk_action::SK_DROP,
            };
        }
    }
    // Never steer the pod's own traffic to itself, which includes the
    // agent's hop to the app: it comes from loopback or from one of the
    // pod's addresses (the kernel drops packets arriving from outside with
    // a local source address as martians, and a spoofed handshake could
    // not complete since the replies stay inside the pod).
    if lk.ingress_ifindex == LOOPBACK_IFINDEX || is_own_address(netns, v4, remote4, &remote6) {
        return sk_action::SK_PASS;
    }
    // The node's own connections, which the connect hooks bound to the
    // probe source; nothing else can complete a handshake from it (see
    // ARCHITECTURE.md, Decisions). Forwarded traffic from the node's
    // addresses (NodePort SNAT) is steered like any other plaintext.
    // SAFETY: presence test only.
    if unsafe { PROBE_SOURCES.get(&remote).is_some() } {
        return sk_action::SK_PASS;
    }
    let port = lk.local_port as u16;
    // Every mTLS mode is steered, DISABLE included: DISABLE means no mTLS
    // required, not no authorization, which the agent applies.
    if port != TUNNEL_PORT && port_excluded(netns, port, DIRECTION_INBOUND) {
        return sk_action::SK_PASS;
    }
    let slot = match (port == TUNNEL_PORT, v4) {
        (true, true) => SLOT_TUNNEL_V4,
        (true, false) => SLOT_TUNNEL_V6,
        (false, true) => SLOT_INBOUND_V4,
        (false, false) => SLOT_INBOUND_V6,
    };
    let key = ListenerKey { netns, slot, pad: 0 };
    match LISTENERS.redirect_sk_lookup(ctx, key, NO_REUSEPORT) {
        Ok(()) => sk_action::SK_PASS,
        // No listener: the agent is down or the pod is being set up. Never
        // let plaintext reach the app behind the agent's back.
        Err(_) => {
            if v4 {
                warn!(
                    ctx,
                    "fail closed: dropped a TCP connection from {:i} to port {} of the pod in netns {}: no agent listener",
                    u32::from_be(remote4),
                    port,
                    netns
                );
            } else {
                warn!(
                    ctx,
                    "fail closed: dropped a TCP connection from {:i} to port {} of the pod in netns {}: no agent listener",
                    ip6_bytes(&remote6),
                    port,
                    netns
                );
            }
            sk_action::SK_DROP
        }
    }
}

/// A UDP datagram's lookup: left to the kernel unless the pod asked for
/// inbound UDP from outside it to be dropped (`POD_DROP_INBOUND_UDP`,
/// from `nodeward.io/inbound-udp: drop`). The pod's own datagrams (from
/// loopback or its addresses) and excluded inbound ports still pass. The
/// kernel finds connected UDP sockets before this program runs, so the
/// replies a pod's connected client sockets wait for are never dropped
/// here; replies to an unconnected one (a resolver that `sendto`s from an
/// unconnected socket) are, which is why the drop is opt-in. Multicast and
/// broadcast never reach `sk_lookup`.
#[inline(always)]
unsafe fn udp(ctx: &SkLookupContext) -> u32 {
    let lk = unsafe { &*ctx.lookup };
    let netns = netns_cookie_const();
    // SAFETY: read-only lookup of a plain value.
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return sk_action::SK_PASS;
    };
    if pod.flags & POD_DROP_INBOUND_UDP == 0 {
        return sk_action::SK_PASS;
    }
    let v4 = lk.family == AF_INET;
    let remote4 = unsafe { read_volatile(&lk.remote_ip4) };
    let remote6 = unsafe { read_ip6(&lk.remote_ip6) };
    if lk.ingress_ifindex == LOOPBACK_IFINDEX || is_own_address(netns, v4, remote4, &remote6) {
        return sk_action::SK_PASS;
    }
    let port = lk.local_port as u16;
    if port_excluded(netns, port, DIRECTION_INBOUND) {
        return sk_action::SK_PASS;
    }
    // Not logged: anyone outside can send datagrams at any rate, and each
    // would cost the agent a log line.
    sk_action::SK_DROP
}

/// Whether a source address belongs to the pod itself (or is loopback).
#[inline(always)]
fn is_own_address(netns: u64, v4: bool, remote4: u32, remote6: &[u32; 4]) -> bool {
    if v4 {
        if is_v4_loopback(remote4) {
            return true;
        }
    } else if is_v6_loopback(remote6) {
        return true;
    }
    // SAFETY: read-only lookup of a plain value.
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return false;
    };
    if v4 {
        pod.flags & POD_HAS_IPV4 != 0 && pod.ipv4 == remote4
    } else if is_v4_mapped(remote6) {
        pod.flags & POD_HAS_IPV4 != 0 && pod.ipv4 == remote6[3]
    } else {
        pod.flags & POD_HAS_IPV6 != 0 && pod.ipv6 == *remote6
    }
}

symbol_is!(nw_sk_lookup, names::NW_SK_LOOKUP);
