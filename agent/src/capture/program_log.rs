//! `--ebpf-log`: the programs' own account of their rare decisions
//! (fail-closed drops, map entries that could not be written or were not
//! found, failed probe-source binds), read from aya-log's ring buffer and
//! logged through tracing under the target `nodeward::ebpf`.
//!
//! Every program instance (the node-wide ones and each pod's `sk_lookup`)
//! writes to the one ring buffer pinned in the node's map directory, so one
//! reader sees them all, and what the programs recorded while the agent was
//! down (the drops that kept a STRICT pod closed) is read when it is back.
//! Off, the level global is 0: the verifier sees every log call as dead
//! code and the programs run exactly as without logging.
use aya::Ebpf;
use aya_log::EbpfLogger;
use nodeward_common::names;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::CaptureError;

/// The level global the programs are loaded with: everything they record
/// when `--ebpf-log` is set (they record nothing below a warning, and
/// nothing per packet), nothing otherwise.
pub(super) fn level(enabled: bool) -> u8 {
    if enabled { aya_log::Level::Info as u8 } else { 0 }
}

/// The reader of the programs' ring buffer.
pub(crate) struct ProgramLog(EbpfLogger<Forward>);

impl std::fmt::Debug for ProgramLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgramLog")
    }
}

impl ProgramLog {
    /// Takes the ring buffer from a loaded object (any instance: the map is
    /// the pinned one).
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        EbpfLogger::init_with_logger(ebpf, Forward)
            .map(ProgramLog)
            .map_err(|e| CaptureError::Host {
                what: format!("the eBPF programs' log ring buffer ({})", names::EBPF_LOG),
                message: e.to_string(),
            })
    }

    /// Logs every record as it arrives, until `stop`; the records already
    /// waiting (written while no agent ran) first.
    pub(crate) async fn run(self, stop: CancellationToken) {
        // SAFETY: the logger owns the ring buffer's map descriptor, which it
        // closes only when dropped, that is with the `AsyncFd`; its
        // `as_raw_fd` always returns that descriptor.
        let registered = unsafe { AsyncFd::register_with_interest(self.0, Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF programs' log cannot be polled; their records are not read");
                return;
            }
        };
        fd.get_mut().flush();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    fd.get_mut().flush();
                    return;
                }
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "polling the eBPF programs' log failed; their records are no longer read");
                        return;
                    }
                },
            }
        }
    }
}

/// Hands aya-log's records (which use the `log` facade) to tracing, naming
/// the program's source module (`nodeward_ebpf::sk_lookup`, ...).
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let program = record.target();
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "nodeward::ebpf", program, "{message}"),
            log::Level::Warn => tracing::warn!(target: "nodeward::ebpf", program, "{message}"),
            log::Level::Info => tracing::info!(target: "nodeward::ebpf", program, "{message}"),
            log::Level::Debug => tracing::debug!(target: "nodeward::ebpf", program, "{message}"),
            log::Level::Trace => tracing::trace!(target: "nodeward::ebpf", program, "{message}"),
        }
    }

    fn flush(&self) {}
}
