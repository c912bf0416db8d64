//! Lock-free access to a BPF hash map from any thread.
//!
//! aya's typed maps need `&mut` for writes, which would put a lock on the
//! per-connection path. The kernel map is already safe for concurrent use,
//! so this wrapper issues the three `bpf()` commands directly on a shared fd.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};

/// A BPF map of `K` to `V`, shareable across threads.
#[derive(Debug)]
pub struct BpfMap<K, V> {
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

impl<K: aya::Pod, V: aya::Pod> BpfMap<K, V> {
    /// Wraps a map fd; the caller vouches that its key and value are `K`, `V`.
    pub fn new(fd: OwnedFd) -> Self {
        BpfMap { fd, _kv: PhantomData }
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
        // key and value point at live K and V of the map's sizes.
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
    pub fn get(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        match self.call(BPF_MAP_LOOKUP_ELEM, key, value.as_mut_ptr() as u64, 0) {
            // SAFETY: the kernel filled the whole value; V is Pod.
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Inserts or replaces `key`.
    pub fn insert(&self, key: &K, value: &V) -> io::Result<()> {
        self.call(BPF_MAP_UPDATE_ELEM, key, value as *const V as u64, 0)
    }

    /// Removes `key`; absent keys are not an error.
    pub fn remove(&self, key: &K) -> io::Result<()> {
        match self.call(BPF_MAP_DELETE_ELEM, key, 0, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    /// All keys, for reconciliation at startup.
    pub fn keys(&self) -> io::Result<Vec<K>> {
        let mut keys = Vec::new();
        let mut next = std::mem::MaybeUninit::<K>::zeroed();
        let mut cur: Option<K> = None;
        loop {
            let key_ptr = cur.as_ref().map_or(std::ptr::null(), |k| k as *const K);
            match self.call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr() as u64, 0) {
                Ok(()) => {
                    // SAFETY: the kernel wrote a whole key.
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
