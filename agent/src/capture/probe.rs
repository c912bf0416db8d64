//! The probe source: the one address the node's own connections to its pods
//! come from, and the only source `nw_sk_lookup` lets past the agent.
//!
//! The connect hooks bind every TCP connection the node's namespace opens
//! to one of its managed pods to `169.254.7.127` (IPv4) or
//! `fd16:9254:7127:1337:ffff:ffff:ffff:ffff` (IPv6), Istio ambient's
//! addresses. For that `bind` to succeed the addresses must be local to
//! the node, so the agent adds them to the node's `lo` (`/32`, `/128`),
//! where they also receive the pods' replies (a pod answers through its
//! default route to the node). They are never removed: the pinned programs
//! keep binding to them while the agent is down.
//!
//! One `RTM_NEWADDR` per address is all the netlink this needs, so it is
//! written here on `libc` (already a dependency) rather than pulling in a
//! netlink crate family whose API changes between minor versions.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nodeward_common::{PROBE_SOURCE_V4, PROBE_SOURCE_V6, names};

use super::BpfMap;
use super::keys::ip_words;

/// The IPv4 probe source, 169.254.7.127.
pub(crate) const PROBE_V4: Ipv4Addr = Ipv4Addr::from_bits(PROBE_SOURCE_V4);
/// The IPv6 probe source, `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`.
pub(crate) const PROBE_V6: Ipv6Addr = Ipv6Addr::from_octets(PROBE_SOURCE_V6);

/// Why the probe source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The address could not be added to the node's loopback interface.
    #[error("adding probe source {addr} to the node's lo: {source}")]
    Address {
        /// The address.
        addr: IpAddr,
        /// Why (netlink's errno).
        source: io::Error,
    },
    /// `PROBE_SOURCES` could not be brought to exactly the probe sources.
    #[error("eBPF map {map}: {0}", map = names::PROBE_SOURCES)]
    Map(io::Error),
}

/// Puts the probe source addresses on the node's `lo` (idempotent) and
/// makes `PROBE_SOURCES` hold exactly them: entries of earlier versions
/// (the node's own addresses) are removed, so traffic the node forwards
/// from its addresses is no longer exempt.
pub(crate) fn install(map: &BpfMap<[u32; 4], u8>) -> Result<(), ProbeError> {
    let sources = [IpAddr::V4(PROBE_V4), IpAddr::V6(PROBE_V6)];
    for addr in sources {
        add_to_loopback(addr).map_err(|source| ProbeError::Address { addr, source })?;
    }
    let want: Vec<[u32; 4]> = sources.iter().map(|a| ip_words(*a)).collect();
    for old in map.keys().map_err(ProbeError::Map)? {
        if !want.contains(&old) {
            map.remove(&old).map_err(ProbeError::Map)?;
        }
    }
    for w in &want {
        map.insert(w, &1).map_err(ProbeError::Map)?;
    }
    Ok(())
}

const NLMSG_HDR_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTA_HDR_LEN: usize = 4;
const RTM_NEWADDR: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

/// Adds `addr` as a host address (`/32`, `/128`) to `lo` of the calling
/// thread's namespace; an address already there is success.
fn add_to_loopback(addr: IpAddr) -> io::Result<()> {
    // SAFETY: the name is a valid NUL-terminated string.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::last_os_error());
    }
    let request = new_addr_message(addr, lo);
    // SAFETY: plain socket creation; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: buffer and address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    match ack_errno(&reply[..n as usize]) {
        Some(0) => Ok(()),
        Some(e) if -e == libc::EEXIST => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        None => Err(io::Error::other("unexpected netlink reply to RTM_NEWADDR")),
    }
}

/// `RTM_NEWADDR` for `addr` as a host address on interface `index`,
/// asking for an acknowledgement and failing (`EEXIST`) rather than
/// changing an address that is already there.
fn new_addr_message(addr: IpAddr, index: u32) -> Vec<u8> {
    let (family, prefix, flags, bytes): (u8, u8, u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, 0, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, IFA_F_NODAD, a.octets().to_vec()),
    };
    let attr_len = RTA_HDR_LEN + bytes.len();
    let total = NLMSG_HDR_LEN + IFADDRMSG_LEN + 2 * attr_len;
    let request_flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
    m.extend_from_slice(&request_flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    m.extend_from_slice(&[family, prefix, flags, 0]); // scope 0: universe
    m.extend_from_slice(&index.to_ne_bytes());
    for kind in [IFA_LOCAL, IFA_ADDRESS] {
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&bytes);
    }
    m
}

/// The errno of a netlink acknowledgement (0 for success, negative for an
/// error), or `None` if the reply is not one.
fn ack_errno(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(
        reply.get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_sources_are_istios() {
        assert_eq!(PROBE_V4, "169.254.7.127".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            PROBE_V6,
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ip_words(IpAddr::V6(PROBE_V6)),
            nodeward_common::ip6_words(&PROBE_SOURCE_V6)
        );
    }

    #[test]
    fn new_addr_messages_are_laid_out_as_netlink_expects() {
        let m = new_addr_message(IpAddr::V4(PROBE_V4), 1);
        assert_eq!(m.len(), 16 + 8 + 2 * 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 32, 0, 0]);
        assert_eq!(&m[28..32], &[169, 254, 7, 127]);
        let m = new_addr_message(IpAddr::V6(PROBE_V6), 1);
        assert_eq!(m.len(), 16 + 8 + 2 * 20);
        assert_eq!(m[17], 128);
    }

    #[test]
    fn acknowledgements_are_read_and_anything_else_is_not_one() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(-libc::EEXIST));
        assert_eq!(ack_errno(&ack[..10]), None);
        ack[4..6].copy_from_slice(&RTM_NEWADDR.to_ne_bytes());
        assert_eq!(ack_errno(&ack), None);
    }
}
