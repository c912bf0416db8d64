//! CNI hand-off of new pods: the runtime runs `nodeward-cni` (chained
//! after the plugin that gives the pod its addresses), which asks the
//! agent to capture the pod before the runtime starts it. The agent thus
//! learns each pod's namespace from the runtime, not by scanning for IPs,
//! and a pod never runs a moment uncaptured.
//!
//! `protocol.rs` is the one-line-each-way exchange, `plugin.rs` the
//! plugin's logic (its binary is `src/bin/nodeward-cni.rs`), `server.rs`
//! the agent's socket, `install.rs` what the DaemonSet's init container
//! runs (`nodeward-cni install`); the pod manager acts on requests
//! (`pods/cni.rs`).

pub mod install;
pub mod plugin;
pub(crate) mod protocol;
pub(crate) mod server;
