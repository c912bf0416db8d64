//! The plaintext probe, and the ports a pod listens on (TCP, and the UDP
//! and SCTP sockets STRICT does not cover).
//!
//! The probe runs in the node's namespace, where the connect hook binds an
//! unbound, unmarked socket headed for a pod to the probe source, which
//! `sk_lookup` lets through to the app untouched (kubelet's health checks
//! must pass under STRICT). A probe that took that path would prove
//! nothing. So the probe binds its socket itself, to the address the node
//! would use to reach the pod (asked of the routing table with a connected
//! UDP socket, which sends nothing): the connect hook leaves a socket the
//! caller bound alone, the SYN leaves from a node address, and `sk_lookup`
//! steers it to the agent like any plaintext client from outside. Marking
//! the socket with the agent's mark would skip the bind as well, but it
//! would need the agent's `--socket-mark` and could meet the node's
//! policy routing on that mark.

#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::netns::Netns;
use crate::state::workload::DatagramProtocol;

/// What became of a plaintext connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Refused: how (`reset`, `closed`, `connect refused`…).
    Refused(String),
    /// Still open after the wait, or the app answered.
    Accepted,
}

/// Connects in plaintext to `dst` from a node address and watches the
/// connection for `wait`: a reset or a close before any byte is a refusal.
pub(crate) fn plaintext(dst: SocketAddr, wait: Duration) -> io::Result<Outcome> {
    let mut stream = match connect_from_node(dst, wait) {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                // A timeout proves nothing: refusals are resets.
                io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                    Ok(Outcome::Refused(format!("connect: {e}")))
                }
                _ => Err(e),
            };
        }
    };
    stream.set_read_timeout(Some(wait))?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok(Outcome::Refused("closed before any byte".into())),
        Ok(_) => Ok(Outcome::Accepted),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(Outcome::Accepted),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(Outcome::Refused("reset".into())),
        Err(e) => Err(e),
    }
}

/// A TCP connection to `dst` from a socket bound to the node's own source
/// address for it, so the connect hook does not make it a probe (see the
/// module's doc).
pub(crate) fn connect_from_node(dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let src = source_for(dst)?;
    let domain = if dst.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&dst.into(), timeout)?;
    Ok(sock.into())
}

/// The node's source address towards `dst`, from the routing table.
pub(crate) fn source_for(dst: SocketAddr) -> io::Result<IpAddr> {
    let any = if dst.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let udp = UdpSocket::bind(SocketAddr::new(any, 0))?;
    udp.connect(dst)?;
    Ok(udp.local_addr()?.ip())
}

/// A listening TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Listener {
    /// The address it is bound to (unspecified for all).
    pub(crate) addr: IpAddr,
    /// Its port.
    pub(crate) port: u16,
}

/// The TCP sockets listening in `netns` (IPv4 and IPv6), from the kernel's
/// `/proc/thread-self/net/tcp{,6}` read from inside it; none when it
/// cannot be entered.
pub(crate) fn listeners(netns: &Netns) -> Vec<Listener> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default();
    let Ok((v4, v6)) = netns.run(|| (read("tcp"), read("tcp6"))) else {
        return Vec::new();
    };
    let mut out = parse_listeners(&v4);
    out.extend(parse_listeners(&v6));
    out
}

/// A socket waiting for datagrams (UDP) or associations (SCTP), which
/// STRICT does not cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DatagramListener {
    /// Its transport.
    pub(crate) protocol: DatagramProtocol,
    /// The address it is bound to (unspecified for all).
    pub(crate) addr: IpAddr,
    /// Its port.
    pub(crate) port: u16,
}

/// The UDP sockets bound and not connected in `netns` (from
/// `/proc/thread-self/net/udp{,6}`), and its listening SCTP endpoints
/// (`/proc/thread-self/net/sctp/eps`, present once the sctp module is
/// loaded); none when the namespace cannot be entered.
pub(crate) fn datagram_listeners(netns: &Netns) -> Vec<DatagramListener> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default();
    let Ok((v4, v6, sctp)) = netns.run(|| (read("udp"), read("udp6"), read("sctp/eps"))) else {
        return Vec::new();
    };
    let mut out = parse_udp(&v4);
    out.extend(parse_udp(&v6));
    out.extend(parse_sctp_endpoints(&sctp));
    out
}

/// `TCP_CLOSE`, the `st` of a UDP socket that is not connected.
const UDP_UNCONNECTED: &str = "07";

/// Parses `/proc/net/udp` or `udp6` into the sockets that take datagrams
/// from anyone: bound to a port and not connected (a connected socket is a
/// client, which only its peer's datagrams reach).
pub(crate) fn parse_udp(text: &str) -> Vec<DatagramListener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let remote = f.next()?;
            let state = f.next()?;
            let (_, remote_port) = remote.split_once(':')?;
            if state != UDP_UNCONNECTED || u16::from_str_radix(remote_port, 16).ok()? != 0 {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(DatagramListener {
                protocol: DatagramProtocol::Udp,
                addr: parse_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok().filter(|p| *p != 0)?,
            })
        })
        .collect()
}

/// `TCP_LISTEN` (10, decimal here) in `/proc/net/sctp/eps`'s `SST` column.
const SCTP_LISTEN: &str = "10";

/// Parses `/proc/net/sctp/eps` (`ENDPT SOCK STY SST HBKT LPORT UID INODE
/// LADDRS...`, addresses printed plainly) into its listening endpoints,
/// one per local address.
pub(crate) fn parse_sctp_endpoints(text: &str) -> Vec<DatagramListener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(state), Some(port)) = (f.get(3), f.get(5).and_then(|p| p.parse::<u16>().ok())) else {
            continue;
        };
        if *state != SCTP_LISTEN || port == 0 {
            continue;
        }
        for addr in f.iter().skip(8).filter_map(|a| a.parse::<IpAddr>().ok()) {
            out.push(DatagramListener {
                protocol: DatagramProtocol::Sctp,
                addr,
                port,
            });
        }
    }
    out
}

/// `TCP_LISTEN` in `/proc/net/tcp`'s `st` column.
const TCP_LISTEN: &str = "0A";

/// Parses `/proc/net/tcp` or `tcp6` text into its listening sockets.
pub(crate) fn parse_listeners(text: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Listener {
                addr: parse_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// The kernel prints addresses as 32-bit words in host (little-endian) order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0A02010A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0A02010A:1F90 0B02010A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(
            parse_listeners(v4),
            vec![
                Listener {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 15001
                },
                Listener {
                    addr: "10.1.2.10".parse().unwrap(),
                    port: 8080
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000A02010A:1F90 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(
            parse_listeners(v6),
            vec![
                Listener {
                    addr: "::".parse().unwrap(),
                    port: 9090
                },
                Listener {
                    addr: "::ffff:10.1.2.10".parse().unwrap(),
                    port: 8080
                },
            ]
        );
    }

    #[test]
    fn udp_sockets_taking_datagrams_from_anyone_and_sctp_listeners_are_read() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  101: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0
  102: 0A02010A:C350 0B02010A:0035 01 00000000:00000000 00:00000000 00000000     0        0 3 2 0 0
";
        let got = parse_udp(udp);
        assert_eq!(
            got.iter().map(|l| (l.addr, l.port)).collect::<Vec<_>>(),
            vec![("0.0.0.0".parse().unwrap(), 53), ("127.0.0.1".parse().unwrap(), 8080)],
            "the connected client socket (st 01, a remote port) is not a listener"
        );
        assert!(got.iter().all(|l| l.protocol == DatagramProtocol::Udp));
        let eps = " ENDPT     SOCK   STY SST HBKT LPORT   UID INODE LADDRS
ffff8881 ffff8882 1   10  29   3868  0   1234 10.1.2.10 fd00::10
ffff8883 ffff8884 2   7   30   0     0   1235 10.1.2.10
";
        assert_eq!(
            parse_sctp_endpoints(eps),
            vec![
                DatagramListener {
                    protocol: DatagramProtocol::Sctp,
                    addr: "10.1.2.10".parse().unwrap(),
                    port: 3868
                },
                DatagramListener {
                    protocol: DatagramProtocol::Sctp,
                    addr: "fd00::10".parse().unwrap(),
                    port: 3868
                },
            ]
        );
    }
}
