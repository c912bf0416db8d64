//! A small load generator for the benchmarks: request/response latency at a
//! fixed rate or at saturation, and connection rate, with HDR histograms.
//!
//! Each worker is a thread that enters the client pod's namespace once and
//! runs a single-threaded tokio runtime there, so every socket it opens
//! belongs to the pod (and is captured like an app's).

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sched::{CloneFlags, setns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let file = File::open(crate::netns::path(netns)).expect("open netns");
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TCP service in a pod: a thread in the pod's namespace running a tokio
/// runtime that serves every accepted connection, until dropped.
pub struct PodService {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodService {
    /// Listens on `addr` in `netns` with `threads` runtime threads (0: the
    /// listening thread alone) and runs `serve` for each connection.
    fn start<F, Fut>(netns: &str, addr: SocketAddr, threads: usize, serve: F) -> PodService
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = in_netns(netns, move || {
            // Worker threads are created from this one and so share its namespace.
            let rt = if threads == 0 {
                runtime()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name(RELAY_THREAD)
                    .enable_all()
                    .build()
                    .expect("runtime")
            };
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(addr).await.expect("bind pod service");
                let _ = tx.send(());
                while !flag.load(Ordering::Relaxed) {
                    let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(100), l.accept()).await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(s));
                }
            })
        });
        let _ = rx.recv_timeout(Duration::from_secs(5));
        PodService {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PodService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An echo server in a pod: every byte goes back (`size` is the expected
/// message size, for the buffer).
pub fn echo_server(netns: &str, addr: SocketAddr, size: usize) -> PodService {
    PodService::start(netns, addr, 0, move |mut s| async move {
        // Echo whatever arrives: clients of any message size.
        let mut buf = vec![0u8; size.max(64 * 1024)];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Name of the relays' worker threads (the only multi-threaded services),
/// by which [`relay_cpu_seconds`] finds them.
const RELAY_THREAD: &str = "floor-relay";

/// CPU time (user + system) used so far by the running relays' worker
/// threads in this process, seconds: the floor's proxy CPU.
pub fn relay_cpu_seconds() -> f64 {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0.0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.ends_with(&format!("({RELAY_THREAD}")) {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        ticks += [11, 12]
            .iter()
            .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
            .sum::<f64>();
    }
    ticks / hz
}

/// A request/response server in a pod: for every `request` bytes read it
/// answers `response` bytes, until the client closes.
pub fn sized_server(netns: &str, addr: SocketAddr, request: usize, response: usize) -> PodService {
    PodService::start(netns, addr, 0, move |mut s| async move {
        let mut req = vec![0u8; request.max(1)];
        let resp = vec![9u8; response];
        while s.read_exact(&mut req).await.is_ok() {
            if s.write_all(&resp).await.is_err() {
                break;
            }
        }
    })
}

/// A plain userspace TCP relay in a pod, on two threads like the agent:
/// each connection accepted on `listen` is copied both ways to `target`,
/// with no TLS and no HTTP/2. Two of them, one per node, are the floor any
/// two-proxy mesh pays on a path: the benchmark's `floor` column.
pub fn relay(netns: &str, listen: SocketAddr, target: SocketAddr) -> PodService {
    PodService::start(netns, listen, 2, move |mut down| async move {
        let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 32 << 10, 32 << 10).await;
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is valid")
}

/// Runs `per_worker` copies of `task` on each of `workers` threads inside
/// `netns`, and merges their histograms and counts.
fn run_workers<F, Fut>(netns: &str, workers: usize, per_worker: usize, task: F) -> (Histogram<u64>, u64)
where
    F: Fn() -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = (Histogram<u64>, u64)> + Send + 'static,
{
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let task = task.clone();
            in_netns(netns, move || {
                runtime().block_on(async move {
                    let tasks: Vec<_> = (0..per_worker).map(|_| tokio::spawn(task())).collect();
                    let mut h = histogram();
                    let mut n = 0;
                    for t in tasks {
                        if let Ok((th, tn)) = t.await {
                            let _ = h.add(th);
                            n += tn;
                        }
                    }
                    (h, n)
                })
            })
        })
        .collect();
    let mut h = histogram();
    let mut n = 0;
    for t in handles {
        if let Ok((th, tn)) = t.join() {
            let _ = h.add(th);
            n += tn;
        }
    }
    (h, n)
}

/// One request and its response, with a deadline so no run can hang.
async fn exchange(s: &mut tokio::net::TcpStream, req: &[u8], resp: &mut [u8]) -> bool {
    let io = async {
        s.write_all(req).await?;
        s.read_exact(resp).await
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), io).await, Ok(Ok(_)))
}

/// Request/response results.
#[derive(Clone, Copy, Debug, Default)]
pub struct RrResult {
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Completed requests per second.
    pub rps: f64,
}

/// Runs `conns` persistent connections from `netns` to `dst` for
/// `duration`, each sending `size`-byte requests; at `rate` total
/// requests/s when given (connections evenly out of phase, so requests are
/// spread over time; latency is measured from each request's send, since
/// the timer's 1 ms granularity would otherwise count), else as fast as
/// possible.
pub fn request_response(
    netns: &str,
    dst: SocketAddr,
    conns: usize,
    size: usize,
    rate: Option<f64>,
    duration: Duration,
) -> RrResult {
    request_response_sized(netns, dst, conns, (size, size), rate, duration)
}

/// [`request_response`] with requests of `sizes.0` bytes answered by
/// `sizes.1` bytes (a [`sized_server`] at `dst`).
pub fn request_response_sized(
    netns: &str,
    dst: SocketAddr,
    conns: usize,
    sizes: (usize, usize),
    rate: Option<f64>,
    duration: Duration,
) -> RrResult {
    let workers = 2.min(conns).max(1);
    let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
    // Connections take evenly spaced phases of the interval, so requests
    // arrive one every 1/rate seconds rather than all together in bursts.
    let next_phase = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let epoch = Instant::now() + Duration::from_millis(100);
    let (h, n) = run_workers(netns, workers, conns.div_ceil(workers), move || {
        let next_phase = next_phase.clone();
        async move {
            let mut h = histogram();
            let Ok(mut s) = tokio::net::TcpStream::connect(dst).await else {
                return (h, 0u64);
            };
            let _ = s.set_nodelay(true);
            let req = vec![7u8; sizes.0];
            let mut resp = vec![0u8; sizes.1];
            let phase = next_phase.fetch_add(1, Ordering::Relaxed);
            let mut next = epoch + interval.map_or(Duration::ZERO, |iv| iv * phase / conns as u32);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < duration {
                if let Some(iv) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += iv;
                }
                let t0 = Instant::now();
                if !exchange(&mut s, &req, &mut resp).await {
                    break;
                }
                let _ = h.record(t0.elapsed().as_micros() as u64);
                n += 1;
            }
            (h, n)
        }
    });
    RrResult {
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        p999_us: h.value_at_quantile(0.999) as f64,
        rps: n as f64 / duration.as_secs_f64(),
    }
}

/// Connection-rate results.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnRate {
    /// Completed connections per second.
    pub cps: f64,
    /// Median of connect + first response, µs.
    pub p50_us: f64,
    /// 99th percentile of connect + first response, µs.
    pub p99_us: f64,
}

/// New connection, one `size`-byte exchange, close; `concurrency` at a time.
pub fn connection_rate(netns: &str, dst: SocketAddr, concurrency: usize, size: usize, duration: Duration) -> ConnRate {
    let (h, n) = run_workers(netns, 2, concurrency.div_ceil(2), move || async move {
        let mut h = histogram();
        let req = vec![1u8; size];
        let mut resp = vec![0u8; size];
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            let t0 = Instant::now();
            let Ok(mut s) = tokio::net::TcpStream::connect(dst).await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            if !exchange(&mut s, &req, &mut resp).await {
                continue;
            }
            let _ = h.record(t0.elapsed().as_micros() as u64);
            n += 1;
            // Close with a reset-free shutdown, as clients do.
            let _ = s.shutdown().await;
        }
        (h, n)
    });
    ConnRate {
        cps: n as f64 / duration.as_secs_f64(),
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
    }
}
