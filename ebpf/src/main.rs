//! Nodeward's kernel side: bring every TCP connection of a managed pod to the
//! agent, once per connection, without touching packets.
//!
//! * `nw_connect4`/`nw_connect6` (cgroup, attached at the cgroup2 root) send a
//!   managed pod's `connect()` to the agent's outbound listener on the pod's
//!   loopback and remember where it was going; a connection the node itself
//!   opens to one of its pods is bound to the probe source address, the one
//!   source `nw_sk_lookup` lets through.
//! * `nw_sockops` hands that original destination to the agent when the
//!   redirected connection is established, keyed by the app's endpoint, and
//!   files the client of each agent hop into a pod under the hop's endpoint
//!   the moment `connect()` has chosen it.
//! * `nw_getpeer4`/`nw_getpeer6` make `getpeername()`/`accept()` show apps
//!   the peers they would see without the mesh.
//! * `nw_sk_lookup` (attached to each pod's network namespace, one instance
//!   per pod) steers every inbound TCP connection to the agent's listeners,
//!   and drops it when the agent is not there (fail closed).
//!
//! Every decision is keyed on the network-namespace cookie, and the agent's
//! own sockets are recognised by their socket mark.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock, sk_action, sockaddr,
    },
    helpers::generated::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use nodeward_common::{
    DIRECTION_INBOUND, DIRECTION_OUTBOUND, LOOPBACK_IFINDEX, ListenerKey, OUTBOUND_PORT, POD_HAS_IPV4, POD_HAS_IPV6,
    PROBE_SOURCE_V4, PROBE_SOURCE_V6, PodInfo, PortKey, SLOT_INBOUND_V4, SLOT_INBOUND_V6, SLOT_TUNNEL_V4,
    SLOT_TUNNEL_V6, SockAddr, SockKey, TUNNEL_PORT, ip6_words, is_v4_loopback, is_v4_mapped, is_v6_loopback, map_v4,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Return value of cgroup sock_addr programs that lets the call proceed.
const PROCEED: i32 = 1;

/// Socket mark of the agent's own sockets; set by the loader.
#[unsafe(no_mangle)]
static SOCKET_MARK: u32 = 0;

/// Network-namespace cookie of the pod an `nw_sk_lookup` instance serves;
/// set by the loader, one program instance per pod.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

/// Network-namespace cookie of the node this agent runs for (the agent's
/// own namespace); set by the loader. The connect hooks run for every
/// socket on the host, and several nodes may share a host (the test bed),
/// so "the node's own connection" must name the namespace.
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: u64 = 0;

/// Managed pods by network-namespace cookie.
#[map]
static PODS: HashMap<u64, PodInfo> = HashMap::pinned(8192, 0);

/// Ports excluded from capture, per pod and direction.
#[map]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

/// Original destination of a redirected `connect()`, by socket cookie, from
/// `connect()` until the connection is established (microseconds). LRU so
/// connections that never establish cannot fill it.
#[map]
static PENDING: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// Original destination of an established captured connection, keyed by the
/// app's local endpoint. Not LRU: entries live exactly as long as the proxied
/// connection, and the agent removes them.
#[map]
static ORIG_DST: HashMap<SockKey, SockAddr> = HashMap::pinned(262144, BPF_F_NO_PREALLOC);

/// The client an app should see as its peer, keyed by the local endpoint of
/// the agent's hop into the pod and the app's port. Filed by `nw_sockops`
/// from `HOP_PEER` when the hop's `connect()` picks its port (before the
/// SYN), and removed by it when the hop closes: exactly when the kernel may
/// give the same 4-tuple to a new hop.
#[map]
static INBOUND_PEER: HashMap<SockKey, SockAddr> = HashMap::pinned(262144, BPF_F_NO_PREALLOC);

/// The client behind an agent hop that is about to connect, by the hop
/// socket's cookie: the agent cannot know the hop's port before
/// `connect()` picks it, so it leaves the client here. LRU so a hop that
/// never connects cannot fill it.
#[map]
static HOP_PEER: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// The agent's listeners, per pod and slot.
#[map]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(32768, 0);

/// Source addresses of node-local health probes: exactly the probe
/// source addresses the connect hooks bind the node's connections to.
#[map]
static PROBE_SOURCES: HashMap<[u32; 4], u8> = HashMap::pinned(1024, 0);

/// Addresses of this node's managed pods: the node's own connections to
/// them are bound to the probe source.
#[map]
static POD_ADDRS: HashMap<[u32; 4], u8> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

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

/// Reads an IPv6 address from a context field word by word.
#[inline(always)]
unsafe fn read_ip6(a: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&a[0]),
            read_volatile(&a[1]),
            read_volatile(&a[2]),
            read_volatile(&a[3]),
        ]
    }
}

#[inline(always)]
fn socket_mark() -> u32 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&SOCKET_MARK) }
}

#[inline(always)]
fn node_netns_cookie() -> u64 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&NODE_NETNS_COOKIE) }
}

#[inline(always)]
fn netns_cookie_const() -> u64 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&NETNS_COOKIE) }
}

#[inline(always)]
fn port_excluded(netns: u64, port: u16, direction: u8) -> bool {
    let key = PortKey {
        netns,
        port,
        direction,
        pad: [0; 5],
    };
    // SAFETY: the value is only tested for presence.
    unsafe { EXCLUDED_PORTS.get(&key).is_some() }
}

// === connect ===

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
    if unsafe { (*sk).mark } == socket_mark() {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == node_netns_cookie() {
        unsafe { bind_probe_source4(ctx, sk) };
        return;
    }
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return;
    };
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A failed insert still redirects: the agent then refuses the connection
    // for want of a destination, which fails closed.
    let _ = PENDING.insert(&cookie, &orig, 0);
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
    if unsafe { (*sk).mark } == socket_mark() {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns == node_netns_cookie() {
        unsafe { bind_probe_source6(ctx, sk) };
        return;
    }
    let Some(pod) = (unsafe { PODS.get(&netns) }) else {
        return;
    };
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A failed insert still redirects: the agent then refuses the connection
    // for want of a destination, which fails closed.
    let _ = PENDING.insert(&cookie, &orig, 0);
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
    let _ = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&mut addr as *mut SockaddrIn).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn>() as i32,
        )
    };
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
    let _ = unsafe {
        bpf_bind(
            ctx.sock_addr,
            (&mut addr as *mut SockaddrIn6).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn6>() as i32,
        )
    };
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

// === established: hand the original destination to the agent ===

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
        let _ = ORIG_DST.insert(&unsafe { local_key(ctx, 0) }, &orig, 0);
    }
}

/// An agent hop into a pod has its port and has not sent its SYN: its
/// client moves from the socket cookie to (hop endpoint, app port), and the
/// socket asks for state callbacks so the entry goes when the hop closes.
#[inline(always)]
unsafe fn file_hop_peer(ctx: &SockOpsContext) {
    if let Some(client) = take_by_cookie(ctx, &HOP_PEER) {
        // A failed insert leaves no entry; the agent checks and refuses the hop.
        let _ = INBOUND_PEER.insert(&unsafe { local_key(ctx, remote_port(ctx)) }, &client, 0);
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

// === getpeername / accept: show apps their real peers ===

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

// === inbound steering ===

#[sk_lookup]
pub fn nw_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: ctx points at the kernel's bpf_sk_lookup for this lookup.
    unsafe { steer(&ctx) }
}

#[inline(always)]
unsafe fn steer(ctx: &SkLookupContext) -> u32 {
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let netns = netns_cookie_const();
    let v4 = lk.family == AF_INET;
    let remote4 = unsafe { read_volatile(&lk.remote_ip4) };
    let remote6 = unsafe { read_ip6(&lk.remote_ip6) };
    let remote = if v4 { map_v4(remote4) } else { remote6 };
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
    match LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => sk_action::SK_PASS,
        // No listener: the agent is down or the pod is being set up. Never
        // let plaintext reach the app behind the agent's back.
        Err(_) => sk_action::SK_DROP,
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
