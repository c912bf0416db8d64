//! The kernel's own view of what is attached, through `bpftool`: an
//! observer independent of the agent under test.

use serde_json::Value;

use crate::netns::sh_out;

/// One BPF link.
#[derive(Clone, Debug)]
pub struct Link {
    /// Link id.
    pub id: u64,
    /// `cgroup`, `netns`, ...
    pub kind: String,
    /// Attach type, e.g. `cgroup_inet4_connect`, `sk_lookup`.
    pub attach_type: String,
    /// The program's id.
    pub prog_id: u64,
    /// The program's name.
    pub prog_name: String,
    /// For netns links, the namespace inode.
    pub netns_ino: Option<u64>,
}

fn json(args: &[&str]) -> Value {
    let mut v = vec!["bpftool", "-j"];
    v.extend_from_slice(args);
    serde_json::from_str(&sh_out(&v)).unwrap_or(Value::Null)
}

/// Every link on the host, with program names.
pub fn links() -> Vec<Link> {
    let progs = json(&["prog", "show"]);
    let name_of = |id: u64| {
        progs
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"].as_u64() == Some(id)))
            .and_then(|p| p["name"].as_str())
            .unwrap_or("")
            .to_string()
    };
    json(&["link", "show"])
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    let prog_id = l["prog_id"].as_u64().unwrap_or(0);
                    Link {
                        id: l["id"].as_u64().unwrap_or(0),
                        kind: l["type"].as_str().unwrap_or("").into(),
                        attach_type: l["attach_type"].as_str().unwrap_or("").into(),
                        prog_id,
                        prog_name: name_of(prog_id),
                        netns_ino: l["netns_ino"].as_u64(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Id of the program behind a pinned link.
pub fn pinned_link_prog(path: &str) -> Option<u64> {
    json(&["link", "show", "pinned", path])["prog_id"].as_u64()
}

/// How many times a program has run (needs `kernel.bpf_stats_enabled=1`).
pub fn run_count(prog_id: u64) -> u64 {
    json(&["prog", "show", "id", &prog_id.to_string()])["run_cnt"]
        .as_u64()
        .unwrap_or(0)
}

/// Inode of a named network namespace.
pub fn netns_ino(name: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(crate::netns::path(name))
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Enables BPF run statistics while alive.
pub struct StatsGuard;

impl StatsGuard {
    /// Turns statistics on.
    pub fn enable() -> StatsGuard {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        StatsGuard
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
}
