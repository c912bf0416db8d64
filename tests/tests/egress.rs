//! Traffic leaving the mesh: under `nodeward.io/egress: tls-only` a pod's
//! connection to a destination outside the mesh passes only if it starts
//! with a TLS ClientHello (which reaches the server untouched) or is
//! allow-listed; plaintext is refused, logged and counted. Real agents,
//! real sockets, real TLS; the outside server is pod `d` of the `plain`
//! namespace, which is not enrolled.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nodeward_testbed::traffic::{self, info_echo, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const EGRESS: &str = "nodeward.io/egress";
const SERVER_NAME: &str = "outside.example";

/// The two-node cluster with node 1's pods `a`, `b` and `e` annotated as
/// given (`None`: no annotation), and the agents started with the flags
/// `flags` makes from the built topology (its addresses).
fn cluster(test: &str, [a, b, e]: [Option<&str>; 3], flags: impl FnOnce(&Topology) -> Vec<String>) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let pod = |name: &str, mode: Option<&str>| match mode {
        Some(m) => PodSpec::new(name, "mesh").annotation(EGRESS, m),
        None => PodSpec::new(name, "mesh"),
    };
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0] = vec![pod("a", a), pod("b", b), pod("e", e)];
    let mut t = Topology::build(spec);
    let flags = flags(&t);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    t.start_agents_with(&flags);
    Some(t)
}

/// The outside server's certificate and key, made once.
fn cert() -> &'static rcgen::CertifiedKey<rcgen::KeyPair> {
    static CERT: OnceLock<rcgen::CertifiedKey<rcgen::KeyPair>> = OnceLock::new();
    CERT.get_or_init(|| rcgen::generate_simple_self_signed(vec![SERVER_NAME.into()]).unwrap())
}

/// Handler: terminates TLS with the self-signed certificate, reads one
/// line and answers `tls peer=<accept()'s peer> got=<line>`.
fn tls_echo(s: TcpStream) {
    let c = cert();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(nodeward::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![c.cert.der().clone()], key)
        .unwrap();
    let peer = s
        .peer_addr()
        .map(|a| a.ip().to_canonical().to_string())
        .unwrap_or_default();
    let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut line = String::new();
    if BufReader::new(&mut tls).read_line(&mut line).is_err() {
        return;
    }
    let _ = write!(tls, "tls peer={peer} got={line}");
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// Speaks TLS from `netns` to `dst`, trusting only the outside server's
/// certificate, and returns its answer to `hello`.
fn tls_hello(netns: &str, dst: SocketAddr) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert().cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(nodeward::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let s = traffic::connect(netns, dst)?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    tls.write_all(b"hello\n")?;
    let mut answer = String::new();
    BufReader::new(&mut tls).read_line(&mut answer)?;
    Ok(answer)
}

/// Sends an HTTP request in plaintext (client-first, as most protocols) and
/// returns whatever comes back before the connection ends.
fn plaintext_request(netns: &str, dst: SocketAddr) -> String {
    let mut s = traffic::connect(netns, dst).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: outside\r\n\r\n");
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    String::from_utf8_lossy(&back).into_owned()
}

/// Node `k`'s agent's metrics.
fn stats(t: &Topology, k: usize) -> String {
    nodeward_testbed::admin::metrics(&t.nodes[k].netns)
}

#[test]
fn tls_only_lets_the_apps_own_tls_through_refuses_plaintext_and_passes_the_allow_list() {
    let _g = shared();
    let test = "tls_only_lets_the_apps_own_tls_through_refuses_plaintext_and_passes_the_allow_list";
    // The allow-list names d's port 8081 only.
    let allow = |t: &Topology| {
        let d = t.pod("d").ip4;
        vec!["--egress-allow".to_string(), format!("192.0.2.0/24,{d}:8081")]
    };
    let Some(t) = cluster(test, [Some("tls-only"), None, None], allow) else {
        return;
    };
    let (a, b, d) = (t.pod("a"), t.pod("b"), t.pod("d"));
    let _tls = serve(&d.netns, d.v4(8443), tls_echo);
    let _tls6 = serve(&d.netns, d.v6(8443), tls_echo);
    let _plain = serve(&d.netns, d.v4(8080), info_echo);
    let _plain6 = serve(&d.netns, d.v6(8080), info_echo);
    let _allowed = serve(&d.netns, d.v4(8081), info_echo);

    // The app's own TLS reaches the outside server end to end: the server's
    // certificate is the one the client pinned (the agent holds no key for
    // it), and the server sees the pod's address.
    let answer = tls_hello(&a.netns, d.v4(8443)).unwrap();
    assert_eq!(answer, format!("tls peer={} got=hello\n", a.ip4));
    let out = t
        .agent(0)
        .wait_connection("outbound", &d.v4(8443).to_string(), WAIT)
        .unwrap();
    assert_eq!(out["reason"], "done");
    assert_eq!(out["transport"], "passthrough");

    // IPv6 alike.
    let answer = tls_hello(&a.netns, d.v6(8443)).unwrap();
    assert_eq!(answer, format!("tls peer={} got=hello\n", a.ip6));
    let back = plaintext_request(&a.netns, d.v6(8080));
    assert!(
        !back.contains("peer="),
        "IPv6 plaintext reached the outside server: {back:?}"
    );

    // Plaintext is refused before the server is even dialled: no greeting.
    let back = plaintext_request(&a.netns, d.v4(8080));
    assert!(
        !back.contains("peer="),
        "plaintext reached the outside server: {back:?}"
    );
    let out = t
        .agent(0)
        .wait_connection("outbound", &d.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("no log:\n{}", t.agent(0).dump()));
    assert_eq!(out["reason"], "egress_plaintext");
    assert_eq!(out["pod"], "mesh/a");
    let warned = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["level"] == "WARN" && l["pod"] == "mesh/a" && l["dst"].is_string()
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", t.agent(0).dump()));
    assert!(
        warned["message"].as_str().unwrap_or_default().contains("tls-only"),
        "{warned}"
    );
    assert!(stats(&t, 0).contains("reason=\"egress_plaintext\""), "not counted");

    // An allow-listed destination passes in plaintext, server-first too.
    let (seen, _, _) = round_trip(&a.netns, d.v4(8081), b"allowed").unwrap();
    assert_eq!(seen.peer.ip().to_canonical(), std::net::IpAddr::V4(a.ip4));

    // A pod without the annotation keeps the default, passthrough.
    let (seen, _, _) = round_trip(&b.netns, d.v4(8080), b"default passthrough").unwrap();
    assert_eq!(seen.peer.ip().to_canonical(), std::net::IpAddr::V4(b.ip4));

    // Destinations in the mesh are not egress: a's tunnel to c is untouched.
    let c = t.pod("c");
    let _mesh = serve(&c.netns, c.v4(8080), info_echo);
    round_trip(&a.netns, c.v4(8080), b"meshed plaintext app protocol").unwrap();
}

#[test]
fn a_pod_cannot_relax_the_egress_default_nor_allow_list_itself_and_an_invalid_value_is_tls_only() {
    let _g = shared();
    let test = "a_pod_cannot_relax_the_egress_default_nor_allow_list_itself_and_an_invalid_value_is_tls_only";
    if !privileged_or_skip(test) {
        return;
    }
    // `a` says passthrough and allow-lists everything for itself; `e`'s
    // value is invalid; `b` says nothing.
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0] = vec![
        PodSpec::new("a", "mesh")
            .annotation(EGRESS, "passthrough")
            .annotation("nodeward.io/egress-allow", "0.0.0.0/0, ::/0"),
        PodSpec::new("b", "mesh"),
        PodSpec::new("e", "mesh").annotation(EGRESS, "plaintext-please"),
    ];
    let mut t = Topology::build(spec);
    t.start_agents_with(&["--egress-default", "tls-only"]);
    let (a, b, e, d) = (t.pod("a"), t.pod("b"), t.pod("e"), t.pod("d"));
    let _plain = serve(&d.netns, d.v4(8080), info_echo);
    let _tls = serve(&d.netns, d.v4(8443), tls_echo);

    // The flag holds for every pod: a pod's `passthrough` and its own
    // allow list change nothing ...
    let back = plaintext_request(&a.netns, d.v4(8080));
    assert!(!back.contains("peer="), "a relaxed its own egress: {back:?}");
    let back = plaintext_request(&b.netns, d.v4(8080));
    assert!(!back.contains("peer="), "b's plaintext passed: {back:?}");
    // ... and an invalid value fails closed, with one warning naming it.
    let back = plaintext_request(&e.netns, d.v4(8080));
    assert!(!back.contains("peer="), "e's plaintext passed: {back:?}");
    assert!(
        t.agent(0)
            .wait_log(WAIT, |l| l["level"] == "WARN"
                && l["pod"] == "mesh/a"
                && l["annotation"] == "nodeward.io/egress-allow")
            .is_some(),
        "no warning that a's own allow list is ignored:\n{}",
        t.agent(0).dump()
    );
    for pod in ["mesh/a", "mesh/b", "mesh/e"] {
        assert!(
            t.agent(0)
                .wait_log(WAIT, |l| l["pod"] == pod && l["reason"] == "egress_plaintext")
                .is_some(),
            "{pod}'s plaintext not refused as egress_plaintext:\n{}",
            t.agent(0).dump()
        );
    }
    assert!(
        t.agent(0)
            .wait_log(WAIT, |l| l["level"] == "WARN" && l["value"] == "plaintext-please")
            .is_some(),
        "no warning about the invalid value:\n{}",
        t.agent(0).dump()
    );
    // A client that never sends (as for a server-first protocol) is
    // refused after the bounded wait, not held open and not let through.
    let mut silent = traffic::connect(&b.netns, d.v4(8080)).unwrap();
    let mut back = Vec::new();
    match silent.read_to_end(&mut back) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "a silent client was held open: {e}"
        ),
    }
    assert!(back.is_empty(), "a silent client reached the server: {back:?}");
    // TLS still passes under the default.
    let answer = tls_hello(&b.netns, d.v4(8443)).unwrap();
    assert_eq!(answer, format!("tls peer={} got=hello\n", b.ip4));
}
