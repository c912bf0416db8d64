//! The capture layer: loads Nodeward's eBPF programs, attaches them, and
//! keeps what fail-closed needs pinned in bpffs.
//!
//! Node-wide programs (connect, getpeername, getsockname, sockops) attach once to the
//! cgroup v2 root and act only on sockets whose network-namespace cookie is
//! in `PODS`, and (connect) on the node's own connections to its pods,
//! which are bound to the probe source (`probe.rs`). Each managed pod gets its own `sk_lookup` instance, attached to
//! its namespace, with the pod's cookie compiled in as a constant (sk_lookup
//! programs cannot ask for their namespace's cookie).
//!
//! Everything lives under `<bpffs>/nodeward/<node>/v1/` (`v1` is [`LAYOUT`]): `maps/`, `links/`
//! and `pods/<cookie>/` (its `sk_lookup` link, `uid-<hash>/`, the pod
//! captured there, and `sandbox-<hash>/`, the CNI sandbox it was handed
//! over as, if it was). Links are pinned, so when the agent dies the
//! programs stay: a managed pod's `connect()` still goes to the (now closed)
//! outbound port and is refused, and inbound connections find no listener
//! and are dropped. A restarted agent attaches fresh links first and only
//! then unpins the old ones, so there is no moment without capture and no
//! duplicate left behind. `nodeward cleanup` removes the directory, which
//! detaches everything.

pub(crate) mod host;
pub(crate) mod keys;
pub(crate) mod map;
pub(crate) mod probe;
pub(crate) mod program_log;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use nodeward_common::{ListenerKey, PodInfo, PortKey, SockAddr, SockKey, names};

pub(crate) use map::BpfMap;
use program_log::ProgramLog;

use crate::netns::Netns;

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeward-ebpf"));

/// Node-wide cgroup programs, each pinned under its own name.
const CGROUP_PROGRAMS: &[&str] = &[
    names::NW_CONNECT4,
    names::NW_CONNECT6,
    names::NW_GETPEER4,
    names::NW_GETPEER6,
    names::NW_GETSOCK4,
    names::NW_GETSOCK6,
];

/// Errors of the capture layer, each naming what is missing or wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The agent lacks capabilities.
    #[error("missing privilege: {0}")]
    MissingPrivilege(String),
    /// No cgroup v2 hierarchy is mounted.
    #[error(
        "no cgroup v2 filesystem is mounted (see /proc/mounts); Nodeward attaches its connect() programs to the cgroup v2 root"
    )]
    NoCgroup2,
    /// A host resource is unusable.
    #[error("{what}: {message}")]
    Host {
        /// The resource.
        what: String,
        /// Why.
        message: String,
    },
    /// The kernel refused a program (usually a missing kernel feature).
    #[error("the kernel refused eBPF program {program} ({hint}): {message}")]
    Program {
        /// Program name.
        program: &'static str,
        /// The kernel feature it needs.
        hint: &'static str,
        /// The loader's error.
        message: String,
    },
    /// A pinned object could not be created, opened or replaced.
    #[error("bpffs pin {path}: {message}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The probe source addresses could not be set up.
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    /// A pinned map is not what the agent expects.
    #[error(transparent)]
    MapLayout(#[from] map::MapError),
    /// The node's pins are of a layout this agent cannot reuse.
    #[error(
        "bpffs pins of layout v{found} at {path}: this agent uses layout v{LAYOUT} and cannot reuse them, so it takes nothing over and the node's pods stay with the agent that pinned them; run an agent of layout v{found}, or drain the node and run `nodeward cleanup` first",
        path = .path.display()
    )]
    Layout {
        /// The other layout's directory.
        path: PathBuf,
        /// Its layout number.
        found: u32,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Where and how to attach.
#[derive(Clone, Debug)]
pub(crate) struct CaptureConfig {
    /// bpffs mount point.
    pub(crate) bpffs: PathBuf,
    /// This node's name, which scopes the pin directory.
    pub(crate) node_name: String,
    /// cgroup v2 root to attach to; discovered when `None`.
    pub(crate) cgroup2: Option<PathBuf>,
    /// Socket mark of the agent's own sockets.
    pub(crate) socket_mark: u32,
    /// Whether the programs record their rare decisions (`--ebpf-log`).
    pub(crate) ebpf_log: bool,
    /// Whether pod-local legs are joined by `sk_msg` (`--local-redirect`).
    pub(crate) local_redirect: bool,
}

/// The layout of the pins: the maps' names, key and value types and what
/// the programs mean by them. An agent reuses (and takes over) only pins of
/// its own layout; a change to any of these takes a new number.
pub(crate) const LAYOUT: u32 = 1;

/// The pin directory of a node.
pub(crate) fn pin_dir(bpffs: &Path, node_name: &str) -> PathBuf {
    bpffs.join("nodeward").join(node_name).join(format!("v{LAYOUT}"))
}

/// Refuses pins of another layout under the node's directory: neither the
/// programs nor the agent could read the other layout's maps, so taking
/// over would leave every pod of the node uncaptured. The agent that made
/// them keeps the pods.
fn check_layout(bpffs: &Path, node_name: &str) -> Result<(), CaptureError> {
    let node_dir = bpffs.join("nodeward").join(node_name);
    let Ok(entries) = std::fs::read_dir(&node_dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if n != LAYOUT {
            return Err(CaptureError::Layout {
                path: e.path(),
                found: n,
            });
        }
    }
    Ok(())
}

/// The maps the agent reads and writes.
#[derive(Debug)]
pub(crate) struct Maps {
    /// Managed pods by namespace cookie.
    pub(crate) pods: BpfMap<u64, PodInfo>,
    /// Excluded ports.
    pub(crate) excluded_ports: BpfMap<PortKey, u8>,
    /// Original destinations of captured outbound connections.
    pub(crate) orig_dst: BpfMap<SockKey, SockAddr>,
    /// Client addresses apps see on inbound connections.
    pub(crate) inbound_peer: BpfMap<SockKey, SockAddr>,
    /// Clients of hops about to connect, by hop socket cookie (sockops
    /// moves each into `inbound_peer`).
    pub(crate) hop_peer: BpfMap<u64, SockAddr>,
    /// Listener sockets for sk_lookup (value: socket fd on insert).
    pub(crate) listeners: BpfMap<ListenerKey, u32>,
    /// The probe source addresses (`probe.rs`): connections from them to
    /// a pod are the node's own, kubelet probes among them.
    pub(crate) probe_sources: BpfMap<[u32; 4], u8>,
    /// Addresses of this node's managed pods: the node's connections to
    /// them are bound to the probe source.
    pub(crate) pod_addrs: BpfMap<[u32; 4], u8>,
    /// Cookies of the agent's own sockets during their `connect()`: the
    /// connect hooks leave a marked socket alone only if it is here
    /// (`proxy::socket::Connecting::start`).
    pub(crate) agent_sockets: BpfMap<u64, u8>,
}

/// The attached capture layer of one node.
#[derive(Debug)]
pub(crate) struct Capture {
    config: CaptureConfig,
    dir: PathBuf,
    /// Cookie of the node's (the agent's own) network namespace.
    node_netns: u64,
    /// The shared maps.
    pub(crate) maps: Maps,
    /// The reader of the programs' log records, until the agent takes it
    /// (`--ebpf-log` only).
    program_log: Option<ProgramLog>,
}

impl Capture {
    /// Checks the host, loads and attaches the node-wide programs (replacing
    /// those of a previous run), and opens the maps.
    pub(crate) fn start(config: CaptureConfig) -> Result<Self, CaptureError> {
        host::check_privileges()?;
        let cgroup = match &config.cgroup2 {
            Some(p) => p.clone(),
            None => host::find_cgroup2()?,
        };
        host::check_cgroup2(&cgroup)?;
        host::ensure_bpffs(&config.bpffs)?;
        check_layout(&config.bpffs, &config.node_name)?;
        let dir = pin_dir(&config.bpffs, &config.node_name);
        for sub in ["maps", "links", "pods"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| CaptureError::Pin {
                path: dir.join(sub),
                message: e.to_string(),
            })?;
        }
        let node_netns = own_netns_cookie()?;
        let mut ebpf = load_object(&dir, &config, node_netns, None)?;
        let program_log = if config.ebpf_log {
            Some(ProgramLog::take(&mut ebpf)?)
        } else {
            None
        };
        let cgroup_fd = std::fs::File::open(&cgroup).map_err(|e| CaptureError::Host {
            what: format!("cgroup v2 root {}", cgroup.display()),
            message: e.to_string(),
        })?;
        for &name in CGROUP_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| refused(name, e))?;
            // bpf_link attachments always coexist with other programs; the
            // kernel rejects attach flags on them, hence "Single" (0).
            let id = prog
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(|e| refused(name, e))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| refused(name, e))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| refused(name, e))?;
            replace_pin(link, &dir.join("links").join(name))?;
        }
        if config.local_redirect {
            // Before sockops files any socket: a socket takes the map's
            // programs when it is filed.
            attach_local_msg(&mut ebpf)?;
        }
        let name = names::NW_SOCKOPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        prog.load().map_err(|e| refused(name, e))?;
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .map_err(|e| refused(name, e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| refused(name, e))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| refused(name, e))?;
        replace_pin(link, &dir.join("links").join(name))?;
        tracing::info!(cgroup = %cgroup.display(), pins = %dir.display(), "capture programs attached");

        let maps = Maps {
            pods: open_map(&dir, names::PODS)?,
            excluded_ports: open_map(&dir, names::EXCLUDED_PORTS)?,
            orig_dst: open_map(&dir, names::ORIG_DST)?,
            inbound_peer: open_map(&dir, names::INBOUND_PEER)?,
            hop_peer: open_map(&dir, names::HOP_PEER)?,
            listeners: open_map(&dir, names::LISTENERS)?,
            probe_sources: open_map(&dir, names::PROBE_SOURCES)?,
            pod_addrs: open_map(&dir, names::POD_ADDRS)?,
            agent_sockets: open_map(&dir, names::AGENT_SOCKETS)?,
        };
        probe::install(&maps.probe_sources)?;
        Ok(Capture {
            config,
            dir,
            node_netns,
            maps,
            program_log,
        })
    }

    /// The reader of the programs' log records, once (`--ebpf-log`).
    pub(crate) fn take_program_log(&mut self) -> Option<ProgramLog> {
        self.program_log.take()
    }

    /// Attaches (or re-attaches) inbound steering to a pod's namespace,
    /// through the descriptor the namespace was found with (never by path).
    /// `uid` is the pod captured there, recorded next to the pin so that a
    /// restarted agent re-adopts the namespace it captured rather than any
    /// namespace holding the pod's IP; `None` (a quarantined namespace)
    /// records no pod.
    pub(crate) fn attach_pod(&self, netns: &Netns, uid: Option<&str>) -> Result<(), CaptureError> {
        let cookie = netns.cookie();
        let pod_dir = self.dir.join("pods").join(cookie.to_string());
        let dir_err = |path: &Path, e: std::io::Error| CaptureError::Pin {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(&pod_dir).map_err(|e| dir_err(&pod_dir, e))?;
        let mut ebpf = load_object(&self.dir, &self.config, self.node_netns, Some(cookie))?;
        let name = names::NW_SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut ebpf, name)?;
        prog.load().map_err(|e| refused(name, e))?;
        let id = prog.attach(netns.as_fd()).map_err(|e| refused(name, e))?;
        let link: FdLink = prog.take_link(id).map_err(|e| refused(name, e))?.into();
        replace_pin(link, &pod_dir.join("sk_lookup"))?;
        let marker = uid.map(uid_marker);
        for old in marker_dirs(&pod_dir) {
            if Some(&old) != marker.as_ref() {
                let path = pod_dir.join(&old);
                std::fs::remove_dir(&path).map_err(|e| dir_err(&path, e))?;
            }
        }
        if let Some(m) = marker {
            let path = pod_dir.join(m);
            std::fs::create_dir_all(&path).map_err(|e| dir_err(&path, e))?;
        }
        Ok(())
    }

    /// Detaches a pod's inbound steering.
    pub(crate) fn detach_pod(&self, cookie: u64) -> Result<(), CaptureError> {
        let pod_dir = self.dir.join("pods").join(cookie.to_string());
        remove_pins(&pod_dir)
    }

    /// Namespace cookies with pinned steering from this or a previous run.
    pub(crate) fn pinned_pods(&self) -> Vec<u64> {
        std::fs::read_dir(self.dir.join("pods"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the pod with `uid` is the one recorded as captured in the
    /// namespace with `cookie` (see [`Capture::attach_pod`]).
    pub(crate) fn pinned_pod_is(&self, cookie: u64, uid: &str) -> bool {
        let pod_dir = self.dir.join("pods").join(cookie.to_string());
        marker_dirs(&pod_dir) == [uid_marker(uid)]
    }

    /// Records, next to the pins of the namespace with `cookie`, the CNI
    /// sandbox (`CNI_CONTAINERID`) the runtime handed it over as, so that a
    /// restarted agent can tell a DEL of that sandbox, whose namespace path
    /// may already be gone, from a DEL of another sandbox of the pod.
    pub(crate) fn pin_sandbox(&self, cookie: u64, container_id: &str) -> Result<(), CaptureError> {
        let pod_dir = self.dir.join("pods").join(cookie.to_string());
        let marker = sandbox_marker(container_id);
        for old in prefixed_dirs(&pod_dir, "sandbox-") {
            if old != marker {
                let _ = std::fs::remove_dir(pod_dir.join(old));
            }
        }
        let path = pod_dir.join(marker);
        std::fs::create_dir_all(&path).map_err(|e| CaptureError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// Whether the namespace with `cookie` was handed over as the sandbox
    /// `container_id` (see [`Capture::pin_sandbox`]); `None`: no sandbox
    /// recorded (found by a scan, never named by the runtime).
    pub(crate) fn pinned_sandbox_is(&self, cookie: u64, container_id: &str) -> Option<bool> {
        let pod_dir = self.dir.join("pods").join(cookie.to_string());
        match prefixed_dirs(&pod_dir, "sandbox-").as_slice() {
            [] => None,
            found => Some(found == [sandbox_marker(container_id)]),
        }
    }
}

/// The name under which a CNI sandbox id is recorded, hashed as uids are.
fn sandbox_marker(container_id: &str) -> String {
    format!("sandbox-{:016x}", fnv1a(container_id))
}

/// The name under which a pod's uid is recorded in its pin directory:
/// bpffs holds only directories and pins, and a uid from the config may
/// hold any character, so it is recorded as a hash (FNV-1a, stable across
/// builds, unlike std's hasher).
fn uid_marker(uid: &str) -> String {
    format!("uid-{:016x}", fnv1a(uid))
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The uid markers in a pod's pin directory.
fn marker_dirs(pod_dir: &Path) -> Vec<String> {
    prefixed_dirs(pod_dir, "uid-")
}

/// The entries of a pod's pin directory named `prefix`….
fn prefixed_dirs(pod_dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(pod_dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes every pin of a node: programs detach, maps are freed. Returns
/// whether there was anything to remove.
pub fn cleanup(bpffs: &Path, node_name: &str) -> Result<bool, CaptureError> {
    let node_dir = bpffs.join("nodeward").join(node_name);
    // Every layout's pins: cleanup is also how a node leaves another
    // layout's pins behind (see `check_layout`).
    let dirs: Vec<PathBuf> = std::fs::read_dir(&node_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix('v'))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .collect()
        })
        .unwrap_or_default();
    if dirs.is_empty() {
        return Ok(false);
    }
    for dir in dirs {
        remove_pins(&dir)?;
    }
    let _ = std::fs::remove_dir(&node_dir);
    Ok(true)
}

fn remove_pins(dir: &Path) -> Result<(), CaptureError> {
    // Held across the removal and dropped after it, so the programs are
    // detached before this returns (see `open_links`).
    let links = open_links(dir);
    let removed = std::fs::remove_dir_all(dir);
    drop(links);
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CaptureError::Pin {
            path: dir.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// Opens every link pinned under `dir` (maps aside). A link whose last
/// reference is its pin is detached by the kernel some time after the pin
/// is removed, from a work queue; with the pins gone, closing these
/// descriptors drops the last references and detaches at once, so traffic
/// the caller sends next is no longer captured.
fn open_links(dir: &Path) -> Vec<PinnedLink> {
    let mut links = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if entry.file_name() != "maps" {
                    dirs.push(path);
                }
            } else if let Ok(link) = PinnedLink::from_pin(&path) {
                links.push(link);
            }
        }
    }
    links
}

/// The cookie of the calling thread's network namespace: at startup, the
/// node's, where the agent runs.
fn own_netns_cookie() -> Result<u64, CaptureError> {
    let host_err = |e: std::io::Error| CaptureError::Host {
        what: "the node's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14 or newer)".into(),
        message: e.to_string(),
    };
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(host_err)?;
    crate::netns::netns_cookie(&sock).map_err(host_err)
}

fn load_object(
    dir: &Path,
    config: &CaptureConfig,
    node_netns: u64,
    netns_cookie: Option<u64>,
) -> Result<Ebpf, CaptureError> {
    let cookie = netns_cookie.unwrap_or(u64::MAX);
    let level = program_log::level(config.ebpf_log);
    // aya-log declares its ring buffer unpinned; pinned here, every
    // instance of every load shares the node's one (see `program_log`).
    let log_pin = dir.join("maps").join(names::EBPF_LOG);
    let loaded = EbpfLoader::new()
        // The programs read only UAPI context structs, which never move, so
        // they need no CO-RE relocation: the kernel's BTF is not used.
        .btf(None)
        .default_map_pin_directory(dir.join("maps"))
        .map_pin_path(names::EBPF_LOG, log_pin)
        .override_global(names::SOCKET_MARK, &config.socket_mark, true)
        .override_global(names::NETNS_COOKIE, &cookie, true)
        .override_global(names::NODE_NETNS_COOKIE, &node_netns, true)
        .override_global(names::EBPF_LOG_LEVEL, &level, true)
        .override_global(names::LOCAL_REDIRECT, &u32::from(config.local_redirect), true)
        .load(EBPF_OBJECT);
    // The loader's parse of the kernel's BTF is freed by now.
    crate::memory::release_freed();
    loaded.map_err(|e| CaptureError::Program {
        program: "(object)",
        hint: "eBPF maps: hash, LRU hash, sock hash and ring buffer, kernel 5.9 or newer",
        message: error_chain(&e),
    })
}

/// Attaches `nw_local_msg` to the pinned `LOCAL_LEGS` sock hash,
/// replacing a previous run's program there. The attachment belongs to the
/// map (a program attached to a map has no link to pin), so it lasts as
/// long as the pinned map; the loader's handle is forgotten so that
/// dropping the object does not detach it.
fn attach_local_msg(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let name = names::NW_LOCAL_MSG;
    let map_err = |e: aya::maps::MapError| CaptureError::Map {
        map: names::LOCAL_LEGS,
        source: std::io::Error::other(error_chain(&e)),
    };
    // A descriptor of its own: the object keeps the map, whose descriptor
    // the programs loaded after this one are relocated against.
    let legs = {
        let map = ebpf.map(names::LOCAL_LEGS).ok_or(CaptureError::Program {
            program: name,
            hint: "missing from the embedded object",
            message: format!("map {} not found", names::LOCAL_LEGS),
        })?;
        let hash: aya::maps::SockHash<&aya::maps::MapData, nodeward_common::LegKey> =
            aya::maps::SockHash::try_from(map).map_err(map_err)?;
        hash.fd().try_clone().map_err(|source| CaptureError::Map {
            map: names::LOCAL_LEGS,
            source,
        })?
    };
    let prog: &mut SkMsg = program(ebpf, name)?;
    prog.load().map_err(|e| refused(name, e))?;
    let id = prog.attach(&legs).map_err(|e| refused(name, e))?;
    let link = prog.take_link(id).map_err(|e| refused(name, e))?;
    std::mem::forget(link);
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        hint: "missing from the embedded object",
        message: "not found".into(),
    })?;
    prog.try_into().map_err(|e| refused(name, e))
}

fn hint(program: &str) -> &'static str {
    match program {
        names::NW_SK_LOOKUP => "needs BPF_PROG_TYPE_SK_LOOKUP with ingress_ifindex, Linux 5.17 or newer",
        names::NW_SOCKOPS => "needs cgroup sock_ops with bpf_get_netns_cookie, Linux 5.15 or newer",
        names::NW_LOCAL_MSG => "needs sk_msg on a sock hash with bpf_get_netns_cookie, Linux 5.15 or newer",
        names::NW_GETPEER4 | names::NW_GETPEER6 => "needs cgroup getpeername hooks, Linux 5.8 or newer",
        names::NW_GETSOCK4 | names::NW_GETSOCK6 => "needs cgroup getsockname hooks, Linux 5.8 or newer",
        _ => "needs cgroup connect hooks with bpf_get_netns_cookie and bpf_link, Linux 5.8 or newer",
    }
}

fn refused(program: &'static str, e: impl std::error::Error) -> CaptureError {
    CaptureError::Program {
        program,
        hint: hint(program),
        message: error_chain(&e),
    }
}

/// An error with all its causes, since aya's errors keep the errno in a source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// Pins `link` at `path`, detaching whatever link was pinned there before.
/// The new link is attached before the old one goes, so capture never lapses.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), CaptureError> {
    let pin_err = |message: String| CaptureError::Pin {
        path: path.to_path_buf(),
        message,
    };
    if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(old) => drop(old.unpin().map_err(|e| pin_err(e.to_string()))?),
            Err(_) => std::fs::remove_file(path).map_err(|e| pin_err(e.to_string()))?,
        }
    }
    link.pin(path).map_err(|e| pin_err(e.to_string()))?;
    Ok(())
}

fn open_map<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &'static str) -> Result<BpfMap<K, V>, CaptureError> {
    let path = dir.join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&path).map_err(|e| CaptureError::Pin {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(BpfMap::new(name, &data)?)
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol};

    use super::*;

    /// The ELF section of each symbol of the embedded object, by name.
    fn symbol_sections() -> std::collections::HashMap<String, String> {
        let file = object::File::parse(EBPF_OBJECT).expect("the embedded eBPF object is ELF");
        file.symbols()
            .filter_map(|sym| {
                let section = file.section_by_index(sym.section_index()?).ok()?;
                Some((sym.name().ok()?.to_owned(), section.name().ok()?.to_owned()))
            })
            .collect()
    }

    #[test]
    fn every_name_the_agent_looks_up_is_in_the_embedded_object_as_that_kind() {
        let sections = symbol_sections();
        let section = |name: &str| {
            sections
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not a symbol of the embedded eBPF object"))
                .as_str()
        };
        for name in names::MAPS {
            assert_eq!(section(name), "maps", "{name} is not a map");
        }
        for name in names::PROGRAMS {
            let s = section(name);
            assert!(
                ["cgroup/", "sockops", "sk_lookup", "sk_msg"]
                    .iter()
                    .any(|p| s.starts_with(p)),
                "{name} is in section {s}, not a program's"
            );
        }
        for name in names::GLOBALS {
            let s = section(name);
            assert!(
                s.starts_with(".rodata") || s.starts_with(".data") || s.starts_with(".bss"),
                "{name} is in section {s}, not a global's"
            );
        }
        for name in CGROUP_PROGRAMS {
            assert!(section(name).starts_with("cgroup/"), "{name} is not a cgroup program");
        }
    }
}
