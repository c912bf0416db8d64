//! The plugin as a runtime drives it: environment, config on stdin, and a
//! stand-in agent on a Unix socket.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;

use serde_json::{Value, json};

use super::*;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("nodeward-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent that answers one request with `reply` and hands the request back.
fn fake_agent(socket: &Path, reply: Reply) -> mpsc::Receiver<Request> {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let req: Request = protocol::read_message(&mut BufReader::new(&s)).unwrap();
        s.write_all(&protocol::encode(&reply)).unwrap();
        tx.send(req).unwrap();
    });
    rx
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
        "ips": [
            {"address": "10.9.1.10/24", "gateway": "10.9.1.1", "interface": 0},
            {"address": "fd00:9:1::10/64", "interface": 0}
        ],
        "dns": {}
    })
}

fn config(socket: &Path, prev: Option<Value>) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "nodeward-cni",
        "agentSocket": socket,
        "timeoutSeconds": 2,
    });
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(command: &str) -> HashMap<String, String> {
    HashMap::from([
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), "sandbox-1".into()),
        ("CNI_NETNS".into(), "/var/run/netns/p".into()),
        ("CNI_IFNAME".into(), "eth0".into()),
        (
            "CNI_ARGS".into(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=uid-a"
                .into(),
        ),
        ("CNI_PATH".into(), "/opt/cni/bin".into()),
    ])
}

fn run_with(env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    run(|k| env.get(k).cloned(), stdin)
}

fn error_object(out: &Outcome) -> Value {
    assert_eq!(out.status, 1, "must fail: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn version_lists_the_supported_spec_versions() {
    let out = run_with(&env("VERSION"), &b"{\"cniVersion\":\"1.0.0\"}"[..]);
    assert_eq!(out.status, 0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}

#[test]
fn add_hands_the_pod_to_the_agent_and_passes_the_previous_result_on_unchanged() {
    let dir = Scratch::new("add");
    let socket = dir.0.join("cni.sock");
    let seen = fake_agent(&socket, Reply::Captured);
    let out = run_with(&env("ADD"), &config(&socket, Some(prev_result()))[..]);
    assert_eq!(out.status, 0, "{out:?}");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result, prev_result());
    let req = seen.recv().unwrap();
    assert_eq!(
        req,
        Request {
            command: Command::Add,
            container_id: "sandbox-1".into(),
            netns: "/var/run/netns/p".into(),
            pod_namespace: "mesh".into(),
            pod_name: "a".into(),
            pod_uid: "uid-a".into(),
            ips: vec!["10.9.1.10".parse().unwrap(), "fd00:9:1::10".parse().unwrap()],
        }
    );
}

#[test]
fn add_fails_with_try_again_later_when_the_agent_is_unreachable() {
    let dir = Scratch::new("down");
    let socket = dir.0.join("cni.sock");
    let out = run_with(&env("ADD"), &config(&socket, Some(prev_result()))[..]);
    let e = error_object(&out);
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(e["msg"].as_str().unwrap().contains("must not start uncaptured"), "{e}");
}

#[test]
fn add_fails_when_the_agent_refuses_or_never_answers() {
    let dir = Scratch::new("refuse");
    let socket = dir.0.join("cni.sock");
    let _seen = fake_agent(
        &socket,
        Reply::Refused {
            message: "namespace gone".into(),
        },
    );
    let e = error_object(&run_with(&env("ADD"), &config(&socket, Some(prev_result()))[..]));
    assert_eq!(e["code"], code::REFUSED);
    assert!(e["msg"].as_str().unwrap().contains("mesh/a"), "{e}");

    let silent = dir.0.join("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let e = error_object(&run_with(&env("ADD"), &config(&silent, Some(prev_result()))[..]));
    assert_eq!(e["code"], code::TRY_AGAIN_LATER, "{e}");
}

#[test]
fn bad_input_is_a_spec_error_naming_the_problem() {
    let dir = Scratch::new("bad");
    let socket = dir.0.join("cni.sock");
    // (environment, stdin, expected code, a word the message must contain)
    type Case<'a> = (HashMap<String, String>, Vec<u8>, u32, &'a str);
    let cases: Vec<Case> = vec![
        (
            env("ADD"),
            b"not json".to_vec(),
            code::DECODING_FAILURE,
            "not valid JSON",
        ),
        (
            env("ADD"),
            br#"{"cniVersion":"0.2.0","prevResult":{}}"#.to_vec(),
            code::INCOMPATIBLE_VERSION,
            "0.2.0",
        ),
        (env("ADD"), config(&socket, None), code::INVALID_CONFIG, "prevResult"),
        (
            env("ADD"),
            config(&socket, Some(json!({"ips": [{"address": "ten/8"}]}))),
            code::INVALID_CONFIG,
            "ips[0]",
        ),
        (
            {
                let mut e = env("ADD");
                e.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
                e
            },
            config(&socket, Some(prev_result())),
            code::INVALID_ENVIRONMENT,
            "K8S_POD_NAME",
        ),
        (
            {
                let mut e = env("ADD");
                e.remove("CNI_NETNS");
                e
            },
            config(&socket, Some(prev_result())),
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS",
        ),
        (env("FROB"), config(&socket, None), code::INVALID_ENVIRONMENT, "FROB"),
    ];
    for (env, stdin, want, needle) in cases {
        let e = error_object(&run_with(&env, &stdin[..]));
        assert_eq!(e["code"], want, "{e}");
        assert!(e["msg"].as_str().unwrap().contains(needle), "{e} lacks {needle}");
    }
}

#[test]
fn del_succeeds_without_the_agent_and_check_does_not() {
    let dir = Scratch::new("del");
    let socket = dir.0.join("cni.sock");
    let out = run_with(&env("DEL"), &config(&socket, None)[..]);
    assert_eq!(out.status, 0, "{out:?}");
    assert!(out.stdout.is_empty());
    let e = error_object(&run_with(&env("CHECK"), &config(&socket, Some(prev_result()))[..]));
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
}

#[test]
fn cni_args_are_split_into_pairs() {
    assert_eq!(
        parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a;junk;K8S_POD_UID=u=1"),
        vec![
            ("IgnoreUnknown".to_string(), "1".to_string()),
            ("K8S_POD_NAME".to_string(), "a".to_string()),
            ("K8S_POD_UID".to_string(), "u=1".to_string()),
        ]
    );
}
