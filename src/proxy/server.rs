//! The listening side: a loopback TCP or unix socket (created with its mode already set), and an
//! HTTP/1.1 keep-alive connection loop whose connections end with the proxy.

use super::forward::{Proxy, handle};
use crate::config::Listen;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

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

/// Accepts until the task is dropped; dropping it ends every connection too.
pub async fn serve(listener: Listener, proxy: Arc<Proxy>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok(io) => {
                    conns.spawn(connection(io, proxy.clone()));
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

async fn connection(io: Box<dyn Io>, proxy: Arc<Proxy>) {
    let service = hyper::service::service_fn(move |req| handle(proxy.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    // A client that goes away mid-request is its own business: nothing to report.
    let _ = conn.await;
}
