//! Network namespaces: entering them for a moment, and finding a pod's by IP.
//!
//! The agent lives in the node's namespace. Everything it does *as a pod* —
//! listening, connecting to the app, connecting out with the pod's IP — uses
//! sockets created inside the pod's namespace: a socket stays in the
//! namespace it was created in, so the thread enters the pod's namespace only
//! for the `socket()` call and returns at once (`Netns::run`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetnsError {
    /// The namespace file could not be opened or inspected.
    #[error("network namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Entering the namespace failed (missing CAP_SYS_ADMIN, or it is gone).
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// A socket inside the namespace could not be created or queried.
    #[error("socket in network namespace {path}: {source}")]
    Socket {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The namespace the agent started in (the node's); threads return to it.
static HOME: OnceLock<File> = OnceLock::new();

fn home() -> &'static File {
    HOME.get_or_init(|| {
        File::open("/proc/thread-self/ns/net")
            .or_else(|_| File::open("/proc/self/ns/net"))
            .expect("the agent's own network namespace is always readable")
    })
}

/// Records the current namespace as the agent's home. Call once at startup,
/// before any thread enters another namespace.
pub(crate) fn init_home() {
    let _ = home();
}

/// (device, inode) of a namespace file: equal for the same namespace.
pub(crate) type NsId = (u64, u64);

/// An open network namespace, kept alive by its file descriptor. Opened
/// once, by the scan that found it, and used through that descriptor from
/// then on: a path may name another namespace by the time it is opened again.
#[derive(Debug)]
pub(crate) struct Netns {
    file: File,
    path: PathBuf,
    id: NsId,
    cookie: u64,
}

impl Netns {
    /// Opens the namespace at `path` and reads its cookie.
    pub(crate) fn open(path: &Path) -> Result<Self, NetnsError> {
        let open_err = |source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let mut ns = Netns {
            file,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            cookie: 0,
        };
        let sock = ns.socket(socket2::Domain::IPV4, None)?;
        ns.cookie = netns_cookie(&sock).map_err(|source| NetnsError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ns)
    }

    /// The namespace file this handle was opened from (for messages only).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this namespace: what the eBPF programs key on.
    pub(crate) fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Identity of the namespace for de-duplication.
    pub(crate) fn id(&self) -> NsId {
        self.id
    }

    /// Runs `f` on this thread while it is inside the namespace.
    ///
    /// `f` must not block or await: the thread is back home when this returns.
    pub(crate) fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        if let Err(e) = setns(home().as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread stranded in a pod's namespace would make every later
            // socket on it belong to that pod. Nothing sane can continue.
            eprintln!("fatal: cannot return to the node network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }

    /// Creates a TCP socket inside the namespace, marked with `mark` so the
    /// capture programs leave it alone.
    pub(crate) fn socket(&self, domain: socket2::Domain, mark: Option<u32>) -> Result<socket2::Socket, NetnsError> {
        let sock = self
            .run(|| socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP)))?
            .map_err(|source| NetnsError::Socket {
                path: self.path.clone(),
                source,
            })?;
        if let Some(mark) = mark {
            sock.set_mark(mark).map_err(|source| NetnsError::Socket {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(sock)
    }

    /// The addresses configured inside the namespace.
    pub(crate) fn addresses(&self) -> Result<Vec<IpAddr>, NetnsError> {
        let path = self.path.clone();
        // A short-lived thread, so no runtime thread is ever inside a pod
        // while it lists interfaces (getifaddrs speaks rtnetlink).
        let file = self.file.try_clone().map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        std::thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: path.clone(),
                source,
            })?;
            local_addresses().map_err(|source| NetnsError::Socket { path, source })
        })
        .join()
        .unwrap_or_else(|_| Ok(Vec::new()))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Addresses of the namespace the calling thread is in, loopback excluded.
pub(crate) fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !ip.is_loopback() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Reads `SO_NETNS_COOKIE` (Linux 5.14+) from a socket.
pub(crate) fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid u64.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The identity of the agent's own (the node's) namespace.
pub(crate) fn home_id() -> io::Result<NsId> {
    let meta = home().metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// What one scan found, each namespace opened once and kept open.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// The namespaces holding each wanted IP.
    pub(crate) by_ip: HashMap<IpAddr, Vec<Arc<Netns>>>,
    /// The namespaces whose cookie was asked for, whatever addresses they hold.
    pub(crate) by_cookie: HashMap<u64, Arc<Netns>>,
}

/// Finds pods' namespaces, the way a node agent must: CNI plugins leave
/// them in `/var/run/netns`, container runtimes behind the processes in
/// `/proc/*/ns/net`.
#[derive(Debug, Default)]
pub(crate) struct NetnsFinder {
    /// Extra directories of namespace files to search besides the defaults.
    pub(crate) extra_dirs: Vec<PathBuf>,
}

impl NetnsFinder {
    /// Scans every namespace on the host once and returns those that hold a
    /// wanted IP and those with a wanted cookie (the namespaces of pods
    /// captured before a restart, found by identity, never by address).
    /// The node's own namespace is never returned: a pod sharing it
    /// (hostNetwork) is not a pod to capture.
    pub(crate) fn scan(&self, wanted: &HashSet<IpAddr>, cookies: &HashSet<u64>) -> Scan {
        let mut found = Scan::default();
        if wanted.is_empty() && cookies.is_empty() {
            return found;
        }
        let mut seen: HashSet<NsId> = HashSet::new();
        if let Ok(id) = home_id() {
            seen.insert(id);
        }
        for path in self.candidates() {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let Ok(ns) = Netns::open(&path) else { continue };
            // What was opened is what counts: the path may have changed
            // between the stat and the open.
            if ns.id() != (meta.dev(), meta.ino()) && !seen.insert(ns.id()) {
                continue;
            }
            let ns = Arc::new(ns);
            if cookies.contains(&ns.cookie()) {
                found.by_cookie.insert(ns.cookie(), ns.clone());
            }
            if wanted.is_empty() {
                continue;
            }
            let Ok(addrs) = ns.addresses() else { continue };
            for ip in addrs {
                if wanted.contains(&ip) {
                    found.by_ip.entry(ip).or_default().push(ns.clone());
                }
            }
        }
        found
    }
    fn candidates(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut dirs = vec![PathBuf::from("/var/run/netns"), PathBuf::from("/run/netns")];
        dirs.extend(self.extra_dirs.iter().cloned());
        for dir in dirs {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name();
                if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                    out.push(e.path().join("ns/net"));
                }
            }
        }
        out
    }
}
