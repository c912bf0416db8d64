//! A container runtime's part of CNI, for tests: pod namespaces set up and
//! torn down by the real reference plugins (`loopback`, `bridge` with
//! `host-local`) chained with `nodeward-cni`, each exec'd with the `CNI_*`
//! environment and its configuration on stdin exactly as a runtime does,
//! inside the node's namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::netns::{path, sh};

/// Where Debian's `containernetworking-plugins` installs the plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `nodeward-cni` binary: next to the `nodeward` under test.
pub fn plugin_bin() -> PathBuf {
    crate::nodeward_bin().with_file_name("nodeward-cni")
}

/// A pod sandbox: its own network namespace, deleted when dropped.
pub struct CniPod {
    /// Network namespace name (under `/var/run/netns`).
    pub netns: String,
    /// The sandbox id the runtime passes as `CNI_CONTAINERID`.
    pub container_id: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod uid.
    pub uid: String,
}

impl CniPod {
    /// Creates the namespace `nwt<id>-cni-<name>` with nothing in it.
    pub fn new(id: u32, name: &str, namespace: &str) -> CniPod {
        let netns = format!("nwt{id}-cni-{name}");
        sh(&["ip", "netns", "add", &netns]);
        CniPod {
            netns,
            container_id: format!("sandbox-{id}-{name}"),
            name: name.into(),
            namespace: namespace.into(),
            uid: format!("uid-{id}-{name}"),
        }
    }

    /// The namespace file, as the runtime passes it.
    pub fn netns_path(&self) -> String {
        path(&self.netns)
    }
}

impl Drop for CniPod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

/// A plugin's error object (the spec's `code`/`msg`), with its exit status.
#[derive(Debug)]
pub struct CniError {
    /// The plugin that failed.
    pub plugin: String,
    /// What it printed: the spec's error object.
    pub error: Value,
    /// What it wrote to stderr.
    pub stderr: String,
}

/// A node's pod network: loopback, then the conflist `bridge` →
/// `nodeward-cni`.
pub struct CniNetwork {
    node_netns: String,
    conflist: Value,
    data_dir: PathBuf,
}

impl CniNetwork {
    /// The pod network of the node in namespace `node_netns`: bridge `cni0`
    /// with `subnet` (one pod address per `10.x.y.10`..`.20`), handing pods to
    /// the agent at `socket`.
    pub fn bridge(node_netns: &str, subnet_prefix: &str, socket: &Path, data_dir: PathBuf) -> CniNetwork {
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "nodeward-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": format!("{subnet_prefix}.0/24"),
                            "rangeStart": format!("{subnet_prefix}.10"),
                            "rangeEnd": format!("{subnet_prefix}.20"),
                        }]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": data_dir,
                    }
                },
                {"type": "nodeward-cni", "agentSocket": socket, "timeoutSeconds": 5}
            ]
        });
        CniNetwork {
            node_netns: node_netns.into(),
            conflist,
            data_dir,
        }
    }

    /// ADD, as a runtime does it: loopback, then the chain, each plugin
    /// getting the previous one's result. Returns the final result.
    pub fn add(&self, pod: &CniPod) -> Result<Value, CniError> {
        let lo = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        self.exec("ADD", pod, lo)?;
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, prev.as_ref());
            prev = Some(self.exec("ADD", pod, conf)?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL, in reverse order, each plugin getting the cached ADD result.
    pub fn del(&self, pod: &CniPod, result: Option<&Value>) -> Result<(), CniError> {
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_conf(plugin, result);
            self.exec("DEL", pod, conf)?;
        }
        Ok(())
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().cloned().unwrap_or_default()
    }

    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    fn exec(&self, command: &str, pod: &CniPod, conf: Value) -> Result<Value, CniError> {
        let kind = conf["type"].as_str().unwrap_or_default().to_string();
        let bin = if kind == "nodeward-cni" {
            plugin_bin()
        } else {
            Path::new(PLUGIN_DIR).join(&kind)
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.container_id, pod.uid
        );
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", path(&self.node_netns)))
            .arg("--")
            .arg(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", PLUGIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("exec {}: {e}", bin.display()));
        let stdin = serde_json::to_vec(&conf).expect("config");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&stdin)
            .expect("write config");
        let out = child.wait_with_output().expect("plugin output");
        let parsed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() {
            Ok(parsed)
        } else {
            Err(CniError {
                plugin: kind,
                error: parsed,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
