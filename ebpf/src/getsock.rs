//! `nw_getsock4`/`nw_getsock6`: `getsockname()` on a captured outbound
//! socket shows the pod's own address, as it would without the mesh, instead
//! of the loopback endpoint the redirect gave it. The port stays the
//! socket's own: it is the one the app's socket really has, and the agent's
//! upstream connection (another socket, another port) is not the app's.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use nodeward_common::{POD_HAS_IPV4, POD_HAS_IPV6, PodInfo, SockKey, is_v4_mapped, map_v4, names};

use crate::helpers::{AF_INET, AF_INET6, PROCEED, SOCK_STREAM, read_ip6, socket_mark, symbol_is};
use crate::maps::{ORIG_DST, PODS};

#[cgroup_sock_addr(getsockname4)]
pub fn nw_getsock4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe {
        if let Some((pod, _)) = captured_pod(&ctx, AF_INET)
            && pod.flags & POD_HAS_IPV4 != 0
        {
            (*ctx.sock_addr).user_ip4 = pod.ipv4;
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getsockname6)]
pub fn nw_getsock6(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx points at the kernel's bpf_sock_addr for this call.
    unsafe {
        if let Some((pod, local)) = captured_pod(&ctx, AF_INET6) {
            let sa = &mut *ctx.sock_addr;
            if is_v4_mapped(&local) {
                // An IPv4-mapped socket: show the pod's IPv4 address, mapped.
                if pod.flags & POD_HAS_IPV4 != 0 {
                    let mapped = map_v4(pod.ipv4);
                    sa.user_ip6[0] = mapped[0];
                    sa.user_ip6[1] = mapped[1];
                    sa.user_ip6[2] = mapped[2];
                    sa.user_ip6[3] = mapped[3];
                }
            } else if pod.flags & POD_HAS_IPV6 != 0 {
                sa.user_ip6[0] = pod.ipv6[0];
                sa.user_ip6[1] = pod.ipv6[1];
                sa.user_ip6[2] = pod.ipv6[2];
                sa.user_ip6[3] = pod.ipv6[3];
            }
        }
    }
    PROCEED
}

/// The pod and the socket's local address, if this is a managed pod's
/// captured outbound socket (its endpoint is in `ORIG_DST`).
#[inline(always)]
unsafe fn captured_pod(ctx: &SockAddrContext, family: u32) -> Option<(PodInfo, [u32; 4])> {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if unsafe { (*sk).mark } == socket_mark() {
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let pod = *unsafe { PODS.get(&netns) }?;
    let src4 = unsafe { read_volatile(&(*sk).src_ip4) };
    let src6 = unsafe { read_ip6(&(*sk).src_ip6) };
    let local = if family == AF_INET { map_v4(src4) } else { src6 };
    let key = SockKey {
        netns,
        addr: local,
        port: unsafe { (*sk).src_port } as u16,
        app_port: 0,
        pad: [0; 4],
    };
    unsafe { ORIG_DST.get(&key) }?;
    Some((pod, local))
}

symbol_is!(nw_getsock4, names::NW_GETSOCK4);
symbol_is!(nw_getsock6, names::NW_GETSOCK6);
