//! `nodeward audit` as operators and CI run it: the exit status follows
//! `--fail-on`, the table names each finding, JSON carries the same.

use std::path::PathBuf;
use std::process::Command;

/// A config with one medium finding (PERMISSIVE in a production
/// namespace) and one low (a DENY that selects nothing).
const MEDIUM_AND_LOW: &str = "apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-relaxed, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ghost, namespace: prod}
spec:
  selector: {matchLabels: {app: gone}}
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
";

fn config(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nodeward-audit-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cluster.yaml"), yaml).unwrap();
    dir
}

fn audit(dir: &PathBuf, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeward"))
        .arg("audit")
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run nodeward audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_exit_status_follows_fail_on() {
    let dir = config("levels", MEDIUM_AND_LOW);
    for (fail_on, want) in [(None, 0), (Some("high"), 0), (Some("medium"), 1), (Some("low"), 1)] {
        let args: Vec<&str> = fail_on.map(|f| vec!["--fail-on", f]).unwrap_or_default();
        let (code, out) = audit(&dir, &args);
        assert_eq!(code, want, "--fail-on {fail_on:?}:\n{out}");
    }
    let clean = config("clean", "apiVersion: v1\nkind: Namespace\nmetadata: {name: tools}\n");
    let (code, out) = audit(&clean, &["--fail-on", "low"]);
    assert_eq!((code, out.as_str()), (0, "no findings\n"));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(clean);
}

#[test]
fn the_table_and_json_name_each_finding() {
    let dir = config("formats", MEDIUM_AND_LOW);
    let (_, table) = audit(&dir, &[]);
    let line = table
        .lines()
        .find(|l| l.contains("permissive_in_production"))
        .unwrap_or_else(|| panic!("no PERMISSIVE finding:\n{table}"));
    assert!(line.starts_with("medium"), "{line}");
    assert!(line.contains("PeerAuthentication prod/web-relaxed"), "{line}");
    assert!(line.contains("on port 8080"), "{line}");
    let (_, json) = audit(&dir, &["--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}:\n{json}"));
    let kinds: Vec<(&str, &str, &str)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["severity"].as_str().unwrap(),
                f["kind"].as_str().unwrap(),
                f["object"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                "medium",
                "permissive_in_production",
                "PeerAuthentication prod/web-relaxed"
            ),
            ("low", "selects_nothing", "AuthorizationPolicy prod/ghost"),
        ]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeward"))
        .args(["audit", "--config-dir", "/nonexistent/nodeward-cfg"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/nodeward-cfg"), "{err}");
}
