//! The proxy in front of a misbehaving or unusual upstream (a small server of the test's own):
//! status codes, error bodies and rate-limit headers passed back as they came, hop-by-hop
//! headers dropped both ways, hangs and resets, and callers that hang up mid-request.

use crate::harness::{Daemon, TokenSpec, World, wait_until};
use crate::proxy::{assert_no_token_in, client, unix_proxy, write_proxy_config};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

/// An upstream that echoes request headers, answers any status, or hangs.
async fn odd_upstream() -> String {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/echo", get(echo).post(echo))
        .route("/status/{code}", get(status))
        .route("/hang", get(std::future::pending::<String>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn echo(headers: HeaderMap) -> impl IntoResponse {
    let seen: serde_json::Map<String, serde_json::Value> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").into())).collect();
    (
        [
            ("connection", "x-hop-resp"),
            ("x-hop-resp", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("x-end-to-end", "kept"),
        ],
        axum::Json(seen),
    )
}

async fn status(axum::extract::Path(code): axum::extract::Path<u16>) -> impl IntoResponse {
    let status = StatusCode::from_u16(code).unwrap();
    let body = format!("{{\"errorCode\":\"CMN-{code}\",\"message\":\"as the upstream said\"}}");
    (
        status,
        [
            ("retry-after", "60"),
            ("x-rate-limit-group", "heavy"),
            ("x-rate-limit-limit", "10"),
            ("x-rate-limit-remaining", "0"),
            ("x-rate-limit-window", "60"),
            ("content-type", "application/json"),
        ],
        body,
    )
}

/// An upstream that resets every connection once the request arrives.
async fn resetting_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    url
}

/// A daemon with two proxies: main.sock to the odd upstream, reset.sock to the resetting one.
async fn started(w: &World, drain: &str) -> Daemon {
    let odd = odd_upstream().await;
    let reset = resetting_upstream().await;
    let proxy = format!(
        "{}\nupstream = \"{odd}\"\ndrain_timeout = \"{drain}\"\n\n[[token.proxy]]\nlisten = \"unix:{}\"\nmode = \"0600\"\nupstream = \"{reset}\"",
        unix_proxy(w),
        w.path("reset.sock").display()
    );
    write_proxy_config(w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon();
    d.wait_ready().await;
    d
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_the_rest_kept() {
    let w = World::new().await;
    let _d = started(&w, "2s").await;
    let resp = client(&w.path("main.sock"))
        .get("http://proxy/echo")
        .header("connection", "x-hop-req")
        .header("x-hop-req", "1")
        .header("proxy-authorization", "Basic eDp5")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .header("authorization", "Bearer callers-own")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for gone in ["x-hop-resp", "keep-alive", "proxy-authenticate"] {
        assert!(!resp.headers().contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(resp.headers()["x-end-to-end"], "kept");
    let seen: serde_json::Value = resp.json().await.unwrap();
    for gone in ["x-hop-req", "proxy-authorization", "te"] {
        assert!(seen.get(gone).is_none(), "{gone} reached the upstream: {seen}");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    let token = w.sink("main").unwrap().access_token;
    assert_eq!(
        seen["authorization"],
        format!("Bearer {token}"),
        "the proxy's token, not the caller's"
    );
}

#[tokio::test]
async fn upstream_errors_and_rate_limits_are_passed_back_as_they_came() {
    let w = World::new().await;
    let _d = started(&w, "2s").await;
    let c = client(&w.path("main.sock"));
    for code in [500u16, 502, 503, 429] {
        let resp = c.get(format!("http://proxy/status/{code}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code);
        let h = resp.headers();
        assert_eq!(h["retry-after"], "60");
        assert_eq!(h["x-rate-limit-remaining"], "0");
        assert_eq!(h["x-rate-limit-group"], "heavy");
        let body = resp.text().await.unwrap();
        assert_eq!(
            body,
            format!("{{\"errorCode\":\"CMN-{code}\",\"message\":\"as the upstream said\"}}")
        );
    }
    let resp = client(&w.path("reset.sock")).get("http://proxy/anything").send().await.unwrap();
    assert_eq!(resp.status(), 502, "a reset upstream is a 502 of the proxy's own");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errorCode"], "TOKEND-PROXY");
}

/// Rotates once and returns how long the refresh took from the signal to the new sink.
async fn rotation_time(w: &World, d: &Daemon) -> Duration {
    let g = w.generation("main");
    let started = Instant::now();
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", g + 1, T).await;
    started.elapsed()
}

#[tokio::test]
async fn a_hanging_upstream_is_passed_through_and_delays_a_rotation_at_most_the_drain_timeout() {
    let w = World::new().await;
    let d = started(&w, "1500ms").await;
    let c = reqwest::Client::builder()
        .unix_socket(w.path("main.sock"))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let hung = tokio::spawn(async move { c.get("http://proxy/hang").send().await });
    // Give the request time to reach the upstream (if it has not, the refresh is simply fast
    // and the assertion below fails).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = rotation_time(&w, &d).await;
    assert!(
        took >= Duration::from_millis(1500),
        "the refresh waited for the request in flight: {took:?}"
    );
    d.wait_log("still in flight at the drain timeout", 1, T).await;
    assert!(!hung.is_finished(), "the hang is the caller's to time out, not the proxy's");
    hung.abort();
}

#[tokio::test]
async fn callers_hanging_up_mid_request_leave_nothing_in_flight() {
    let w = World::new().await;
    let d = started(&w, "20s").await;
    // A body cut short, and a request whose caller leaves while the upstream thinks.
    let mut s = tokio::net::UnixStream::connect(w.path("main.sock")).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    drop(s);
    let mut s = tokio::net::UnixStream::connect(w.path("main.sock")).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = rotation_time(&w, &d).await;
    assert!(took < Duration::from_secs(10), "the rotation waited {took:?} for callers that left");
    assert_eq!(d.count("still in flight"), 0);
    let resp = client(&w.path("main.sock")).get("http://proxy/echo").send().await.unwrap();
    assert_eq!(resp.status(), 200, "the proxy still serves");
}

/// Connections an upstream of the test's own has open now, and the most it ever had.
#[derive(Default)]
struct OpenCount {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// A raw HTTP/1.1 upstream that counts its open connections: `GET /hang` is never answered,
/// anything else gets a small 200 (kept alive).
async fn counting_upstream() -> (String, std::sync::Arc<OpenCount>) {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(OpenCount::default());
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let now = c.now.fetch_add(1, SeqCst) + 1;
            c.most.fetch_max(now, SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                answer_until_closed(s).await;
                c.now.fetch_sub(1, SeqCst);
            });
        }
    });
    (url, count)
}

async fn answer_until_closed(mut s: tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n @ 1..) = s.read(&mut buf).await else { return };
        head.extend_from_slice(&buf[..n]);
        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let request: Vec<u8> = head.drain(..end + 4).collect();
            if request.starts_with(b"GET /hang ") {
                // Never answered; the connection stays open until the proxy closes it.
                let _ = s.read(&mut buf).await;
                return;
            }
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    }
}

/// A request whose caller holds the connection (the upstream never answers it).
async fn hanging_request(w: &World) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(w.path("main.sock")).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    s
}

#[tokio::test]
async fn upstream_connections_are_capped_and_a_request_waits_for_one_then_gets_a_503() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new().await;
    let (up, count) = counting_upstream().await;
    let proxy = format!("{}\nupstream = \"{up}\"\nmax_upstream_connections = 2", unix_proxy(&w));
    write_proxy_config(&w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon();
    d.wait_ready().await;
    let first = hanging_request(&w).await;
    let _second = hanging_request(&w).await;
    wait_until("two connections upstream", T, || count.now.load(SeqCst) == 2).await;

    // Both connections busy: the third request waits, then gets the proxy's own 503.
    let started = Instant::now();
    let resp = client(&w.path("main.sock")).get("http://proxy/ok").send().await.unwrap();
    assert_eq!(resp.status(), 503, "a request past the cap");
    assert!(started.elapsed() >= Duration::from_secs(4), "it waited: {:?}", started.elapsed());
    let body = resp.text().await.unwrap();
    assert!(body.contains("TOKEND-PROXY") && body.contains("max_upstream_connections"), "{body}");
    assert_no_token_in(&w, &body);

    // A request waiting when a connection closes (its caller hung up) takes its place.
    let waiting = tokio::spawn({
        let c = client(&w.path("main.sock"));
        async move { c.get("http://proxy/ok").send().await.map(|r| r.status()) }
    });
    // Not a verdict: lets the request start waiting before the place frees up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(first);
    let status = tokio::time::timeout(T, waiting).await.expect("bounded").unwrap().unwrap();
    assert_eq!(status, 200, "the freed place went to the waiting request");
    assert_eq!(count.most.load(SeqCst), 2, "never more than the cap open upstream");
    assert_no_token_in(&w, &d.output());
}
