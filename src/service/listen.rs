//! Serving connections: HTTP/1.1 with a header (and keep-alive idle)
//! timeout, a cap on open connections, and a shutdown that turns the
//! service unready, keeps serving for a moment, then drains within a bound.
//!
//! Without these, a client that opens connections and sends nothing (or half
//! a request) holds a file descriptor each for ever: enough of them and the
//! process can no longer accept, not even `/healthz`, nor reach Redis.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// File descriptors kept free for everything but client connections: the
/// listener, Redis connections, the policy, users and key files, logs.
pub const FD_RESERVE: u64 = 64;

/// The most a connection buffers while reading a request's head (request
/// line and headers): past it, `431 Request Header Fields Too Large` and
/// the connection is closed. nginx's default (`large_client_header_buffers
/// 4 8k`) allows as much. Without a bound, hyper buffers ~400 KiB per
/// connection, and 400 connections each sending a half request of 400 KiB
/// of headers took the process from 10 to 171 MiB.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Headers in one request at most (hyper's own default, set here so that
/// it is a decision): past it, 431.
pub const MAX_HEADERS: usize = 100;

/// What one open connection may hold at most while its request head
/// arrives: the read buffer grows by doubling, so up to twice
/// [`MAX_HEAD_BYTES`], plus the write buffer and the connection's state
/// (measured: 200 connections each holding 30 KiB of a head cost ~40 KiB
/// each).
pub const MAX_BYTES_PER_CONNECTION: u64 = 2 * MAX_HEAD_BYTES as u64 + 16 * 1024;

/// The share of the memory limit that client connections may take at
/// worst: the rest is for password checks (up to 4 threads x 19 MiB with
/// argon2id's defaults) and the process itself with its caches. Under the
/// operator's default 128 MiB limit: 128 MiB / 4 / 80 KiB = 409
/// connections, and 96 MiB for the rest.
pub const MEMORY_SHARE_DIVISOR: u64 = 4;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a connection may take to send a request's headers, counted from
    /// its opening or from the end of its previous request: so also how long
    /// an idle kept-alive connection stays open.
    pub header_timeout: Duration,
    /// Open client connections at most; past it, new ones wait in the
    /// kernel's backlog until one closes.
    pub max_connections: usize,
    /// After the shutdown signal: how long the service keeps answering
    /// (with `/readyz` unready) before it stops accepting.
    pub shutdown_delay: Duration,
    /// Then: how long in-flight requests get to finish before the remaining
    /// connections are closed.
    pub shutdown_timeout: Duration,
}

/// Set once the shutdown signal came: `/readyz` answers 503 from then on.
#[derive(Debug, Clone, Default)]
pub struct Draining(pub Arc<AtomicBool>);

impl Draining {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Raises the soft limit on open files to the hard one and returns the soft
/// limit in force (None when unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                limit = raised;
            }
        }
        limit.current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The memory limit of the process's cgroup (a Pod's
/// `resources.limits.memory`), in bytes; None when unlimited or unknown.
pub fn memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .as_deref()
        .and_then(parse_memory_limit)
}

/// `memory.max` (cgroup v2: a number or `max`) or `memory.limit_in_bytes`
/// (v1: a number, near 2^63 when unlimited).
fn parse_memory_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0 && *n < 1 << 60)
}

/// The connection cap in force: the one asked for, but never so high that
/// client connections could take the descriptors the process needs itself,
/// nor, each holding [`MAX_BYTES_PER_CONNECTION`] at worst, more than
/// 1/[`MEMORY_SHARE_DIVISOR`] of the memory limit.
pub fn connection_cap(requested: usize, fd_limit: Option<u64>, memory: Option<u64>) -> usize {
    let to_usize = |n: u64| usize::try_from(n.max(1)).unwrap_or(usize::MAX);
    let mut cap = requested.max(1);
    if let Some(n) = fd_limit {
        cap = cap.min(to_usize(n.saturating_sub(FD_RESERVE)));
    }
    if let Some(bytes) = memory {
        cap = cap.min(to_usize(
            bytes / MEMORY_SHARE_DIVISOR / MAX_BYTES_PER_CONNECTION,
        ));
    }
    cap
}

/// Accepts connections until `signal` resolves, then shuts down as
/// [`Limits`] says. Every request carries the peer's `ConnectInfo`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    draining: Draining,
    signal: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);

    let delay = limits.shutdown_delay;
    let stop = async {
        signal.await;
        draining.0.store(true, Ordering::Relaxed);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "shutdown signal: not ready; still serving for the shutdown delay"
        );
        tokio::time::sleep(delay).await;
    };
    tokio::pin!(stop);

    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or a connection reset before we
                    // took it: not fatal; pause so as not to spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let router = router.clone();
            async move {
                let resp = router.oneshot(req.map(Body::new)).await;
                Ok::<_, Infallible>(resp.unwrap_or_else(|never| match never {}))
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        connections = open,
        "stopped accepting; draining open connections"
    );
    match tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            timeout_ms = limits.shutdown_timeout.as_millis() as u64,
            "shutdown timeout reached: closing the remaining connections"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_leaves_room_for_the_process() {
        assert_eq!(connection_cap(1024, None, None), 1024);
        assert_eq!(connection_cap(1024, Some(20_000), None), 1024);
        assert_eq!(
            connection_cap(1024, Some(256), None),
            256 - FD_RESERVE as usize
        );
        assert_eq!(connection_cap(1024, Some(10), None), 1);
        assert_eq!(connection_cap(0, Some(20_000), None), 1);
    }

    #[test]
    fn cap_fits_the_memory_limit() {
        const MIB: u64 = 1024 * 1024;
        // The operator's default limit: a quarter of 128 MiB at 80 KiB each.
        assert_eq!(MAX_BYTES_PER_CONNECTION, 80 * 1024);
        assert_eq!(connection_cap(1024, Some(20_000), Some(128 * MIB)), 409);
        assert_eq!(connection_cap(1024, None, Some(1024 * MIB)), 1024);
        assert_eq!(connection_cap(100, None, Some(128 * MIB)), 100);
        assert_eq!(connection_cap(1024, None, Some(1)), 1);
        assert_eq!(parse_memory_limit("134217728\n"), Some(128 * MIB));
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712"), None);
        assert_eq!(parse_memory_limit(""), None);
    }
}
