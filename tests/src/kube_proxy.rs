//! What kube-proxy puts in a node's `nat` table, for tests that need its
//! DNAT in front of the mesh: iptables rules inside a node's namespace.

use std::net::SocketAddr;

use crate::netns::nsenter;

/// Runs `iptables -t nat ARGS` in `netns`, failing the test on error.
pub fn nat(netns: &str, args: &[&str]) {
    let out = nsenter(netns, &[&["iptables", "-t", "nat"], args].concat())
        .output()
        .expect("run iptables");
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kube-proxy's DNAT of TCP to `dst` onto `to`, in each of `chains`
/// (`PREROUTING` for forwarded traffic, `OUTPUT` for the node's own).
pub fn dnat(netns: &str, dst: SocketAddr, to: SocketAddr, chains: &[&str]) {
    let (ip, port, to) = (dst.ip().to_string(), dst.port().to_string(), to.to_string());
    for chain in chains {
        nat(
            netns,
            &[
                "-A",
                chain,
                "-p",
                "tcp",
                "-d",
                &ip,
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
        );
    }
}

/// kube-proxy's masquerade of what it DNATed (`externalTrafficPolicy:
/// Cluster`): the endpoint sees the node's address as the client.
pub fn masquerade_dnat(netns: &str) {
    nat(
        netns,
        &[
            "-A",
            "POSTROUTING",
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-j",
            "MASQUERADE",
        ],
    );
}
