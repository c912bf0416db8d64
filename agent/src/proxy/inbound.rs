//! Inbound plaintext: a connection to the pod, steered to 15006 by sk_lookup.
//!
//! sk_lookup does not rewrite packets, so the accepted socket's local
//! address *is* the original destination. The agent connects to it from
//! inside the pod (loopback delivery, which sk_lookup leaves alone) and
//! registers its hop's endpoint so the app's `accept()`/`getpeername()`
//! report the real client.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::relay::CloseReason;
use super::{Outcome, PodContext, relay_tcp, sock_addr, sock_key, socket, unmap};

/// Handles one inbound plaintext connection.
pub async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let dst = match down.local_addr() {
        Ok(a) => unmap(a),
        Err(_) => return Outcome::refused(None, CloseReason::IoError),
    };
    let client = sock_addr(unmap(peer));
    let netns = ctx.netns.cookie();
    let mut registered = None;
    let up = socket::connect_from_pod(
        &ctx.netns,
        ctx.config.socket_mark,
        Some(SocketAddr::new(dst.ip(), 0)),
        dst,
        ctx.config.connect_timeout,
        |local| {
            let key = sock_key(netns, local);
            ctx.capture.maps.inbound_peer.insert(&key, &client)?;
            registered = Some(key);
            Ok(())
        },
    )
    .await;
    let _entry = registered.map(|key| PeerEntryGuard { ctx, key });
    let up = match up {
        Ok(up) => up,
        Err(e) => {
            // The app's port is closed (or worse): the client must see a
            // reset, as it would without the mesh, not a hang.
            socket::reset(&down);
            return Outcome::refused(Some(dst), CloseReason::from_io(&e));
        }
    };
    let stats = relay_tcp(ctx, down, up).await;
    Outcome {
        dst: Some(dst),
        stats,
    }
}

/// Removes the hop's `INBOUND_PEER` entry when the handler ends.
struct PeerEntryGuard<'a> {
    ctx: &'a PodContext,
    key: nodeward_common::SockKey,
}

impl Drop for PeerEntryGuard<'_> {
    fn drop(&mut self) {
        let _ = self.ctx.capture.maps.inbound_peer.remove(&self.key);
    }
}
