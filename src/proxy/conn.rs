//! One client connection, HTTP/1.1 with keep-alive, served by the proxy's own loop (in place of
//! hyper's server): read a head (httparse), hand the request to the proxy, write the answer,
//! and again. Requests are answered in order, one at a time, so pipelined requests wait in the
//! read buffer. Between requests the connection holds no buffer: it waits for its socket to
//! become readable and only then takes one (hyper kept 8 KiB to read and 8 KiB to write for a
//! connection's whole life, about 10 KiB resident per idle connection).

use super::idle::Activity;
use super::inbody::{ClientBody, ReadSide, Slot};
use super::wire::{self, Framing, Head, Out, Reply};
use bytes::BytesMut;
use hyper::body::{Body, Bytes};
use hyper::{Method, Request, Response, Version};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The largest request head read, and the most of an answer gathered before it is written.
pub const MAX_BUF: usize = 64 * 1024;

/// What a read takes at a time (and the buffer a request head starts in).
const READ_SIZE: usize = 8 * 1024;

/// A connection's read side: readable, and able to say when data arrived without a buffer.
pub trait Reader: AsyncRead + Unpin + Send + Sync + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Reader for tokio::net::tcp::OwnedReadHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl Reader for tokio::net::unix::OwnedReadHalf {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// A connection's write side.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Reads more into `buf`: `Ok(0)` at the end of the stream. An empty `buf` without room (a
/// connection between requests) takes its memory only once the socket is readable, and gives
/// it back if the read then finds nothing after all (readiness is a hint).
pub fn fill(
    io: &mut dyn Reader,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == 0 {
        ready!(io.poll_read_ready(cx))?;
        *buf = spare::take();
    }
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    let read = tokio_util::io::poll_read_buf(Pin::new(io), cx, buf);
    if read.is_pending() && buf.is_empty() {
        spare::give(std::mem::take(buf));
    }
    read
}

/// A few empty read buffers kept per thread: a connection gives its buffer back whenever it
/// waits for its client, which on a busy connection is once a request, and 8 KiB from the
/// allocator each time cost about 4% of a proxied request's instructions (a large allocation
/// consolidates the allocator's small free lists first). At most `KEPT` per thread, 64 KiB.
mod spare {
    use super::READ_SIZE;
    use bytes::BytesMut;
    use std::cell::RefCell;

    const KEPT: usize = 8;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> BytesMut {
        SPARE.with_borrow_mut(Vec::pop).unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
    }

    /// Keeps `buf` (empty) if its whole memory is free again, it did not grow for a large
    /// head, and there is room.
    pub fn give(mut buf: BytesMut) {
        if buf.try_reclaim(READ_SIZE) && buf.capacity() <= 2 * READ_SIZE {
            SPARE.with_borrow_mut(|kept| {
                if kept.len() < KEPT {
                    kept.push(buf);
                }
            });
        }
    }
}

/// Serves `reader`/`writer` until the client closes, the connection has been idle for `idle`
/// (up to twice that; see `idle`), a request head is refused, or `shutdown`: then a request in
/// progress is answered (with `Connection: close`), an idle connection closes at once. A client
/// that takes none of an answer for `idle` is closed too (see `write_within`).
pub async fn serve<S, F, B>(
    reader: Box<dyn Reader>,
    writer: Writer,
    service: S,
    shutdown: &CancellationToken,
    idle: std::time::Duration,
) where
    S: FnMut(Request<ClientBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
{
    let activity = Activity::default();
    let stopping = shutdown.cancelled();
    let stopping = std::pin::pin!(stopping);
    let conn = Conn {
        side: Some((reader, BytesMut::new())),
        writer,
        back: None,
        activity: &activity,
        shutdown,
        stopping,
        stall: idle,
    };
    tokio::select! {
        biased;
        () = conn.run(service) => {}
        () = activity.idle(idle) => {}
    }
}

struct Conn<'a, 's> {
    /// The read side, while no request body holds it.
    side: Option<ReadSide>,
    writer: Writer,
    /// Where request bodies give the read side back; made with the first body.
    back: Option<Slot>,
    activity: &'a Activity,
    shutdown: &'a CancellationToken,
    stopping: Pin<&'s mut WaitForCancellationFuture<'a>>,
    /// How long a write of an answer may wait for the client to take any of it.
    stall: std::time::Duration,
}

/// What the wait for a request head ended with (a value passed back once per request, never
/// stored: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Head),
    /// The client closed, the socket failed, or the proxy stops.
    Closed,
    Refused(wire::Refused),
}

impl Conn<'_, '_> {
    async fn run<S, F, B>(mut self, mut service: S)
    where
        S: FnMut(Request<ClientBody>) -> F,
        F: Future<Output = Response<B>>,
        B: Body<Data = Bytes> + Unpin,
    {
        loop {
            let head = match self.next_head().await {
                Next::Request(head) => head,
                Next::Closed => return,
                Next::Refused(r) => {
                    let _ = self.writer.write_all(&wire::refusal(&r)).await;
                    return;
                }
            };
            self.activity.begin();
            // Boxed: a request's state (its answer, the answer's body) takes memory only while
            // the request is in progress, not in every idle connection's task.
            let keep = Box::pin(self.exchange(head, &mut service)).await;
            self.activity.end();
            if !keep {
                return;
            }
        }
    }

    /// Reads until a whole request head is in (a pipelined one may be buffered already).
    async fn next_head(&mut self) -> Next {
        let Some((io, buf)) = self.side.as_mut() else { return Next::Closed };
        loop {
            if !buf.is_empty() {
                match wire::parse_head(buf, MAX_BUF) {
                    Ok(Some(head)) => return Next::Request(head),
                    Ok(None) => {}
                    Err(r) => return Next::Refused(r),
                }
            }
            let read = std::future::poll_fn(|cx| fill(&mut **io, buf, cx));
            tokio::select! {
                biased;
                n = read => match n {
                    Ok(1..) => {}
                    Ok(0) | Err(_) => return Next::Closed,
                },
                () = self.stopping.as_mut() => return Next::Closed,
            }
        }
    }

    /// One request and its answer; false when the connection is to close after it.
    async fn exchange<S, F, B>(&mut self, head: Head, service: &mut S) -> bool
    where
        S: FnMut(Request<ClientBody>) -> F,
        F: Future<Output = Response<B>>,
        B: Body<Data = Bytes> + Unpin,
    {
        let Head { request, framing, keep_alive, expect_continue } = head;
        if expect_continue && self.writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
        {
            return false;
        }
        let head_request = request.method() == Method::HEAD;
        let http10 = request.version() == Version::HTTP_10;
        let body = self.body(framing);
        let answer = service(request.map(|()| body));
        let Some(resp) = self.answer_unless_gone(answer).await else { return false };
        self.take_back();
        let close = !keep_alive || self.side.is_none() || self.shutdown.is_cancelled();
        let (parts, body) = resp.into_parts();
        let hint = body.size_hint();
        let reply = Reply { head_request, http10, close, length: hint.exact() };
        let mut out = Vec::with_capacity(512);
        let how = wire::response_head(&mut out, &parts, &reply);
        drop(parts);
        let sent = send_body(&mut self.writer, out, body, how, self.stall).await;
        sent && !close && how != Out::UntilClose
    }

    /// The request's body: it takes the read side along while the body has one.
    fn body(&mut self, framing: Framing) -> ClientBody {
        if framing == Framing::Empty {
            return ClientBody::empty();
        }
        let side = self.side.take().expect("a read side between requests");
        let back = self.back.get_or_insert_with(Slot::default).clone();
        ClientBody::new(side, framing, back)
    }

    /// The read side, if a request body gave it back.
    fn take_back(&mut self) {
        if self.side.is_none()
            && let Some(back) = &self.back
        {
            self.side = back.lock().expect("read side slot").take();
        }
    }

    /// The answer, or None if the client closed the connection first (the request is dropped,
    /// as hyper's server dropped it: nothing waits on its behalf, a rotation least of all).
    /// Bytes a client sends meanwhile (a pipelined request) are read into the buffer, up to
    /// `MAX_BUF`.
    async fn answer_unless_gone<R>(&mut self, answer: impl Future<Output = R>) -> Option<R> {
        let mut answer = std::pin::pin!(answer);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            self.take_back();
            match self.side.as_mut() {
                Some((io, buf)) if buf.len() < MAX_BUF => match fill(&mut **io, buf, cx) {
                    Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(None),
                    // Read more on the next wake-up (the readiness is still set).
                    Poll::Ready(Ok(_)) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Pending => Poll::Pending,
                },
                _ => Poll::Pending,
            }
        })
        .await
    }
}

/// Writes the head in `out` and the body framed as `how`, gathering what the body has ready
/// into one write; false if the body failed, or the client went away or took none of it for
/// `stall`.
async fn send_body<B>(
    writer: &mut Writer,
    mut out: Vec<u8>,
    mut body: B,
    how: Out,
    stall: std::time::Duration,
) -> bool
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut left = match how {
        Out::None => return write_within(writer, &out, stall).await,
        Out::Length(n) => Some(n),
        Out::Chunked | Out::UntilClose => None,
    };
    loop {
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            // Nothing more for now: what is gathered goes out while the body waits.
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            other => other.map(Some),
        });
        match next.await {
            None => {
                if !write_within(writer, &out, stall).await {
                    return false;
                }
                out.clear();
            }
            Some(None) => break,
            Some(Some(Err(_))) => {
                // A chunked answer stays without its last chunk: the client sees it cut off.
                write_within(writer, &out, stall).await;
                return false;
            }
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                if !frame_out(&mut out, &data, how, &mut left) {
                    write_within(writer, &out, stall).await;
                    return false;
                }
                if out.len() >= MAX_BUF {
                    if !write_within(writer, &out, stall).await {
                        return false;
                    }
                    out.clear();
                }
            }
        }
    }
    if how == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    // A body shorter than its Content-Length: the connection cannot carry another answer.
    write_within(writer, &out, stall).await && left.is_none_or(|n| n == 0)
}

/// Writes all of `buf`; false if a write fails, or the client takes none of it for `stall`: a
/// client that stopped reading would otherwise hold its answer, and the upstream connection
/// behind it, for as long as it stays connected (the idle check spares a request in
/// progress, which may be a long download). No timer for a write the socket takes at once.
async fn write_within(writer: &mut Writer, mut buf: &[u8], stall: std::time::Duration) -> bool {
    use futures_util::FutureExt;
    while !buf.is_empty() {
        let mut write = std::pin::pin!(writer.write(buf));
        let written = match write.as_mut().now_or_never() {
            Some(w) => w,
            None => match tokio::time::timeout(stall, write).await {
                Ok(w) => w,
                Err(_) => return false,
            },
        };
        match written {
            Ok(n @ 1..) => buf = &buf[n..],
            Ok(0) | Err(_) => return false,
        }
    }
    true
}

/// Adds `data` to `out` framed as `how`; false if it goes past the answer's Content-Length
/// (what fits is added).
fn frame_out(out: &mut Vec<u8>, data: &[u8], how: Out, left: &mut Option<u64>) -> bool {
    if data.is_empty() {
        return true;
    }
    if let Some(n) = left {
        let fits = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
        out.extend_from_slice(&data[..fits]);
        *n -= fits as u64;
        return fits == data.len();
    }
    if how == Out::Chunked {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either, Full, StreamBody};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    type TestBody =
        Either<Full<Bytes>, http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>;

    /// Sets its flag when dropped: the request's future was dropped.
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }

    fn full(status: u16, text: String) -> Response<TestBody> {
        let mut resp = Response::new(Either::Left(Full::new(Bytes::from(text))));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        resp
    }

    /// An answer that streams `a`, then `b` after `gap`, with no length.
    fn streamed(gap: Duration) -> Response<TestBody> {
        let frames = futures_util::stream::unfold(0, move |i| async move {
            let data = match i {
                0 => "a",
                1 => {
                    tokio::time::sleep(gap).await;
                    "b"
                }
                _ => return None,
            };
            Some((Ok(hyper::body::Frame::data(Bytes::from(data))), i + 1))
        });
        Response::new(Either::Right(StreamBody::new(frames).boxed_unsync()))
    }

    /// An answer of 1 GiB in 64 KiB pieces (far more than socket buffers take), which sets
    /// `dropped` when dropped.
    fn endless(dropped: Arc<AtomicBool>) -> Response<TestBody> {
        use futures_util::StreamExt;
        let guard = Dropped(dropped);
        let piece = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = futures_util::stream::iter(0..16_384).map(move |_| {
            let _alive = &guard;
            Ok(hyper::body::Frame::data(piece.clone()))
        });
        Response::new(Either::Right(StreamBody::new(frames).boxed_unsync()))
    }

    /// The test service, by path: `/echo` answers the method, path and whole body; `/stream`
    /// streams two pieces `gap` apart; `/204`; `/hang` never answers (and sets `dropped` when
    /// dropped); `/unread` answers without reading the body; `/endless` streams 1 GiB (and
    /// sets `dropped` when dropped).
    async fn service(
        req: Request<ClientBody>,
        gap: Duration,
        dropped: Arc<AtomicBool>,
    ) -> Response<TestBody> {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/stream" => streamed(gap),
            "/204" => full(204, String::new()),
            "/hang" => {
                let _guard = Dropped(dropped);
                std::future::pending().await
            }
            "/unread" => full(200, "unread".into()),
            "/endless" => endless(dropped),
            _ => {
                let method = req.method().clone();
                match req.into_body().collect().await {
                    Ok(body) => {
                        let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                        full(200, format!("{method} {path} {body}"))
                    }
                    Err(e) => full(400, e.to_string()),
                }
            }
        }
    }

    struct Served {
        client: TcpStream,
        task: tokio::task::JoinHandle<()>,
        dropped: Arc<AtomicBool>,
    }

    /// Serves one loopback connection with `service` and the idle timeout `idle`.
    async fn served(idle: Duration) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        let task = tokio::spawn(async move {
            let (r, w) = socket.into_split();
            // The streamed answer's gap outlasts a short idle timeout.
            let gap = (idle * 4).min(Duration::from_secs(1));
            let svc = move |req| Box::pin(service(req, gap, d.clone()));
            serve(Box::new(r), Box::new(w), svc, &CancellationToken::new(), idle).await;
        });
        Served { client, task, dropped }
    }

    /// Reads until what came contains `needle` `times` times (30 s at most).
    async fn read_until(c: &mut TcpStream, needle: &str, times: usize) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&got).matches(needle).count() < times {
            let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf)).await;
            let n = n.expect("an answer within 30 s").unwrap();
            assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// Reads until the server closes the connection (30 s at most).
    async fn read_to_close(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got)).await;
        read.expect("closed within 30 s").unwrap();
        String::from_utf8(got).unwrap()
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
        let mut s = served(LONG).await;
        s.client.write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let first = read_until(&mut s.client, "GET /1 ", 1).await;
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("\r\ncontent-length: 7\r\n"), "{first}");
        let pipelined = b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\nPOST /3 HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /4 HTTP/1.1\r\n\r\n";
        s.client.write_all(pipelined).await.unwrap();
        let all = read_until(&mut s.client, "HTTP/1.1 200", 3).await;
        let (two, three, four) = (all.find("GET /2 "), all.find("POST /3 hi"), all.find("GET /4 "));
        assert!(two < three && three < four && two.is_some(), "{all}");
        // An HTTP/1.0 client keeps its connection only when it asks to.
        s.client.write_all(b"GET /5 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").await.unwrap();
        let kept = read_until(&mut s.client, "GET /5 ", 1).await;
        assert!(kept.contains("\r\nconnection: keep-alive\r\n"), "{kept}");
        s.client.write_all(b"GET /6 HTTP/1.0\r\n\r\n").await.unwrap();
        let last = read_to_close(&mut s.client).await;
        assert!(last.contains("\r\nconnection: close\r\n") && last.ends_with("GET /6 "), "{last}");
    }

    #[tokio::test]
    async fn request_bodies_chunked_or_with_a_length_are_read_and_the_connection_goes_on() {
        let mut s = served(LONG).await;
        let chunked = b"POST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\ntrailer: 1\r\n\r\n";
        s.client.write_all(chunked).await.unwrap();
        read_until(&mut s.client, "POST /c hello world", 1).await;
        s.client.write_all(b"PUT /l HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc").await.unwrap();
        read_until(&mut s.client, "PUT /l abc", 1).await;
        s.client
            .write_all(b"POST /bad HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap();
        let bad = read_to_close(&mut s.client).await;
        assert!(bad.starts_with("HTTP/1.1 400 ") && bad.contains("connection: close"), "{bad}");
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_before_the_body_is_sent() {
        let mut s = served(LONG).await;
        s.client
            .write_all(b"POST /e HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
            .await
            .unwrap();
        let interim = read_until(&mut s.client, "\r\n\r\n", 1).await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        s.client.write_all(b"ok").await.unwrap();
        read_until(&mut s.client, "POST /e ok", 1).await;
    }

    #[tokio::test]
    async fn head_and_204_answers_have_no_body_and_an_unknown_length_is_chunked() {
        let mut s = served(LONG).await;
        s.client
            .write_all(
                b"HEAD /h HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /stream HTTP/1.1\r\n\r\n",
            )
            .await
            .unwrap();
        let all = read_until(&mut s.client, "0\r\n\r\n", 1).await;
        let answers: Vec<&str> = all.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 3, "{all}");
        // A HEAD's answer: the head alone (a Content-Length only where the answer had one).
        assert!(
            answers[0].starts_with("200 OK\r\n") && answers[0].ends_with("GMT\r\n\r\n"),
            "{all}"
        );
        assert!(
            answers[1].starts_with("204 No Content\r\n") && answers[1].ends_with("\r\n\r\n"),
            "{all}"
        );
        assert!(!answers[1].contains("content-length"), "{all}");
        assert!(answers[2].contains("transfer-encoding: chunked\r\n"), "{all}");
        assert!(answers[2].ends_with("\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n"), "{all}");
    }

    #[tokio::test]
    async fn an_oversized_head_gets_431_and_garbage_400_and_the_connection_closes() {
        let mut s = served(LONG).await;
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(MAX_BUF));
        // The server may close before the whole head is written.
        let _ = s.client.write_all(big.as_bytes()).await;
        let answer = read_to_close(&mut s.client).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("too large"), "{answer}");
        let mut s = served(LONG).await;
        s.client.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
        let answer = read_to_close(&mut s.client).await;
        assert!(answer.starts_with("HTTP/1.1 400 ") && answer.contains("TOKEND-PROXY"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_the_proxy_did_not_read_closes_the_connection_after_the_answer() {
        let mut s = served(LONG).await;
        s.client
            .write_all(b"POST /unread HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let answer = read_to_close(&mut s.client).await;
        assert!(answer.contains("connection: close\r\n") && answer.ends_with("unread"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_request_drops_the_request() {
        let mut s = served(LONG).await;
        s.client.write_all(b"GET /hang HTTP/1.1\r\n\r\n").await.unwrap();
        drop(s.client);
        tokio::time::timeout(Duration::from_secs(30), s.task).await.expect("kept").unwrap();
        assert!(s.dropped.load(SeqCst), "the request's future was not dropped");
    }

    /// A request head that dribbles in (a slowloris client) is cut off after the idle timeout.
    #[tokio::test]
    async fn a_request_head_that_dribbles_in_is_closed() {
        let idle = Duration::from_millis(200);
        let mut s = served(idle).await;
        s.client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let dribble = async {
            // Bounded: 60 lines over 12 s, 30 times the longest the timeout may take.
            for _ in 0..60 {
                tokio::time::sleep(idle / 4).await;
                if s.client.write_all(b"X-A: 1\r\n").await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            r = s.task => r.unwrap(),
            () = dribble => panic!("a head dribbling in for 12 s was kept"),
        }
    }

    /// An answer streaming for longer than the idle timeout is not cut; once it is done, the
    /// idle connection is closed, as is one that never sends anything.
    #[tokio::test]
    async fn a_long_answer_is_not_cut_and_idle_connections_then_close() {
        let idle = Duration::from_millis(200);
        let mut s = served(idle).await;
        s.client.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let text = read_until(&mut s.client, "0\r\n\r\n", 1).await;
        assert!(text.contains("\r\na\r\n") && text.contains("\r\nb\r\n"), "{text}");
        tokio::time::timeout(Duration::from_secs(30), s.task).await.expect("idle kept").unwrap();
        assert_eq!(read_to_close(&mut s.client).await, "", "the server closed it");
        let silent = served(idle).await;
        tokio::time::timeout(Duration::from_secs(30), silent.task)
            .await
            .expect("silent kept")
            .unwrap();
    }

    /// A client that stops reading its answer is closed once it has taken none of it for the
    /// idle timeout, and the answer (with what feeds it, an upstream connection) is dropped.
    #[tokio::test]
    async fn a_client_that_stops_reading_its_answer_is_closed() {
        let idle = Duration::from_millis(200);
        let mut s = served(idle).await;
        s.client.write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        // Reads nothing; the connection must end long before the 1 GiB could be taken.
        tokio::time::timeout(Duration::from_secs(30), s.task)
            .await
            .expect("a client reading nothing kept its answer for 30 s")
            .unwrap();
        assert!(s.dropped.load(SeqCst), "the answer's body was not dropped");
    }
}
