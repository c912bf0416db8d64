//! `nodeward-cni install`: what the DaemonSet's init container runs to
//! put the plugin on the node: the binary into the CNI bin dir and a
//! `nodeward-cni` entry at the end of the chain the runtime uses.

#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Why installation failed (the init container exits non-zero and the
/// kubelet retries it).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read, written or renamed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The primary CNI has not written its network config yet.
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {0} yet")]
    NoConfig(PathBuf),
    /// The runtime's network config is not one to chain into.
    #[error("{path}: {problem}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Where to install, from `install --bin-dir D --conf-dir D --socket P`.
#[derive(Debug, PartialEq, Eq)]
pub struct InstallArgs {
    /// The node's CNI bin dir (as mounted).
    pub bin_dir: PathBuf,
    /// The node's CNI conf dir (as mounted).
    pub conf_dir: PathBuf,
    /// The agent's socket, as the plugin on the host will see it.
    pub socket: PathBuf,
}

impl InstallArgs {
    /// Parses the three flags; every one is required.
    pub fn parse(args: &[String]) -> Result<InstallArgs, String> {
        let get = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
                .ok_or_else(|| format!("install: {flag} DIR is required"))
        };
        Ok(InstallArgs {
            bin_dir: get("--bin-dir")?,
            conf_dir: get("--conf-dir")?,
            socket: get("--socket")?,
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `exe` into the bin dir and chains the plugin into the network
/// config the runtime uses (the first by name); returns that file.
pub fn install(exe: &Path, args: &InstallArgs) -> Result<PathBuf, InstallError> {
    let target = args.bin_dir.join("nodeward-cni");
    let tmp = args.bin_dir.join(".nodeward-cni.tmp");
    std::fs::copy(exe, &tmp).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))?;

    let mut names: Vec<PathBuf> = std::fs::read_dir(&args.conf_dir)
        .map_err(io(&args.conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    names.sort();
    let first = names
        .first()
        .ok_or_else(|| InstallError::NoConfig(args.conf_dir.clone()))?;
    let raw = std::fs::read(first).map_err(io(first))?;
    let bad = |problem: String| InstallError::BadConfig {
        path: first.clone(),
        problem,
    };
    let conf: Value = serde_json::from_slice(&raw).map_err(|e| bad(format!("not JSON: {e}")))?;
    let single = conf.get("plugins").is_none();
    let chained = chain(conf, &args.socket).map_err(bad)?;
    // A single-plugin `.conf` becomes a `.conflist` of the same name.
    let out = if single {
        first.with_extension("conflist")
    } else {
        first.clone()
    };
    let tmp = args.conf_dir.join(".nodeward-cni.conflist.tmp");
    let mut text = serde_json::to_vec_pretty(&chained).unwrap_or_default();
    text.push(b'\n');
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    if out != *first {
        std::fs::remove_file(first).map_err(io(first))?;
    }
    Ok(out)
}

/// The network config with `nodeward-cni` last in its chain (added once;
/// a present entry gets the socket updated).
pub(crate) fn chain(mut conf: Value, socket: &Path) -> Result<Value, String> {
    if conf.get("plugins").is_none() {
        let obj = conf.as_object_mut().ok_or("not a JSON object")?;
        let version = obj.remove("cniVersion").unwrap_or(json!("1.0.0"));
        let name = obj.remove("name").ok_or("no network name")?;
        conf = json!({ "cniVersion": version, "name": name, "plugins": [Value::Object(obj.clone())] });
    }
    let plugins = conf["plugins"].as_array_mut().ok_or("plugins is not a list")?;
    let ours = json!({ "type": "nodeward-cni", "agentSocket": socket });
    match plugins.iter_mut().find(|p| p["type"] == "nodeward-cni") {
        Some(p) => p["agentSocket"] = json!(socket),
        None => plugins.push(ours),
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_chained_last_once_and_a_single_conf_becomes_a_list() {
        let socket = Path::new("/var/run/nodeward/cni.sock");
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}, {"type": "portmap"}]});
        let once = chain(list, socket).unwrap();
        assert_eq!(
            once["plugins"][2],
            json!({"type": "nodeward-cni", "agentSocket": socket})
        );
        let twice = chain(once.clone(), socket).unwrap();
        assert_eq!(twice, once);

        let single = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"});
        let got = chain(single, socket).unwrap();
        assert_eq!(got["name"], "bridge-net");
        assert_eq!(got["cniVersion"], "0.4.0");
        assert_eq!(got["plugins"][0], json!({"type": "bridge", "bridge": "cni0"}));
        assert_eq!(got["plugins"][1]["type"], "nodeward-cni");
        assert!(chain(json!({"type": "bridge"}), socket).is_err());
        assert!(chain(json!({"name": "x", "plugins": {}}), socket).is_err());
    }

    #[test]
    fn install_writes_the_binary_and_chains_into_the_first_config() {
        let dir = std::env::temp_dir().join(format!("nodeward-cni-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let args = InstallArgs {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            socket: "/var/run/nodeward/cni.sock".into(),
        };
        let exe = dir.join("exe");
        std::fs::write(&exe, b"#!/bin/true\n").unwrap();
        assert!(matches!(install(&exe, &args), Err(InstallError::NoConfig(_))));
        std::fs::write(
            conf.join("10-net.conf"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(conf.join("20-other.conflist"), br#"{"name":"o","plugins":[]}"#).unwrap();
        let out = install(&exe, &args).unwrap();
        assert_eq!(out, conf.join("10-net.conflist"));
        assert!(!conf.join("10-net.conf").exists());
        let written: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(written["plugins"][1]["type"], "nodeward-cni");
        let other: Value = serde_json::from_slice(&std::fs::read(conf.join("20-other.conflist")).unwrap()).unwrap();
        assert_eq!(
            other["plugins"],
            json!([]),
            "only the config the runtime uses is changed"
        );
        let mode = std::fs::metadata(bin.join("nodeward-cni"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::write(conf.join("05-bad.conflist"), b"{").unwrap();
        let e = install(&exe, &args).unwrap_err().to_string();
        assert!(e.contains("05-bad.conflist") && e.contains("not JSON"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn install_flags_are_all_required() {
        let args: Vec<String> = ["--bin-dir", "/b", "--conf-dir", "/c", "--socket", "/s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            InstallArgs::parse(&args),
            Ok(InstallArgs {
                bin_dir: "/b".into(),
                conf_dir: "/c".into(),
                socket: "/s".into()
            })
        );
        let e = InstallArgs::parse(&args[..4]).unwrap_err();
        assert!(e.contains("--socket"), "{e}");
    }
}
