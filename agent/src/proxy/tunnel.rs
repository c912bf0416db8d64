//! The HBONE listener on 15008.
//!
//! sk_lookup already steers 15008 here so the port is owned by the agent in
//! every managed pod. Terminating HBONE (mTLS + HTTP/2 CONNECT) needs the
//! workload identities of the identity issue; until then every connection is
//! refused with a reset, which is what a client of a pod without a tunnel
//! endpoint must see.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::relay::CloseReason;
use super::{Outcome, PodContext, socket, unmap};

/// Refuses a tunnel connection.
pub async fn handle(_ctx: &PodContext, down: TcpStream, _peer: SocketAddr) -> Outcome {
    let dst = down.local_addr().ok().map(unmap);
    socket::reset(&down);
    Outcome::refused(dst, CloseReason::Unsupported)
}
