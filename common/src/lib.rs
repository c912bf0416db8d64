//! Types shared by Nodeward's eBPF programs and its agent.
//!
//! Every map key and value the two sides exchange is defined here, once, as a
//! `#[repr(C)]` struct with explicit padding, so the kernel and userspace can
//! never disagree on a layout. Addresses are always stored as 16 bytes: IPv4
//! as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one key type serves
//! `AF_INET` sockets, `AF_INET6` sockets and IPv4-mapped sockets alike.
#![no_std]

/// Port of the outbound capture listener; `connect()` of a managed pod is
/// redirected to it on loopback.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the inbound plaintext listener; every inbound connection to a
/// managed pod, on any port but the tunnel port, is steered to it.
pub const INBOUND_PORT: u16 = 15006;
/// Port of the inbound HBONE tunnel listener.
pub const TUNNEL_PORT: u16 = 15008;

/// Loopback interface index; it is 1 in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `PortKey::direction` for ports excluded from outbound capture.
pub const DIRECTION_OUTBOUND: u8 = 1;
/// `PortKey::direction` for ports excluded from inbound capture.
pub const DIRECTION_INBOUND: u8 = 2;

/// Source address the node's own connections to its pods are bound to
/// (kubelet probes), host byte order: 169.254.7.127, Istio ambient's choice.
/// Link-local, so no pod or remote host owns it, and local to the node, so
/// a pod's reply always comes back to the node.
pub const PROBE_SOURCE_V4: u32 = 0xa9fe_077f;
/// IPv6 counterpart of [`PROBE_SOURCE_V4`]:
/// `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`, Istio ambient's choice.
pub const PROBE_SOURCE_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

/// Listener slots per pod in the `LISTENERS` sock hash.
pub const SLOT_INBOUND_V4: u32 = 0;
/// See [`SLOT_INBOUND_V4`].
pub const SLOT_INBOUND_V6: u32 = 1;
/// See [`SLOT_INBOUND_V4`].
pub const SLOT_TUNNEL_V4: u32 = 2;
/// See [`SLOT_INBOUND_V4`].
pub const SLOT_TUNNEL_V6: u32 = 3;
/// The outbound listener (15001 on the pod's loopback), steered by
/// `sk_lookup` like the inbound ones, so that a new agent's listener takes
/// over from an old one's in one map update (see ARCHITECTURE.md, upgrades).
pub const SLOT_OUTBOUND_V4: u32 = 4;
/// See [`SLOT_OUTBOUND_V4`].
pub const SLOT_OUTBOUND_V6: u32 = 5;

/// `PodInfo::flags`: the pod has an IPv4 address in `ipv4`.
pub const POD_HAS_IPV4: u32 = 1;
/// `PodInfo::flags`: the pod has an IPv6 address in `ipv6`.
pub const POD_HAS_IPV6: u32 = 2;
/// `PodInfo::flags`: `nw_sk_lookup` drops inbound UDP from outside the pod
/// (`nodeward.io/inbound-udp: drop`), excluded inbound ports aside.
pub const POD_DROP_INBOUND_UDP: u32 = 4;

/// Names of the kernel programs, maps and loader globals: the ELF symbols
/// the eBPF object defines (each item's own name) and the agent looks up,
/// overrides and pins by. Kept here once so the two sides cannot drift; the
/// eBPF build checks each item against its constant, and an agent unit test
/// checks each constant against the embedded object.
pub mod names {
    /// Program: `connect()` of IPv4 sockets (cgroup `connect4`).
    pub const NW_CONNECT4: &str = "nw_connect4";
    /// Program: `connect()` of IPv6 sockets (cgroup `connect6`).
    pub const NW_CONNECT6: &str = "nw_connect6";
    /// Program: established and hop connect/close callbacks (cgroup `sock_ops`).
    pub const NW_SOCKOPS: &str = "nw_sockops";
    /// Program: `getpeername()`/`accept()` of IPv4 sockets.
    pub const NW_GETPEER4: &str = "nw_getpeer4";
    /// Program: `getpeername()`/`accept()` of IPv6 sockets.
    pub const NW_GETPEER6: &str = "nw_getpeer6";
    /// Program: `getsockname()` of IPv4 sockets.
    pub const NW_GETSOCK4: &str = "nw_getsock4";
    /// Program: `getsockname()` of IPv6 sockets.
    pub const NW_GETSOCK6: &str = "nw_getsock6";
    /// Program: inbound steering, one instance per pod (`sk_lookup`).
    pub const NW_SK_LOOKUP: &str = "nw_sk_lookup";

    /// Map: managed pods by network-namespace cookie.
    pub const PODS: &str = "PODS";
    /// Map: ports excluded from capture, per pod and direction.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// Map: original destination by socket cookie, until established.
    pub const PENDING: &str = "PENDING";
    /// Map: original destination by the app's endpoint.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Map: the client an app sees, by agent hop endpoint and app port.
    pub const INBOUND_PEER: &str = "INBOUND_PEER";
    /// Map: the client of a hop about to connect, by hop socket cookie.
    pub const HOP_PEER: &str = "HOP_PEER";
    /// Map: the agent's listeners, per pod and slot.
    pub const LISTENERS: &str = "LISTENERS";
    /// Map: the probe source addresses.
    pub const PROBE_SOURCES: &str = "PROBE_SOURCES";
    /// Map: addresses of this node's managed pods.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// Map: cookies of the agent's own sockets while they `connect()`.
    pub const AGENT_SOCKETS: &str = "AGENT_SOCKETS";

    /// Loader global: socket mark of the agent's own sockets.
    pub const SOCKET_MARK: &str = "SOCKET_MARK";
    /// Loader global: network-namespace cookie of an `nw_sk_lookup` instance's pod.
    pub const NETNS_COOKIE: &str = "NETNS_COOKIE";
    /// Loader global: network-namespace cookie of the node.
    pub const NODE_NETNS_COOKIE: &str = "NODE_NETNS_COOKIE";
    /// Loader global: 1 when the pod-local legs are joined by sk_msg
    /// (`--local-redirect`), so `nw_sockops` files them in `LOCAL_LEGS`.
    pub const LOCAL_REDIRECT: &str = "LOCAL_REDIRECT";
    /// Program: moves a pod-local leg's bytes straight to its peer socket.
    pub const NW_LOCAL_MSG: &str = "nw_local_msg";
    /// Map: the sockets of pod-local legs (sock hash), by their 4-tuple.
    pub const LOCAL_LEGS: &str = "LOCAL_LEGS";
    /// Map: pod-local sockets that once sent through TCP, and so stay on it.
    pub const LOCAL_TCP_ONLY: &str = "LOCAL_TCP_ONLY";
    /// Map: the programs' log records (aya-log's ring buffer, pinned so
    /// every program instance writes to the one the agent reads).
    pub const EBPF_LOG: &str = "AYA_LOGS";
    /// Loader global: the most verbose aya-log level the programs record
    /// (0: none, so the verifier prunes every log call).
    pub const EBPF_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

    /// Every program, for checks that each is in the object.
    pub const PROGRAMS: &[&str] = &[
        NW_CONNECT4,
        NW_CONNECT6,
        NW_SOCKOPS,
        NW_GETPEER4,
        NW_GETPEER6,
        NW_GETSOCK4,
        NW_GETSOCK6,
        NW_SK_LOOKUP,
        NW_LOCAL_MSG,
    ];
    /// Every map, for checks that each is in the object.
    pub const MAPS: &[&str] = &[
        PODS,
        EXCLUDED_PORTS,
        PENDING,
        ORIG_DST,
        INBOUND_PEER,
        HOP_PEER,
        LISTENERS,
        PROBE_SOURCES,
        POD_ADDRS,
        AGENT_SOCKETS,
        LOCAL_LEGS,
        LOCAL_TCP_ONLY,
        EBPF_LOG,
    ];
    /// Every loader global, for checks that each is in the object.
    pub const GLOBALS: &[&str] = &[
        SOCKET_MARK,
        NETNS_COOKIE,
        NODE_NETNS_COOKIE,
        LOCAL_REDIRECT,
        EBPF_LOG_LEVEL,
    ];

    /// Whether two names are equal, in a `const` context (the eBPF build
    /// asserts each item's name with it).
    pub const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// A managed pod, keyed in `PODS` by its network-namespace cookie.
///
/// The pod's own addresses let `connect()` leave connections to the pod
/// itself alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// IPv4 address, network byte order as the kernel stores it.
    pub ipv4: u32,
    /// `POD_HAS_*` bits.
    pub flags: u32,
    /// IPv6 address, four network-order words as in `bpf_sock_addr`.
    pub ipv6: [u32; 4],
}

/// One socket endpoint inside one network namespace.
///
/// Keys `ORIG_DST` (the app's local endpoint of a captured outbound
/// connection) and `INBOUND_PEER` (the agent's local endpoint of its hop to
/// the app, plus the app's port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network-namespace cookie.
    pub netns: u64,
    /// Address, IPv4 mapped into IPv6, network-order words.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// `INBOUND_PEER`: the app port the hop connects to, host byte order,
    /// since `connect()` may give hops to different app ports the same
    /// local port. 0 in `ORIG_DST`.
    pub app_port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub pad: [u8; 4],
}

/// One TCP socket of a pod-local leg (app ↔ agent on a pod's loopback),
/// by its own 4-tuple in its namespace: `LOCAL_LEGS` and `LOCAL_TCP_ONLY`.
///
/// A sender's peer is the entry whose local and remote ends are the
/// sender's swapped, in the sender's namespace, so a redirect can only
/// ever reach the other end of the same connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LegKey {
    /// Network-namespace cookie.
    pub netns: u64,
    /// Local address, IPv4 mapped into IPv6, network-order words.
    pub local: [u32; 4],
    /// Remote address, same form.
    pub remote: [u32; 4],
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// Explicit padding.
    pub pad: [u8; 4],
}

/// A socket address as the kernel hands it to sock_addr programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    /// Address, IPv4 mapped into IPv6, network-order words.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding.
    pub pad: [u8; 6],
}

/// A port of a pod excluded from capture in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Network-namespace cookie of the pod.
    pub netns: u64,
    /// Port, host byte order.
    pub port: u16,
    /// `DIRECTION_OUTBOUND` or `DIRECTION_INBOUND`.
    pub direction: u8,
    /// Explicit padding.
    pub pad: [u8; 5],
}

/// A listener slot of a pod in the `LISTENERS` sock hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Network-namespace cookie of the pod.
    pub netns: u64,
    /// One of the `SLOT_*` constants.
    pub slot: u32,
    /// Explicit padding.
    pub pad: u32,
}

/// Maps an IPv4 address (network-order word) into the IPv6 form used in keys.
#[inline(always)]
pub const fn map_v4(addr_be: u32) -> [u32; 4] {
    [0, 0, u32::to_be(0xffff), addr_be]
}

/// True when a 16-byte address is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::to_be(0xffff)
}

/// True for IPv4 loopback, 127.0.0.0/8, given a network-order word.
#[inline(always)]
pub const fn is_v4_loopback(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

/// A 16-byte address as the four network-order words keys use.
#[inline(always)]
pub const fn ip6_words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// True for the IPv6 loopback address `::1`.
#[inline(always)]
pub const fn is_v6_loopback(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::to_be(1)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type below is #[repr(C)], made only of integers, and has
    // explicit padding fields, so any bit pattern is valid and none is
    // uninitialised.
    unsafe impl aya::Pod for super::PodInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LegKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<PodInfo>(), 24);
        assert_eq!(core::mem::size_of::<SockKey>(), 32);
        assert_eq!(core::mem::size_of::<SockAddr>(), 24);
        assert_eq!(core::mem::size_of::<PortKey>(), 16);
        assert_eq!(core::mem::size_of::<ListenerKey>(), 16);
        assert_eq!(core::mem::size_of::<LegKey>(), 48);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let a = u32::to_be(0x0a000102);
        let m = map_v4(a);
        assert!(is_v4_mapped(&m));
        assert_eq!(m[3], a);
        assert!(is_v4_loopback(u32::to_be(0x7f000001)));
        assert!(!is_v4_loopback(a));
        assert!(is_v6_loopback(&[0, 0, 0, u32::to_be(1)]));
        let mut lo = [0u8; 16];
        lo[15] = 1;
        assert!(is_v6_loopback(&ip6_words(&lo)));
        assert_eq!(ip6_words(&PROBE_SOURCE_V6)[0], u32::to_be(0xfd16_9254));
    }
}
