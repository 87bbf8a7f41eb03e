//! The proxy's connections on both sides: client connections opened ahead of use or idle
//! between requests (no buffers until their next bytes, then served), a client sending its request a byte at a time, and
//! plain-HTTP upstream connections reused across requests, or not when the upstream says
//! `Connection: close`.

use crate::harness::{Daemon, TokenSpec, World, wait_until};
use crate::proxy::write_proxy_config;
use crate::rotation::EXTENSION;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon with one loopback TCP proxy (to `upstream`, or the fake server); its port.
async fn started(w: &World, upstream: Option<&str>) -> (Daemon, u16) {
    let port = free_port();
    let up = upstream.map(|u| format!("\nupstream = \"{u}\"")).unwrap_or_default();
    write_proxy_config(
        w,
        &TokenSpec::new("main"),
        "",
        &format!("listen = \"127.0.0.1:{port}\"{up}"),
    );
    let d = w.daemon();
    d.wait_ready().await;
    (d, port)
}

/// Sends one GET on `s` and reads the whole answer (a Content-Length body); its status.
async fn get(s: &mut TcpStream) -> u16 {
    s.write_all(format!("GET {EXTENSION} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    read_answer(s).await
}

async fn read_answer(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return head[9..12].parse().unwrap();
            }
        }
        let n = tokio::time::timeout(T, s.read_buf(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "the proxy closed the connection: {}", String::from_utf8_lossy(&buf));
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Connections opened and not yet used (a client's pool warming up) cost the daemon their
/// socket and a small task, not hyper's buffers (8 KiB each for reading and writing); each is
/// served once it sends its request.
#[tokio::test]
async fn connections_opened_ahead_of_use_hold_no_buffers_and_are_served_later() {
    const N: usize = 400;
    let w = World::new().await;
    let (mut d, port) = started(&w, None).await;
    // Counted before any connection (one closed just now may not have closed yet).
    let fds = open_fds(d.pid());
    // The request path's own first allocations are made before the baseline.
    let mut warm = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(get(&mut warm).await, 200);
    drop(warm);
    let before = rss_kib(d.pid());
    let mut conns = Vec::new();
    for _ in 0..N {
        conns.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    wait_until("the daemon accepts every connection", T, || open_fds(d.pid()) >= fds + N).await;
    let per_conn = rss_kib(d.pid()).saturating_sub(before) as f64 / N as f64;
    // hyper's two buffers alone touch at least a page each (8 KiB); a socket and a waiting
    // task take well under one.
    assert!(per_conn < 4.0, "{per_conn:.1} KiB per connection not yet used");
    for s in &mut conns {
        assert_eq!(get(s).await, 200, "a connection idle before its first request");
    }
    assert!(d.stop().await.success(), "{}", d.output());
}

/// Connections kept open after a request (a client's keep-alive pool between calls) hold no
/// buffers: hyper's server kept 8 KiB to read and 8 KiB to write on each for its whole life
/// (about 10 KiB resident per connection in issue 13's benchmark).
#[tokio::test]
async fn connections_idle_after_a_request_hold_no_buffers() {
    const N: usize = 400;
    let w = World::new().await;
    let (mut d, port) = started(&w, None).await;
    // Every proxy thread's first allocations are made before the baseline.
    for _ in 0..8 {
        let mut warm = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(get(&mut warm).await, 200);
    }
    let before = rss_kib(d.pid());
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(get(&mut s).await, 200);
        conns.push(s);
    }
    let per_conn = rss_kib(d.pid()).saturating_sub(before) as f64 / N as f64;
    assert!(per_conn < 4.0, "{per_conn:.1} KiB per connection idle after a request");
    for s in &mut conns {
        assert_eq!(get(s).await, 200, "a connection idle after a request");
    }
    assert!(d.stop().await.success(), "{}", d.output());
}

/// A client that sends its request head a byte at a time, each a separate segment.
#[tokio::test]
async fn a_request_sent_a_byte_at_a_time_is_served() {
    let w = World::new().await;
    let (mut d, port) = started(&w, None).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let request = format!("GET {EXTENSION} HTTP/1.1\r\nhost: x\r\nx-slow: yes\r\n\r\n");
    for b in request.as_bytes() {
        s.write_all(&[*b]).await.unwrap();
        // Pacing only: the bytes arrive apart whatever the machine's speed.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(read_answer(&mut s).await, 200);
    // The same connection goes on serving at full speed.
    assert_eq!(get(&mut s).await, 200);
    assert!(d.stop().await.success(), "{}", d.output());
}

/// A plain-HTTP/1.1 upstream that counts its connections and answers every request with 200;
/// with `close`, each answer says `Connection: close` and the connection ends.
async fn counting_upstream(close: bool) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while s.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let last = if close { "connection: close\r\n" } else { "" };
                        let answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{last}\r\n{{}}");
                        if s.write_all(answer.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, accepted)
}

/// Upstream connections are kept and reused: callers one after another need one per proxy
/// thread (one per core: a thread keeps its own), 8 callers at once at most 8 besides those;
/// an upstream that closes after each answer gets a new one each time, and no call fails for it.
#[tokio::test]
async fn plain_http_upstream_connections_are_reused_unless_the_upstream_closes_them() {
    let w = World::new().await;
    let (upstream, accepted) = counting_upstream(false).await;
    let (mut d, port) = started(&w, Some(&upstream)).await;
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(get(&mut s).await, 200);
    }
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let n = accepted.load(Ordering::SeqCst);
    assert!(n <= threads, "sequential callers used {n} upstream connections ({threads} threads)");
    let callers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                for _ in 0..20 {
                    assert_eq!(get(&mut s).await, 200);
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(n <= 8 + threads, "{n} upstream connections for 8 callers ({threads} threads)");
    assert!(d.stop().await.success(), "{}", d.output());

    let w = World::new().await;
    let (upstream, accepted) = counting_upstream(true).await;
    let (mut d, port) = started(&w, Some(&upstream)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for _ in 0..10 {
        assert_eq!(get(&mut s).await, 200, "a call after the upstream closed its connection");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
    assert!(d.stop().await.success(), "{}", d.output());
}
