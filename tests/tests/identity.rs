//! Identities on real agents: certificates issued per identity for the pods
//! a node captures, dropped with the last pod, CA trouble at runtime shown
//! in readiness, bad CA material refused at startup by file name, and trust
//! changes on the client's node closing its pooled tunnels.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodeward::identity::ca_cli::{self, Signer};
use nodeward_testbed::traffic::{Server, info_echo, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, nodeward_bin, privileged_or_skip, shared, traffic};

const WAIT: Duration = Duration::from_secs(10);

/// GET `path` from the agent's admin port inside node `k`'s namespace.
fn admin_get(t: &Topology, k: usize, path: &str) -> String {
    let mut s =
        traffic::connect(&t.nodes[k].netns, "127.0.0.1:15021".parse().unwrap()).expect("admin port on the node");
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn each_identity_on_a_node_gets_one_certificate_dropped_with_its_last_pod() {
    let _g = shared();
    if !privileged_or_skip("each_identity_on_a_node_gets_one_certificate_dropped_with_its_last_pod") {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    // a and b share a service account on node 1.
    spec.nodes[0] = vec![PodSpec::new("a", "mesh"), PodSpec::new("b", "mesh")];
    for p in &mut spec.nodes[0] {
        p.service_account = "shared".into();
    }
    let mut t = Topology::build(spec);
    t.start_agents();
    let issued = |k: usize| {
        t.agent(k)
            .lines()
            .into_iter()
            .filter(|l| l["message"] == "workload certificate issued")
            .map(|l| l["identity"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        issued(0),
        vec!["spiffe://cluster.local/ns/mesh/sa/shared"],
        "one certificate for two pods"
    );
    assert_eq!(
        issued(1),
        vec!["spiffe://cluster.local/ns/mesh/sa/c"],
        "plain/d is not enrolled"
    );
    assert!(admin_get(&t, 0, "/healthz/ready").starts_with("HTTP/1.1 200"));

    t.edit_pod("a", |_| false);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod released" && l["pod"] == "mesh/a")
        .unwrap();
    assert!(
        !t.agent(0)
            .lines()
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").starts_with("certificate dropped")),
        "b still uses it"
    );
    t.edit_pod("b", |_| false);
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "certificate dropped: no pod uses it"
                && l["identity"] == "spiffe://cluster.local/ns/mesh/sa/shared"
        })
        .unwrap_or_else(|| panic!("certificate not dropped:\n{}", t.agent(0).dump()));
}

#[test]
fn a_ca_broken_at_runtime_is_reported_in_readiness_and_the_old_one_keeps_signing() {
    let _g = shared();
    if !privileged_or_skip("a_ca_broken_at_runtime_is_reported_in_readiness_and_the_old_one_keeps_signing") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    std::fs::write(t.ca_dir.join("ca-key.pem"), "not a key").unwrap();
    let err = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["level"] == "ERROR" && l["message"].as_str().unwrap_or("").contains("CA directory rejected")
        })
        .unwrap_or_else(|| panic!("no error:\n{}", t.agent(0).dump()));
    assert!(err["message"].as_str().unwrap().contains("ca-key.pem"), "{err}");
    let ready = admin_get(&t, 0, "/healthz/ready");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("ca-key.pem"),
        "{ready}"
    );
    // A pod added now still gets a certificate, from the previous CA.
    t.add_pod(0, PodSpec::new("e", "mesh"));
    t.write_config();
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "workload certificate issued" && l["identity"] == "spiffe://cluster.local/ns/mesh/sa/e"
        })
        .unwrap_or_else(|| panic!("no certificate for e:\n{}", t.agent(0).dump()));
    std::thread::sleep(Duration::from_millis(500));
    let errors = t
        .agent(0)
        .lines()
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").contains("CA directory rejected"))
        .count();
    assert_eq!(errors, 1, "the error is logged once");
}

#[test]
fn bad_ca_material_at_startup_is_refused_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("nodeward-badca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = nodeward_bin();
    let init = std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success());
    let printed = String::from_utf8_lossy(&init.stdout);
    for f in [
        "root-cert.pem",
        "root-key.pem",
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
    ] {
        assert!(printed.contains(f), "ca init prints {f}: {printed}");
    }
    assert!(printed.contains("sha256:"), "ca init prints fingerprints: {printed}");
    // Key of another CA.
    let other = dir.with_extension("other");
    let _ = std::fs::remove_dir_all(&other);
    std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    std::fs::copy(other.join("ca-key.pem"), dir.join("ca-key.pem")).unwrap();
    let cfg = std::env::temp_dir();
    let out = std::process::Command::new(&bin)
        .args(["run", "--node-name", "badca", "--config-dir"])
        .arg(&cfg)
        .arg("--ca-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca-key.pem") && err.contains("does not match"), "{err}");
    // Unreadable.
    let out = std::process::Command::new(&bin)
        .args(["run", "--node-name", "badca", "--config-dir"])
        .arg(&cfg)
        .args(["--ca-dir", "/nonexistent/ca"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ca/ca-cert.pem"), "{err}");
    let _ = (std::fs::remove_dir_all(&dir), std::fs::remove_dir_all(&other));
}

/// `ca init` keeps the root key out of the directory signers mount, and
/// both signers (`run --ca-dir`, `ca serve --ca-dir`) refuse to start with
/// a root key, or any private key but their own, in their directory.
#[test]
fn signers_refuse_to_start_beside_a_root_key_or_any_other_private_key() {
    let base = std::env::temp_dir().join(format!("nodeward-rootkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dir, root) = (base.join("ca"), base.join("offline"));
    let bin = nodeward_bin();
    let init = std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&dir)
        .arg("--root-out")
        .arg(&root)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    assert!(root.join("root-key.pem").exists(), "no root key in --root-out");
    assert!(
        !dir.join("root-key.pem").exists(),
        "the root key sits beside the intermediate"
    );
    // The default root directory is a sibling, never the directory itself.
    let plain = base.join("plain");
    let out = std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !plain.join("root-key.pem").exists(),
        "ca init without --root-out put the root key in --out"
    );
    assert!(base.join("plain-root/root-key.pem").exists());

    let cfg = base.join("config");
    std::fs::create_dir_all(&cfg).unwrap();
    let jwks = base.join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let signers = |dir: &std::path::Path| -> Vec<(&'static str, std::process::Output)> {
        let mut run = std::process::Command::new(&bin);
        run.args(["run", "--node-name", "rootkey", "--config-dir"])
            .arg(&cfg)
            .arg("--ca-dir")
            .arg(dir);
        let mut serve = std::process::Command::new(&bin);
        serve
            .args([
                "ca",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--issuer",
                "https://issuer.test",
            ])
            .arg("--ca-dir")
            .arg(dir)
            .arg("--jwks")
            .arg(&jwks)
            .arg("--config-dir")
            .arg(&cfg)
            .arg("--issuance-log")
            .arg(base.join("issuance.jsonl"));
        vec![("run", exits_within(run)), ("ca serve", exits_within(serve))]
    };
    for (planted, from) in [("root-key.pem", "root-key.pem"), ("old-root.pem", "root-key.pem")] {
        std::fs::copy(root.join(from), dir.join(planted)).unwrap();
        for (who, out) in signers(&dir) {
            assert!(
                !out.status.success(),
                "{who} started with {planted} in its CA directory"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&dir.join(planted).display().to_string())
                    && err.contains("private key other than ca-key.pem"),
                "{who}'s error does not name {planted}: {err}"
            );
        }
        std::fs::remove_file(dir.join(planted)).unwrap();
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Runs `cmd` and returns its output once it exits; one still running after
/// 20 s (it started instead of refusing) is killed and fails the test.
fn exits_within(mut cmd: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(Duration::from_secs(20));
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} started instead of refusing:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

const C_ID: &str = "spiffe://cluster.local/ns/mesh/sa/c";

/// Whether `s` is closed by its peer within `within` (EOF or reset, not a timeout).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// Two nodes; only node 1's agent (the client's) reads a deny list and a
/// CRL, both empty at first. Pod a holds a connection to c:7000 over a
/// pooled tunnel. Returns the topology, the trust files, the connection
/// and c's server.
fn client_with_pooled_tunnel(test: &str) -> Option<(Topology, PathBuf, PathBuf, TcpStream, Server)> {
    if !privileged_or_skip(test) {
        return None;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    let deny = t.ca_dir.join("node1-deny.txt");
    std::fs::write(&deny, "# nobody\n").unwrap();
    let (crl, _) = ca_cli::revoke(&t.ca_dir, Signer::Intermediate, &[]).unwrap();
    let (deny_arg, crl_arg) = (deny.to_string_lossy().into_owned(), crl.to_string_lossy().into_owned());
    t.start_agent(0, &["--deny-identities", &deny_arg, "--crl", &crl_arg]);
    t.start_agent(1, &[]);
    t.wait_captured(0);
    t.wait_captured(1);
    let c = t.pod("c").clone();
    let server = serve(&c.netns, c.v4(7000), info_echo);
    let held = traffic::connect(&t.pod("a").netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&held).unwrap();
    Some((t, deny, crl, held, server))
}

/// The pooled connection to c is closed on node 1 within a few polls, and a
/// new connection from a is refused by a new handshake (`refusal`), not
/// served over the old tunnel.
fn pooled_tunnel_is_cut_and_not_reused(t: &Topology, mut held: TcpStream, refusal: &str) {
    let since = Instant::now();
    assert!(
        closed_within(&mut held, Duration::from_secs(5)),
        "the pooled tunnel still carries a's connection after {:?}:\n{}",
        since.elapsed(),
        t.agent(0).dump()
    );
    let cut = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("closing connection: peer no longer trusted")
        })
        .unwrap_or_else(|| panic!("no cut logged:\n{}", t.agent(0).dump()));
    assert_eq!(cut["peer"], C_ID);
    assert_eq!(cut["refusal"], refusal);
    let c = t.pod("c");
    assert!(
        round_trip(&t.pod("a").netns, c.v4(7000), b"again").is_err(),
        "a new connection to the untrusted server is refused"
    );
    let l = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed" && l["direction"] == "outbound" && l["refusal"] == refusal
        })
        .unwrap_or_else(|| {
            panic!(
                "the new connection was not refused by a handshake:\n{}",
                t.agent(0).dump()
            )
        });
    assert_eq!(l["dst"], c.v4(7000).to_string());
}

#[test]
fn denying_a_server_on_the_clients_node_closes_its_pooled_tunnel() {
    let _g = shared();
    let Some((t, deny, _crl, held, _server)) =
        client_with_pooled_tunnel("denying_a_server_on_the_clients_node_closes_its_pooled_tunnel")
    else {
        return;
    };
    std::fs::write(&deny, format!("{C_ID}\n")).unwrap();
    pooled_tunnel_is_cut_and_not_reused(&t, held, "denied_identity");
}

#[test]
fn revoking_a_servers_certificate_on_the_clients_node_closes_its_pooled_tunnel() {
    let _g = shared();
    let Some((t, _deny, _crl, held, _server)) =
        client_with_pooled_tunnel("revoking_a_servers_certificate_on_the_clients_node_closes_its_pooled_tunnel")
    else {
        return;
    };
    let serial = t
        .agent(1)
        .lines()
        .into_iter()
        .find(|l| l["message"] == "workload certificate issued" && l["identity"] == C_ID)
        .and_then(|l| l["serial"].as_str().map(str::to_string))
        .expect("c's certificate serial is logged");
    ca_cli::revoke(&t.ca_dir, Signer::Intermediate, &[serial]).unwrap();
    pooled_tunnel_is_cut_and_not_reused(&t, held, "revoked_leaf");
}

#[test]
fn tunnels_are_closed_when_the_peer_certificate_expires_and_new_streams_get_a_fresh_one() {
    let _g = shared();
    let test = "tunnels_are_closed_when_the_peer_certificate_expires_and_new_streams_get_a_fresh_one";
    if !privileged_or_skip(test) {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&["--cert-lifetime", "5s"]);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    let mut held = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&held).unwrap();
    held.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    held.read_exact(&mut one).unwrap();
    // The certificates either side presented are valid for at most 5 s.
    assert!(
        closed_within(&mut held, Duration::from_secs(10)),
        "the tunnel outlived the certificates:\n{}",
        t.agent(0).dump()
    );
    // Either end may cut first (each at the other's certificate's expiry).
    let expired = |l: &serde_json::Value| l["message"] == "closing connection: peer certificate expired";
    assert!(
        t.agent(0).wait_log(WAIT, expired).is_some() || t.agent(1).wait_log(WAIT, expired).is_some(),
        "the expiry is logged:\n{}\n{}",
        t.agent(0).dump(),
        t.agent(1).dump()
    );
    round_trip(&a.netns, c.v4(7000), b"fresh").expect("a new connection is served over a fresh tunnel");
    let tunnel = c.v4(15008).to_string();
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "tunnel connection opened" && l["dst"] == tunnel.as_str() && l["id"].as_u64() >= Some(2)
        })
        .unwrap_or_else(|| panic!("no fresh tunnel connection:\n{}", t.agent(0).dump()));
}

/// Signs a CRL of the intermediate listing `serials` into `out` (by rename,
/// so the agent never reads half a file) and returns it as an argument.
/// The CRL number counts up from 1 with each call since the last `fresh`.
fn crl_file(ca_dir: &std::path::Path, fresh: bool, serials: &[String], out: &std::path::Path) -> String {
    let ca_crl = ca_dir.join("ca-crl.pem");
    if fresh {
        let _ = std::fs::remove_file(&ca_crl);
    }
    let (signed, _) = ca_cli::revoke(ca_dir, Signer::Intermediate, serials).unwrap();
    let tmp = out.with_extension("tmp");
    std::fs::copy(&signed, &tmp).unwrap();
    std::fs::rename(&tmp, out).unwrap();
    out.to_string_lossy().into_owned()
}

#[test]
fn a_serial_revoked_only_in_the_second_crl_file_of_its_issuer_is_refused_and_its_tunnel_cut() {
    let _g = shared();
    let test = "a_serial_revoked_only_in_the_second_crl_file_of_its_issuer_is_refused_and_its_tunnel_cut";
    if !privileged_or_skip(test) {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[1].push(PodSpec::new("e", "mesh"));
    let mut t = Topology::build(spec);
    // Two CRLs of the same issuer. The first has the higher CRL number and
    // lists nothing: a verifier that consults one CRL per issuer (the
    // first, or the newest) never sees the second file's revocations.
    let (a_pem, b_pem) = (t.ca_dir.join("crl-a.pem"), t.ca_dir.join("crl-b.pem"));
    let b_arg = crl_file(&t.ca_dir, true, &[], &b_pem);
    crl_file(&t.ca_dir, false, &[], &a_pem);
    let a_arg = crl_file(&t.ca_dir, false, &[], &a_pem);
    t.start_agents_with(&["--crl", &format!("{a_arg},{b_arg}")]);
    let (c, e) = (t.pod("c").clone(), t.pod("e").clone());
    let _servers = [
        serve(&c.netns, c.v4(7000), info_echo),
        serve(&e.netns, e.v4(7000), info_echo),
    ];
    let held = traffic::connect(&t.pod("a").netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&held).unwrap();
    let mut held_e = traffic::connect(&t.pod("a").netns, e.v4(7000)).unwrap();
    traffic::read_greeting(&held_e).unwrap();

    let serial = t
        .agent(1)
        .lines()
        .into_iter()
        .find(|l| l["message"] == "workload certificate issued" && l["identity"] == C_ID)
        .and_then(|l| l["serial"].as_str().map(str::to_string))
        .expect("c's certificate serial is logged");
    // b.pem: CRL number 2 (below a.pem's 3), listing c's serial.
    crl_file(&t.ca_dir, true, &[], &b_pem);
    crl_file(&t.ca_dir, false, &[serial], &b_pem);
    let b_file = b_pem.to_string_lossy().into_owned();
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "CRL loaded" && l["file"] == b_file.as_str() && l["revoked"] == 1
        })
        .unwrap_or_else(|| panic!("the second CRL is not reloaded:\n{}", t.agent(0).dump()));
    // b has no pooled tunnel to c: its connection takes a new handshake,
    // which must consult the second file too.
    assert!(
        round_trip(&t.pod("b").netns, c.v4(7000), b"new").is_err(),
        "a new handshake with c succeeds:\n{}",
        t.agent(0).dump()
    );
    pooled_tunnel_is_cut_and_not_reused(&t, held, "revoked_leaf");

    // e's certificate is not revoked: its connection and new ones go on.
    held_e.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    held_e.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    held_e.read_exact(&mut one).expect("the connection to e is still open");
    round_trip(&t.pod("a").netns, e.v4(7000), b"still").expect("e is still reachable");
}
