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

/// The connection cap in force: the one asked for, but never so high that
/// client connections could take the descriptors the process needs itself.
pub fn connection_cap(requested: usize, fd_limit: Option<u64>) -> usize {
    let requested = requested.max(1);
    match fd_limit {
        Some(n) => {
            let room = n.saturating_sub(FD_RESERVE).max(1);
            requested.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
        None => requested,
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
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
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
        assert_eq!(connection_cap(1024, None), 1024);
        assert_eq!(connection_cap(1024, Some(20_000)), 1024);
        assert_eq!(connection_cap(1024, Some(256)), 256 - FD_RESERVE as usize);
        assert_eq!(connection_cap(1024, Some(10)), 1);
        assert_eq!(connection_cap(0, Some(20_000)), 1);
    }
}
