//! Every map and loader global of the programs. Maps are pinned by name in
//! the agent's pin directory; globals are set by the loader for each load.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, SockHash},
};
use aya_log_ebpf::macro_support::{AYA_LOG_LEVEL, AYA_LOGS};
use nodeward_common::{LegKey, ListenerKey, PodInfo, PortKey, SockAddr, SockKey, names};

use crate::helpers::symbol_is;

/// Socket mark of the agent's own sockets; set by the loader.
#[unsafe(no_mangle)]
pub(crate) static SOCKET_MARK: u32 = 0;

/// Network-namespace cookie of the pod an `nw_sk_lookup` instance serves;
/// set by the loader, one program instance per pod.
#[unsafe(no_mangle)]
pub(crate) static NETNS_COOKIE: u64 = 0;

/// Network-namespace cookie of the node this agent runs for (the agent's
/// own namespace); set by the loader. The connect hooks run for every
/// socket on the host, and several nodes may share a host (the test bed),
/// so "the node's own connection" must name the namespace.
#[unsafe(no_mangle)]
pub(crate) static NODE_NETNS_COOKIE: u64 = 0;

/// 1 when the pod-local legs are joined by `nw_local_msg`
/// (`--local-redirect`); set by the loader.
#[unsafe(no_mangle)]
pub(crate) static LOCAL_REDIRECT: u32 = 0;

/// Managed pods by network-namespace cookie.
#[map]
pub(crate) static PODS: HashMap<u64, PodInfo> = HashMap::pinned(8192, 0);

/// Ports excluded from capture, per pod and direction.
#[map]
pub(crate) static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

/// Original destination of a redirected `connect()`, by socket cookie, from
/// `connect()` until the connection is established (microseconds). LRU so
/// connections that never establish cannot fill it.
#[map]
pub(crate) static PENDING: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// Original destination of an established captured connection, keyed by the
/// app's local endpoint. Not LRU: entries live exactly as long as the proxied
/// connection, and the agent removes them.
#[map]
pub(crate) static ORIG_DST: HashMap<SockKey, SockAddr> = HashMap::pinned(262144, BPF_F_NO_PREALLOC);

/// The client an app should see as its peer, keyed by the local endpoint of
/// the agent's hop into the pod and the app's port. Filed by `nw_sockops`
/// from `HOP_PEER` when the hop's `connect()` picks its port (before the
/// SYN), and removed by it when the hop closes: exactly when the kernel may
/// give the same 4-tuple to a new hop.
#[map]
pub(crate) static INBOUND_PEER: HashMap<SockKey, SockAddr> = HashMap::pinned(262144, BPF_F_NO_PREALLOC);

/// The client behind an agent hop that is about to connect, by the hop
/// socket's cookie: the agent cannot know the hop's port before
/// `connect()` picks it, so it leaves the client here. LRU so a hop that
/// never connects cannot fill it.
#[map]
pub(crate) static HOP_PEER: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// The agent's listeners, per pod and slot.
#[map]
pub(crate) static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(32768, 0);

/// Source addresses of node-local health probes: exactly the probe
/// source addresses the connect hooks bind the node's connections to.
#[map]
pub(crate) static PROBE_SOURCES: HashMap<[u32; 4], u8> = HashMap::pinned(1024, 0);

/// Addresses of this node's managed pods: the node's own connections to
/// them are bound to the probe source.
#[map]
pub(crate) static POD_ADDRS: HashMap<[u32; 4], u8> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

/// The agent's own sockets, by socket cookie, while their `connect()`
/// runs: the agent files a socket's cookie before `connect()` and removes
/// it when the call returns, and the connect hooks leave a socket alone
/// only if its mark is the agent's *and* its cookie is here. A mark is
/// something any process with `CAP_NET_RAW` can set; a cookie in this map
/// only the agent (with `CAP_BPF`) can put there. LRU so an entry the
/// agent could not remove (killed mid-call) never fills the map; an
/// entry lives for one system call, so eviction needs 16384 connects of
/// this agent within one, and an evicted socket is captured (fails closed).
#[map]
pub(crate) static AGENT_SOCKETS: LruHashMap<u64, u8> = LruHashMap::pinned(16384, 0);

/// The sockets of pod-local legs (app ↔ agent on a pod's loopback), by
/// their own 4-tuple, filed by `nw_sockops` when each end is established
/// (`--local-redirect` only). `nw_local_msg` is attached to this map, so it
/// runs for these sockets' `sendmsg()` and no other. The kernel removes a
/// socket when it closes.
#[map]
pub(crate) static LOCAL_LEGS: SockHash<LegKey> = SockHash::pinned(65536, 0);

/// Pod-local sockets that sent bytes through TCP because their peer was
/// not in `LOCAL_LEGS` yet (the first write can race the peer's
/// establishment). They stay on TCP: a later redirect would overtake the
/// bytes still queued in TCP. LRU: an entry outlives its socket; an evicted
/// one belongs, in all but the rarest case, to a closed connection.
#[map]
pub(crate) static LOCAL_TCP_ONLY: LruHashMap<LegKey, u8> = LruHashMap::pinned(65536, 0);

symbol_is!(SOCKET_MARK, names::SOCKET_MARK);
symbol_is!(LOCAL_REDIRECT, names::LOCAL_REDIRECT);
symbol_is!(LOCAL_LEGS, names::LOCAL_LEGS);
symbol_is!(LOCAL_TCP_ONLY, names::LOCAL_TCP_ONLY);
symbol_is!(NETNS_COOKIE, names::NETNS_COOKIE);
symbol_is!(NODE_NETNS_COOKIE, names::NODE_NETNS_COOKIE);
symbol_is!(PODS, names::PODS);
symbol_is!(EXCLUDED_PORTS, names::EXCLUDED_PORTS);
symbol_is!(PENDING, names::PENDING);
symbol_is!(ORIG_DST, names::ORIG_DST);
symbol_is!(INBOUND_PEER, names::INBOUND_PEER);
symbol_is!(HOP_PEER, names::HOP_PEER);
symbol_is!(LISTENERS, names::LISTENERS);
symbol_is!(PROBE_SOURCES, names::PROBE_SOURCES);
symbol_is!(POD_ADDRS, names::POD_ADDRS);
symbol_is!(AGENT_SOCKETS, names::AGENT_SOCKETS);
// aya-log's ring buffer and level, which the agent pins and sets by these names.
symbol_is!(AYA_LOGS, names::EBPF_LOG);
symbol_is!(AYA_LOG_LEVEL, names::EBPF_LOG_LEVEL);
