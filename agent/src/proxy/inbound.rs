//! Inbound plaintext: a connection to the pod, steered to 15006 by sk_lookup.
//!
//! sk_lookup does not rewrite packets, so the accepted socket's local
//! address *is* the original destination. The agent connects to it from
//! inside the pod (loopback delivery, which sk_lookup leaves alone) and
//! registers its hop's endpoint so the app's `accept()`/`getpeername()`
//! report the real client. The tunnel listener reuses [`connect_app`].

use std::io;
use std::net::SocketAddr;

use nodeward_common::SockKey;
use tokio::net::TcpStream;

use super::relay::CloseReason;
use super::{Outcome, PodContext, log_audits, relay_tcp, sock_addr, sock_key, socket, unmap};
use crate::policy::ConnInfo;
use crate::policy::model::Mode;

/// Handles one inbound plaintext connection: refused on a STRICT port,
/// otherwise authorized without a principal (PERMISSIVE), then relayed.
pub async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let dst = match down.local_addr() {
        Ok(a) => unmap(a),
        Err(_) => return Outcome::refused(None, CloseReason::IoError),
    };
    let client = unmap(peer);
    let snap = ctx.mesh.store.current();
    let Some(pod) = snap.pods.get(&ctx.pod.key).cloned() else {
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::PodRemoved);
    };
    if snap.mtls(&pod).mode(dst.port()) == Mode::Strict {
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::MtlsStrict);
    }
    let info = ConnInfo {
        src_ip: client.ip(),
        src_identity: None,
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let decision = snap.authorize(&pod, &info);
    log_audits(ctx, &info, &decision);
    if !decision.allowed {
        socket::reset(&down);
        let mut o = Outcome::refused(Some(dst), CloseReason::PolicyDenied);
        o.refusal = Some(decision.reason);
        o.policy = decision.policy;
        return o;
    }
    let live = ctx.live.register(info, &ctx.cancel);
    let (up, _entry) = match connect_app(ctx, dst, client).await {
        Ok(c) => c,
        Err(e) => {
            // The app's port is closed (or worse): the client must see a
            // reset, as it would without the mesh, not a hang.
            socket::reset(&down);
            return Outcome::refused(Some(dst), CloseReason::from_io(&e));
        }
    };
    let mut stats = relay_tcp(ctx, down, up, &live.cancel).await;
    if live.closed_by_policy() {
        stats.reason = Some(CloseReason::PolicyChanged);
    }
    Outcome::relayed(dst, stats, "plaintext")
}

/// Connects to the app at `dst` from inside the pod, so that the app sees
/// `client` as its peer. The guard removes that registration when dropped.
pub async fn connect_app<'a>(
    ctx: &'a PodContext,
    dst: SocketAddr,
    client: SocketAddr,
) -> io::Result<(TcpStream, PeerEntryGuard<'a>)> {
    let netns = ctx.netns.cookie();
    let client = sock_addr(client);
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
    let guard = PeerEntryGuard { ctx, key: registered };
    up.map(|up| (up, guard))
}

/// Removes the hop's `INBOUND_PEER` entry when the connection ends.
pub struct PeerEntryGuard<'a> {
    ctx: &'a PodContext,
    key: Option<SockKey>,
}

impl Drop for PeerEntryGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            let _ = self.ctx.capture.maps.inbound_peer.remove(key);
        }
    }
}
