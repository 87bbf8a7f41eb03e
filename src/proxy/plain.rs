//! Plain-HTTP upstreams (`upstream = "http://..."`) over HTTP/1.1 connections that run in the
//! task of the request using them, not in a task of their own: the request is written, the
//! answer read and its body streamed by whoever polls them, and the connection goes back to an
//! idle list when its body is done. hyper's pooled client (kept for HTTPS, where HTTP/2 shares
//! one connection) hands each request to the connection's task and back and spawns a task to
//! return the connection to its pool: per request that cost about as much CPU as the rest of
//! the proxy together (issue 13's benchmark). At most `max` connections are open at once; a
//! request that finds them all busy waits for one (at most `CONNECTION_WAIT`).

use super::forward::UpBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

/// Idle connections kept beyond this many are closed (a burst's extra connections).
const MAX_IDLE: usize = 256;

/// How long a request waits for a connection when all `max` are busy, before a 503.
pub const CONNECTION_WAIT: Duration = Duration::from_secs(5);

type Conn = http1::Connection<TokioIo<tokio::net::TcpStream>, UpBody>;

/// One upstream connection: the sender and the connection's I/O, polled by their user.
struct Upstream {
    send: http1::SendRequest<UpBody>,
    conn: Conn,
    /// Its place under the cap, given back when the connection closes (is dropped).
    _slot: Slot,
    /// The worker whose runtime its socket is registered with: it goes back to that
    /// worker's idle list.
    home: usize,
}

/// The count of open connections and the wake-up of a request waiting for one. Separate from
/// `Pool`: idle connections hold a slot, and the pool holds them.
struct Slots {
    open: AtomicUsize,
    max: usize,
    /// A connection went idle or closed: a waiting request looks again.
    freed: Notify,
}

/// One open (or opening) connection's place under the cap.
struct Slot(Arc<Slots>);

impl Slots {
    fn take(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// A proxy's connections to its plain-HTTP upstream, shared by its workers.
pub struct Shared {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    /// Each worker's idle connections. Boxed: hyper's connection state is large, and a
    /// request moves its connection several times (out of this list, into the answer's body,
    /// which hyper moves again).
    #[allow(clippy::vec_box)]
    idle: Vec<Mutex<Vec<Box<Upstream>>>>,
    slots: Arc<Slots>,
    /// How long a request waits when all connections are busy.
    wait: Duration,
}

impl Shared {
    /// At most `max` open connections to `addr` among `workers` workers; a request waits up
    /// to `wait` for one.
    pub fn new(addr: String, max: usize, wait: Duration, workers: usize) -> Arc<Self> {
        let slots = Arc::new(Slots { open: AtomicUsize::new(0), max, freed: Notify::new() });
        let idle = (0..workers).map(|_| Mutex::new(Vec::new())).collect();
        Arc::new(Self { addr, idle, slots, wait })
    }
}

/// One worker's view of the connections: it takes its own idle ones and opens new ones on its
/// own runtime (a connection used on another worker's thread would wake that thread for each
/// of its reads).
pub struct Pool {
    shared: Arc<Shared>,
    worker: usize,
}

/// Why the upstream gave no answer.
pub enum Error {
    Connect,
    Request,
    /// All `max` connections stayed busy for the whole wait.
    Busy {
        max: usize,
        waited: Duration,
    },
}

impl Pool {
    pub fn new(shared: &Arc<Shared>, worker: usize) -> Arc<Self> {
        Arc::new(Self { shared: shared.clone(), worker })
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one when none
    /// is idle or the idle one turns out closed before the request went out.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpBody>,
    ) -> Result<Response<PlainBody>, Error> {
        let mut req = req;
        loop {
            let (mut up, reused) = self.acquire().await?;
            let sent = std::pin::pin!(up.send.try_send_request(req));
            match (Drive { conn: &mut up.conn, sent, closed: false }).await {
                Ok(resp) => {
                    let pool = self.clone();
                    let mut resp = resp.map(|body| PlainBody { body, up: Some((up, pool)) });
                    // No body (a 204, a HEAD): the connection is free already.
                    resp.body_mut().release_if_done();
                    return Ok(resp);
                }
                // Never written: a reused connection closed under it; try a fresh one.
                Err(mut e) if reused => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(Error::Request),
                },
                Err(_) => return Err(Error::Request),
            }
        }
    }

    /// An idle connection of worker `worker`'s that is still open and ready for a request.
    async fn checkout(&self, worker: usize) -> Option<Box<Upstream>> {
        loop {
            let mut up = self.shared.idle[worker].lock().expect("upstream pool lock").pop()?;
            // One poll finishes the last answer's bookkeeping and notices a close (no system
            // call unless the socket became readable while idle).
            if StillOpen(&mut up.conn).await && up.send.is_ready() {
                return Some(up);
            }
        }
    }

    /// An idle connection (true), or a new one (false) while fewer than `max` are open, or
    /// (at the cap) another worker's idle one; otherwise waits for one to go idle or close,
    /// at most `wait`.
    async fn acquire(&self) -> Result<(Box<Upstream>, bool), Error> {
        // The usual case, without joining the wait list (a lock the workers share).
        if let Some(found) = self.try_acquire().await? {
            return Ok(found);
        }
        // Boxed: every request's future would otherwise carry the wait's state.
        Box::pin(self.wait_for_one()).await
    }

    /// At the cap: waits for a connection to go idle or close, at most `wait`.
    async fn wait_for_one(&self) -> Result<(Box<Upstream>, bool), Error> {
        let slots = &self.shared.slots;
        let deadline = tokio::time::Instant::now() + self.shared.wait;
        loop {
            // Registered before looking again: a connection freed after the look wakes it.
            let freed = slots.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(found) = self.try_acquire().await? {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                // The wake-up this request may have taken goes to the next one in line.
                slots.freed.notify_one();
                return Err(Error::Busy { max: slots.max, waited: self.shared.wait });
            }
        }
    }

    /// One look: an idle connection of this worker's, a new one under the cap, or another
    /// worker's idle one.
    async fn try_acquire(&self) -> Result<Option<(Box<Upstream>, bool)>, Error> {
        if let Some(up) = self.checkout(self.worker).await {
            return Ok(Some((up, true)));
        }
        if let Some(slot) = self.shared.slots.take() {
            // Boxed: a connection is opened once for many requests (see `acquire`).
            return Ok(Some((Box::pin(self.connect(slot)).await?, false)));
        }
        Ok(self.borrow().await.map(|up| (up, true)))
    }

    /// Another worker's idle connection, at the cap only (its reads wake that worker).
    async fn borrow(&self) -> Option<Box<Upstream>> {
        for other in (0..self.shared.idle.len()).filter(|w| *w != self.worker) {
            if let Some(up) = self.checkout(other).await {
                return Some(up);
            }
        }
        None
    }

    async fn connect(&self, slot: Slot) -> Result<Box<Upstream>, Error> {
        let tcp =
            tokio::net::TcpStream::connect(&self.shared.addr).await.map_err(|_| Error::Connect)?;
        // Small requests and answers: no Nagle delay on top of the upstream's latency.
        let _ = tcp.set_nodelay(true);
        let (send, conn) =
            http1::Builder::new().handshake(TokioIo::new(tcp)).await.map_err(|_| Error::Connect)?;
        Ok(Box::new(Upstream { send, conn, _slot: slot, home: self.worker }))
    }

    fn put(&self, up: Box<Upstream>) {
        let kept = {
            let mut idle = self.shared.idle[up.home].lock().expect("upstream pool lock");
            let keep = idle.len() < MAX_IDLE;
            if keep {
                idle.push(up);
            }
            keep
        };
        // Dropped instead, the connection's slot wakes a waiting request.
        if kept {
            self.shared.slots.freed.notify_one();
        }
    }
}

/// Polls an idle connection once: false if it has closed.
struct StillOpen<'a>(&'a mut Conn);

impl Future for StillOpen<'_> {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        Poll::Ready(Pin::new(&mut *self.0).poll(cx).is_pending())
    }
}

/// Polls the connection (writes the request, reads the answer) and the answer's future
/// together until the answer's head is in.
struct Drive<'a, F> {
    conn: &'a mut Conn,
    sent: Pin<&'a mut F>,
    /// The connection's future has completed: it is not polled again.
    closed: bool,
}

impl<F: Future> Future for Drive<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // The connection first: it moves the request out and the answer in.
        if !self.closed && Pin::new(&mut *self.conn).poll(cx).is_ready() {
            // A closed connection has failed the request: the future says so.
            self.closed = true;
        }
        self.sent.as_mut().poll(cx)
    }
}

/// The upstream's answer body; polling it drives its connection, which goes back to the pool
/// once the body is done (dropped before that, the connection closes).
pub struct PlainBody {
    body: Incoming,
    up: Option<(Box<Upstream>, Arc<Pool>)>,
}

impl PlainBody {
    fn release_if_done(&mut self) {
        if self.body.is_end_stream()
            && let Some((up, pool)) = self.up.take()
        {
            pool.put(up);
        }
    }
}

impl Body for PlainBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending()
            && let Some((up, _)) = this.up.as_mut()
        {
            // The connection reads on for the body; a close shows in the body's next poll.
            if Pin::new(&mut up.conn).poll(cx).is_ready() {
                this.up = None;
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => {
                if let Some((up, pool)) = this.up.take() {
                    pool.put(up);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            Poll::Ready(Some(Err(_))) => this.up = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
