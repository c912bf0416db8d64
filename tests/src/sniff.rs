//! Packet capture on a link inside a namespace (tcpdump), to check what
//! really crosses the wire.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::nsenter;

/// A running capture; [`Sniffer::finish`] stops it and returns the bytes.
pub struct Sniffer {
    child: Child,
    file: PathBuf,
}

impl Sniffer {
    /// Captures full packets on `iface` in namespace `netns`.
    pub fn start(netns: &str, iface: &str) -> Sniffer {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let file = std::env::temp_dir().join(format!(
            "nodeward-sniff-{}-{}.pcap",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = nsenter(
            netns,
            &["tcpdump", "--immediate-mode", "-i", iface, "-U", "-s", "0", "-n", "-w"],
        )
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by `cargo xtask test`)");
        // tcpdump says "listening on" once the capture is armed.
        let mut err = child.stderr.take().expect("stderr");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while Instant::now() < deadline && !String::from_utf8_lossy(&seen).contains("listening on") {
            match err.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&b[..n]),
            }
        }
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        Sniffer { child, file }
    }

    /// Stops the capture and returns the pcap file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).unwrap_or_default();
        let _ = std::fs::remove_file(&self.file);
        bytes
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
