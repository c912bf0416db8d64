//! What the agent says when it cannot start: each error names exactly what
//! is missing, and the process exits non-zero without attaching anything.

use std::process::Command;
use std::time::Duration;

use nodeward_testbed::{PodSpec, Topology, TopologySpec, nodeward_bin, patience, privileged_or_skip, shared};

fn run(prefix: &[&str], args: &[&str]) -> (bool, String) {
    let bin = nodeward_bin();
    let mut cmd = Command::new(prefix.first().copied().unwrap_or(bin.to_str().unwrap()));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg(&bin);
    }
    let out = cmd
        .args(args)
        .env("NODEWARD_BPFFS", "/sys/fs/bpf")
        // These agents run in the machine's own namespace, some at once:
        // ports of their own, so none fails on another's operator port.
        .env("NODEWARD_ADMIN_ADDR", "127.0.0.1:0")
        .env("NODEWARD_METRICS_ADDR", "127.0.0.2:0")
        .env("NODEWARD_READINESS_ADDR", "127.0.0.3:0")
        .output()
        .expect("run nodeward");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn without_privileges_the_missing_capabilities_are_named() {
    if !privileged_or_skip("without_privileges_the_missing_capabilities_are_named") {
        return;
    }
    let dir = std::env::temp_dir();
    let (ok, err) = run(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ],
        &[
            "run",
            "--node-name",
            "startup-test",
            "--config-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("missing privilege"), "{err}");
    assert!(
        err.contains("CAP_SYS_ADMIN") && err.contains("CAP_NET_ADMIN") && err.contains("CAP_BPF"),
        "{err}"
    );
}

#[test]
fn a_cgroup_root_that_is_not_cgroup_v2_is_refused_by_name() {
    if !privileged_or_skip("a_cgroup_root_that_is_not_cgroup_v2_is_refused_by_name") {
        return;
    }
    let dir = std::env::temp_dir();
    let (ok, err) = run(
        &[],
        &[
            "run",
            "--node-name",
            "startup-test",
            "--config-dir",
            dir.to_str().unwrap(),
            "--cgroup2",
            "/tmp",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("/tmp") && err.contains("not a cgroup v2 filesystem"),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/nodeward/startup-test").exists(),
        "nothing pinned"
    );
}

#[test]
fn a_missing_config_directory_is_refused_by_name() {
    let (ok, err) = run(
        &[],
        &[
            "run",
            "--node-name",
            "startup-test",
            "--config-dir",
            "/nonexistent/nodeward-config",
        ],
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent/nodeward-config"), "{err}");
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let (ok, out) = {
        let o = Command::new(nodeward_bin()).args(["run", "--help"]).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert!(ok);
    for flag in [
        "--node-name",
        "--config-dir",
        "--bpffs",
        "--cgroup2",
        "--socket-mark",
        "--drain-timeout",
        "--idle-timeout",
    ] {
        assert!(out.contains(flag), "{flag} missing from help:\n{out}");
    }
    assert!(
        out.contains("[env: NODEWARD_NODE_NAME=]") && out.contains("[env: NODEWARD_CONFIG_DIR=]"),
        "{out}"
    );
}

#[test]
fn a_config_file_that_does_not_parse_at_start_is_refused_naming_the_file_and_the_line() {
    let _g = shared();
    let test = "a_config_file_that_does_not_parse_at_start_is_refused_naming_the_file_and_the_line";
    if !privileged_or_skip(test) {
        return;
    }
    let mut t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("a", "mesh")]],
        namespaces: vec![("mesh".into(), true)],
    });
    // A mesh-wide STRICT policy, then a document whose YAML is broken on line 8.
    t.apply(
        "broken",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n---\napiVersion: v1\nkind: Pod: oops\n",
    );
    t.start_agent(0, &[]);
    let agent = t.agent_mut(0);
    let status = agent.wait_exit(patience(Duration::from_secs(10)));
    let log = agent.dump();
    let status = status.unwrap_or_else(|| panic!("the agent started without the file; log:\n{log}"));
    assert!(!status.success(), "{status}; log:\n{log}");
    let file = t.config_dir.join("broken.yaml");
    assert!(
        log.contains(&format!("{}: document 2 (line 8)", file.display())),
        "the error does not name the file and the line; log:\n{log}"
    );
    assert!(!t.pin_dir(0).exists(), "the agent attached something before refusing");
}
