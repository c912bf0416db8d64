//! The hand-off between `nodeward-cni` and the agent: one JSON line each
//! way over a Unix socket, bounded in size, so neither side can be made to
//! buffer without limit or wait forever.

#![forbid(unsafe_code)]

use std::io::{self, BufRead};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest line either side accepts, newline included.
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Where the agent listens unless the plugin's config says otherwise.
pub(crate) const DEFAULT_SOCKET: &str = "/var/run/nodeward/cni.sock";
/// How long the plugin waits for the agent's answer unless its config says
/// otherwise: capture takes milliseconds; a runtime retries a failed ADD.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the runtime asked the plugin to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Command {
    /// A pod's network was set up: capture it before it starts.
    Add,
    /// A sandbox of a pod is being torn down: release the pod if it is the one it runs in.
    Del,
    /// Is the pod still captured as ADD left it?
    Check,
}

/// The plugin's request: what the runtime told it about one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Request {
    /// ADD, DEL or CHECK.
    pub(crate) command: Command,
    /// `CNI_CONTAINERID`: the sandbox (a DEL of another sandbox of the pod changes nothing).
    pub(crate) container_id: String,
    /// `CNI_NETNS`: the pod's network namespace file (may be empty on DEL).
    pub(crate) netns: PathBuf,
    /// `K8S_POD_NAMESPACE`.
    pub(crate) pod_namespace: String,
    /// `K8S_POD_NAME`.
    pub(crate) pod_name: String,
    /// `K8S_POD_UID` (empty when the runtime does not pass it).
    pub(crate) pod_uid: String,
    /// The pod's addresses from the previous plugin's result.
    pub(crate) ips: Vec<IpAddr>,
}

impl Request {
    /// `namespace/name`, as the agent names pods.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Reply {
    /// ADD/CHECK: the pod is captured (steering attached, `PODS` filled).
    Captured,
    /// ADD/CHECK: the pod is enrolled or not yet known to the config; its
    /// namespace is held closed (steering, `PODS`, no listeners) until its
    /// config arrives.
    Held,
    /// ADD/CHECK: the config says the pod is outside the mesh.
    NotManaged,
    /// DEL: done (whatever the agent held in the named sandbox is released).
    Released,
    /// The agent refuses: the plugin fails the command with this message.
    Refused {
        /// Why, for the runtime's events.
        message: String,
    },
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    /// The socket failed or timed out.
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    /// The peer closed before a full line.
    #[error("the peer closed the connection before a full line")]
    Closed,
    /// More than [`MAX_LINE`] bytes without a newline.
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not the expected JSON object.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads one newline-terminated JSON message of at most [`MAX_LINE`] bytes.
pub(crate) fn read_message<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> Result<T, ProtocolError> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(if n >= MAX_LINE {
            ProtocolError::TooLong
        } else {
            ProtocolError::Closed
        });
    }
    Ok(serde_json::from_slice(&line)?)
}

/// One message as a line, newline included.
pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // A struct of strings, addresses and enums always serializes.
    let mut out = serde_json::to_vec(msg).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            command: Command::Add,
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod_namespace: "mesh".into(),
            pod_name: "a".into(),
            pod_uid: "uid-a".into(),
            ips: vec!["10.1.1.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        }
    }

    #[test]
    fn a_request_and_each_reply_survive_the_wire() {
        let req = request();
        let got: Request = read_message(&mut &encode(&req)[..]).unwrap();
        assert_eq!(got, req);
        for reply in [
            Reply::Captured,
            Reply::Held,
            Reply::NotManaged,
            Reply::Released,
            Reply::Refused { message: "no".into() },
        ] {
            let got: Reply = read_message(&mut &encode(&reply)[..]).unwrap();
            assert_eq!(got, reply);
        }
        assert_eq!(encode(&Reply::NotManaged), b"{\"status\":\"not_managed\"}\n");
    }

    #[test]
    fn an_overlong_truncated_or_unknown_message_is_refused() {
        let long = vec![b' '; MAX_LINE + 10];
        assert!(matches!(
            read_message::<Reply>(&mut &long[..]),
            Err(ProtocolError::TooLong)
        ));
        assert!(matches!(
            read_message::<Reply>(&mut &b"{\"status\":"[..]),
            Err(ProtocolError::Closed)
        ));
        assert!(matches!(
            read_message::<Reply>(&mut &b"{\"status\":\"maybe\"}\n"[..]),
            Err(ProtocolError::Json(_))
        ));
    }
}
