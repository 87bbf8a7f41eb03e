//! The systemd notify protocol, with the test as the service manager: a datagram socket in
//! NOTIFY_SOCKET and WATCHDOG_USEC set.

use crate::harness::{TokenSpec, World, wait_until};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn ready_only_after_sinks_exist_watchdog_keeps_coming_stopping_on_sigterm() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let socket_path = w.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    // Each message with whether the json sink existed when it arrived.
    let messages: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let (m, sink) = (messages.clone(), w.path("main.json"));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !done2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                m.lock().unwrap().push((text, sink.exists()));
            }
        }
    });
    let mut d = w.daemon_with(
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")],
        "",
    );
    let count =
        |needle: &str| messages.lock().unwrap().iter().filter(|(t, _)| t.contains(needle)).count();
    wait_until("READY=1", Duration::from_secs(20), || count("READY=1") == 1).await;
    wait_until("5 watchdog pings", Duration::from_secs(20), || count("WATCHDOG=1") >= 5).await;
    {
        let msgs = messages.lock().unwrap();
        let ready = msgs.iter().find(|(t, _)| t.contains("READY=1")).unwrap();
        assert!(ready.1, "READY=1 came before the sink existed");
        assert!(ready.0.contains("STATUS=main ok gen 1"), "{}", ready.0);
    }
    assert_eq!(count("STOPPING=1"), 0);
    assert!(d.stop().await.success());
    wait_until("STOPPING=1", Duration::from_secs(5), || count("STOPPING=1") == 1).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
}
