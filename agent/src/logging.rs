//! Log output kept off the data path.
//!
//! Every proxied connection ends in a log line. Written straight to stderr,
//! each line is a `write(2)` on the connection's thread and a wake-up of
//! whatever reads the other end of the pipe. Here lines are appended to a
//! bounded in-memory buffer, and one thread writes what has gathered every
//! 20 ms, in one call. If the reader falls behind by more than the bound,
//! lines are dropped and counted rather than stalling connections; the
//! count is reported in the output. [`LogFlush`] writes what is left when
//! the agent exits (a SIGKILL loses at most the last 20 ms).
//!
//! Log fields carry text from peers (certificate subjects, SPIFFE IDs,
//! HBONE headers). [`EscapedFields`] writes every control character of a
//! field or message escaped, so no peer can end a text-format line early
//! and forge the next one, nor send terminal escapes to an operator.
//!
//! The level filter sits behind a `reload` layer: [`set_level`] changes it
//! at runtime (`POST 127.0.0.1:15000/logging?level=`).

#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Why the log level could not be changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogLevelError {
    /// Logging was set up without a reloadable filter.
    #[error("the log level cannot be changed: logging has no reloadable filter")]
    NotReloadable,
    /// The filter does not parse.
    #[error("invalid log level {spec:?}: {reason}")]
    Invalid {
        /// What was asked for.
        spec: String,
        /// Why it does not parse.
        reason: String,
    },
}

static LEVEL: OnceLock<(reload::Handle<EnvFilter, Registry>, Mutex<String>)> = OnceLock::new();

/// The level filter as a reloadable layer, with `spec` as its start value;
/// the first call makes [`set_level`] work.
pub fn reloadable_filter(spec: &str) -> reload::Layer<EnvFilter, Registry> {
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let _ = LEVEL.set((handle, Mutex::new(spec.to_string())));
    layer
}

/// Replaces the level filter (`info`, `debug`, `nodeward=debug,info`, ...).
pub(crate) fn set_level(spec: &str) -> Result<(), LogLevelError> {
    let invalid = |reason: String| LogLevelError::Invalid {
        spec: spec.to_string(),
        reason,
    };
    if spec.is_empty() || spec.len() > 256 || spec.chars().any(char::is_control) {
        return Err(invalid("must be 1 to 256 printable characters".into()));
    }
    let filter = EnvFilter::try_new(spec).map_err(|e| invalid(e.to_string()))?;
    let (handle, current) = LEVEL.get().ok_or(LogLevelError::NotReloadable)?;
    handle.reload(filter).map_err(|_| LogLevelError::NotReloadable)?;
    *current.lock().unwrap_or_else(|e| e.into_inner()) = spec.to_string();
    Ok(())
}

/// The level filter in force, when it is reloadable.
pub(crate) fn current_level() -> Option<String> {
    LEVEL
        .get()
        .map(|(_, c)| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// How often gathered lines are written.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Most bytes held before lines are dropped.
const MAX_PENDING: usize = 4 << 20;

struct Shared {
    pending: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    stop: AtomicBool,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what has gathered (and any drop count) to `out`.
    fn flush_to(&self, out: &mut impl Write) {
        let batch = std::mem::take(&mut *self.lock());
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(out, "nodeward: {dropped} log lines dropped: the log reader fell behind");
        }
    }
}

/// A `MakeWriter` for `tracing_subscriber` that batches lines to stderr.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Writes one formatted event into the batch.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.len() + line.len() > MAX_PENDING {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            pending.extend_from_slice(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { shared: &self.shared }
    }
}

/// Stops the writer thread and writes the remaining lines when dropped.
pub struct LogFlush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        match self.thread.take() {
            // The thread writes what is left before it ends.
            Some(t) => {
                let _ = t.join();
            }
            None => self.shared.flush_to(&mut io::stderr()),
        }
    }
}

/// A batching stderr writer and the guard that flushes it at exit.
pub fn batched_stderr() -> (BatchedStderr, LogFlush) {
    batched(io::stderr)
}

fn batched<W: Write>(out: impl Fn() -> W + Send + 'static) -> (BatchedStderr, LogFlush) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Vec::new()),
        dropped: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        wake: Condvar::new(),
    });
    let bg = shared.clone();
    let thread = std::thread::Builder::new()
        .name("nodeward-log".into())
        .spawn(move || {
            while !bg.stop.load(Ordering::Relaxed) {
                // Sleep on the condvar so that exit interrupts the wait.
                let guard = bg.lock();
                let _ = bg.wake.wait_timeout(guard, FLUSH_EVERY);
                bg.flush_to(&mut out());
            }
            bg.flush_to(&mut out());
        })
        .ok();
    (BatchedStderr { shared: shared.clone() }, LogFlush { shared, thread })
}

/// Text-format fields as `tracing_subscriber` writes them (`message`
/// first, then `name=value` with values `Debug`-formatted), with every
/// control character escaped (`\n`, `\u{1b}`, ...).
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut v = EscapingVisitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    result: std::fmt::Result,
    first: bool,
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let value = escape_controls(value);
        self.result = match field.name() {
            "message" => write!(self.writer, "{sep}{value}"),
            name => write!(self.writer, "{sep}{}={value}", name.strip_prefix("r#").unwrap_or(name)),
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// `text` with each control character replaced by its escape.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the tests can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_promptly() {
        let sink = Sink::default();
        let out = sink.clone();
        let (w, _flush) = batched(move || out.clone());
        for i in 0..100 {
            w.make_writer().write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        std::thread::sleep(FLUSH_EVERY * 5);
        let got = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let want: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_guard_writes_what_is_left_at_exit() {
        let sink = Sink::default();
        let out = sink.clone();
        let (w, flush) = batched(move || out.clone());
        w.make_writer().write_all(b"last words\n").unwrap();
        // Well within one flush period: only the exit can have written it.
        drop(flush);
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"last words\n");
    }

    #[test]
    fn a_reader_that_falls_behind_costs_lines_not_memory() {
        let shared = Shared {
            pending: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(true),
            wake: Condvar::new(),
        };
        let line = vec![b'x'; 1024];
        for _ in 0..(MAX_PENDING / 1024 + 10) {
            LineWriter { shared: &shared }.write_all(&line).unwrap();
        }
        assert!(shared.lock().len() <= MAX_PENDING);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10);
        let mut out = Vec::new();
        shared.flush_to(&mut out);
        assert!(
            String::from_utf8_lossy(&out).ends_with("nodeward: 10 log lines dropped: the log reader fell behind\n")
        );
    }

    #[test]
    fn peer_text_in_fields_and_messages_cannot_forge_a_line() {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        let forged = "spiffe://x\n2026-01-01T00:00:00Z  INFO forged line\x1b[2J";
        tracing::subscriber::with_default(subscriber, || {
            let shown = forged.to_string();
            tracing::warn!(peer = %shown, authority = forged, "refused {shown}");
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "one event, one line: {text:?}");
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.contains(r"refused spiffe://x\n2026"), "{text:?}");
        assert!(text.contains(r"peer=spiffe://x\n2026"), "{text:?}");
        assert!(text.contains(r"forged line\u{1b}[2J"), "{text:?}");
    }
}
