//! The rotation window: callers hammering the API while the daemon rotates the token, through a
//! fake server with a WAN-like round trip (without it the window is a millisecond wide and hides).

use crate::harness::{Daemon, TokenSpec, World};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokend::fake::FakeConfig;

pub const EXTENSION: &str = "/restapi/v1.0/account/~/extension/~";

/// The round trip the issue measured the window with.
pub const RTT: Duration = Duration::from_millis(100);

/// A fake server with a 100 ms round trip and no auth rate limit (many rotations in a row).
pub fn wan_fake() -> FakeConfig {
    FakeConfig { latency: RTT, ..FakeConfig::for_tests() }
}

/// How a caller reaches the API.
#[derive(Clone)]
pub enum Caller {
    /// The README's file-reader contract at its best: re-read the json sink before every single
    /// call, send that token straight to the server, never retry.
    FileReader { sink: PathBuf, server: String },
    /// Through the proxy's unix socket, sending no token at all.
    Proxy { socket: PathBuf },
}

/// Calls and failed calls, counted by every caller of one kind.
#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl Tally {
    pub fn get(&self) -> (u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// `n` callers calling with no pause until `stop` turns true.
pub fn spawn_callers(
    n: usize,
    caller: &Caller,
    stop: &Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let tasks = (0..n)
        .map(|_| {
            let (caller, stop, tally) = (caller.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                // One client per caller: its own keep-alive connection, like separate programs.
                let client = match &caller {
                    Caller::Proxy { socket } => {
                        reqwest::Client::builder().unix_socket(socket.as_path()).build().unwrap()
                    }
                    Caller::FileReader { .. } => reqwest::Client::new(),
                };
                while !stop.load(Ordering::Relaxed) {
                    let ok = call_once(&client, &caller).await;
                    let counter = if ok { &tally.ok } else { &tally.failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    (tally, tasks)
}

async fn call_once(client: &reqwest::Client, caller: &Caller) -> bool {
    let request = match caller {
        Caller::FileReader { sink, server } => {
            let doc: tokend::store::SinkDoc =
                serde_json::from_slice(&std::fs::read(sink).expect("sink")).expect("sink json");
            client.get(format!("{server}{EXTENSION}")).bearer_auth(doc.access_token)
        }
        Caller::Proxy { .. } => client.get(format!("http://proxy{EXTENSION}")),
    };
    request.send().await.is_ok_and(|r| r.status().is_success())
}

/// Rotates the token `n` times with SIGUSR1, each time waiting for the new generation and then
/// for `calls` more successful calls, so that callers run on every token in between.
pub async fn rotate(w: &World, d: &Daemon, n: u64, tallies: &[&Tally]) {
    let start = w.generation("main");
    for i in 1..=n {
        d.signal(libc::SIGUSR1);
        w.wait_generation("main", start + i, Duration::from_secs(30)).await;
        let before: Vec<u64> = tallies.iter().map(|t| t.get().0).collect();
        crate::harness::wait_until("calls on the new token", Duration::from_secs(30), || {
            tallies.iter().zip(&before).all(|(t, b)| t.get().0 >= b + 16)
        })
        .await;
    }
}

#[tokio::test]
async fn fake_latency_is_half_each_way_on_api_and_token_calls() {
    let w = World::with(wan_fake()).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let login = client
        .post(format!("{}/restapi/oauth/token", w.server.url()))
        .basic_auth(crate::harness::CLIENT_ID, Some(crate::harness::CLIENT_SECRET))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", crate::harness::JWT),
        ])
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= RTT, "token call took {:?}", started.elapsed());
    let token = login.json::<serde_json::Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let resp = client
        .get(format!("{}{EXTENSION}", w.server.url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= RTT, "API call took {:?}", started.elapsed());
    // The admin API is the test's own and stays fast.
    let started = Instant::now();
    assert_eq!(w.stats().api_accepted, 1);
    assert!(started.elapsed() < RTT);
}

/// The window the proxy closes, measured: file readers without retries fail at each rotation.
#[tokio::test]
async fn file_readers_fail_calls_at_each_rotation_over_a_wan() {
    let w = World::with(wan_fake()).await;
    w.write_config(&[TokenSpec::new("main")]);
    let d = w.daemon();
    d.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = Caller::FileReader { sink: w.path("main.json"), server: w.server.url() };
    let (tally, tasks) = spawn_callers(16, &reader, &stop);
    let rotations = 5;
    rotate(&w, &d, rotations, &[&tally]).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = tally.get();
    eprintln!(
        "file readers, 16 callers, {rotations} rotations, 100 ms RTT: {failed} of {} calls failed ({:.1} per rotation)",
        ok + failed,
        failed as f64 / rotations as f64
    );
    assert!(failed > 0, "no call failed: the fake's latency did not open the window");
}

/// The goal: through the proxy, no call fails at a rotation. 16 callers with no pause
/// through 20 rotations with a 100 ms round trip, the file-reader contract beside it as the
/// baseline (same run, same rotations).
#[tokio::test]
async fn no_proxied_call_fails_through_twenty_rotations() {
    let w = World::with(wan_fake()).await;
    let proxy = format!("{}\naccess_log = true", crate::proxy::unix_proxy(&w));
    crate::proxy::write_proxy_config(&w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon();
    d.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = Caller::FileReader { sink: w.path("main.json"), server: w.server.url() };
    let proxied = Caller::Proxy { socket: w.path("main.sock") };
    let (files, mut tasks) = spawn_callers(16, &reader, &stop);
    let (proxy, more) = spawn_callers(16, &proxied, &stop);
    tasks.extend(more);
    let rotations = 20;
    rotate(&w, &d, rotations, &[&files, &proxy]).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (p_ok, p_failed) = proxy.get();
    let (f_ok, f_failed) = files.get();
    eprintln!("{rotations} rotations, 16 callers each, no pause, 100 ms RTT:");
    eprintln!("  through the proxy: {p_failed} of {} calls failed", p_ok + p_failed);
    eprintln!(
        "  file readers (baseline): {f_failed} of {} calls failed ({:.1} per rotation)",
        f_ok + f_failed,
        f_failed as f64 / rotations as f64
    );
    assert_eq!(p_failed, 0, "a proxied call failed at a rotation");
    assert!(f_failed > 0, "the baseline saw no failure: the rotation window did not open");
    assert_eq!(d.count("still in flight at the drain timeout"), 0);
    // The drain alone did it: calls were held at rotations, none needed a replay.
    let held = d.count("proxied") - d.count("held_ms=0.0");
    let replayed = d.count("replayed=true");
    eprintln!("  held at a rotation: {held}; replayed: {replayed}");
    assert!(held > 0, "no call was held at a rotation");
    assert_eq!(replayed, 0, "calls were replayed: the drain let old-token calls through");
}
