//! The systemd notify protocol, with the test as the service manager: a datagram socket in
//! NOTIFY_SOCKET and WATCHDOG_USEC set.

use crate::harness::{TokenSpec, World, wait_until};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each message received, with whether `sink` existed when it arrived, and when.
type Messages = Arc<Mutex<Vec<(String, bool, Instant)>>>;

/// The service manager's end: every message received.
struct Manager {
    path: std::path::PathBuf,
    messages: Messages,
    done: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Manager {
    fn listen(w: &World, sink: std::path::PathBuf) -> Self {
        let path = w.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let messages: Messages = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (m, d) = (messages.clone(), done.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !d.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    m.lock().unwrap().push((text, sink.exists(), Instant::now()));
                }
            }
        });
        Self { path, messages, done, reader: Some(reader) }
    }

    fn env(&self) -> [(&str, &str); 2] {
        [("NOTIFY_SOCKET", self.path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]
    }

    fn count(&self, needle: &str) -> usize {
        self.messages.lock().unwrap().iter().filter(|(t, ..)| t.contains(needle)).count()
    }

    /// The first message containing `needle`, with whether the sink existed then.
    fn first(&self, needle: &str) -> (String, bool) {
        let messages = self.messages.lock().unwrap();
        let (text, existed, _) = messages.iter().find(|(t, ..)| t.contains(needle)).unwrap();
        (text.clone(), *existed)
    }

    /// The longest time between two watchdog pings from `from` to now.
    fn longest_ping_gap(&self, from: Instant) -> Duration {
        let messages = self.messages.lock().unwrap();
        let pings = messages.iter().filter(|m| m.0.contains("WATCHDOG=1")).map(|m| m.2);
        crate::harness::longest_gap(from, pings)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[tokio::test]
async fn ready_only_after_sinks_exist_watchdog_keeps_coming_stopping_on_sigterm() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let m = Manager::listen(&w, w.path("main.json"));
    let mut d = w.daemon_with(&m.env(), "");
    wait_until("READY=1", Duration::from_secs(20), || m.count("READY=1") == 1).await;
    wait_until("5 watchdog pings", Duration::from_secs(20), || m.count("WATCHDOG=1") >= 5).await;
    let ready = m.first("READY=1");
    assert!(ready.1, "READY=1 came before the sink existed");
    assert!(ready.0.contains("STATUS=main ok gen 1"), "{}", ready.0);
    assert_eq!(m.count("STOPPING=1"), 0);
    assert!(d.stop().await.success());
    wait_until("STOPPING=1", Duration::from_secs(5), || m.count("STOPPING=1") == 1).await;
}

/// With many tokens the status line counts them instead of naming each (it was a line of
/// 40 bytes per token), and building it reads the lock table once, not once per token (150
/// tokens in a loaded test run kept the daemon from exiting on SIGTERM for 20 s).
#[tokio::test]
async fn many_tokens_get_a_short_status_line_at_once() {
    let w = World::new().await;
    let tokens: Vec<_> = (0..150).map(|i| TokenSpec::new(&format!("t{i}"))).collect();
    w.write_config(&tokens);
    let m = Manager::listen(&w, w.path("t149.json"));
    let mut d = w.daemon_with(&m.env(), "");
    d.wait_log("tokend ready", 1, Duration::from_secs(120)).await;
    wait_until("READY=1", Duration::from_secs(20), || m.count("READY=1") == 1).await;
    let ready = m.first("READY=1").0;
    assert!(ready.contains("STATUS=150 tokens: 150 ok\n"), "{ready}");
    assert!(d.stop().await.success());
}

/// A reload waits for the tokens it adds to publish (or fail) and for the changed ones to stop,
/// which a slow server stretches: the watchdog is pinged meanwhile. It was pinged by the loop
/// that ran the reload, so a reload longer than `WatchdogSec=` (60 s in the unit) got the
/// daemon killed by systemd in the middle of it.
#[tokio::test]
async fn a_slow_reload_keeps_the_watchdog_fed() {
    const HANG_MS: u64 = 4000;
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let m = Manager::listen(&w, w.path("main.json"));
    let mut d = w.daemon_with(&m.env(), "");
    wait_until("READY=1", Duration::from_secs(20), || m.count("READY=1") == 1).await;
    w.server.inject(format!("hang,ms={HANG_MS}").parse().unwrap());
    w.write_config(&[TokenSpec::new("main"), TokenSpec::new("added")]);
    let reload = Instant::now();
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", 1, Duration::from_secs(60)).await;
    let took = reload.elapsed();
    assert!(
        took >= Duration::from_millis(HANG_MS - 500),
        "the reload took {took:?}: the added token's login did not hang, the test shows nothing"
    );
    // Pings every 100 ms; a loaded 2-core machine has delayed one by 0.7 s (slow_disk).
    let gap = m.longest_ping_gap(reload);
    assert!(
        gap < Duration::from_millis(1200),
        "a watchdog ping was {gap:?} late during a {took:?} reload"
    );
    assert_eq!(w.generation("added"), 1, "the added token published after its slow login");
    assert!(d.stop().await.success());
}
