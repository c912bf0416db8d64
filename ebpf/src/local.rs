//! `nw_local_msg`: joins the two sockets of a pod-local leg (the app's and
//! the agent's, both on the pod's loopback) so that what one sends lands in
//! the other's receive queue without the loopback TCP stack
//! (`--local-redirect`).
//!
//! It runs for every `sendmsg()` of a socket in `LOCAL_LEGS`, and only
//! those: the sockets `nw_sockops` filed. The target is looked up by the
//! sender's own 4-tuple swapped, in the sender's namespace, so it can only
//! be the other end of the same connection. When that end is not filed
//! (not established yet, or closed) the bytes go through TCP as they would
//! without the program, and the sender stays on TCP from then on
//! (`LOCAL_TCP_ONLY`), so nothing it sends later can overtake them.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use nodeward_common::{LegKey, map_v4, names};

use crate::helpers::{AF_INET, read_ip6, symbol_is};
use crate::maps::{LOCAL_LEGS, LOCAL_TCP_ONLY};

#[sk_msg]
pub fn nw_local_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: ctx is the kernel's sk_msg_md for this call.
    let me = unsafe { own_key(&ctx) };
    // SAFETY: presence test only.
    if unsafe { LOCAL_TCP_ONLY.get(&me) }.is_some() {
        return SK_PASS;
    }
    let mut peer = LegKey {
        netns: me.netns,
        local: me.remote,
        remote: me.local,
        local_port: me.remote_port,
        remote_port: me.local_port,
        pad: [0; 4],
    };
    // SK_PASS with the redirect set when the peer is filed; otherwise no
    // redirect is set, and returning SK_PASS sends through TCP.
    if LOCAL_LEGS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        let _ = LOCAL_TCP_ONLY.insert(&me, &1, 0);
    }
    SK_PASS
}

/// The sending socket's own 4-tuple in its namespace.
#[inline(always)]
unsafe fn own_key(ctx: &SkMsgContext) -> LegKey {
    let md = unsafe { &*ctx.msg };
    // Read both forms unconditionally: a branch-selected context offset is
    // something the verifier refuses.
    let (l4, r4) = (md.local_ip4, md.remote_ip4);
    let (l6, r6) = unsafe { (read_ip6(&md.local_ip6), read_ip6(&md.remote_ip6)) };
    let (local, remote) = if md.family == AF_INET {
        (map_v4(l4), map_v4(r4))
    } else {
        (l6, r6)
    };
    LegKey {
        // SAFETY: the helper only reads the socket behind the kernel's context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port: md.local_port as u16,
        remote_port: crate::helpers::ctx_remote_port(md.remote_port),
        pad: [0; 4],
    }
}

symbol_is!(nw_local_msg, names::NW_LOCAL_MSG);
