//! The proxy's own HTTP/1.1 server on the wire, driven byte by byte over raw sockets: request
//! framing (RFC 9112: Content-Length lists, Transfer-Encoding beside Content-Length, bodies
//! longer or shorter than declared, bad chunks, obs-fold, bare LF), what an upstream of the
//! test's own then receives, answers without a body and answers cut short by the upstream,
//! HTTP/1.0 clients, vanishing clients, and no descriptor left behind.

use crate::harness::{Daemon, TokenSpec, World, wait_until};
use crate::proxy::{assert_no_token_in, write_proxy_config};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const T: Duration = Duration::from_secs(30);

/// An upstream that records each whole request it receives (head and body, as sent) and
/// answers by path: `/short` and `/short-chunked` end their answer early and close, `/304`
/// and HEAD answer a head with a length and no body, `/big` sends 8 MiB, others `ok`. For the
/// proxy's client side: `/chunked-trailers` answers in chunks with trailer fields, `/until-close` with
/// a body ended by the close, `/interim` with a 103 and a 100 before its answer, `/says-close`
/// with `Connection: close` while it keeps the connection (and answers `500 reused` to any
/// request on it after), `/lying` with a Content-Length shorter than what it sends (a second
/// answer), `/close-idle` closes the connection after its answer, and `/drop-next` closes the
/// connection when the next request on it arrives, without an answer.
struct Upstream {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    /// Connections accepted, and closed.
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (log, o, c) = (seen.clone(), opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                o.fetch_add(1, SeqCst);
                let (log, c) = (log.clone(), c.clone());
                tokio::spawn(async move {
                    upstream_conn(s, log).await;
                    c.fetch_add(1, SeqCst);
                });
            }
        });
        Self { url, seen, opened, closed }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// What an upstream connection does after an answer.
#[derive(PartialEq)]
enum After {
    Next,
    Close,
    /// Answers `500 reused` to every later request.
    Refuse,
    /// Closes when the next request arrives.
    DropNext,
}

/// Serves one upstream connection until it closes or a request ends it.
async fn upstream_conn(mut s: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut after = After::Next;
    // Bounded: each turn takes a request or ends the connection.
    for _ in 0..1000 {
        let Some(len) = whole_request(&mut s, &mut buf).await else { return };
        let req: Vec<u8> = buf.drain(..len).collect();
        // The access token is the daemon's secret: kept out of the test's messages.
        let req: String = String::from_utf8_lossy(&req)
            .split_inclusive("\r\n")
            .map(|l| {
                if l.to_ascii_lowercase().starts_with("authorization:") {
                    "authorization: [redacted]\r\n"
                } else {
                    l
                }
            })
            .collect();
        let path = req.split(' ').nth(1).unwrap_or("").to_string();
        let head_request = req.starts_with("HEAD ");
        seen.lock().unwrap().push(req);
        if after == After::DropNext {
            return;
        }
        if after == After::Refuse {
            let _ = s
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 6\r\n\r\nreused")
                .await;
            continue;
        }
        let (answer, then) = client_side_answer(&path);
        if let Some(answer) = answer {
            if s.write_all(answer.as_bytes()).await.is_err() || then == After::Close {
                return;
            }
            after = then;
            continue;
        }
        let (answer, close): (Vec<u8>, bool) = match path.as_str() {
            "/short" => {
                (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec(), true)
            }
            "/short-chunked" => (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
                true,
            ),
            "/te-cl" => {
                let a =
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n";
                (format!("{a}5\r\nhello\r\n0\r\n\r\n").into_bytes(), false)
            }
            "/cl-list" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello".to_vec(), false),
            "/304" => (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n".to_vec(), false),
            "/big" => {
                let mut a = b"HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\n".to_vec();
                a.resize(a.len() + (8 << 20), b'x');
                (a, false)
            }
            _ if head_request => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(), false),
            _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(), false),
        };
        if s.write_all(&answer).await.is_err() || close {
            return;
        }
    }
}

/// The answers for the proxy's client side (see `Upstream`), and what follows them.
fn client_side_answer(path: &str) -> (Option<&'static str>, After) {
    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    match path {
        "/chunked-trailers" => (
            Some(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-sum: 1\r\nx-more: 2\r\n\r\n",
            ),
            After::Next,
        ),
        "/until-close" => (Some("HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nuntil the close"), After::Close),
        "/interim" => (
            Some(
                "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nfinal",
            ),
            After::Next,
        ),
        "/says-close" => (
            Some("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
            After::Refuse,
        ),
        "/lying" => (
            Some(
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled",
            ),
            After::Next,
        ),
        "/close-idle" => (Some(ok), After::Close),
        "/drop-next" => (Some(ok), After::DropNext),
        _ => (None, After::Next),
    }
}

/// Reads until `buf` starts with a whole request (Content-Length or chunked); its length.
pub(crate) async fn whole_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(len) = request_len(buf) {
            return Some(len);
        }
        let n = tokio::time::timeout(T, s.read_buf(buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
    }
}

fn request_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if head.contains("\r\ntransfer-encoding: chunked\r\n") {
        let body = &buf[end..];
        let last = body.windows(5).position(|w| w == b"0\r\n\r\n")?;
        return Some(end + last + 5);
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.split(',').next())
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    (buf.len() >= end + len).then_some(end + len)
}

/// A daemon whose loopback TCP proxy forwards to `upstream`; its port.
pub(crate) async fn started(w: &World, upstream: &str) -> (Daemon, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let proxy = format!("listen = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"");
    write_proxy_config(w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon();
    d.wait_ready().await;
    (d, port)
}

pub(crate) async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// Reads one answer: its head (lower-cased) and body, framed by Content-Length or chunked;
/// a HEAD's or 304's answer has no body. Panics if the connection closes first.
pub(crate) async fn answer(s: &mut TcpStream, no_body: bool) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_ascii_lowercase();
            let body = &buf[end + 4..];
            if head.starts_with("http/1.1 100 ") {
                buf.drain(..end + 4);
                continue;
            }
            if no_body {
                assert!(body.is_empty(), "bytes after a bodiless answer: {head}");
                return (head, Vec::new());
            }
            if head.contains("transfer-encoding: chunked") {
                if body.ends_with(b"0\r\n\r\n") {
                    return (head, body.to_vec());
                }
            } else {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if body.len() >= len {
                    assert_eq!(body.len(), len, "more than the length: {head}");
                    return (head, body.to_vec());
                }
            }
        }
        let n = tokio::time::timeout(T, s.read_buf(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed mid-answer: {}", String::from_utf8_lossy(&buf));
    }
}

/// Everything until the proxy closes the connection (30 s at most).
pub(crate) async fn to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut got)).await;
    read.expect("the proxy closed the connection within 30 s").unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// The requests the upstream received for `path`.
fn received(up: &Upstream, path: &str) -> Vec<String> {
    let target = format!(" {path} ");
    up.seen().into_iter().filter(|r| r.contains(&target)).collect()
}

/// How many `name:` fields a request head has.
fn fields(req: &str, name: &str) -> usize {
    let head = &req[..req.find("\r\n\r\n").unwrap()];
    head.to_ascii_lowercase().lines().filter(|l| l.starts_with(&format!("{name}:"))).count()
}

/// Content-Length lists and duplicates, Transfer-Encoding beside Content-Length, and a request
/// pipelined behind a body: each body reaches the upstream framed one way only, with exactly
/// the bytes the client framed, and the pipelined request is a request of its own.
#[tokio::test]
async fn what_goes_upstream_is_framed_one_way() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    s.write_all(b"POST /list HTTP/1.1\r\nhost: x\r\ncontent-length: 3, 3\r\n\r\nabc")
        .await
        .unwrap();
    assert!(answer(&mut s, false).await.0.starts_with("http/1.1 200 "));
    let dup = b"POST /dup HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc";
    s.write_all(dup).await.unwrap();
    assert!(answer(&mut s, false).await.0.starts_with("http/1.1 200 "));
    let piped = b"POST /piped HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcGET /after HTTP/1.1\r\nhost: x\r\n\r\n";
    s.write_all(piped).await.unwrap();
    answer(&mut s, false).await;
    answer(&mut s, false).await;
    for path in ["/list", "/dup", "/piped"] {
        let req = &received(&up, path);
        assert_eq!(req.len(), 1, "{path}: {req:?}");
        assert!(req[0].ends_with("\r\n\r\nabc"), "{path}: {req:?}");
        assert_eq!(fields(&req[0], "content-length"), 1, "{path}: {req:?}");
        assert!(req[0].to_ascii_lowercase().contains("\r\ncontent-length: 3\r\n"), "{req:?}");
        assert_eq!(fields(&req[0], "transfer-encoding"), 0, "{path}: {req:?}");
    }
    assert_eq!(received(&up, "/after").len(), 1);

    let both = b"POST /both HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    s.write_all(both).await.unwrap();
    let (head, _) = answer(&mut s, false).await;
    assert!(head.contains("connection: close"), "an ambiguous request's connection: {head}");
    assert_eq!(to_close(&mut s).await, "");
    let req = &received(&up, "/both");
    assert_eq!(req.len(), 1, "{req:?}");
    // Framed one way: the decoded body with its length, or the chunks without one.
    let framings = fields(&req[0], "content-length") + fields(&req[0], "transfer-encoding");
    assert_eq!(framings, 1, "{req:?}");
    let body = &req[0][req[0].find("\r\n\r\n").unwrap() + 4..];
    assert!(body == "hello" || body == "5\r\nhello\r\n0\r\n\r\n", "{req:?}");
}

/// Heads a proxy must not guess at are refused with 400 and the connection closed, and the
/// upstream sees none of them: a body longer than its Content-Length (the rest is not a
/// request), bad chunk sizes, obs-fold, whitespace before a colon, conflicting lengths.
#[tokio::test]
async fn ambiguous_or_malformed_requests_are_refused_and_never_reach_the_upstream() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (d, port) = started(&w, &up.url).await;
    let bad: [&[u8]; 9] = [
        b"POST /long HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcdef\r\n\r\n",
        b"POST /size HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
        b"POST /size HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        b"POST /size HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        b"POST /over HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        b"GET /fold HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n  folded\r\n\r\n",
        b"GET /colon HTTP/1.1\r\nhost: x\r\ncontent-length : 3\r\n\r\nabc",
        b"POST /two HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST /te HTTP/1.1\r\nhost: x\r\ntransfer-encoding: identity\r\n\r\nabc",
    ];
    for text in bad {
        let mut s = connect(port).await;
        s.write_all(text).await.unwrap();
        let all = to_close(&mut s).await;
        let shown = String::from_utf8_lossy(text);
        let last = all.rfind("HTTP/1.1 ").map(|i| &all[i..]).unwrap_or_default();
        assert!(
            last.starts_with("HTTP/1.1 400 ") || last.starts_with("HTTP/1.1 501 "),
            "{shown}: {all}"
        );
        assert!(last.contains("connection: close"), "{shown}: {all}");
    }
    for path in ["/size", "/over", "/fold", "/colon", "/two", "/te"] {
        assert_eq!(received(&up, path), Vec::<String>::new(), "{path}");
    }
    // The long body's first 3 bytes were a request; the rest is refused, not forwarded.
    assert_eq!(received(&up, "/long").len(), 1);
    assert_eq!(up.seen().len(), 1, "{:?}", up.seen());
    assert_no_token_in(&w, &d.output());
}

/// A body shorter than declared, its client gone: the upstream never receives a whole
/// request (it would act on a body the client did not send).
#[tokio::test]
async fn a_body_cut_short_never_reaches_the_upstream_whole() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (d, port) = started(&w, &up.url).await;
    let cut: [&[u8]; 2] = [
        b"POST /cut HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
        b"POST /cut HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    ];
    for text in cut {
        let mut s = connect(port).await;
        s.write_all(text).await.unwrap();
        s.shutdown().await.unwrap();
        to_close(&mut s).await;
    }
    // Then a whole request on a new connection, which the upstream sees after the others.
    let mut s = connect(port).await;
    s.write_all(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    answer(&mut s, false).await;
    assert_eq!(received(&up, "/cut"), Vec::<String>::new());
    assert_no_token_in(&w, &d.output());
}

/// HEAD and 304 answers carry no body and the connection goes on in step; HTTP/1.0 gets its
/// answer with a length and the connection closed (no keep-alive unless asked).
#[tokio::test]
async fn bodiless_answers_and_http_1_0_clients() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    s.write_all(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /304 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = answer(&mut s, true).await;
    assert!(head.starts_with("http/1.1 200 ") && head.contains("content-length: 5"), "{head}");
    let (head, _) = answer(&mut s, true).await;
    assert!(head.starts_with("http/1.1 304 "), "{head}");
    s.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert_eq!(answer(&mut s, false).await.1, b"ok");

    let mut s = connect(port).await;
    s.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let all = to_close(&mut s).await.to_ascii_lowercase();
    assert!(all.contains("content-length: 2\r\n") && all.ends_with("\r\n\r\nok"), "{all}");
}

/// An upstream answer that ends before its length or last chunk: the client sees the
/// connection close, never a keep-alive connection left waiting for bytes that will not come.
#[tokio::test]
async fn an_answer_cut_short_by_the_upstream_closes_the_client_connection() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    for path in ["/short", "/short-chunked"] {
        let mut s = connect(port).await;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let all = to_close(&mut s).await;
        assert!(all.starts_with("HTTP/1.1 200 "), "{path}: {all}");
        assert!(!all.ends_with("0\r\n\r\n"), "{path}: a cut answer looks whole: {all}");
    }
}

/// Connections opened and dropped in every state (idle, mid-head, mid-body, mid-answer of a
/// large body the client stopped reading) leave no descriptor or task behind.
#[tokio::test]
async fn connections_dropped_in_any_state_leave_no_descriptor_behind() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    s.write_all(b"GET /warm HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    answer(&mut s, false).await;
    drop(s);
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(0, Iterator::count);
    // The upstream connection the warm-up opened may stay pooled: counted in the baseline.
    let base = fds();
    let states: [&[u8]; 4] = [
        b"",
        b"GET /mid HTTP/1.1\r\nhost",
        b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nab",
        b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n",
    ];
    for round in 0..50 {
        let mut open = Vec::new();
        for text in states {
            let mut s = connect(port).await;
            s.write_all(text).await.unwrap();
            open.push(s);
        }
        if round == 0 {
            wait_until("the big answers started", T, || !received(&up, "/big").is_empty()).await;
        }
        drop(open);
    }
    // Upstream connections in use when their client left are not reused: allow a few pooled.
    wait_until("descriptors back to their count before", T, || fds() <= base + 4).await;
}

/// An upstream answer framed by both chunks and a Content-Length reaches the client as its
/// chunks say (RFC 9112 section 6.3: Transfer-Encoding overrides the length, and an
/// intermediary MUST remove it), and a length sent as a list goes on as one value.
#[tokio::test]
async fn an_upstream_answer_is_framed_one_way_to_the_client() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    for path in ["/te-cl", "/cl-list", "/next"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let (head, body) = answer(&mut s, false).await;
        let framings = head.matches("\r\ncontent-length:").count()
            + head.matches("\r\ntransfer-encoding:").count();
        assert_eq!(framings, 1, "{path}: {head}");
        let body = String::from_utf8_lossy(&body).into_owned();
        let want = if path == "/next" { "ok" } else { "hello" };
        assert!(
            body == want || body == format!("5\r\n{want}\r\n0\r\n\r\n"),
            "{path}: {head}{body}"
        );
    }
}

/// A chunked body's trailer fields (dropped by the proxy) are bounded as hyper's server bounded
/// them (16 KiB): past that the request fails and never reaches the upstream whole, and one
/// within the bound goes through.
#[tokio::test]
async fn trailer_fields_are_bounded() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let head = "POST /trailers HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    let line = format!("x-t: {}\r\n", "a".repeat(100));
    let mut s = connect(port).await;
    let small = format!("{head}5\r\nhello\r\n0\r\n{}\r\n", line.repeat(10));
    s.write_all(small.as_bytes()).await.unwrap();
    assert_eq!(answer(&mut s, false).await.1, b"ok");
    let mut s = connect(port).await;
    let big = format!("{head}5\r\nhello\r\n0\r\n{}\r\n", line.repeat(1000));
    // The proxy may close before all of it is written.
    let _ = s.write_all(big.as_bytes()).await;
    let all = to_close(&mut s).await;
    assert!(!all.starts_with("HTTP/1.1 200 "), "{all}");
    assert_eq!(received(&up, "/trailers").len(), 1, "the 100 KiB of trailers were taken");
}

/// `Expect: 100-continue` gets its interim answer and then the body goes upstream; a head
/// with bare LF line ends (which RFC 9112 section 2.2 lets a recipient take) goes upstream
/// with CRLF ones, as a request of its own.
#[tokio::test]
async fn expect_continue_and_bare_lf_heads() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    let expect =
        b"POST /expect HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n";
    s.write_all(expect).await.unwrap();
    let mut interim = vec![0; 25];
    tokio::time::timeout(T, s.read_exact(&mut interim)).await.expect("100 Continue").unwrap();
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"abc").await.unwrap();
    assert_eq!(answer(&mut s, false).await.1, b"ok");
    assert!(received(&up, "/expect")[0].ends_with("\r\n\r\nabc"));
    s.write_all(b"GET /lf HTTP/1.1\nhost: x\n\n").await.unwrap();
    assert_eq!(answer(&mut s, false).await.1, b"ok");
    let lf = &received(&up, "/lf");
    assert_eq!(lf.len(), 1, "{lf:?}");
    assert!(lf[0].starts_with("GET /lf HTTP/1.1\r\n"), "{lf:?}");
}

/// One request on `s` (a POST carries a small body); its answer's head and body, a chunked
/// body decoded.
async fn call(s: &mut TcpStream, method: &str, path: &str) -> (String, String) {
    let body = if method == "POST" { "content-length: 4\r\n\r\nbody" } else { "\r\n" };
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{body}");
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = answer(s, false).await;
    let body = if head.contains("transfer-encoding: chunked") { dechunked(&body) } else { body };
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// A chunked body's data (no extensions, no trailers: the proxy writes none).
pub(crate) fn dechunked(mut body: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    // Bounded: each turn takes a chunk or ends.
    for _ in 0..body.len() {
        let end = body.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..end]).unwrap(), 16).unwrap();
        if size == 0 {
            break;
        }
        data.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
    data
}

/// The proxy's HTTP/1.1 client reads an upstream's answer however it is framed (chunks with
/// extensions and trailer fields, a body ended by the close, interim answers before the final
/// one) and reuses the connection only after an answer read to its end that did not say close
/// and did not run past its length (bytes after it are never taken as the next answer).
#[tokio::test]
async fn upstream_answers_are_read_whatever_their_framing_and_reused_only_when_clean() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    let (head, body) = call(&mut s, "GET", "/chunked-trailers").await;
    assert!(head.starts_with("http/1.1 200 ") && !head.contains("x-sum"), "{head}");
    assert_eq!(body, "hello world");
    assert_eq!(call(&mut s, "GET", "/next").await.1, "ok");
    assert_eq!(up.opened.load(SeqCst), 1, "the connection was not reused after the trailers");

    let (head, body) = call(&mut s, "GET", "/until-close").await;
    assert!(head.starts_with("http/1.1 200 ") && head.contains("x-a: 1"), "{head}");
    assert_eq!(body, "until the close");
    let (head, body) = call(&mut s, "POST", "/interim").await;
    assert!(head.starts_with("http/1.1 201 ") && !head.contains("link"), "{head}");
    assert_eq!(body, "final");

    for path in ["/says-close", "/lying"] {
        assert_eq!(call(&mut s, "GET", path).await.1, "ok", "{path}");
        let (head, body) = call(&mut s, "GET", "/next").await;
        assert!(head.starts_with("http/1.1 200 ") && body == "ok", "after {path}: {head}{body}");
    }
    // The first connection, then a new one after each of the three.
    assert_eq!(up.opened.load(SeqCst), 4);
    assert_eq!(received(&up, "/next").len(), 3);
}

/// An idle pooled connection that the upstream closed is not used (a POST, which is never
/// sent twice, goes through on a new one); a reused connection closed as a request arrives
/// (the close crossed it) has an idempotent request sent again on a new one, and a POST
/// answered 502, sent once.
#[tokio::test]
async fn upstream_connections_closed_under_a_request_are_retried_only_when_safe() {
    let w = World::new().await;
    let up = Upstream::start().await;
    let (d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    assert_eq!(call(&mut s, "POST", "/close-idle").await.1, "ok");
    wait_until("the upstream closed its connection", T, || up.closed.load(SeqCst) == 1).await;
    let (head, body) = call(&mut s, "POST", "/after-close").await;
    assert!(head.starts_with("http/1.1 200 ") && body == "ok", "{head}{body}");
    assert_eq!(received(&up, "/after-close").len(), 1);

    assert_eq!(call(&mut s, "GET", "/drop-next").await.1, "ok");
    let (head, body) = call(&mut s, "GET", "/crossed").await;
    assert!(head.starts_with("http/1.1 200 ") && body == "ok", "{head}{body}");
    assert_eq!(received(&up, "/crossed").len(), 2, "sent on the closed connection and again");

    assert_eq!(call(&mut s, "POST", "/drop-next").await.1, "ok");
    let (head, _) = call(&mut s, "POST", "/crossed-post").await;
    assert!(head.starts_with("http/1.1 502 "), "{head}");
    assert_eq!(received(&up, "/crossed-post").len(), 1, "a POST was sent twice");
    assert_no_token_in(&w, &d.output());
}
