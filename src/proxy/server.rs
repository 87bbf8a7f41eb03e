//! The listening side: a loopback TCP or unix socket (created with its mode already set), whose
//! connections are handed to the proxy's worker threads in turn, and an HTTP/1.1 keep-alive
//! connection loop that drains at shutdown: it stops accepting, lets the requests in flight
//! finish (bounded by `SHUTDOWN_GRACE`) and closes idle connections.

use super::conn::{self, Reader, Writer};
use super::forward::{Proxy, handle};
use crate::config::Listen;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long requests in flight at shutdown may take to finish before their connections are
/// cut (inside systemd's `TimeoutStopSec=`, with room for a refresh's own grace).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection that sends nothing is closed after this long.
const FIRST_BYTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A connection with no request in progress is closed after 15 to 30 s without one starting
/// or ending: an idle keep-alive connection, or a request head that does not arrive whole (as
/// hyper's header read timeout, 30 s, did before; see `idle`).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

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

/// Where a proxy's connections run: a worker thread's runtime and the proxy's state for it.
pub type Worker = (tokio::runtime::Handle, Arc<Proxy>);

/// Accepts until `shutdown`, handing each connection to the next worker in turn, then drains:
/// the listener closes at once (its socket file goes), idle connections close, and requests in
/// flight get `SHUTDOWN_GRACE` to finish. Dropping the task instead ends every connection at once.
pub async fn serve(listener: Listener, workers: Vec<Worker>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    let token = workers[0].1.gate.name().to_string();
    let mut turn = (0..workers.len()).cycle();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(&listener) => match accepted {
                Ok(stream) => {
                    let (rt, proxy) = &workers[turn.next().unwrap_or(0)];
                    conns.spawn_on(on_worker(stream, proxy.clone(), shutdown.clone()), rt);
                }
                Err(e) => {
                    tracing::warn!(token, error = %e, "proxy accept failed");
                    // EMFILE and the like: let connections close before trying again.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    drain(&mut conns, &token).await;
}

/// Serves an accepted connection on the worker this runs on, its socket moved from the
/// accepting runtime to that worker's.
async fn on_worker(stream: Stream, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let moved = match stream {
        Stream::Tcp(io) => match io.into_std().and_then(tokio::net::TcpStream::from_std) {
            Ok(io) => return connection(io, proxy, shutdown).await,
            Err(e) => e,
        },
        Stream::Unix(io) => match io.into_std().and_then(tokio::net::UnixStream::from_std) {
            Ok(io) => return connection(io, proxy, shutdown).await,
            Err(e) => e,
        },
    };
    tracing::warn!(token = %proxy.gate.name(), error = %moved, "proxy connection dropped: could not move it to a worker thread");
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

/// An accepted client connection.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A client connection's socket: able to say when data arrived without reading it, and to
/// split into the connection loop's read and write sides.
trait Io: std::os::fd::AsFd + Send + Unpin + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    /// Runs `op` if the socket may be readable; a `WouldBlock` from it clears the readiness.
    fn try_read_io(&self, op: impl FnOnce() -> std::io::Result<usize>) -> std::io::Result<usize>;
    fn split(self) -> (Box<dyn Reader>, Writer);
}

impl Io for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Self::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, op: impl FnOnce() -> std::io::Result<usize>) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, op)
    }
    fn split(self) -> (Box<dyn Reader>, Writer) {
        let (reader, writer) = self.into_split();
        (Box::new(reader), Box::new(writer))
    }
}

impl Io for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Self::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, op: impl FnOnce() -> std::io::Result<usize>) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, op)
    }
    fn split(self) -> (Box<dyn Reader>, Writer) {
        let (reader, writer) = self.into_split();
        (Box::new(reader), Box::new(writer))
    }
}

/// Ready, handing the socket back, once it has data (or the client closed it, or it failed).
/// tokio's readiness alone is a hint (a fresh socket starts out "readable"), so a one-byte peek
/// confirms it, leaving the bytes for the connection loop.
struct Readable<I>(Option<I>);

impl<I: Io> std::future::Future for Readable<I> {
    type Output = (I, std::io::Result<()>);

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let io = self.0.as_ref().expect("polled after ready");
        let ready = loop {
            if let Err(e) = std::task::ready!(io.poll_read_ready(cx)) {
                break Err(e);
            }
            let mut byte = [std::mem::MaybeUninit::uninit()];
            match io.try_read_io(|| socket2::SockRef::from(io).peek(&mut byte)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Data, or end of file (the close is the connection loop's to see), or an error.
                other => break other.map(|_| ()),
            }
        };
        Poll::Ready((self.0.take().expect("polled after ready"), ready))
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Stream> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            // Small requests and answers: no Nagle delay on top of the upstream's latency.
            let _ = stream.set_nodelay(true);
            Ok(Stream::Tcp(stream))
        }
        Listener::Unix { listener, .. } => Ok(Stream::Unix(listener.accept().await?.0)),
    }
}

/// Waits for the client's first bytes before the connection is served: its task then takes
/// the connection loop's state (about 1 KiB, boxed), so a connection opened ahead of use (a
/// client's pool warming up) holds only its socket and a small task until it is used.
async fn connection<I: Io>(io: I, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    if let Some(io) = first_bytes(io, &shutdown, FIRST_BYTE_TIMEOUT).await {
        let (reader, writer) = io.split();
        serve_connection(reader, writer, proxy, shutdown).await;
    }
}

/// The socket once its first bytes are in; None (closing it) when the client sends nothing
/// within `timeout`, the socket fails, or the proxy stops.
async fn first_bytes<I: Io>(
    io: I,
    shutdown: &CancellationToken,
    timeout: std::time::Duration,
) -> Option<I> {
    tokio::select! {
        r = tokio::time::timeout(timeout, Readable(Some(io))) => match r {
            Ok((io, Ok(()))) => Some(io),
            _ => None,
        },
        () = shutdown.cancelled() => None,
    }
}

/// Serves one client connection (see `conn`). Boxed: the task of a connection still waiting
/// for its first bytes stays small (and the future's type is named, which the compiler needs
/// to see that it is `Send`); the request's future is boxed too, as it lives only while a
/// request is in progress.
fn serve_connection(
    reader: Box<dyn Reader>,
    writer: Writer,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let service = move |req| Box::pin(handle(proxy.clone(), req));
        conn::serve(reader, writer, service, &shutdown, IDLE_TIMEOUT).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A silent connection is closed after the first-byte timeout, as hyper closed it before
    /// the first-byte wait existed; one that sends in time is handed on.
    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_first_byte_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let short = Duration::from_millis(300);
        let _silent = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let started = std::time::Instant::now();
        let kept = tokio::time::timeout(Duration::from_secs(60), first_bytes(s, &stop, short));
        assert!(kept.await.expect("still waiting after 60 s").is_none(), "a silent one is kept");
        assert!(started.elapsed() >= short);
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(b"G").await.unwrap();
        let long = Duration::from_secs(60);
        assert!(first_bytes(s, &stop, long).await.is_some(), "one that sent is closed");
    }

    /// A connection with nothing sent yet is not handed on; its first byte hands it on unread.
    #[tokio::test]
    async fn readable_waits_for_the_first_byte_and_leaves_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut waiting = Readable(Some(s));
        let early = tokio::time::timeout(Duration::from_millis(200), &mut waiting).await;
        assert!(early.is_err(), "ready before any byte");
        c.write_all(b"G").await.unwrap();
        let (s, ready) = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap();
        ready.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.try_read(&mut buf).unwrap(), 1, "the byte was consumed");
        assert_eq!(&buf, b"G");
    }
}
