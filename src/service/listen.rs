//! Serving connections: HTTP/1.1 with a header (and keep-alive idle)
//! timeout, a cap on open connections and a smaller one per client, a
//! maximum age and request count per connection, and a shutdown that turns
//! the service unready, keeps serving for a moment, then drains within a
//! bound.
//!
//! Without these, a client that opens connections and sends nothing (or half
//! a request) holds a file descriptor each for ever: enough of them and the
//! process can no longer accept, not even `/healthz`, nor reach Redis.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
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
    /// Open connections of one client (one address; IPv6 per /64) at most:
    /// past it, a new one of that client is closed at once, so that no
    /// client holds every slot.
    pub max_connections_per_client: usize,
    /// A connection older than this is closed once its current request is
    /// answered (None: never).
    pub max_connection_age: Option<Duration>,
    /// The answer to a connection's n-th request carries `Connection:
    /// close`, and the connection ends with it (None: never).
    pub max_requests_per_connection: Option<u64>,
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

/// Who a connection's client is, for [`ClientSlots`]: its address, an IPv6
/// one by its /64 (a host is given at least that many addresses).
fn client_of(ip: IpAddr) -> IpAddr {
    match crate::trusted_proxies::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Open connections per client, bounded.
#[derive(Debug)]
pub struct ClientSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a client, counted until dropped.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    client: IpAddr,
}

impl ClientSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ClientSlots {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip`, or None when its client has all
    /// of its own.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let client = client_of(ip);
        let mut open = self.open();
        let n = open.entry(client).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }

    /// Open connections of `ip`'s client.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.open().get(&client_of(ip)).copied().unwrap_or(0)
    }

    /// Clients with an open connection.
    pub fn clients(&self) -> usize {
        self.open().len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open();
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
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
    let clients = ClientSlots::new(limits.max_connections_per_client);
    let (closing, closed) = watch::channel(false);
    let mut connections = JoinSet::new();
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
        while connections.try_join_next().is_some() {}
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
        let Some(slot) = clients.take(peer.ip()) else {
            tracing::debug!(
                client = %client_of(peer.ip()),
                limit = limits.max_connections_per_client,
                "connection closed: the client has its limit of open connections"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let served = Arc::new(AtomicU64::new(0));
        let max_requests = limits.max_requests_per_connection;
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let router = router.clone();
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                let mut resp = match router.oneshot(req.map(Body::new)).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if max_requests.is_some_and(|max| n >= max) {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let mut closed = closed.clone();
        let max_age = limits.max_connection_age;
        connections.spawn(async move {
            tokio::pin!(conn);
            let aged = async {
                match max_age {
                    Some(age) => tokio::time::sleep(age).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(aged);
            let mut ending = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    // Old enough, or the service stops: the request in
                    // flight is answered, then the connection ends.
                    _ = &mut aged, if !ending => {
                        conn.as_mut().graceful_shutdown();
                        ending = true;
                    }
                    _ = closed.changed(), if !ending => {
                        conn.as_mut().graceful_shutdown();
                        ending = true;
                    }
                }
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    while connections.try_join_next().is_some() {}
    tracing::info!(
        connections = connections.len(),
        "stopped accepting; draining open connections"
    );
    let _ = closing.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    match tokio::time::timeout(limits.shutdown_timeout, drained).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!(
                timeout_ms = limits.shutdown_timeout.as_millis() as u64,
                "shutdown timeout reached: closing the remaining connections"
            );
            connections.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_own_slots_and_no_more() {
        let slots = ClientSlots::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "a third of the same client");
        // Written as IPv6, the same IPv4 client.
        assert!(slots.take("::ffff:192.0.2.1".parse().unwrap()).is_none());
        let _other = slots.take(b).unwrap();
        drop(first);
        assert_eq!(slots.count(a), 1);
        let _again = slots.take(a).unwrap();
        assert_eq!(slots.clients(), 2);
    }

    #[test]
    fn an_ipv6_network_is_one_client() {
        let slots = ClientSlots::new(1);
        let _one = slots.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(
            slots
                .take("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none()
        );
        let _next = slots.take("2001:db8:1:3::1".parse().unwrap()).unwrap();
        drop(_one);
        drop(_next);
        // Closed connections leave no entry behind.
        assert_eq!(slots.clients(), 0);
    }

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
