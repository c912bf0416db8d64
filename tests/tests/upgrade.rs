//! Rolling upgrades (issue 28): a second agent started on a node while the
//! first runs takes the node over; the first drains on SIGTERM. Measured
//! by a client that never stops opening connections across the nodes, and
//! one connection that stays open through it all.
//!
//! `NODEWARD_PREVIOUS_BIN`, when set, names the previous release's
//! `nodeward`: the continuous check then also runs through a downgrade to
//! it and an upgrade back (CI sets it from the release that follows this
//! one's; this release is the first that can hand a node over).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeward_testbed::admin::wait_ready;
use nodeward_testbed::agent::Agent;
use nodeward_testbed::netns::sh_out;
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{Topology, TopologySpec, nodeward_bin, patience, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(15);
const DRAIN: &str = "30s";

fn strict() -> &'static str {
    "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n"
}

/// A client in `from` that opens a connection to `to` every 20 ms and
/// checks each one's echo, until stopped; every failure is kept.
struct Prober {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<u64>>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(from: &str, to: SocketAddr) -> Prober {
        let (stop, done, failures) = (
            Arc::<AtomicBool>::default(),
            Arc::<Mutex<u64>>::default(),
            Arc::<Mutex<Vec<String>>>::default(),
        );
        let (s, d, f, netns) = (stop.clone(), done.clone(), failures.clone(), from.to_string());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let n = *d.lock().unwrap();
                if let Err(e) = round_trip(&netns, to, format!("probe {n}").as_bytes()) {
                    f.lock()
                        .unwrap()
                        .push(format!("connection {n} at {:?}: {e}", started.elapsed()));
                }
                *d.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(20).saturating_sub(t.elapsed()));
            }
        });
        Prober {
            stop,
            done,
            failures,
            thread: Some(thread),
        }
    }

    fn done(&self) -> u64 {
        *self.done.lock().unwrap()
    }

    /// Stops and returns (connections made, failures).
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (self.done(), self.failures.lock().unwrap().clone())
    }
}

/// Waits until plaintext from `from` to `to` no longer reaches the app
/// (the STRICT policy just written is in force).
fn wait_refused(from: &str, to: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = traffic::connect_timeout(from, to, Duration::from_secs(2)).and_then(|s| read_greeting(&s));
        if r.is_err() {
            return;
        }
        assert!(Instant::now() < deadline, "plaintext still reaches a STRICT pod");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Echoes `msg` over an open connection.
#[track_caller]
fn echo(s: &mut std::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Upgrades node `k`'s agent to `bin`: starts it beside the running one,
/// waits until it reports Ready (which the node's readiness port now
/// answers for it), and returns the previous agent, still running.
fn upgrade(t: &mut Topology, k: usize, bin: &std::path::Path, flags: &[&str]) -> Agent {
    let old = t.start_successor(k, bin, flags);
    t.agent(k)
        .wait_log(WAIT, |l| {
            l["message"] == "taking the node over from the agent running on it"
        })
        .unwrap_or_else(|| {
            panic!(
                "no takeover on node {k}:\n{}\nprevious:\n{}",
                t.agent(k).dump(),
                old.dump()
            )
        });
    old.wait_log(WAIT, |l| {
        l["message"] == "handed the node's pods to a new agent; relaying the open connections until SIGTERM"
    })
    .unwrap_or_else(|| panic!("node {k}'s previous agent did not hand over:\n{}", old.dump()));
    t.wait_captured(k);
    let (status, body) = wait_ready(&t.nodes[k].netns, patience(WAIT), |s, _| s == 200);
    assert_eq!(
        status,
        200,
        "node {k}'s new agent is not Ready: {body}\n{}",
        t.agent(k).dump()
    );
    old
}

/// SIGTERMs node `k`'s previous agent and checks it exits 0 after its
/// last connection closes (`close`), well within the drain timeout.
fn retire(mut old: Agent, close: impl FnOnce()) {
    old.terminate();
    old.wait_log(WAIT, |l| l["message"] == "SIGTERM: draining")
        .unwrap_or_else(|| panic!("no drain:\n{}", old.dump()));
    close();
    let status = old
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the previous agent did not exit:\n{}", old.dump()));
    assert!(status.success(), "{status:?}\n{}", old.dump());
}

#[test]
fn a_rolling_upgrade_of_both_nodes_refuses_no_connection_and_keeps_open_ones_echoing() {
    let _g = shared();
    if !privileged_or_skip("a_rolling_upgrade_of_both_nodes_refuses_no_connection_and_keeps_open_ones_echoing") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&["--drain-timeout", DRAIN]);
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let current = nodeward_bin();
    let mut releases: Vec<PathBuf> = vec![current.clone()];
    if let Ok(previous) = std::env::var("NODEWARD_PREVIOUS_BIN") {
        // Down to the previous release, then back up.
        releases.push(previous.into());
        releases.push(current.clone());
    }

    // Outbound on node 1 and inbound on node 2, and the other way round.
    let there = Prober::start(&a.netns, c.v4(7000));
    let back = Prober::start(&c.netns, a.v4(7000));
    let mut long = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    read_greeting(&long).unwrap();
    echo(&mut long, b"before");

    for bin in &releases {
        for k in 0..2 {
            let old = upgrade(&mut t, k, bin, &["--drain-timeout", DRAIN]);
            echo(&mut long, format!("node {k} taken over").as_bytes());
            // The previous agent holds the long connection: it drains it, and
            // exits once it ends. The next one stays open on the new agents.
            retire(old, || {
                echo(&mut long, b"while the previous agent drains");
                std::thread::sleep(Duration::from_millis(500));
                echo(&mut long, b"still");
                drop(std::mem::replace(&mut long, {
                    let mut s = traffic::connect(&a.netns, c.v4(7000)).unwrap();
                    read_greeting(&s).unwrap();
                    echo(&mut s, b"opened on the new agents");
                    s
                }));
            });
            echo(&mut long, format!("node {k}'s previous agent gone").as_bytes());
        }
    }
    while there.done() < 500 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (made, failed) = there.finish();
    assert!(
        failed.is_empty(),
        "{} of {made} connections a -> c failed: {failed:#?}",
        failed.len()
    );
    let (made_back, failed_back) = back.finish();
    assert!(
        failed_back.is_empty(),
        "{} of {made_back} connections c -> a failed: {failed_back:#?}",
        failed_back.len()
    );
    assert!(made >= 500);

    // The new agents hold the line: plaintext from outside the mesh to a
    // STRICT pod is refused, and logged by the pod's new agent.
    t.apply("strict", strict());
    wait_refused(&d.netns, a.v4(7000));
    t.agent(0)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("the new agent did not log the refusal:\n{}", t.agent(0).dump()));
    round_trip(&c.netns, a.v4(7000), b"HBONE under STRICT").unwrap();
    echo(&mut long, b"after");
}

#[test]
fn a_successor_killed_mid_takeover_leaves_the_node_closed_and_a_third_agent_takes_over() {
    let _g = shared();
    if !privileged_or_skip("a_successor_killed_mid_takeover_leaves_the_node_closed_and_a_third_agent_takes_over") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&["--drain-timeout", DRAIN]);
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    t.apply("strict", strict());
    wait_refused(&d.netns, a.v4(7000));
    let refused = |who: &str| {
        let r = traffic::connect_timeout(&d.netns, a.v4(7000), Duration::from_secs(2)).and_then(|s| read_greeting(&s));
        assert!(r.is_err(), "{who}: plaintext reached a STRICT pod: {r:?}");
    };
    refused("before");

    let bin = nodeward_bin();
    let old = t.start_successor(0, &bin, &["--drain-timeout", DRAIN]);
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "taking the node over from the agent running on it"
        })
        .unwrap_or_else(|| panic!("no takeover:\n{}", t.agent(0).dump()));
    t.agent_mut(0).kill();
    old.wait_log(WAIT, |l| {
        l["message"] == "handed the node's pods to a new agent; relaying the open connections until SIGTERM"
    })
    .expect("the first agent handed over");
    // Neither agent manages the node now: still no plaintext to a.
    refused("successor killed");
    for _ in 0..5 {
        refused("successor killed, later");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A third agent: the first has let go of the node, so it starts as
    // after a crash, and takes every pod.
    t.start_agent(0, &["--drain-timeout", DRAIN]);
    t.wait_captured(0);
    let (status, body) = wait_ready(&t.nodes[0].netns, patience(WAIT), |s, _| s == 200);
    assert_eq!(status, 200, "{body}");
    round_trip(&c.netns, a.v4(7000), b"through the third agent").unwrap();
    refused("third agent");
    t.agent(0)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("the third agent did not log the refusal:\n{}", t.agent(0).dump()));
    retire(old, || {});
}

#[test]
fn an_agent_refuses_to_take_over_pins_of_another_layout_and_the_pods_stay_with_the_running_one() {
    let _g = shared();
    if !privileged_or_skip(
        "an_agent_refuses_to_take_over_pins_of_another_layout_and_the_pods_stay_with_the_running_one",
    ) {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&[]);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let node_dir = t.pin_dir(0).parent().unwrap().to_path_buf();
    // What a newer release's pins would look like next to ours.
    let newer = node_dir.join("v2");
    std::fs::create_dir(&newer).unwrap();
    let bin = nodeward_bin();
    let mut old = t.start_successor(0, &bin, &[]);
    let status = t.agent_mut(0).wait_exit(WAIT).expect("the new agent gives up");
    assert!(!status.success());
    let said = t.agent(0).dump();
    assert!(
        said.contains("bpffs pins of layout v2") && said.contains("this agent uses layout v1 and cannot reuse them"),
        "{said}"
    );
    // Nothing was taken: the running agent still has every pod.
    assert!(
        !old.lines()
            .iter()
            .any(|l| l["message"]
                == "handed the node's pods to a new agent; relaying the open connections until SIGTERM"),
        "{}",
        old.dump()
    );
    round_trip(&c.netns, a.v4(7000), b"still the first agent").unwrap();
    old.wait_connection("inbound_tunnel", &a.v4(7000).to_string(), WAIT)
        .unwrap_or_else(|| panic!("the first agent did not carry it:\n{}", old.dump()));
    std::fs::remove_dir(&newer).unwrap();
    let out = sh_out(&["ls", node_dir.to_str().unwrap()]);
    assert_eq!(out.trim(), "v1");
    old.kill();
}

#[test]
fn a_pod_the_runtime_handed_over_stays_captured_through_a_takeover_and_its_del_reaches_the_new_agent() {
    use nodeward_testbed::PodSpec;
    use nodeward_testbed::cni::{CniNetwork, CniPod, PLUGIN_DIR};
    let _g = shared();
    let test = "a_pod_the_runtime_handed_over_stays_captured_through_a_takeover_and_its_del_reaches_the_new_agent";
    if !privileged_or_skip(test) {
        return;
    }
    assert!(
        std::path::Path::new(PLUGIN_DIR).join("bridge").exists(),
        "{PLUGIN_DIR}/bridge missing"
    );
    let mut t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("d", "plain")]],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    });
    let socket = t.config_dir.join(".cni.sock");
    let sock = socket.to_str().unwrap().to_string();
    let args = ["--cni-socket", sock.as_str(), "--drain-timeout", DRAIN];
    t.start_agent(0, &args);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "CNI hand-off listening")
        .unwrap_or_else(|| panic!("no CNI socket:\n{}", t.agent(0).dump()));
    let net = CniNetwork::bridge(
        &t.nodes[0].netns,
        &format!("10.{}.99", t.id),
        &socket,
        PathBuf::from(format!("/run/nodeward-testbed/{}.ipam", t.id)),
    );
    // As on a real node: the API has the pod Pending, with no address yet,
    // when the runtime's ADD comes; only the ADD says where it is.
    let p = CniPod::new(t.id, "p", "mesh");
    t.apply(
        "p",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: mesh\n  uid: {}\nspec:\n  nodeName: {}\n  serviceAccountName: default\nstatus:\n  phase: Pending\n",
            p.uid, t.nodes[0].name
        ),
    );
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "config applied" && l["pods"] == 2)
        .unwrap_or_else(|| panic!("pod p not read:\n{}", t.agent(0).dump()));
    let result = net.add(&p).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let dst: SocketAddr = format!("{ip}:7000").parse().unwrap();
    let _server = serve(&p.netns, dst, info_echo);
    let d = t.pod("d").clone();
    t.apply("strict", strict());
    wait_refused(&d.netns, dst);

    // With the same flags, as a DaemonSet's new pod is started.
    let old = upgrade(&mut t, 0, &nodeward_bin(), &args);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/p")
        .unwrap_or_else(|| panic!("the new agent did not capture p:\n{}", t.agent(0).dump()));
    retire(old, || {});
    // Still closed to plaintext, now by the new agent, which knows p only
    // from the runtime's ADD that the previous agent handed over.
    for _ in 0..10 {
        let r = traffic::connect_timeout(&d.netns, dst, Duration::from_secs(2)).and_then(|s| read_greeting(&s));
        assert!(
            r.is_err(),
            "plaintext reached p after the takeover: {r:?}\n{}",
            t.agent(0).dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["reason"] == "mtls_strict" && l["dst"] == dst.to_string().as_str()
        })
        .unwrap_or_else(|| panic!("the new agent did not refuse it:\n{}", t.agent(0).dump()));
    // The socket changed hands with its queue: the runtime's DEL reaches
    // the new agent at the same path.
    net.del(&p, Some(&result))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "CNI request" && l["command"] == "Del" && l["pod"] == "mesh/p"
        })
        .unwrap_or_else(|| panic!("the new agent did not get the DEL:\n{}", t.agent(0).dump()));
}

/// One takeover request to the control socket at `name`, with `fd` as the
/// map it offers: the answer line and how many descriptors came with it.
fn ask_to_take_over(
    name: &str,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<(serde_json::Value, usize)> {
    use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    let stream = UnixStream::connect(name)?;
    stream.set_read_timeout(Some(WAIT))?;
    let hello = b"{\"layout\":1,\"version\":\"0.0.0-impostor\"}\n";
    let raw: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(hello)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = 0;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds += r.len();
            for fd in r {
                // SAFETY: installed in this process for this message.
                drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    let line = buf[..n].split(|b| *b == b'\n').next().unwrap_or_default().to_vec();
    Ok((serde_json::from_slice(&line).map_err(std::io::Error::other)?, fds))
}

/// Connects to the Unix socket at `path` from a child process running as
/// `nobody` (65534): `Ok` if it connected, the errno otherwise. The child
/// makes only raw system calls between `fork` and `_exit` (the test
/// process has other threads).
fn connect_as_nobody(path: &str) -> Result<(), nix::errno::Errno> {
    assert!(path.len() < 108, "{path}: too long for a socket address");
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child calls only async-signal-safe functions, then exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            let code = if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                255
            } else {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) == 0 {
                    0
                } else {
                    *libc::__errno_location()
                }
            };
            libc::_exit(code)
        },
        nix::unistd::ForkResult::Parent { child } => match nix::sys::wait::waitpid(child, None).expect("waitpid") {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
            nix::sys::wait::WaitStatus::Exited(_, 255) => panic!("the child could not become nobody"),
            nix::sys::wait::WaitStatus::Exited(_, e) => Err(nix::errno::Errno::from_raw(e)),
            other => panic!("child: {other:?}"),
        },
    }
}

#[test]
fn the_control_socket_is_roots_alone_and_hands_nothing_to_a_process_without_the_pins() {
    use std::os::fd::AsFd;
    let _g = shared();
    if !privileged_or_skip("the_control_socket_is_roots_alone_and_hands_nothing_to_a_process_without_the_pins") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&["--drain-timeout", DRAIN]);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let name = format!("/var/run/nodeward/takeover/{}.v1.sock", t.nodes[0].name);
    // Only root may enter its directory or open it: a pod reaches it only
    // with a hostPath of the host's /var/run/nodeward, which is root's.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::fs::metadata("/var/run/nodeward/takeover").unwrap();
    assert_eq!(
        (dir.uid(), dir.permissions().mode() & 0o777),
        (0, 0o700),
        "the control directory"
    );
    let sock = std::fs::metadata(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        (sock.uid(), sock.permissions().mode() & 0o777),
        (0, 0o600),
        "the control socket"
    );
    assert_eq!(
        connect_as_nobody(&name),
        Err(nix::errno::Errno::EACCES),
        "a process that is not root connected to the control socket"
    );
    // Root on the node without the node's pins has no map to prove itself
    // with: with none, and with a descriptor that is no map, it gets a
    // refusal and no descriptor.
    for offer in ["none", "/dev/null"] {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = (offer != "none").then(|| file.as_fd());
        let (answer, fds) = ask_to_take_over(&name, fd)
            .unwrap_or_else(|e| panic!("no answer with {offer}: {e}\n{}", t.agent(0).dump()));
        assert_eq!(answer["answer"], "refused", "offering {offer}: {answer}");
        assert!(
            answer["reason"]
                .as_str()
                .is_some_and(|r| r.contains("only an agent holding the node's pins may take over")),
            "offering {offer}: {answer}"
        );
        assert_eq!(fds, 0, "offering {offer}, descriptors came back: {answer}");
    }
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "takeover refused: no map descriptor came with the request: only an agent holding the node's pins may take over")
        .unwrap_or_else(|| panic!("the refusal is not logged:\n{}", t.agent(0).dump()));
    // Nothing changed: the agent still carries its pods, and a real
    // successor still takes over through the same socket.
    round_trip(&c.netns, a.v4(7000), b"still the first agent").unwrap();
    t.agent(0)
        .wait_connection("inbound_tunnel", &a.v4(7000).to_string(), WAIT)
        .unwrap_or_else(|| panic!("the first agent did not carry it:\n{}", t.agent(0).dump()));
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let old = upgrade(&mut t, 0, &nodeward_bin(), &["--drain-timeout", DRAIN]);
    round_trip(&a.netns, c.v4(7000), b"the new agent").unwrap();
    t.agent(0)
        .wait_connection("outbound", &c.v4(7000).to_string(), WAIT)
        .unwrap_or_else(|| panic!("the new agent did not carry it:\n{}", t.agent(0).dump()));
    retire(old, || {});
}

#[test]
fn a_pod_that_joins_the_agents_reuseport_groups_gets_none_of_the_connections_steered_to_the_agent() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket, sockopt,
    };
    use nodeward_testbed::netns::run_in;
    use std::os::fd::OwnedFd;
    let _g = shared();
    if !privileged_or_skip(
        "a_pod_that_joins_the_agents_reuseport_groups_gets_none_of_the_connections_steered_to_the_agent",
    ) {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(&[]);
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    t.apply("strict", strict());
    wait_refused(&d.netns, a.v4(7000));
    // The agent's listeners in the pod are bound with SO_REUSEPORT (so a
    // new agent can bind beside them): the pod's root, same uid, can join
    // each group.
    let joined: Vec<(u16, OwnedFd)> = run_in(&a.netns, || {
        [15001u16, 15006, 15008]
            .into_iter()
            .map(|port| {
                let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).unwrap();
                setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
                bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &SockaddrIn::new(127, 0, 0, 1, port),
                )
                .unwrap_or_else(|e| panic!("joining the group on 127.0.0.1:{port}: {e}"));
                listen(&fd, Backlog::new(64).unwrap()).unwrap();
                (port, fd)
            })
            .collect()
    });
    for i in 0..20 {
        // Plaintext to a STRICT pod (15006), a tunnel into it (15008), and
        // its own outbound connections (15001).
        let r = traffic::connect_timeout(&d.netns, a.v4(7000), Duration::from_secs(2)).and_then(|s| read_greeting(&s));
        assert!(r.is_err(), "plaintext reached a STRICT pod ({i}): {r:?}");
        round_trip(&c.netns, a.v4(7000), b"in").unwrap_or_else(|e| panic!("c -> a ({i}): {e}"));
        round_trip(&a.netns, c.v4(7000), b"out").unwrap_or_else(|e| panic!("a -> c ({i}): {e}"));
    }
    for (port, fd) in &joined {
        let got = nix::sys::socket::accept(std::os::fd::AsRawFd::as_raw_fd(fd));
        assert_eq!(
            got,
            Err(nix::errno::Errno::EAGAIN),
            "the pod's socket on 127.0.0.1:{port} got a connection steered to the agent"
        );
    }
}
