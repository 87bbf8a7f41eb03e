//! The listening side: a loopback TCP or unix socket (created with its mode already set), and an
//! HTTP/1.1 keep-alive connection loop that drains at shutdown: it stops accepting, lets the
//! requests in flight finish (bounded by `SHUTDOWN_GRACE`) and closes idle connections.

use super::forward::{Proxy, handle};
use crate::config::Listen;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long requests in flight at shutdown may take to finish before their connections are
/// cut (inside systemd's `TimeoutStopSec=`, with room for a refresh's own grace).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest request head the proxy reads, and the most of a response it queues for a slow
/// client before waiting for it (hyper's default is 400 KiB; API calls are small).
const MAX_BUF: usize = 64 * 1024;

/// A bound listener.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix { listener: tokio::net::UnixListener, _file: SocketFile },
}

/// Removes the socket file when the proxy stops.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `listen`. A unix socket is bound in a private directory, given its mode, and only
/// then renamed into place: nobody can connect while it has the umask's mode.
pub async fn bind(listen: &Listen) -> std::io::Result<Listener> {
    match listen {
        Listen::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
        Listen::Unix { path, mode } => {
            let listener = bind_unix(path, *mode)?;
            Ok(Listener::Unix { listener, _file: SocketFile(path.clone()) })
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = tempfile::Builder::new().prefix(".tokend-proxy").tempdir_in(dir)?;
    let temp = private.path().join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&temp)?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&temp, path)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Accepts until `shutdown`, then drains: the listener closes at once (its socket file goes),
/// idle connections close, and requests in flight get `SHUTDOWN_GRACE` to finish. Dropping the
/// task instead ends every connection at once.
pub async fn serve(listener: Listener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(io) => {
                    conns.spawn(connection(io, proxy.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(token = %proxy.gate.name(), error = %e, "proxy accept failed");
                    // EMFILE and the like: let connections close before trying again.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    drain(&mut conns, proxy.gate.name()).await;
}

async fn drain(conns: &mut JoinSet<()>, token: &str) {
    let open = conns.len();
    let all = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        tracing::warn!(
            token,
            connections = conns.len(),
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "proxied requests still in flight at shutdown; closing their connections"
        );
        conns.shutdown().await;
    } else if open > 0 {
        tracing::debug!(token, connections = open, "proxy connections drained");
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn accept(listener: &Listener) -> std::io::Result<Box<dyn Io>> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            // Small requests and answers: no Nagle delay on top of the upstream's latency.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream))
        }
        Listener::Unix { listener, .. } => Ok(Box::new(listener.accept().await?.0)),
    }
}

async fn connection(io: Box<dyn Io>, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    // Boxed: hyper keeps a slot the size of the service's future for each connection, idle or
    // not; a box makes that slot a pointer, and the future's memory lives only per request.
    let service = hyper::service::service_fn(move |req| Box::pin(handle(proxy.clone(), req)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // A client that goes away mid-request is its own business: nothing to report.
    tokio::select! {
        _ = conn.as_mut() => return,
        () = shutdown.cancelled() => {}
    }
    // Finishes the request in flight (answered with `Connection: close`), or closes at once
    // when idle.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
