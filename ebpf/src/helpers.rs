//! Helpers and constants the programs share: reading context fields and
//! loader globals, and the per-pod port exclusions.

use core::ptr::read_volatile;

use nodeward_common::PortKey;

use crate::maps::{AGENT_SOCKETS, EXCLUDED_PORTS, LOCAL_REDIRECT, NETNS_COOKIE, NODE_NETNS_COOKIE, SOCKET_MARK};

pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;
/// Return value of cgroup sock_addr programs that lets the call proceed.
pub(crate) const PROCEED: i32 = 1;

/// Fails the build unless the item's name, which the aya macros make its
/// ELF symbol, is the constant of `nodeward_common::names` the agent finds
/// it by.
macro_rules! symbol_is {
    ($item:ident, $name:expr) => {
        const _: () = {
            let _ = &$item;
            assert!(
                nodeward_common::names::same(stringify!($item), $name),
                concat!(
                    stringify!($item),
                    " differs from its name in nodeward_common::names"
                ),
            );
        };
    };
}
pub(crate) use symbol_is;

/// Reads an IPv6 address from a context field word by word.
#[inline(always)]
pub(crate) unsafe fn read_ip6(a: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            read_volatile(&a[0]),
            read_volatile(&a[1]),
            read_volatile(&a[2]),
            read_volatile(&a[3]),
        ]
    }
}

/// An IPv6 address as its 16 bytes, from the four words the kernel keeps it
/// in (each in network order), for aya-log's `{:i}`.
#[inline(always)]
pub(crate) fn ip6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = words[i].to_ne_bytes();
        b[4 * i] = w[0];
        b[4 * i + 1] = w[1];
        b[4 * i + 2] = w[2];
        b[4 * i + 3] = w[3];
        i += 1;
    }
    b
}

/// A context's `remote_port` field in host byte order. The kernel keeps it
/// in network order, in the upper half of the word on little-endian
/// (sock_ops and sk_msg alike).
#[inline(always)]
pub(crate) fn ctx_remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be)
}

/// Whether the pod-local legs are joined by `nw_local_msg` (loader global
/// `LOCAL_REDIRECT`).
#[inline(always)]
pub(crate) fn local_redirect() -> bool {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&LOCAL_REDIRECT) != 0 }
}

/// The agent's socket mark (loader global `SOCKET_MARK`).
#[inline(always)]
pub(crate) fn socket_mark() -> u32 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&SOCKET_MARK) }
}

/// Whether the socket with `cookie` is one the agent registered in
/// `AGENT_SOCKETS` for its `connect()`: the proof the mark is not.
#[inline(always)]
pub(crate) fn agent_socket(cookie: u64) -> bool {
    // SAFETY: presence test only.
    unsafe { AGENT_SOCKETS.get(&cookie).is_some() }
}

/// The node's network-namespace cookie (loader global `NODE_NETNS_COOKIE`).
#[inline(always)]
pub(crate) fn node_netns_cookie() -> u64 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&NODE_NETNS_COOKIE) }
}

/// The cookie of the pod an `nw_sk_lookup` instance serves (loader global
/// `NETNS_COOKIE`).
#[inline(always)]
pub(crate) fn netns_cookie_const() -> u64 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { read_volatile(&NETNS_COOKIE) }
}

/// Whether a pod excludes `port` from capture in `direction`.
#[inline(always)]
pub(crate) fn port_excluded(netns: u64, port: u16, direction: u8) -> bool {
    let key = PortKey {
        netns,
        port,
        direction,
        pad: [0; 5],
    };
    // SAFETY: the value is only tested for presence.
    unsafe { EXCLUDED_PORTS.get(&key).is_some() }
}
