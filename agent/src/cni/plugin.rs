//! `nodeward-cni`, a chained CNI plugin (spec 1.0, also 0.3.x and 0.4.0):
//! on ADD it hands the pod to the agent and succeeds only once the agent
//! has captured it (or says the pod is outside the mesh), passing the
//! previous plugin's result on unchanged. Everything here is a function of
//! the environment and stdin, so it is tested without a runtime.

#![forbid(unsafe_code)]

use std::io::{BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::protocol::{self, Command, ProtocolError, Reply, Request};

/// Spec versions whose configuration and result shapes this plugin reads
/// (0.3.0 introduced the `ips` list it takes addresses from).
pub(crate) const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version this plugin answers VERSION with.
pub(crate) const CNI_VERSION: &str = "1.0.0";
/// Largest configuration read from stdin.
const MAX_CONFIG: u64 = 1 << 20;

/// The spec's well-known error codes this plugin uses.
pub(crate) mod code {
    /// The configuration's `cniVersion` is not supported.
    pub(crate) const INCOMPATIBLE_VERSION: u32 = 1;
    /// A required `CNI_*` variable or `CNI_ARGS` entry is missing or bad.
    pub(crate) const INVALID_ENVIRONMENT: u32 = 4;
    /// Reading stdin failed.
    pub(crate) const IO_FAILURE: u32 = 5;
    /// stdin is not JSON.
    pub(crate) const DECODING_FAILURE: u32 = 6;
    /// The configuration is not one this plugin can act on.
    pub(crate) const INVALID_CONFIG: u32 = 7;
    /// The agent is unreachable or timed out: the runtime retries.
    pub(crate) const TRY_AGAIN_LATER: u32 = 11;
    /// The agent refused the pod (plugin-specific, 100 and up).
    pub(crate) const REFUSED: u32 = 100;
}

/// Why a command failed; rendered as the spec's error object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PluginError {
    /// See [`code::INCOMPATIBLE_VERSION`].
    #[error("cniVersion {0:?} is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0)")]
    Version(String),
    /// See [`code::INVALID_ENVIRONMENT`].
    #[error("{0}")]
    Environment(String),
    /// See [`code::IO_FAILURE`].
    #[error("reading the network configuration from stdin: {0}")]
    Io(std::io::Error),
    /// See [`code::DECODING_FAILURE`].
    #[error("the network configuration on stdin is not valid JSON: {0}")]
    Decode(serde_json::Error),
    /// See [`code::INVALID_CONFIG`].
    #[error("{0}")]
    Config(String),
    /// See [`code::TRY_AGAIN_LATER`].
    #[error("nodeward agent at {socket}: {problem}; the pod must not start uncaptured")]
    Unreachable {
        /// The agent's socket.
        socket: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// See [`code::REFUSED`].
    #[error("nodeward agent refused pod {pod}: {message}")]
    Refused {
        /// `namespace/name`.
        pod: String,
        /// The agent's reason.
        message: String,
    },
}

impl PluginError {
    /// The spec's error code for this error.
    pub(crate) fn code(&self) -> u32 {
        match self {
            PluginError::Version(_) => code::INCOMPATIBLE_VERSION,
            PluginError::Environment(_) => code::INVALID_ENVIRONMENT,
            PluginError::Io(_) => code::IO_FAILURE,
            PluginError::Decode(_) => code::DECODING_FAILURE,
            PluginError::Config(_) => code::INVALID_CONFIG,
            PluginError::Unreachable { .. } => code::TRY_AGAIN_LATER,
            PluginError::Refused { .. } => code::REFUSED,
        }
    }
}

/// What the process prints and exits with.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Written to stdout.
    pub stdout: Vec<u8>,
    /// Written to stderr (the runtime logs it).
    pub stderr: String,
    /// The exit status: 0 on success.
    pub status: i32,
}

/// The plugin's own part of the network configuration; the rest
/// (`name`, `type`, `runtimeConfig`, ...) is the runtime's and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// Runs one CNI command: `env` looks up the process environment, `stdin`
/// is the network configuration.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: impl std::io::Read) -> Outcome {
    let mut version = CNI_VERSION.to_string();
    match execute(&env, stdin, &mut version) {
        Ok((stdout, stderr)) => Outcome {
            stdout,
            stderr,
            status: 0,
        },
        Err(e) => {
            let mut stdout = serde_json::to_vec(&json!({
                "cniVersion": version,
                "code": e.code(),
                "msg": e.to_string(),
            }))
            .unwrap_or_default();
            stdout.push(b'\n');
            Outcome {
                stdout,
                stderr: format!("nodeward-cni: {e}\n"),
                status: 1,
            }
        }
    }
}

fn execute(
    env: &impl Fn(&str) -> Option<String>,
    stdin: impl std::io::Read,
    version: &mut String,
) -> Result<(Vec<u8>, String), PluginError> {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        let out = json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS });
        return Ok((line(&out), String::new()));
    }
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "" => return Err(PluginError::Environment("CNI_COMMAND is not set".into())),
        other => return Err(PluginError::Environment(format!("CNI_COMMAND {other:?} is unknown"))),
    };
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(stdin, MAX_CONFIG), &mut raw).map_err(PluginError::Io)?;
    let conf: NetConf = serde_json::from_slice(&raw).map_err(PluginError::Decode)?;
    if !conf.cni_version.is_empty() {
        version.clone_from(&conf.cni_version);
    }
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::Version(conf.cni_version));
    }
    let required = |name: &str| {
        env(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| PluginError::Environment(format!("{name} is not set")))
    };
    let container_id = required("CNI_CONTAINERID")?;
    let netns = match command {
        Command::Del => env("CNI_NETNS").unwrap_or_default(),
        _ => required("CNI_NETNS")?,
    };
    required("CNI_IFNAME")?;
    let args = parse_cni_args(&env("CNI_ARGS").unwrap_or_default());
    let arg = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (pod_namespace, pod_name) = match (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => (ns, name),
        // Without them no pod can be identified; DEL has nothing to undo.
        _ if command == Command::Del => return Ok((Vec::new(), String::new())),
        _ => {
            return Err(PluginError::Environment(
                "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME: nodeward-cni only serves Kubernetes pods".into(),
            ));
        }
    };
    let ips = match (&conf.prev_result, command) {
        (Some(prev), _) => prev_ips(prev)?,
        (None, Command::Del) => Vec::new(),
        (None, _) => {
            return Err(PluginError::Config(
                "no prevResult: nodeward-cni must be chained after the plugin that gives the pod its addresses".into(),
            ));
        }
    };
    let request = Request {
        command,
        container_id,
        netns: netns.into(),
        pod_namespace,
        pod_name,
        pod_uid: arg("K8S_POD_UID").unwrap_or_default(),
        ips,
    };
    let socket = conf
        .agent_socket
        .unwrap_or_else(|| PathBuf::from(protocol::DEFAULT_SOCKET));
    let timeout = conf
        .timeout_seconds
        .filter(|s| *s > 0)
        .map_or(protocol::DEFAULT_TIMEOUT, Duration::from_secs);
    let reply = match ask(&socket, timeout, &request) {
        Ok(r) => r,
        // The agent purges pods it no longer manages when it comes back;
        // failing DEL would only wedge the runtime's teardown.
        Err(e) if command == Command::Del => {
            return Ok((Vec::new(), format!("nodeward-cni: DEL of {}: {e}\n", request.key())));
        }
        Err(e) => return Err(e),
    };
    match (command, reply) {
        (_, Reply::Refused { message }) => Err(PluginError::Refused {
            pod: request.key(),
            message,
        }),
        (Command::Add, Reply::Captured | Reply::Held | Reply::NotManaged) => {
            // Chained: the previous result is this plugin's result.
            Ok((line(conf.prev_result.as_ref().unwrap_or(&Value::Null)), String::new()))
        }
        (Command::Check, Reply::Captured | Reply::Held | Reply::NotManaged) | (Command::Del, _) => {
            Ok((Vec::new(), String::new()))
        }
        (_, other) => Err(PluginError::Refused {
            pod: request.key(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// `K8S_POD_NAME=a;K8S_POD_NAMESPACE=b`: pairs; entries without `=` are skipped.
pub(crate) fn parse_cni_args(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The addresses of a 0.3+ result: `ips[].address` in CIDR form.
fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, PluginError> {
    let bad = |why: String| PluginError::Config(format!("prevResult: {why}"));
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let list = ips.as_array().ok_or_else(|| bad("ips is not a list".into()))?;
    let mut out = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let addr = entry
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("ips[{i}] has no address")))?;
        let ip = addr.split('/').next().unwrap_or(addr);
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| bad(format!("ips[{i}].address {addr:?} is not an address")))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Sends `request` to the agent at `socket` and waits up to `timeout` for
/// its answer.
pub(crate) fn ask(socket: &Path, timeout: Duration, request: &Request) -> Result<Reply, PluginError> {
    let unreachable = |problem: String| PluginError::Unreachable {
        socket: socket.to_path_buf(),
        problem,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| unreachable(format!("connecting: {e}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable(e.to_string()))?;
    stream
        .write_all(&protocol::encode(request))
        .map_err(|e| unreachable(format!("sending: {e}")))?;
    match protocol::read_message(&mut BufReader::new(&stream)) {
        Ok(r) => Ok(r),
        Err(ProtocolError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            Err(unreachable(format!("no answer within {}s", timeout.as_secs())))
        }
        Err(e) => Err(unreachable(format!("answer: {e}"))),
    }
}

#[cfg(test)]
mod tests;
