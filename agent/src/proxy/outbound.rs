//! Outbound: a connection an app in the pod opened, redirected to 15001.
//!
//! The sockops program recorded the original destination under the app's
//! endpoint (our peer). The entry stays while the connection lives, because
//! the app's `getpeername()` reads it too, and is removed when it closes.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::relay::CloseReason;
use super::{Outcome, PodContext, from_words, relay_tcp, sock_key, socket};

/// Handles one captured outbound connection: plaintext passthrough from the
/// pod's namespace to the original destination.
pub async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let key = sock_key(ctx.netns.cookie(), peer);
    let orig = match ctx.capture.maps.orig_dst.get(&key) {
        Ok(Some(o)) => o,
        Ok(None) | Err(_) => {
            // Without its destination the connection cannot be forwarded;
            // refusing it is the only safe answer.
            socket::reset(&down);
            return Outcome::refused(None, CloseReason::NoOriginalDestination);
        }
    };
    let _entry = MapEntryGuard { ctx, key };
    let dst = from_words(orig.addr, orig.port);
    let up = socket::connect_from_pod(
        &ctx.netns,
        ctx.config.socket_mark,
        None,
        dst,
        ctx.config.connect_timeout,
        |_| Ok(()),
    )
    .await;
    let up = match up {
        Ok(up) => up,
        Err(e) => {
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

/// Removes the connection's `ORIG_DST` entry when the handler ends.
struct MapEntryGuard<'a> {
    ctx: &'a PodContext,
    key: nodeward_common::SockKey,
}

impl Drop for MapEntryGuard<'_> {
    fn drop(&mut self) {
        let _ = self.ctx.capture.maps.orig_dst.remove(&self.key);
    }
}
