//! The proxy's HTTP/1.1 client against a hostile raw upstream (RFC 9112): interim answers
//! without end, heads with too many fields, answers that disagree with their connection on
//! where they end, an upstream that answers before it has read the request body, and
//! malformed heads and chunks.

use crate::harness::{World, wait_until};
use crate::proxy::assert_no_token_in;
use crate::proxy_wire::{T, answer, connect, dechunked, started, to_close, whole_request};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A raw upstream whose connections `serve` handles; counts the connections it accepted.
struct Raw {
    url: String,
    opened: Arc<AtomicUsize>,
}

impl Raw {
    async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let opened = Arc::new(AtomicUsize::new(0));
        let o = opened.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                o.fetch_add(1, SeqCst);
                tokio::spawn(serve(s));
            }
        });
        Self { url, opened }
    }

    /// Answers each request on a connection with `answers(method, path)`, as it is, and keeps
    /// the connection for the next one.
    async fn answering(answers: fn(&str, &str) -> Vec<u8>) -> Self {
        Self::start(move |mut s| async move {
            let mut buf = Vec::new();
            // Bounded: each turn takes a request or ends the connection.
            for _ in 0..1000 {
                let Some(len) = whole_request(&mut s, &mut buf).await else { return };
                let req = String::from_utf8_lossy(&buf[..len]).into_owned();
                buf.drain(..len);
                let mut words = req.split(' ');
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                if s.write_all(&answers(method, path)).await.is_err() {
                    return;
                }
            }
        })
        .await
    }
}

/// `method path` on `s`; the answer's head (lower-cased) and body (none for a HEAD or a
/// path with 304 in it).
async fn call(s: &mut TcpStream, method: &str, path: &str) -> (String, String) {
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = answer(s, method == "HEAD" || path.contains("304")).await;
    let body = if head.contains("transfer-encoding: chunked") { dechunked(&body) } else { body };
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn hostile_heads(_method: &str, path: &str) -> Vec<u8> {
    match path {
        // 1 MiB of interim answers, then a final one.
        "/interim-forever" => {
            let mut a = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(40_000);
            a.extend_from_slice(OK);
            a
        }
        "/many-fields" => {
            let mut a = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..101 {
                a.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
            }
            a.extend_from_slice(b"content-length: 2\r\n\r\nok");
            a
        }
        _ => OK.to_vec(),
    }
}

/// An answer's head is bounded with the interim (1xx) answers before it, as its bound says
/// (an upstream sending `100 Continue` without end held the request, and a core, forever),
/// and a 502 for a head with too many fields says so rather than "not HTTP/1.1".
#[tokio::test]
async fn answer_heads_are_bounded_with_their_interim_answers_and_a_502_names_why() {
    let w = World::new().await;
    let up = Raw::answering(hostile_heads).await;
    let (d, port) = started(&w, &up.url).await;
    for (path, why) in [("/interim-forever", "64 KiB"), ("/many-fields", "over 100 header fields")]
    {
        let mut s = connect(port).await;
        let (head, body) = call(&mut s, "GET", path).await;
        assert!(head.starts_with("http/1.1 502 ") && body.contains(why), "{path}: {head}{body}");
    }
    assert_no_token_in(&w, &d.output());
}

fn out_of_step(method: &str, path: &str) -> Vec<u8> {
    let a: &[u8] = match path {
        // RFC 9112 section 6.1: framing a recipient must take as faulty, then close.
        "/http-1.0-chunked" => {
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        }
        // Bodies where there is none (RFC 9110 sections 9.3.2 and 15.4.5).
        "/304-body" => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello",
        "/head-body" if method == "HEAD" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        _ => OK,
    };
    a.to_vec()
}

/// An answer whose framing the proxy cannot trust, or with bytes past its end, is passed on
/// and its connection never carries another request (the next one goes on a new connection
/// and gets its own answer, never the bytes left over).
#[tokio::test]
async fn answers_out_of_step_with_their_connection_end_it() {
    let w = World::new().await;
    let up = Raw::answering(out_of_step).await;
    let (_d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    assert_eq!(call(&mut s, "GET", "/warm").await.1, "ok");
    let cases = [
        ("GET", "/http-1.0-chunked", "hello"),
        ("GET", "/304-body", ""),
        ("HEAD", "/head-body", ""),
    ];
    for (i, (method, path, want)) in cases.into_iter().enumerate() {
        let (head, body) = call(&mut s, method, path).await;
        assert!(head.starts_with("http/1.1 ") && body == want, "{path}: {head}{body}");
        let (head, body) = call(&mut s, "GET", "/next").await;
        assert!(head.starts_with("http/1.1 200 ") && body == "ok", "after {path}: {head}{body}");
        assert_eq!(up.opened.load(SeqCst), i + 2, "the connection was reused after {path}");
    }
}

/// An upstream that sends its answer's head as soon as a request's head is in, then reads the
/// whole body (by its Content-Length) and ends the answer with the count it read.
async fn duplex(mut s: TcpStream) {
    let mut buf = Vec::new();
    let read = async {
        let end = loop {
            if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break e + 4;
            }
            if s.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.ok()?;
        let mut got = buf.len() - end;
        let mut piece = vec![0; 64 * 1024];
        while got < len {
            match s.read(&mut piece).await.ok()? {
                0 => return None,
                n => got += n,
            }
        }
        let text = format!("got {got}");
        let end = format!("{:x}\r\n{text}\r\n0\r\n\r\n", text.len());
        s.write_all(end.as_bytes()).await.ok()
    };
    // Bounded: the test's own timeout.
    let _ = tokio::time::timeout(T, read).await;
}

/// An upstream may answer before it has the whole request body and go on reading it (RFC 9112
/// section 9.5: a client stops sending only when the answer says the server will not read it):
/// a streamed body (over the replay limit) still goes upstream whole while the answer streams
/// back, where it once stopped at the answer's head and both sides waited for ever. The client
/// sends the last part of its body only once the answer's head is in: the proxy has the head
/// before the body, whatever the socket buffers hold.
#[tokio::test]
async fn a_body_goes_upstream_whole_after_an_early_answer() {
    let w = World::new().await;
    let up = Raw::start(duplex).await;
    let (d, port) = started(&w, &up.url).await;
    let mut s = connect(port).await;
    let (first, last) = (3 << 19, 1 << 19);
    let head =
        format!("POST /duplex HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", first + last);
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'b'; first]).await.unwrap();
    let mut got = Vec::new();
    let head_in = tokio::time::timeout(T, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(s.read_buf(&mut got).await.unwrap() > 0, "closed before the answer's head");
        }
    });
    head_in.await.expect("the answer's head within 30 s");
    s.write_all(&vec![b'b'; last]).await.unwrap();
    let want = format!("got {}\r\n0\r\n\r\n", first + last);
    let rest = tokio::time::timeout(T, async {
        while !got.ends_with(want.as_bytes()) {
            if s.read_buf(&mut got).await.unwrap() == 0 {
                break;
            }
        }
    });
    let timed_out = rest.await.is_err();
    let got = String::from_utf8_lossy(&got);
    assert!(!timed_out && got.ends_with(&want), "the whole answer within 30 s: {got}");
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert_no_token_in(&w, &d.output());
}

fn malformed(_method: &str, path: &str) -> Vec<u8> {
    let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
    let a = match path {
        "/half-head" => "HTTP/1.1 200 OK\r\ncontent-le",
        "/obs-fold" => "HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\nok",
        "/nul" => "HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 2\r\n\r\nok",
        "/length-sign" => "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
        "/lengths" => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        "/size-sign" => &format!("{chunked}+5\r\nhello\r\n0\r\n\r\n"),
        "/size-overflow" => &format!("{chunked}10000000000000005\r\nhello\r\n0\r\n\r\n"),
        "/size-bare-lf" => &format!("{chunked}5\nhello\r\n0\r\n\r\n"),
        "/data-no-crlf" => &format!("{chunked}5\r\nhello0\r\n\r\n"),
        _ => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    };
    let mut a = a.as_bytes().to_vec();
    if path == "/half-head" {
        // Never in a head: the upstream closes after the rest.
        a.push(0xff);
    }
    a
}

/// Malformed answers, each on a connection that was reused: a head the proxy cannot read is a
/// 502 naming why (a head cut by the close too), a body that is not valid chunked coding ends
/// the client's connection without the last chunk (never an answer that looks whole) with a
/// warning in the log; the next request goes on a new connection and gets its own answer.
#[tokio::test]
async fn malformed_answers_are_a_502_or_a_broken_answer_never_a_whole_one() {
    let w = World::new().await;
    let up = Raw::start(|mut s| async move {
        let mut buf = Vec::new();
        // Bounded: each turn takes a request or ends the connection.
        for _ in 0..1000 {
            let Some(len) = whole_request(&mut s, &mut buf).await else { return };
            let req = String::from_utf8_lossy(&buf[..len]).into_owned();
            buf.drain(..len);
            let mut a = malformed("GET", req.split(' ').nth(1).unwrap_or(""));
            // 0xff (never in a head): close after the rest.
            let close = a.last() == Some(&0xff);
            a.truncate(a.len() - usize::from(close));
            if s.write_all(&a).await.is_err() || close {
                return;
            }
        }
    })
    .await;
    let (d, port) = started(&w, &up.url).await;
    let heads = [
        ("/half-head", "closed or reset the connection inside its answer's head"),
        ("/obs-fold", "refused"),
        ("/nul", "refused"),
        ("/length-sign", "an invalid content-length"),
        ("/lengths", "an invalid content-length"),
    ];
    // One client connection: idle upstream connections are each worker's own.
    let mut s = connect(port).await;
    assert_eq!(call(&mut s, "GET", "/warm").await.1, "ok");
    for (i, (path, why)) in heads.into_iter().enumerate() {
        let (head, body) = call(&mut s, "GET", path).await;
        let body = body.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 502 ") && body.contains(why), "{path}: {head}{body}");
        assert_eq!(call(&mut s, "GET", "/next").await.1, "ok", "after {path}");
        assert_eq!(up.opened.load(SeqCst), i + 2, "after {path}");
    }
    for path in ["/size-sign", "/size-overflow", "/size-bare-lf", "/data-no-crlf"] {
        let mut s = connect(port).await;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let all = to_close(&mut s).await;
        assert!(all.starts_with("HTTP/1.1 200 "), "{path}: {all}");
        assert!(!all.ends_with("0\r\n\r\n"), "{path}: a broken answer looks whole: {all}");
    }
    let broke = "the upstream's answer broke off";
    wait_until("a warning per broken answer", T, || d.output().matches(broke).count() >= 4).await;
    assert_no_token_in(&w, &d.output());
}

/// A streamed body (over the replay limit) that its client cuts off midway never reaches the
/// upstream whole, with a length or in chunks: the upstream would act on a body the client did
/// not send.
#[tokio::test]
async fn a_streamed_body_cut_off_midway_never_reaches_the_upstream_whole() {
    let w = World::new().await;
    let whole = Arc::new(AtomicUsize::new(0));
    let (counted, upstream_gone) = (whole.clone(), Arc::new(AtomicUsize::new(0)));
    let gone = upstream_gone.clone();
    let up = Raw::start(move |mut s| {
        let (whole, gone) = (counted.clone(), gone.clone());
        async move {
            let mut buf = Vec::new();
            if whole_request(&mut s, &mut buf).await.is_some() {
                whole.fetch_add(1, SeqCst);
                let _ = s.write_all(OK).await;
            }
            gone.fetch_add(1, SeqCst);
        }
    })
    .await;
    let (d, port) = started(&w, &up.url).await;
    let piece = vec![b'b'; 64 * 1024];
    let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), &piece, b"\r\n"].concat();
    let heads = [
        format!("POST /cut HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", 4 << 20),
        "POST /cut HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_string(),
    ];
    for (i, head) in heads.iter().enumerate() {
        let mut s = connect(port).await;
        s.write_all(head.as_bytes()).await.unwrap();
        // 2 MiB of the body, then the client is gone.
        for _ in 0..32 {
            s.write_all(if i == 0 { &piece } else { &chunk }).await.unwrap();
        }
        wait_until("the request reached the upstream", T, || up.opened.load(SeqCst) > i).await;
        drop(s);
        wait_until("the upstream connection closed", T, || upstream_gone.load(SeqCst) > i).await;
    }
    assert_eq!(whole.load(SeqCst), 0, "a body cut off reached the upstream whole");
    assert_no_token_in(&w, &d.output());
}
