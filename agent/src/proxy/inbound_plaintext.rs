//! Inbound plaintext: a connection to the pod, steered to 15006 by sk_lookup.
//!
//! sk_lookup does not rewrite packets, so the accepted socket's local
//! address *is* the original destination. The agent connects to it from
//! inside the pod (loopback delivery, which sk_lookup leaves alone) and
//! files its hop's endpoint (`hop`) so the app's `accept()`/`getpeername()`
//! report the real client.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::hop::{close_reason, connect_app};
use super::relay::{TcpLeg, relay};
use super::report::{Opened, Outcome, log_audits};
use super::{PodContext, socket, unmap};
use crate::outcome::{CloseReason, Direction, Refusal, Transport};
use crate::policy::ConnInfo;
use crate::policy::model::Mode;

/// Handles one inbound plaintext connection: refused on a STRICT port,
/// otherwise authorized without a principal (PERMISSIVE), then relayed.
pub(crate) async fn handle(ctx: &PodContext, down: TcpStream, peer: SocketAddr) -> Outcome {
    let dst = match down.local_addr() {
        Ok(a) => unmap(a),
        Err(_) => return Outcome::refused(None, CloseReason::IoError),
    };
    if dst.ip().is_loopback() {
        // Only an app inside the pod can reach the listener by its loopback
        // address (sk_lookup hands over outside traffic with the pod's IP as
        // local address); relaying it would dial this listener again.
        socket::reset(&down);
        return Outcome::refused(Some(dst), CloseReason::LoopRefused);
    }
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
        let mut o =
            Outcome::refused(Some(dst), CloseReason::PolicyDenied).refusal(Some(Refusal::Policy(decision.reason)));
        o.policy = decision.policy;
        return o;
    }
    let open = ctx.mesh.open.register_conn(&ctx.pod.key, info, &ctx.cancel);
    let up = match connect_app(ctx, dst, client).await {
        Ok(c) => c,
        Err(e) => {
            // The app's port is closed (or worse): the client must see a
            // reset, as it would without the mesh, not a hang.
            socket::reset(&down);
            return Outcome::refused(Some(dst), close_reason(&e));
        }
    };
    let size = ctx.config.relay.buffer_size;
    let (mut down, mut up) = (TcpLeg::new(down, size), TcpLeg::new(up, size));
    let opened = Opened::count(ctx, Direction::Inbound, client, dst, Transport::Plaintext, None, None)
        .allowed_by(decision.policy);
    let stats = relay(ctx, &mut down, &mut up, &open.cancel, || open.cut_by()).await;
    Outcome::relayed(opened, stats)
}
