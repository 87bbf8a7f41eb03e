//! Plain-HTTP upstreams (`upstream = "http://..."`) over HTTP/1.1 connections of the proxy's
//! own, driven by the request using them: the request is written and the answer read by
//! whoever polls them, its body streamed by whoever polls the body, and the connection goes
//! back to an idle list when the body is done. hyper's pooled client (kept for HTTPS, where
//! HTTP/2 shares one connection) hands each request to the connection's task and back; hyper's
//! connection driven inline still cost about 19k of the 41.6k instructions of a proxied
//! request (callgrind, issue 13's benchmark). At most `max` connections are open at once; a
//! request that finds them all busy waits for one (at most `CONNECTION_WAIT`).

use super::body::UpBody;
use super::forward::BoxError;
use super::upwire::{self, Answer, Framing, Outgoing, Sending};
use super::wire::{Chunked, Decoded};
use bytes::BytesMut;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::{Method, Response};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Idle connections kept beyond this many are closed (a burst's extra connections).
const MAX_IDLE: usize = 256;

/// How long a request waits for a connection when all `max` are busy, before a 503.
pub const CONNECTION_WAIT: Duration = Duration::from_secs(5);

/// What a read takes at least room for.
const READ_SIZE: usize = 16 * 1024;

/// One upstream connection.
struct Upstream {
    io: TcpStream,
    /// Read from the upstream and not used yet (empty between requests; its memory is kept).
    buf: BytesMut,
    /// Its place under the cap, given back when the connection closes (is dropped).
    _slot: Slot,
    /// The worker whose runtime its socket is registered with: it goes back to that
    /// worker's idle list.
    home: usize,
}

impl Upstream {
    /// An idle connection is still open and has nothing to read (a close, a reset, or bytes
    /// no request asked for make it unusable). A system call only when the socket became
    /// readable since its last read.
    fn still_open(&self, cx: &mut Context<'_>) -> bool {
        match self.io.poll_read_ready(cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.io.try_read(&mut [0; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Reads more into `buf`: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
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
    /// Each worker's idle connections. Boxed: a request moves its connection several times
    /// (out of this list, into the answer's body, which the proxy moves again).
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
    /// The request got no answer: why (never a header or the target: they may be private).
    Request(&'static str),
    /// The answer is not HTTP/1.1 the proxy can pass on: why.
    Answer(&'static str),
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

    /// Sends `req` with `body` on an idle connection, or a new one when none is idle. A reused connection that the upstream closed before answering (its close
    /// crossed the request) gets the request again on a fresh one, if it was not written yet
    /// or is idempotent (RFC 9110 section 9.2.2), and its body is all still here.
    pub async fn send(
        self: &Arc<Self>,
        req: &Outgoing<'_>,
        body: UpBody,
    ) -> Result<Response<PlainBody>, Error> {
        let (whole, stream) = match body {
            UpBody::Whole(b) => (b, None),
            UpBody::Streaming(s) => (Bytes::new(), Some(s)),
        };
        let mut head = Vec::with_capacity(512);
        let whole_len = stream.is_none().then_some(whole.len());
        let sending = upwire::request_head(&mut head, req, whole_len);
        let head_request = *req.method == Method::HEAD;
        let mut sender = Sender::new(head, whole, stream, sending);
        let mut retried = false;
        loop {
            let (mut up, reused) = self.acquire().await?;
            let mut ex = Exchange { up: &mut up, sender: &mut sender, answered: false, interim: 0 };
            let answer = std::future::poll_fn(|cx| ex.poll(cx, head_request)).await;
            match answer {
                Ok(answer) => return Ok(self.answer(up, answer, sender)),
                Err(Failure::NoAnswer { wrote })
                    if reused
                        && !retried
                        && !sender.taken
                        && (!wrote || idempotent(req.method)) =>
                {
                    retried = true;
                    sender.again();
                }
                Err(Failure::Bad(why)) => return Err(Error::Answer(why)),
                Err(Failure::NoAnswer { .. }) => {
                    return Err(Error::Request(
                        "the upstream closed the connection without an answer",
                    ));
                }
                Err(Failure::Other(why)) => return Err(Error::Request(why)),
            }
        }
    }

    /// The answer, its body reading on from `up`, and the rest of the request (an answer that
    /// came before it was all sent) still going out as the body is read.
    fn answer(
        self: &Arc<Self>,
        up: Box<Upstream>,
        answer: Answer,
        sender: Sender,
    ) -> Response<PlainBody> {
        let Answer { head, framing, keep_alive } = answer;
        let decoder = match framing {
            Framing::Empty => Decoder::Length(0),
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunked::Size),
            Framing::UntilClose => Decoder::UntilClose,
        };
        // Reused only if the request went out whole and the answer says the upstream keeps it.
        let sent = sender.sent && !sender.broken;
        let reuse = keep_alive && sent;
        let rest = (!sender.sent && !sender.broken).then(|| Box::new(sender));
        let mut body = PlainBody { up: Some((up, self.clone())), decoder, reuse, rest };
        // No body (a 204, a HEAD): the connection is free already.
        body.release_if_done();
        head.map(|()| body)
    }

    /// An idle connection of worker `worker`'s that is still open.
    async fn checkout(&self, worker: usize) -> Option<Box<Upstream>> {
        loop {
            let up = self.shared.idle[worker].lock().expect("upstream pool lock").pop()?;
            if std::future::poll_fn(|cx| Poll::Ready(up.still_open(cx))).await {
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
        let io = TcpStream::connect(&self.shared.addr).await.map_err(|_| Error::Connect)?;
        // Small requests and answers: no Nagle delay on top of the upstream's latency.
        let _ = io.set_nodelay(true);
        Ok(Box::new(Upstream { io, buf: BytesMut::new(), _slot: slot, home: self.worker }))
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

/// Methods a client may send again after a connection failed under them (RFC 9110
/// section 9.2.2).
fn idempotent(method: &Method) -> bool {
    [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS, Method::TRACE]
        .contains(method)
}

/// Why a request got no answer.
enum Failure {
    /// The upstream closed or reset the connection before any byte of an answer; `wrote`:
    /// some of the request had gone out.
    NoAnswer { wrote: bool },
    /// An answer that is not valid HTTP/1.1, or a framing the proxy cannot pass on.
    Bad(&'static str),
    /// Anything else (the connection failed inside an answer's head, the request body broke):
    /// why.
    Other(&'static str),
}

/// A request going upstream, written as far as the socket takes at each poll: an upstream may
/// answer (a 401, a 413, or a 200 it streams while it reads) before a streamed body is all sent.
struct Sender {
    /// The head and a whole body, written from `written` on.
    head: Vec<u8>,
    whole: Bytes,
    written: usize,
    /// A streamed body, framed into `chunk` a piece at a time.
    stream: Option<BoxBody<Bytes, BoxError>>,
    sending: Sending,
    /// A streamed body's declared length not sent yet.
    left: u64,
    chunk: Vec<u8>,
    chunk_written: usize,
    /// The request is all written.
    sent: bool,
    /// A write failed: the rest of the request is not sent, an answer may still be there.
    broken: bool,
    /// Some of a streamed body was taken from it: it cannot be sent again.
    taken: bool,
}

/// One request written and its answer's head read, both as far as they can go at each poll.
struct Exchange<'a> {
    up: &'a mut Upstream,
    sender: &'a mut Sender,
    /// Bytes of an answer (interim ones too) came in.
    answered: bool,
    /// The bytes of interim answers dropped so far (bounded with the head).
    interim: usize,
}

impl Sender {
    fn new(
        head: Vec<u8>,
        whole: Bytes,
        stream: Option<BoxBody<Bytes, BoxError>>,
        sending: Sending,
    ) -> Self {
        let left = if let Sending::Length(n) = sending { n } else { 0 };
        Self {
            head,
            whole,
            written: 0,
            stream,
            sending,
            left,
            chunk: Vec::new(),
            chunk_written: 0,
            sent: false,
            broken: false,
            taken: false,
        }
    }

    /// From the start, on a new connection (nothing of a streamed body was taken).
    fn again(&mut self) {
        self.written = 0;
        self.chunk.clear();
        self.chunk_written = 0;
        self.sent = false;
        self.broken = false;
    }

    /// Writes as much of the request as the socket takes.
    fn poll_send(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Result<(), SendError> {
        let total = self.head.len() + self.whole.len();
        loop {
            if self.written < total {
                let (a, b) = (&self.head[..], &self.whole[..]);
                let slices = if self.written < a.len() {
                    [IoSlice::new(&a[self.written..]), IoSlice::new(b)]
                } else {
                    [IoSlice::new(&b[self.written - a.len()..]), IoSlice::new(&[])]
                };
                match Pin::new(&mut *io).poll_write_vectored(cx, &slices) {
                    Poll::Ready(Ok(n)) if n > 0 => self.written += n,
                    Poll::Ready(_) => return Err(SendError::Write),
                    Poll::Pending => return Ok(()),
                }
            } else if self.chunk_written < self.chunk.len() {
                match Pin::new(&mut *io).poll_write(cx, &self.chunk[self.chunk_written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => self.chunk_written += n,
                    Poll::Ready(_) => return Err(SendError::Write),
                    Poll::Pending => return Ok(()),
                }
            } else if let Some(stream) = self.stream.as_mut() {
                let Poll::Ready(frame) = Pin::new(stream).poll_frame(cx) else {
                    return Ok(());
                };
                self.chunk.clear();
                self.chunk_written = 0;
                match frame {
                    None => self.end_stream()?,
                    Some(Ok(frame)) => {
                        self.taken = true;
                        if let Ok(data) = frame.into_data() {
                            self.frame(&data)?;
                        }
                    }
                    Some(Err(_)) => return Err(SendError::Body),
                }
            } else {
                self.sent = true;
                return Ok(());
            }
        }
    }

    /// Frames a piece of a streamed body into `chunk`.
    fn frame(&mut self, data: &[u8]) -> Result<(), SendError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.sending == Sending::Chunked {
            self.chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.chunk.extend_from_slice(data);
            self.chunk.extend_from_slice(b"\r\n");
            return Ok(());
        }
        // Longer than declared: the upstream would read the rest as a request of its own.
        self.left = self.left.checked_sub(data.len() as u64).ok_or(SendError::Body)?;
        self.chunk.extend_from_slice(data);
        Ok(())
    }

    /// The streamed body ended: the last chunk, or a check that it had its declared length.
    fn end_stream(&mut self) -> Result<(), SendError> {
        self.stream = None;
        match self.sending {
            Sending::Chunked => self.chunk.extend_from_slice(b"0\r\n\r\n"),
            Sending::Length(_) if self.left > 0 => return Err(SendError::Body),
            _ => {}
        }
        Ok(())
    }
}

impl Exchange<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, head_request: bool) -> Poll<Result<Answer, Failure>> {
        let sender = &mut *self.sender;
        if !sender.sent && !sender.broken {
            match sender.poll_send(&mut self.up.io, cx) {
                Ok(()) => {}
                Err(SendError::Write) => sender.broken = true,
                Err(SendError::Body) => {
                    let why = "the client's request body broke off, or was not its declared length";
                    return Poll::Ready(Err(Failure::Other(why)));
                }
            }
        }
        self.poll_answer(cx, head_request)
    }

    /// Reads until a final answer's head is in.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<Answer, Failure>> {
        loop {
            if !self.up.buf.is_empty() {
                match upwire::parse_answer(&mut self.up.buf, head_request, &mut self.interim) {
                    Ok(Some(answer)) => return Poll::Ready(Ok(answer)),
                    Ok(None) => {}
                    Err(bad) => return Poll::Ready(Err(Failure::Bad(bad.0))),
                }
            }
            match ready!(self.up.poll_fill(cx)) {
                Ok(1..) => self.answered = true,
                Ok(0) | Err(_) if !self.answered => {
                    let wrote = self.sender.written > 0 || self.sender.taken;
                    return Poll::Ready(Err(Failure::NoAnswer { wrote }));
                }
                Ok(0) | Err(_) => {
                    let why =
                        "the upstream closed or reset the connection inside its answer's head";
                    return Poll::Ready(Err(Failure::Other(why)));
                }
            }
        }
    }
}

enum SendError {
    /// The socket refused the write (the upstream closed or reset it).
    Write,
    /// The client's body broke off, or was longer or shorter than it said.
    Body,
}

/// How an answer's body is read off the connection.
enum Decoder {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    /// An answer read until its close has ended.
    Closed,
}

/// The upstream's answer body; polling it reads its connection, which goes back to the pool
/// once the body is done (dropped before that, the connection closes).
pub struct PlainBody {
    up: Option<(Box<Upstream>, Arc<Pool>)>,
    decoder: Decoder,
    /// The connection may carry another request after this body.
    reuse: bool,
    /// The rest of a request that was answered before it was all sent: it still goes out as
    /// the body is read (the upstream may read it all before it ends its answer).
    rest: Option<Box<Sender>>,
}

impl PlainBody {
    fn done(&self) -> bool {
        match self.decoder {
            Decoder::Length(left) => left == 0,
            Decoder::Chunked(state) => state == Chunked::Done,
            Decoder::UntilClose => false,
            Decoder::Closed => true,
        }
    }

    /// At the body's end, the connection goes back to the pool if nothing more was read from
    /// it than the answer (bytes past the answer's end mean the upstream and the proxy
    /// disagree on where it ended: never reused).
    fn release_if_done(&mut self) {
        if self.done() {
            self.rest = None;
        }
        if self.done()
            && let Some((up, pool)) = self.up.take()
            && self.reuse
            && up.buf.is_empty()
        {
            pool.put(up);
        }
    }

    /// Sends more of the rest of the request, as far as the socket takes it.
    fn poll_rest(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let (Some(rest), Some((up, _))) = (self.rest.as_mut(), self.up.as_mut()) else {
            return Ok(());
        };
        match rest.poll_send(&mut up.io, cx) {
            Ok(()) if !rest.sent => {}
            // All sent, or the upstream stopped reading it: its answer may still come whole.
            Ok(()) | Err(SendError::Write) => self.rest = None,
            Err(SendError::Body) => {
                return Err(std::io::Error::other(
                    "the request body broke off after the upstream's answer began",
                ));
            }
        }
        Ok(())
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        self.poll_rest(cx)?;
        loop {
            let Some((up, _)) = self.up.as_mut() else { return Poll::Ready(None) };
            let decoded = decode(&mut self.decoder, &mut up.buf)?;
            match decoded {
                Decoded::Data(d) => {
                    self.release_if_done();
                    return Poll::Ready(Some(Ok(d)));
                }
                Decoded::End => {
                    self.release_if_done();
                    return Poll::Ready(None);
                }
                Decoded::More => {}
            }
            if ready!(up.poll_fill(cx))? == 0 {
                if let Decoder::UntilClose = self.decoder {
                    self.decoder = Decoder::Closed;
                    self.up = None;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection inside the answer's body",
                ))));
            }
        }
    }
}

/// The next piece of an answer's body from what `buf` holds.
fn decode(decoder: &mut Decoder, buf: &mut BytesMut) -> std::io::Result<Decoded> {
    match decoder {
        Decoder::Length(0) | Decoder::Closed => Ok(Decoded::End),
        Decoder::Length(left) => {
            if buf.is_empty() {
                return Ok(Decoded::More);
            }
            let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
            *left -= n as u64;
            Ok(Decoded::Data(buf.split_to(n).freeze()))
        }
        Decoder::UntilClose if buf.is_empty() => Ok(Decoded::More),
        Decoder::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
        Decoder::Chunked(state) => {
            state.decode(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.0))
        }
    }
}

impl Body for PlainBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = self.poll_data(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            // A broken body: its connection is not reused, and the client's connection closes
            // without the answer's end (the only way to tell it the answer is not whole).
            tracing::warn!(error = %e, "the upstream's answer broke off; the client's connection is closed");
            self.up = None;
        }
        polled.map(|d| d.map(|d| d.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Closed => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
