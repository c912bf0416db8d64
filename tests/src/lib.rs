//! A test bed of real network namespaces: nodes joined by a fabric, pods on
//! each node behind a bridge, one real `nodeward` agent per node, and the
//! cluster's objects in a YAML directory the agents read.
//!
//! Used by the integration tests in `tests/tests/`, by `cargo xtask demo`
//! and by the benchmarks. Everything a topology creates is removed when it
//! is dropped, also when a test panics; leftovers of a killed run are
//! reclaimed by the next one.

pub mod admin;
pub mod agent;
pub mod bpf;
pub mod ca;
pub mod cluster;
pub mod cni;
pub mod cri;
pub mod fake_api;
pub mod hbone;
pub mod kube_proxy;
pub mod loadgen;
pub mod netns;
pub mod sniff;
pub mod tls_records;
pub mod topology;
pub mod traffic;
pub mod ztunnel;

pub use agent::Agent;
pub use cluster::{EndpointSpec, PodSpec, ServiceSpec, Workloads};
pub use topology::{Node, Pod, Topology, TopologySpec};

/// Whether this process can build topologies: root with eBPF. When it
/// cannot, tests print why and skip, except in CI (`CI=true`), where a
/// skipped privileged test is a failure.
pub fn privileged_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (network namespaces, eBPF); CI must run it as root");
    }
    eprintln!("SKIPPED {test}: needs root for network namespaces and eBPF");
    false
}

/// The standard two-node cluster with its agents running (extra flags
/// `extra`), or `None` when `test` must be skipped for want of root.
pub fn two_node_cluster(test: &str, extra: &[&str]) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents_with(extra);
    Some(t)
}

/// `d` stretched by `NODEWARD_TEST_PATIENCE` (a whole factor, default 1):
/// `cargo xtask vm-test` sets it for guests under emulation (TCG), where
/// loading and verifying eBPF and everything else runs many times slower;
/// what is awaited stays the same.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    match std::env::var("NODEWARD_TEST_PATIENCE") {
        Err(_) => d,
        Ok(v) => match v.parse::<u32>() {
            Ok(k) if k >= 1 => d * k,
            _ => panic!("NODEWARD_TEST_PATIENCE={v}: not a whole factor of at least 1"),
        },
    }
}

/// The `nodeward` binary under test: `$NODEWARD_BIN`, else the one built
/// next to the test executable.
pub fn nodeward_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("NODEWARD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    // target/<profile>/deps/test-xxxx -> target/<profile>/nodeward
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("nodeward");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p nodeward`) or set NODEWARD_BIN",
        bin.display()
    );
    bin
}

/// Serialises tests that measure host-wide state (attachment counts, eBPF
/// run counters) against the others, which share the lock.
pub static HOST_WIDE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Takes the shared side of [`HOST_WIDE`], ignoring poisoning by a failed test.
pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    HOST_WIDE.read().unwrap_or_else(|e| e.into_inner())
}

/// Takes the exclusive side of [`HOST_WIDE`].
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    HOST_WIDE.write().unwrap_or_else(|e| e.into_inner())
}
