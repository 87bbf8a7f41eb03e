//! The proxy's listeners across the daemon's life: SIGHUP adds, moves and removes them (and a
//! bad one keeps the running ones), SIGTERM drains them (no new connections, the requests in
//! flight finish, bounded) before the daemon exits.

use crate::harness::{Daemon, TokenSpec, World, wait_until};
use crate::proxy::{client, write_proxy_config};
use crate::rotation::EXTENSION;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

const T: Duration = Duration::from_secs(30);

fn unix(w: &World, name: &str) -> String {
    format!("listen = \"unix:{}\"\nmode = \"0600\"", w.path(name).display())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The status of one call through the unix socket at `path`, or `None` if it cannot connect.
async fn call_unix(path: &Path) -> Option<u16> {
    let resp = client(path).get(format!("http://proxy{EXTENSION}")).send().await.ok()?;
    Some(resp.status().as_u16())
}

async fn call_tcp(port: u16) -> Option<u16> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{EXTENSION}")).await.ok()?;
    Some(resp.status().as_u16())
}

/// Rewrites the config and reloads; waits for the `n`th "config reloaded" (or refusal).
async fn reload(w: &World, d: &Daemon, proxies: Option<&str>, needle: &str, n: usize) {
    match proxies {
        Some(p) => write_proxy_config(w, &TokenSpec::new("main"), "", p),
        None => w.write_config(&[TokenSpec::new("main")]),
    }
    d.signal(libc::SIGHUP);
    d.wait_log(needle, n, T).await;
}

#[tokio::test]
async fn sighup_moves_adds_and_removes_proxy_listeners_and_a_bad_one_keeps_the_running_ones() {
    let w = World::new().await;
    let (a, b) = (w.path("a.sock"), w.path("b.sock"));
    write_proxy_config(&w, &TokenSpec::new("main"), "", &unix(&w, "a.sock"));
    let mut d = w.daemon();
    d.wait_ready().await;
    assert_eq!(call_unix(&a).await, Some(200));
    let generation = w.generation("main");

    // Moved from a.sock to b.sock, and a loopback TCP listener added.
    let port = free_port();
    let moved = format!("{}\n\n[[token.proxy]]\nlisten = \"127.0.0.1:{port}\"", unix(&w, "b.sock"));
    reload(&w, &d, Some(&moved), "config reloaded", 1).await;
    assert!(!a.exists(), "the old socket file is left behind");
    assert_eq!(call_unix(&a).await, None, "the old listener still answers");
    assert_eq!(call_unix(&b).await, Some(200), "the moved listener does not answer");
    assert_eq!(call_tcp(port).await, Some(200), "the added listener does not answer");

    // A listener the config refuses: the reload is refused whole, the running ones serve on.
    let bad = format!("{}\n\n[[token.proxy]]\nlisten = \"0.0.0.0:{port}\"", unix(&w, "b.sock"));
    reload(&w, &d, Some(&bad), "config reload failed", 1).await;
    assert_eq!(call_unix(&b).await, Some(200), "a refused reload stopped a running proxy");
    assert_eq!(call_tcp(port).await, Some(200), "a refused reload stopped a running proxy");

    // Every proxy removed: both listeners close, the token (and its sinks) go on.
    reload(&w, &d, None, "config reloaded", 2).await;
    assert!(!b.exists(), "the removed socket file is left behind");
    assert_eq!(call_tcp(port).await, None, "the removed TCP listener still answers");
    assert_eq!(w.generation("main"), generation, "moving listeners refreshed the token");
    assert!(d.stop().await.success(), "{}", d.output());
}

/// An upstream whose `/slow` answers only when the test says so, and tells when it has a request.
struct SlowUpstream {
    url: String,
    arrived: Arc<AtomicBool>,
    release: Arc<Notify>,
}

async fn slow_upstream() -> SlowUpstream {
    let arrived = Arc::new(AtomicBool::new(false));
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let slow = move || {
        let (a, r) = (a.clone(), r.clone());
        async move {
            let released = r.notified();
            a.store(true, Ordering::SeqCst);
            released.await;
            "done"
        }
    };
    let app = axum::Router::new()
        .route("/slow", axum::routing::get(slow))
        .route("/fast", axum::routing::get(|| async { "fast" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    SlowUpstream { url, arrived, release }
}

async fn started_slow(w: &World, up: &SlowUpstream) -> Daemon {
    let proxy = format!("{}\nupstream = \"{}\"", unix(w, "main.sock"), up.url);
    write_proxy_config(w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon();
    d.wait_ready().await;
    d
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_the_request_in_flight_finish_then_exits() {
    let w = World::new().await;
    let up = slow_upstream().await;
    let mut d = started_slow(&w, &up).await;
    let sock = w.path("main.sock");
    // An idle keep-alive connection must not hold the exit up.
    let idle = client(&sock);
    assert_eq!(idle.get("http://proxy/fast").send().await.unwrap().status(), 200);
    let c = client(&sock);
    let in_flight = tokio::spawn(async move {
        let resp = c.get("http://proxy/slow").send().await?;
        Ok::<_, reqwest::Error>((resp.status().as_u16(), resp.text().await?))
    });
    wait_until("the slow request at the upstream", T, || up.arrived.load(Ordering::SeqCst)).await;

    d.signal(libc::SIGTERM);
    wait_until("the socket file removed", T, || !sock.exists()).await;
    assert!(
        tokio::net::UnixStream::connect(&sock).await.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    assert!(!in_flight.is_finished(), "the request in flight was cut: {:?}", in_flight.await);
    up.release.notify_one();
    let (status, body) = in_flight.await.unwrap().expect("the request in flight was cut");
    assert_eq!((status, body.as_str()), (200, "done"));
    assert!(d.wait_exit(T).await.success(), "{}", d.output());
    assert_eq!(d.count("still in flight at shutdown"), 0, "{}", d.output());
}

#[tokio::test]
async fn sigterm_waits_for_a_hung_request_at_most_the_shutdown_grace() {
    let w = World::new().await;
    let up = slow_upstream().await;
    let mut d = started_slow(&w, &up).await;
    let c = client(&w.path("main.sock"));
    let hung = tokio::spawn(async move { c.get("http://proxy/slow").send().await });
    wait_until("the request at the upstream", T, || up.arrived.load(Ordering::SeqCst)).await;
    d.signal(libc::SIGTERM);
    // Never released: the daemon gives up on it after the grace (`proxy::SHUTDOWN_GRACE`,
    // 10 s) and exits anyway.
    let grace = Duration::from_secs(10);
    assert!(d.wait_exit(grace + T).await.success(), "{}", d.output());
    assert_eq!(d.count("still in flight at shutdown"), 1, "{}", d.output());
    assert!(hung.await.unwrap().is_err(), "the hung request got an answer");
}
