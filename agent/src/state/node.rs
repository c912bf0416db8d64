//! Nodes as the agent understands them: their addresses, nothing else.

#![forbid(unsafe_code)]

use std::net::IpAddr;

/// A `v1/Node`, reduced to what Service resolution needs: a connection to
/// one of its addresses on a `nodePort` is a call to that Service. Only
/// the addresses are kept, so a Node's images and conditions never stay
/// in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Node {
    /// `metadata.name`.
    pub(crate) name: String,
    /// `status.addresses` of type `InternalIP` and `ExternalIP`, de-duplicated.
    pub(crate) addresses: Vec<IpAddr>,
}
