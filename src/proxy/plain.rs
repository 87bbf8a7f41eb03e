//! Plain-HTTP upstreams (`upstream = "http://..."`) over HTTP/1.1 connections that run in the
//! task of the request using them, not in a task of their own: the request is written, the
//! answer read and its body streamed by whoever polls them, and the connection goes back to an
//! idle list when its body is done. hyper's pooled client (kept for HTTPS, where HTTP/2 shares
//! one connection) hands each request to the connection's task and back and spawns a task to
//! return the connection to its pool: per request that cost about as much CPU as the rest of
//! the proxy together (issue 13's benchmark).

use super::forward::UpBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Idle connections kept beyond this many are closed (a burst's extra connections).
const MAX_IDLE: usize = 256;

type Conn = http1::Connection<TokioIo<tokio::net::TcpStream>, UpBody>;

/// One upstream connection: the sender and the connection's I/O, polled by their user.
struct Upstream {
    send: http1::SendRequest<UpBody>,
    conn: Conn,
}

/// A proxy's connections to its plain-HTTP upstream.
pub struct Pool {
    /// `host:port`, as `TcpStream::connect` takes it.
    addr: String,
    /// Boxed: hyper's connection state is large, and a request moves its connection several
    /// times (out of this list, into the answer's body, which hyper moves again).
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Upstream>>>,
}

/// Why the upstream gave no answer.
pub enum Error {
    Connect,
    Request,
}

impl Pool {
    pub fn new(addr: String) -> Arc<Self> {
        Arc::new(Self { addr, idle: Mutex::new(Vec::new()) })
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one when none
    /// is idle or the idle one turns out closed before the request went out.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpBody>,
    ) -> Result<Response<PlainBody>, Error> {
        let mut req = req;
        loop {
            let (mut up, reused) = match self.checkout().await {
                Some(up) => (up, true),
                None => (self.connect().await?, false),
            };
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

    /// An idle connection that is still open and ready for a request.
    async fn checkout(&self) -> Option<Box<Upstream>> {
        loop {
            let mut up = self.idle.lock().expect("upstream pool lock").pop()?;
            // One poll finishes the last answer's bookkeeping and notices a close (no system
            // call unless the socket became readable while idle).
            if StillOpen(&mut up.conn).await && up.send.is_ready() {
                return Some(up);
            }
        }
    }

    async fn connect(&self) -> Result<Box<Upstream>, Error> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await.map_err(|_| Error::Connect)?;
        // Small requests and answers: no Nagle delay on top of the upstream's latency.
        let _ = tcp.set_nodelay(true);
        let (send, conn) =
            http1::Builder::new().handshake(TokioIo::new(tcp)).await.map_err(|_| Error::Connect)?;
        Ok(Box::new(Upstream { send, conn }))
    }

    fn put(&self, up: Box<Upstream>) {
        let mut idle = self.idle.lock().expect("upstream pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(up);
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
