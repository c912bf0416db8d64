//! How the agent writes addresses and endpoints into the eBPF maps, next to
//! the maps themselves: 16-byte addresses with IPv4 mapped into IPv6
//! (network-order words, as the kernel programs read them), so one key type
//! serves every socket family.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use nodeward_common::{SockAddr, SockKey, map_v4};

/// The key the eBPF maps use for an endpoint in a pod: `app_port` is the
/// app port of a hop (`INBOUND_PEER`), 0 for an app's own endpoint
/// (`ORIG_DST`).
pub(crate) fn sock_key(netns: u64, a: SocketAddr, app_port: u16) -> SockKey {
    SockKey {
        netns,
        addr: ip_words(a.ip()),
        port: a.port(),
        app_port,
        pad: [0; 4],
    }
}

/// The map form of a socket address.
pub(crate) fn sock_addr(a: SocketAddr) -> SockAddr {
    SockAddr {
        addr: ip_words(a.ip()),
        port: a.port(),
        pad: [0; 6],
    }
}

/// Map words of an address: IPv4 mapped into IPv6, network-order words.
pub(crate) fn ip_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => map_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => map_v4(u32::from_ne_bytes(v4.octets())),
            None => {
                let o = v6.octets();
                std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
            }
        },
    }
}

/// The socket address for map words and a port.
pub(crate) fn from_words(words: [u32; 4], port: u16) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_words() {
        for a in ["10.1.2.3:80", "[fd00::1:2]:443", "127.0.0.1:15001"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(from_words(ip_words(a.ip()), a.port()), a);
        }
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        assert_eq!(from_words(ip_words(mapped.ip()), 5), "10.0.0.1:5".parse().unwrap());
        // The kernel's network-order word for 10.0.0.1 is the octets in memory order.
        assert_eq!(
            ip_words("10.0.0.1".parse().unwrap())[3],
            u32::from_ne_bytes([10, 0, 0, 1])
        );
    }
}
