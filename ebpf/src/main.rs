//! Nodeward's kernel side: bring every TCP connection of a managed pod to the
//! agent, once per connection, without touching packets.
//!
//! * `nw_connect4`/`nw_connect6` (`connect.rs`; cgroup, attached at the
//!   cgroup2 root) send a managed pod's `connect()` to the agent's outbound
//!   listener on the pod's loopback and remember where it was going; a
//!   connection the node itself opens to one of its pods is bound to the
//!   probe source address, the one source `nw_sk_lookup` lets through.
//! * `nw_sockops` (`sockops.rs`) hands that original destination to the
//!   agent when the redirected connection is established, keyed by the app's
//!   endpoint, and files the client of each agent hop into a pod under the
//!   hop's endpoint the moment `connect()` has chosen it.
//! * `nw_getpeer4`/`nw_getpeer6` (`getpeer.rs`) make `getpeername()`/
//!   `accept()` show apps the peers they would see without the mesh.
//! * `nw_getsock4`/`nw_getsock6` (`getsock.rs`) make `getsockname()` on a
//!   captured outbound socket show the pod's own address, not loopback.
//! * `nw_local_msg` (`local.rs`; attached to the `LOCAL_LEGS` sock hash,
//!   `--local-redirect` only) hands each `sendmsg()` of a pod-local leg
//!   straight to the receive queue of the socket at its other end, so the
//!   app ↔ agent bytes skip the loopback TCP stack.
//! * `nw_sk_lookup` (`sk_lookup.rs`; attached to each pod's network
//!   namespace, one instance per pod) steers every inbound TCP connection to
//!   the agent's listeners, and drops it when the agent is not there (fail
//!   closed).
//!
//! The maps and loader globals are in `maps.rs`, the helpers the programs
//! share in `helpers.rs`. Every item's name is its ELF symbol, which the
//! agent finds by the constants in `nodeward_common::names`. Every decision
//! is keyed on the network-namespace cookie, and the agent's own sockets are
//! recognised by their socket mark together with their cookie in
//! `AGENT_SOCKETS` (the mark alone any `CAP_NET_RAW` process can set).
#![no_std]
#![no_main]

mod connect;
mod getpeer;
mod getsock;
mod helpers;
mod local;
mod maps;
mod sk_lookup;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
