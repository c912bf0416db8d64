//! Real clients and servers inside pods.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::run_in;

/// Default timeout for test sockets (stretched by [`crate::patience`] where used).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Connects from inside namespace `netns` (the socket is created there).
pub fn connect(netns: &str, dst: SocketAddr) -> io::Result<TcpStream> {
    connect_timeout(netns, dst, crate::patience(TIMEOUT))
}

/// [`connect`] with a timeout.
pub fn connect_timeout(netns: &str, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = run_in(netns, move || TcpStream::connect_timeout(&dst, timeout))?;
    s.set_read_timeout(Some(crate::patience(TIMEOUT)))?;
    s.set_write_timeout(Some(crate::patience(TIMEOUT)))?;
    Ok(s)
}

/// Connects from inside `netns` from a socket first bound to `src` (port 0
/// lets the kernel choose), as an app that picks its source address does.
pub fn connect_bound(netns: &str, src: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, socket};
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = run_in(netns, move || {
        socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
    })?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(src))?;
    let s = TcpStream::from(fd);
    // std has no connect() on an existing socket; Linux bounds a blocking
    // connect() by the send timeout, and reports its expiry as EINPROGRESS.
    s.set_write_timeout(Some(timeout))?;
    match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&s), &SockaddrStorage::from(dst)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    s.set_read_timeout(Some(crate::patience(TIMEOUT)))?;
    s.set_write_timeout(Some(crate::patience(TIMEOUT)))?;
    Ok(s)
}

/// A server thread; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listens on `addr` inside `netns` and runs `handler` per connection on
/// its own thread.
pub fn serve(netns: &str, addr: SocketAddr, handler: fn(TcpStream)) -> Server {
    let listener =
        run_in(netns, move || TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {netns}: {e}"));
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    std::thread::spawn(move || handler(s));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
        addr,
    }
}

/// Handler: first sends `peer=<addr> local=<addr>\n` (what the server's
/// `accept()` reported), then echoes until EOF, then closes its side.
pub fn info_echo(mut s: TcpStream) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if writeln!(s, "peer={peer} local={local}").is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Handler: for every byte received, answers with a line naming the peer
/// `getpeername()` reports at that moment (`-` when it fails), until EOF.
pub fn peer_on_request(mut s: TcpStream) {
    let mut b = [0u8; 1];
    while matches!(s.read(&mut b), Ok(1)) {
        let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|_| "-".into());
        if writeln!(s, "{peer}").is_err() {
            return;
        }
    }
}

/// Asks a [`peer_on_request`] server whom its app sees now.
pub fn ask_peer(s: &mut TcpStream) -> io::Result<String> {
    s.write_all(b"?")?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Handler: reads everything, then replies with the byte count and an
/// FNV-1a checksum, then closes.
pub fn checksum_sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sum = Fnv::default();
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                sum.update(&buf[..k]);
                n += k as u64;
            }
            Err(_) => return,
        }
    }
    let _ = writeln!(s, "{n} {:016x}", sum.0);
    let _ = s.shutdown(Shutdown::Write);
}

/// What an `info_echo` server reported about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The peer the server's `accept()` saw.
    pub peer: SocketAddr,
    /// The server's local address.
    pub local: SocketAddr,
}

/// Reads the `info_echo` greeting.
pub fn read_greeting(s: &TcpStream) -> io::Result<Seen> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let mut peer = None;
    let mut local = None;
    for part in line.split_whitespace() {
        if let Some(v) = part.strip_prefix("peer=") {
            peer = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("local=") {
            local = v.parse().ok();
        }
    }
    match (peer, local) {
        (Some(peer), Some(local)) => Ok(Seen { peer, local }),
        _ => Err(io::Error::other(format!("bad greeting {line:?}"))),
    }
}

/// Connects, reads the greeting, echoes `msg`, half-closes and checks the
/// echo. Returns what the server saw and the client's own view.
pub fn round_trip(netns: &str, dst: SocketAddr, msg: &[u8]) -> io::Result<(Seen, SocketAddr, SocketAddr)> {
    echo_checked(connect(netns, dst)?, msg)
}

/// [`round_trip`] with `timeout` on the connect and on each read: for a
/// client that must not hang on a connection a fault left half-open.
pub fn round_trip_within(
    netns: &str,
    dst: SocketAddr,
    msg: &[u8],
    timeout: Duration,
) -> io::Result<(Seen, SocketAddr, SocketAddr)> {
    let s = connect_timeout(netns, dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    echo_checked(s, msg)
}

fn echo_checked(mut s: TcpStream, msg: &[u8]) -> io::Result<(Seen, SocketAddr, SocketAddr)> {
    let client_peer = s.peer_addr()?;
    let client_local = s.local_addr()?;
    let seen = read_greeting(&s)?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    if back != msg {
        return Err(io::Error::other(format!(
            "echo mismatch: sent {} bytes, got {}",
            msg.len(),
            back.len()
        )));
    }
    Ok((seen, client_peer, client_local))
}

/// Sends `chunks` chunks of `chunk` pseudo-random bytes from `netns` to a
/// [`checksum_sink`] at `dst`, half-closes, and checks that the sink saw
/// exactly those bytes (count and checksum). Returns the bytes sent.
pub fn checked_transfer(netns: &str, dst: SocketAddr, chunks: u64, chunk: usize) -> io::Result<u64> {
    let mut s = connect(netns, dst)?;
    s.set_write_timeout(Some(Duration::from_secs(300)))?;
    let mut buf = vec![0u8; chunk];
    let mut sum = Fnv::default();
    for i in 0..chunks {
        pattern(i, &mut buf);
        sum.update(&buf);
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let total = chunks * chunk as u64;
    let want = format!("{total} {:016x}", sum.0);
    if reply.trim() != want {
        return Err(io::Error::other(format!(
            "sink saw {:?}, expected {want:?}",
            reply.trim()
        )));
    }
    Ok(total)
}

/// FNV-1a 64, a cheap checksum for transfers.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic pseudo-random bytes for transfers.
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// An IPv4-mapped IPv6 socket address as plain IPv4 (how the agent logs it).
pub fn unmapped(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether a connection from `netns` to `dst` is captured: the kernel's
/// socket table (which no `getsockname`/`getpeername` hook rewrites) shows
/// it connected to the agent's outbound listener, port 15001. Apps see the
/// pod's address either way, so their own view cannot tell.
pub fn captured(netns: &str, dst: SocketAddr) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let s = connect(netns, dst)?;
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))?.ino();
    let remote_port = run_in(netns, move || -> io::Result<Option<u16>> {
        for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            for line in std::fs::read_to_string(table)?.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.get(9).and_then(|i| i.parse::<u64>().ok()) == Some(inode) {
                    let port = fields[2].rsplit(':').next().unwrap_or("");
                    return Ok(u16::from_str_radix(port, 16).ok());
                }
            }
        }
        Ok(None)
    })?;
    drop(s);
    Ok(remote_port == Some(15001))
}
