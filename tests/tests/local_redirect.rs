//! `--local-redirect`: the pod-local legs (app ↔ agent on each pod's
//! loopback) joined by a sock hash and `sk_msg`, so a pod's bytes reach
//! the agent, and the agent's reach the app, without the loopback TCP
//! stack. Observed from outside the agent: the bytes each pod's `lo`
//! carries while tens of megabytes cross, and what the apps receive.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use nodeward_testbed::netns::sh_out;
use nodeward_testbed::traffic::{self, Fnv, pattern, serve};
use nodeward_testbed::{Topology, TopologySpec, exclusive, privileged_or_skip};

const MIB: u64 = 1 << 20;
/// Bytes each transfer moves, each way.
const PAYLOAD: u64 = 32 * MIB;

/// Bytes received on the loopback of network namespace `netns`.
fn lo_rx_bytes(netns: &str) -> u64 {
    let out = sh_out(&["ip", "-n", netns, "-s", "-j", "link", "show", "lo"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .expect("ip -s -j link show lo has rx bytes")
}

/// Handler: sends `PAYLOAD` pattern bytes, then a line with their FNV-1a
/// checksum, then closes.
fn bulk_source(mut s: TcpStream) {
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = Fnv::default();
    for i in 0..PAYLOAD / MIB {
        pattern(i, &mut buf);
        sum.update(&buf);
        if s.write_all(&buf).is_err() {
            return;
        }
    }
    let _ = writeln!(s, "{:016x}", sum.0);
    let _ = s.shutdown(Shutdown::Write);
}

/// Reads `s` to its end. A blocking read on a socket in a sock hash can
/// fail with EAGAIN before its timeout when the socket is woken with
/// nothing to read (the kernel's `tcp_bpf_recvmsg`; see ARCHITECTURE.md,
/// "The pod-local leg without TCP", the reason the flag is off by
/// default): such a read is retried, and counted. Any other error fails.
fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, u32) {
    // A read that waited its whole timeout is a real stall, not an early
    // EAGAIN: fail then, rather than retrying for hours.
    let timeout = s.read_timeout().ok().flatten().unwrap_or(Duration::from_secs(60));
    let (mut all, mut spurious) = (Vec::new(), 0);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let started = std::time::Instant::now();
        match s.read(&mut buf) {
            Ok(0) => return (all, spurious),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && started.elapsed() < timeout / 2 => spurious += 1,
            Err(e) => panic!("read after {} bytes and {spurious} early EAGAINs: {e}", all.len()),
        }
    }
}

/// Handler: reads to the end (retrying early EAGAINs, as [`read_to_end`]),
/// then replies with the byte count and FNV-1a checksum, and closes.
fn sink(mut s: TcpStream) {
    let (all, _) = read_to_end(&mut s);
    let mut sum = Fnv::default();
    sum.update(&all);
    let _ = writeln!(s, "{} {:016x}", all.len(), sum.0);
    let _ = s.shutdown(Shutdown::Write);
}

/// Handler: sends `peer=<what accept() reported>\n`, then echoes what it
/// reads to the end, and closes.
fn peer_echo(mut s: TcpStream) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (all, _) = read_to_end(&mut s);
    let _ = writeln!(s, "peer={peer}");
    let _ = s.write_all(&all);
    let _ = s.shutdown(Shutdown::Write);
}

/// Sends `PAYLOAD` pattern bytes to a [`sink`] at `dst`,
/// half-closes, and checks the sink saw exactly them.
fn send_bulk(netns: &str, dst: std::net::SocketAddr) -> u32 {
    let mut s = traffic::connect(netns, dst).expect("connect to the checksum sink");
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = Fnv::default();
    for i in 0..PAYLOAD / MIB {
        pattern(i, &mut buf);
        sum.update(&buf);
        s.write_all(&buf).expect("write to the checksum sink");
    }
    s.shutdown(Shutdown::Write).unwrap();
    let (reply, spurious) = read_to_end(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&reply).trim(),
        format!("{PAYLOAD} {:016x}", sum.0),
        "the sink did not see the {PAYLOAD} bytes sent, whole and in order"
    );
    spurious
}

/// Reads a [`bulk_source`] to its end and checks count and checksum.
fn read_bulk(netns: &str, dst: std::net::SocketAddr) -> u32 {
    let mut s = traffic::connect(netns, dst).expect("connect to the bulk source");
    let (all, spurious) = read_to_end(&mut s);
    assert!(all.len() > PAYLOAD as usize, "only {} bytes arrived", all.len());
    let (body, tail) = all.split_at(PAYLOAD as usize);
    let mut sum = Fnv::default();
    sum.update(body);
    assert_eq!(
        String::from_utf8_lossy(tail).trim(),
        format!("{:016x}", sum.0),
        "the {PAYLOAD} bytes from the server arrived changed, reordered or cut"
    );
    spurious
}

/// Moves `PAYLOAD` from `a` to `c` and back (two connections), checking
/// every byte; returns the bytes the loopbacks of `a` and `c` received.
fn both_ways(t: &Topology) -> (u64, u64) {
    let (a, c) = (t.pod("a"), t.pod("c"));
    let (lo_a, lo_c) = (lo_rx_bytes(&a.netns), lo_rx_bytes(&c.netns));
    let spurious = send_bulk(&a.netns, c.v4(7000)) + read_bulk(&a.netns, c.v4(7001));
    eprintln!("reads that returned EAGAIN early: {spurious}");
    (lo_rx_bytes(&a.netns) - lo_a, lo_rx_bytes(&c.netns) - lo_c)
}

#[test]
fn local_redirect_moves_pod_bytes_without_loopback_tcp_and_keeps_them_whole() {
    let _g = exclusive();
    if !privileged_or_skip("local_redirect_moves_pod_bytes_without_loopback_tcp_and_keeps_them_whole") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    let c = t.pod("c").clone();
    let _sink = serve(&c.netns, c.v4(7000), sink);
    let _source = serve(&c.netns, c.v4(7001), bulk_source);
    let _echo = serve(&c.netns, c.v4(7002), peer_echo);

    // Without the flag each pod's loopback carries every byte of its leg
    // (the measurement sees the legs) ...
    let (lo_a, lo_c) = both_ways(&t);
    assert!(
        lo_a >= 2 * PAYLOAD && lo_c >= 2 * PAYLOAD,
        "without --local-redirect the pods' loopbacks received {lo_a} and {lo_c} bytes for 2 × {PAYLOAD}"
    );

    // ... with it, restarted on both nodes, the same transfers arrive whole
    // (half-close after the last redirected byte included) while the
    // loopbacks carry only handshakes, ACKs of nothing, and FINs.
    for k in 0..2 {
        t.agent_mut(k).kill();
    }
    t.start_agents_with(&["--local-redirect"]);
    let (lo_a, lo_c) = both_ways(&t);
    assert!(
        lo_a < PAYLOAD / 16 && lo_c < PAYLOAD / 16,
        "with --local-redirect the pods' loopbacks still received {lo_a} and {lo_c} bytes for 2 × {PAYLOAD}"
    );

    // The apps' view is unchanged: the server sees the real client, the
    // client the real server, through redirected legs.
    let a = t.pod("a").clone();
    let mut s = traffic::connect(&a.netns, c.v4(7002)).expect("connect to the echo server");
    let client_peer = s.peer_addr().unwrap();
    s.write_all(b"hello").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (got, _) = read_to_end(&mut s);
    let got = String::from_utf8_lossy(&got).into_owned();
    let (greeting, echo) = got.split_once('\n').expect("a greeting line");
    assert_eq!(echo, "hello", "the echo came back as {echo:?}");
    let peer = format!("peer={}:", a.ip4);
    assert!(greeting.contains(&peer), "the server saw {greeting:?}, not {peer}…");
    assert_eq!(client_peer, c.v4(7002), "the client saw its peer as {client_peer}");
    let log = t.agent(0).wait_connection(
        "outbound",
        &c.v4(7002).to_string(),
        nodeward_testbed::patience(Duration::from_secs(5)),
    );
    assert!(log.is_some(), "no access-log line for the redirected connection");
}
