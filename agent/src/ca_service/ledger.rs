//! The issuance log: every certificate the CA service signs and every
//! request it refuses, one JSON line each, appended and synced before the
//! answer leaves. Each line carries the SHA-256 of the line before it, so
//! a line edited, removed or moved breaks the chain at a place
//! `nodeward ca log verify` names, and `nodeward audit --issuance-log`
//! can show that a certificate in use was never logged: the sign of the
//! signing key used outside the service.
//!
//! What the chain cannot show alone is the loss of the newest lines
//! (nothing follows them): `ca log verify` prints the head, the hash of the
//! last line, for the operator to record elsewhere, and a restart refuses
//! a file whose chain is already broken.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `prev` of the first line: no line came before it.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line the verifier reads; a longer one is a break (the service
/// never writes one: every field is bounded by the request's size).
const MAX_LINE: usize = 64 * 1024;

/// Who asked, as the token says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Caller {
    /// `namespace/serviceaccount`, empty when no token was verified.
    pub(crate) service_account: String,
    /// `kubernetes.io.node.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<String>,
    /// `namespace/name` of the pod the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pod: Option<String>,
}

/// Issued or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Decision {
    /// A certificate was signed.
    Issued,
    /// Nothing was signed.
    Refused,
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    /// RFC 3339, UTC.
    pub(crate) time: String,
    /// The service instance that wrote it (its host name): each replica
    /// keeps a chain of its own.
    pub(crate) replica: String,
    /// Who asked.
    pub(crate) caller: Caller,
    /// The peer's address.
    pub(crate) peer: String,
    /// The SPIFFE ID asked for (the caller's own when it named none), or
    /// what it named when that was not one.
    pub(crate) requested: String,
    /// Issued or refused.
    pub(crate) decision: Decision,
    /// `ok`, or the refusal's reason (the metric label).
    pub(crate) reason: String,
    /// The certificate's serial, hex, when issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) serial: Option<String>,
    /// Its notAfter, unix seconds, when issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) not_after: Option<i64>,
    /// SHA-256 of the certificate's DER (colon-separated hex), when issued:
    /// a forgery that reuses a logged serial has another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sha256: Option<String>,
    /// SHA-256 (hex) of the previous line's bytes, [`GENESIS`] for the first.
    pub(crate) prev: String,
}

/// Why the log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file could not be opened, read or written.
    #[error("--issuance-log {}: {source}", .file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The existing file's chain is broken: the service does not append
    /// to a log it cannot vouch for.
    #[error("--issuance-log {}: {broken}; move the file aside (keep it as evidence) to start a new log", .file.display())]
    Broken {
        /// The file.
        file: PathBuf,
        /// Where and how.
        broken: Break,
    },
}

/// The first place a chain does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct Break {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong there.
    pub why: String,
}

/// A log that holds: how many lines, and the hash of the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Lines read.
    pub lines: usize,
    /// SHA-256 of the last line ([`GENESIS`] for an empty log).
    pub head: String,
    /// The entries, in order (for the audit).
    pub(crate) entries: Vec<Entry>,
}

/// SHA-256 of `bytes`, lowercase hex.
fn digest(bytes: &[u8]) -> String {
    crate::identity::ca::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Checks a log's chain from its first line; the first break is the error.
pub fn verify(reader: impl std::io::Read) -> Result<Verified, Break> {
    let mut entries = Vec::new();
    let (lines, head) = walk(reader, |e| entries.push(e))?;
    Ok(Verified { lines, head, entries })
}

/// Walks a log's chain, handing each entry to `each`; (lines, head).
fn walk(reader: impl std::io::Read, mut each: impl FnMut(Entry)) -> Result<(usize, String), Break> {
    let mut reader = BufReader::new(reader);
    let mut prev = GENESIS.to_string();
    let mut line = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Break {
                line: n + 1,
                why: format!("unreadable: {e}"),
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        let Some(body) = line.strip_suffix(b"\n") else {
            let why = if read > MAX_LINE {
                format!("longer than {MAX_LINE} bytes")
            } else {
                "no newline: the last write was cut short".into()
            };
            return Err(Break { line: n, why });
        };
        let entry: Entry = serde_json::from_slice(body).map_err(|e| Break {
            line: n,
            why: format!("not an issuance record: {e}"),
        })?;
        if entry.prev != prev {
            return Err(Break {
                line: n,
                why: format!(
                    "prev is {}, the line before hashes to {prev}: a line before it was edited, removed or moved",
                    entry.prev
                ),
            });
        }
        prev = digest(body);
        each(entry);
    }
    Ok((n, prev))
}

/// The log the service appends to.
#[derive(Debug)]
pub(crate) struct Ledger {
    file: File,
    path: PathBuf,
    head: String,
    /// A write failed and could not be undone: the file may end in a
    /// partial line, so nothing more is appended (the service refuses
    /// everything) until it restarts and finds the break.
    poisoned: bool,
}

impl Ledger {
    /// Opens (or creates, mode 0640) the log at `path` and checks the chain
    /// it already holds, so new lines continue it.
    pub(crate) fn open(path: &Path) -> Result<Ledger, LedgerError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| LedgerError::Io {
            file: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(io)?;
        // Only the head is kept: a long log is read through, not held.
        let (_, head) = walk(&file, |_| {}).map_err(|broken| LedgerError::Broken {
            file: path.to_path_buf(),
            broken,
        })?;
        Ok(Ledger {
            file,
            path: path.to_path_buf(),
            head,
            poisoned: false,
        })
    }

    /// Appends `entry` (its `prev` set here), synced to disk when `sync`
    /// (issuances: a certificate is answered only once its line is
    /// durable). A failed write is cut back off the file, so the chain
    /// stays whole; if even that fails, the log takes no more lines.
    pub(crate) fn append(&mut self, mut entry: Entry, sync: bool) -> Result<(), LedgerError> {
        let io = |path: &Path, source| LedgerError::Io {
            file: path.to_path_buf(),
            source,
        };
        if self.poisoned {
            let e = std::io::Error::other("an earlier write failed and could not be undone; restart to check the file");
            return Err(io(&self.path, e));
        }
        entry.prev = self.head.clone();
        let mut line = serde_json::to_vec(&entry).map_err(|e| io(&self.path, std::io::Error::other(e)))?;
        let head = digest(&line);
        line.push(b'\n');
        let before = self.file.metadata().map_err(|e| io(&self.path, e))?.len();
        // One write of the whole line, appended after what is there.
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            if self.file.set_len(before).and_then(|()| self.file.sync_data()).is_err() {
                self.poisoned = true;
            }
            return Err(io(&self.path, e));
        }
        self.head = head;
        // The same line on the log stream: a replica's file lives as long
        // as its pod; the cluster's log pipeline keeps the stream.
        tracing::info!(
            target: "nodeward::issuance",
            record = %String::from_utf8_lossy(&line[..line.len() - 1]),
            "issuance record"
        );
        Ok(())
    }
}

/// `nodeward ca log verify FILE`: the report line, or the first break.
pub fn verify_file(path: &Path) -> Result<String, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match verify(file) {
        Ok(v) => {
            let issued = v.entries.iter().filter(|e| e.decision == Decision::Issued).count();
            Ok(format!(
                "{}: chain holds: {} lines ({issued} issued, {} refused); head sha256:{}",
                path.display(),
                v.lines,
                v.lines - issued,
                v.head
            ))
        }
        Err(b) => Err(format!("{}: chain broken at {b}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &str) -> Entry {
        Entry {
            time: "2026-12-07T12:00:00Z".into(),
            replica: "ca-0".into(),
            caller: Caller {
                service_account: "nodeward-system/nodeward".into(),
                node: Some("node-1".into()),
                pod: Some("nodeward-system/nodeward-abc".into()),
            },
            peer: "10.0.0.1:4000".into(),
            requested: "spiffe://cluster.local/ns/shop/sa/web".into(),
            decision: Decision::Issued,
            reason: "ok".into(),
            serial: Some(serial.into()),
            not_after: Some(1_800_000_000),
            sha256: None,
            prev: String::new(),
        }
    }

    fn log(tag: &str, n: usize) -> (PathBuf, Vec<String>) {
        let path = std::env::temp_dir().join(format!("nodeward-ledger-{tag}-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut l = Ledger::open(&path).unwrap();
        for i in 0..n {
            l.append(entry(&format!("{i:02x}")), true).unwrap();
        }
        let lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        (path, lines)
    }

    fn verify_lines(lines: &[String]) -> Result<Verified, Break> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        verify(text.as_bytes())
    }

    #[test]
    fn a_written_log_verifies_and_a_reopened_one_continues_its_chain() {
        let (path, lines) = log("reopen", 3);
        assert_eq!(verify_lines(&lines).unwrap().lines, 3);
        let mut l = Ledger::open(&path).unwrap();
        l.append(entry("ff"), false).unwrap();
        let v = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!(v.lines, 4);
        assert_eq!(v.entries[0].prev, GENESIS);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_edited_removed_or_moved_line_breaks_the_chain_where_it_happened() {
        let (path, lines) = log("tamper", 5);
        // Edited: the serial of line 2; the break shows at line 3.
        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"01\"", "\"99\"");
        assert_eq!(verify_lines(&edited).unwrap_err().line, 3);
        // Removed: line 3; line 4 (now the third) no longer follows.
        let mut removed = lines.clone();
        removed.remove(2);
        assert_eq!(verify_lines(&removed).unwrap_err().line, 3);
        // Reordered: lines 2 and 3 swapped.
        let mut moved = lines.clone();
        moved.swap(1, 2);
        assert_eq!(verify_lines(&moved).unwrap_err().line, 2);
        // The first line forged with another prev.
        let mut first = lines.clone();
        first[0] = first[0].replace(GENESIS, &"1".repeat(64));
        assert_eq!(verify_lines(&first).unwrap_err().line, 1);
        // A torn last write.
        let mut torn: String = lines.iter().map(|l| format!("{l}\n")).collect();
        torn.truncate(torn.len() - 10);
        assert!(verify(torn.as_bytes()).unwrap_err().why.contains("no newline"));
        // Garbage.
        assert!(
            verify(&b"not json\n"[..])
                .unwrap_err()
                .why
                .contains("not an issuance record")
        );
        // The service refuses to continue a broken file.
        std::fs::write(&path, edited.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        let e = Ledger::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
