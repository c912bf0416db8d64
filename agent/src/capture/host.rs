//! What the capture layer needs from the host, checked before anything is
//! loaded so a missing piece is named exactly: privileges, cgroup v2, bpffs.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use super::CaptureError;

/// Capabilities the agent needs, with why.
const REQUIRED_CAPS: &[(u32, &str, &str)] = &[
    (21, "CAP_SYS_ADMIN", "enter pod network namespaces and mount bpffs"),
    (12, "CAP_NET_ADMIN", "mark its sockets and attach to network namespaces"),
];
const CAP_BPF: u32 = 39;

/// Fails with the list of missing capabilities.
pub(crate) fn check_privileges() -> Result<(), CaptureError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let mut missing: Vec<String> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _, _)| !has(*bit))
        .map(|(_, name, why)| format!("{name} (to {why})"))
        .collect();
    if !has(CAP_BPF) && !has(21) {
        missing.push("CAP_BPF or CAP_SYS_ADMIN (to load eBPF programs)".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::MissingPrivilege(missing.join(", ")))
    }
}

/// Finds the cgroup v2 mount from `/proc/mounts` (never a fixed path: it is
/// `/sys/fs/cgroup` on most hosts and `/sys/fs/cgroup/unified` on hybrid ones).
pub(crate) fn find_cgroup2() -> Result<PathBuf, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| CaptureError::Host {
        what: "/proc/mounts".into(),
        message: e.to_string(),
    })?;
    mount_point(&mounts, "cgroup2").ok_or(CaptureError::NoCgroup2)
}

/// Fails unless `path` is the root of a cgroup v2 filesystem.
pub(crate) fn check_cgroup2(path: &Path) -> Result<(), CaptureError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| CaptureError::Host {
        what: format!("cgroup v2 root {}", path.display()),
        message: e.to_string(),
    })?;
    if st.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(CaptureError::Host {
            what: format!("cgroup v2 root {}", path.display()),
            message: "is not a cgroup v2 filesystem".into(),
        });
    }
    Ok(())
}

/// The mount point of the first mount of filesystem type `fstype`.
pub(crate) fn mount_point(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, point, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(point.replace("\\040", " ")))
    })
}

/// Makes sure `path` is a bpffs mount, mounting one there if none is.
pub(crate) fn ensure_bpffs(path: &Path) -> Result<(), CaptureError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[2] == "bpf" && Path::new(f[1]) == path
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| CaptureError::Host {
        what: format!("bpffs mount point {}", path.display()),
        message: e.to_string(),
    })?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|e| CaptureError::Host {
        what: format!("mounting bpffs at {}", path.display()),
        message: e.to_string(),
    })?;
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            mount_point(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point("proc /proc proc rw 0 0\n", "cgroup2"), None);
    }
}
