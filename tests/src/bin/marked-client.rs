//! `nodeward-marked-client MARK ADDR PAYLOAD`: a hostile app's client.
//! Sets `SO_MARK` to `MARK` (decimal or `0x` hex) on a TCP socket, which
//! needs only `CAP_NET_RAW` since Linux 5.17, checks the kernel kept it,
//! connects to `ADDR`, sends `PAYLOAD`, half-closes, and prints what came
//! back. Exit 2: the mark could not be set (the test proves nothing then);
//! exit 1: the connection failed or was refused; exit 0: it got an answer
//! (possibly empty, printed as is).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, mark, addr, payload] = args.as_slice() else {
        eprintln!("usage: nodeward-marked-client MARK ADDR PAYLOAD");
        return ExitCode::from(2);
    };
    let mark = match mark.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => mark.parse(),
    };
    let (Ok(mark), Ok(addr)) = (mark, addr.parse::<SocketAddr>()) else {
        eprintln!("bad MARK or ADDR");
        return ExitCode::from(2);
    };
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        eprintln!("socket: {}", std::io::Error::last_os_error());
        return ExitCode::from(2);
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: the value pointer and length describe a live u32.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            len,
        )
    };
    if rc != 0 {
        eprintln!("setsockopt(SO_MARK, {mark:#x}): {}", std::io::Error::last_os_error());
        return ExitCode::from(2);
    }
    let (mut got, mut got_len) = (0u32, len);
    // SAFETY: as above, for the kernel to write into.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mut got as *mut u32).cast(),
            &mut got_len,
        )
    };
    if rc != 0 || got != mark {
        eprintln!("SO_MARK reads back {got:#x} (rc {rc}), not {mark:#x}");
        return ExitCode::from(2);
    }
    let mut stream = TcpStream::from(fd);
    // A blocking connect() is bounded by the send timeout (EINPROGRESS).
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let dst = nix::sys::socket::SockaddrStorage::from(addr);
    if let Err(e) = nix::sys::socket::connect(stream.as_raw_fd(), &dst) {
        println!("connect failed: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = stream.write_all(payload.as_bytes()) {
        println!("send failed: {e}");
        return ExitCode::from(1);
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut back = Vec::new();
    match stream.read_to_end(&mut back) {
        Ok(_) => {
            print!("{}", String::from_utf8_lossy(&back));
            ExitCode::SUCCESS
        }
        Err(e) => {
            print!("{}", String::from_utf8_lossy(&back));
            println!("\nread failed: {e}");
            ExitCode::from(1)
        }
    }
}
