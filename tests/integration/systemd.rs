//! The systemd notify protocol, with the test as the service manager: a datagram socket in
//! NOTIFY_SOCKET and WATCHDOG_USEC set.

use crate::harness::{TokenSpec, World, wait_until};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The service manager's end: every message received, with whether `sink` existed when it
/// arrived.
struct Manager {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<(String, bool)>>>,
    done: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Manager {
    fn listen(w: &World, sink: std::path::PathBuf) -> Self {
        let path = w.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let messages: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (m, d) = (messages.clone(), done.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !d.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    m.lock().unwrap().push((text, sink.exists()));
                }
            }
        });
        Self { path, messages, done, reader: Some(reader) }
    }

    fn env(&self) -> [(&str, &str); 2] {
        [("NOTIFY_SOCKET", self.path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]
    }

    fn count(&self, needle: &str) -> usize {
        self.messages.lock().unwrap().iter().filter(|(t, _)| t.contains(needle)).count()
    }

    /// The first message containing `needle`, with whether the sink existed then.
    fn first(&self, needle: &str) -> (String, bool) {
        self.messages.lock().unwrap().iter().find(|(t, _)| t.contains(needle)).unwrap().clone()
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
