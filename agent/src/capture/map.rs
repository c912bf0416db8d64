//! Lock-free access to a BPF hash map from any thread.
//!
//! aya's typed maps need `&mut` for writes, which would put a lock on the
//! per-connection path. The kernel map is already safe for concurrent use,
//! so this wrapper issues the three `bpf()` commands directly on a shared fd.
//! The kernel copies exactly the map's key and value sizes through the
//! pointers it is given, so [`BpfMap::new`] checks them against `K` and `V`
//! before any call is made: that check is what makes the calls sound.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use aya::maps::MapData;

/// A BPF map of `K` to `V`, shareable across threads.
#[derive(Debug)]
pub(crate) struct BpfMap<K, V> {
    fd: OwnedFd,
    _kv: PhantomData<fn(K, V)>,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Why a map cannot be used as a `BpfMap<K, V>`.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The kernel did not describe the map, or its fd could not be kept.
    #[error("eBPF map {map}: {message}")]
    Info {
        /// Map name.
        map: &'static str,
        /// Why.
        message: String,
    },
    /// The map's key or value size is not the agent's: programs and agent
    /// are from different builds, and the kernel would copy past `K` or `V`.
    #[error(
        "eBPF map {map}: the kernel's {part} is {actual} bytes, the agent's is {expected} (pinned by another build of Nodeward? `nodeward cleanup` removes it)"
    )]
    Size {
        /// Map name.
        map: &'static str,
        /// `key` or `value`.
        part: &'static str,
        /// Size in the kernel.
        actual: u32,
        /// `size_of` K or V.
        expected: usize,
    },
}

impl<K, V> BpfMap<K, V> {
    /// The map's descriptor: what proves to another agent that this one
    /// holds the node's pinned maps (`takeover`).
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl<K: aya::Pod, V: aya::Pod> BpfMap<K, V> {
    /// Shares the map `name` as `K` to `V`, once the kernel's key and value
    /// sizes are checked to be theirs.
    pub(crate) fn new(name: &'static str, map: &MapData) -> Result<Self, MapError> {
        let info = map.info().map_err(|e| MapError::Info {
            map: name,
            message: format!("reading its info: {e}"),
        })?;
        for (part, actual, expected) in [
            ("key", info.key_size(), std::mem::size_of::<K>()),
            ("value", info.value_size(), std::mem::size_of::<V>()),
        ] {
            if usize::try_from(actual).ok() != Some(expected) {
                return Err(MapError::Size {
                    map: name,
                    part,
                    actual,
                    expected,
                });
            }
        }
        let fd = map.fd().as_fd().try_clone_to_owned().map_err(|e| MapError::Info {
            map: name,
            message: format!("duplicating its fd: {e}"),
        })?;
        Ok(BpfMap { fd, _kv: PhantomData })
    }

    fn call(&self, cmd: libc::c_long, key: *const K, value: u64, flags: u64) -> io::Result<()> {
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: key as u64,
            value,
            flags,
        };
        // SAFETY: attr is a valid bpf_attr prefix for the element commands;
        // key and value point at live K and V (or are null where the command
        // allows it), whose sizes `new` checked are the map's, so the kernel
        // reads and writes only within them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The value for `key`, if any.
    pub(crate) fn get(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        match self.call(BPF_MAP_LOOKUP_ELEM, key, value.as_mut_ptr() as u64, 0) {
            // SAFETY: the kernel filled the whole value (the map's value size
            // is size_of::<V>, checked in `new`); V is Pod.
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Inserts or replaces `key`.
    pub(crate) fn insert(&self, key: &K, value: &V) -> io::Result<()> {
        self.call(BPF_MAP_UPDATE_ELEM, key, value as *const V as u64, 0)
    }

    /// Removes `key`; absent keys are not an error.
    pub(crate) fn remove(&self, key: &K) -> io::Result<()> {
        match self.call(BPF_MAP_DELETE_ELEM, key, 0, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    /// All keys, for reconciliation at startup.
    pub(crate) fn keys(&self) -> io::Result<Vec<K>> {
        let mut keys = Vec::new();
        let mut next = std::mem::MaybeUninit::<K>::zeroed();
        let mut cur: Option<K> = None;
        loop {
            let key_ptr = cur.as_ref().map_or(std::ptr::null(), |k| k as *const K);
            match self.call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr() as u64, 0) {
                Ok(()) => {
                    // SAFETY: the kernel wrote a whole key (size checked in `new`); K is Pod.
                    let k = unsafe { next.assume_init() };
                    keys.push(k);
                    cur = Some(k);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    /// A fresh kernel hash map of the given sizes (needs CAP_BPF).
    fn hash_map(key_size: u32, value_size: u32) -> io::Result<MapData> {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        let attr = CreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size,
            value_size,
            max_entries: 4,
        };
        // SAFETY: attr is a valid bpf_attr prefix for BPF_MAP_CREATE.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &attr as *const CreateAttr,
                std::mem::size_of::<CreateAttr>() as u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        MapData::from_fd(fd).map_err(io::Error::other)
    }

    #[test]
    fn a_map_of_other_sizes_is_refused_by_name() {
        if !nix::unistd::geteuid().is_root() && std::env::var("CI").as_deref() != Ok("true") {
            eprintln!("SKIPPED a_map_of_other_sizes_is_refused_by_name: needs root");
            return;
        }
        let map = hash_map(8, 4).expect("create a BPF hash map");
        let ok = BpfMap::<u64, u32>::new("good_map", &map).unwrap();
        ok.insert(&7, &9).unwrap();
        assert_eq!(ok.get(&7).unwrap(), Some(9));
        assert_eq!(ok.keys().unwrap(), vec![7]);

        let e = BpfMap::<u32, u32>::new("narrow_key", &map).unwrap_err().to_string();
        assert!(
            e.contains("narrow_key") && e.contains("key is 8 bytes, the agent's is 4"),
            "{e}"
        );
        let e = BpfMap::<u64, u64>::new("wide_value", &map).unwrap_err().to_string();
        assert!(
            e.contains("wide_value") && e.contains("value is 4 bytes, the agent's is 8"),
            "{e}"
        );
    }
}
