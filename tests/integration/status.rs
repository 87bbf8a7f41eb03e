//! `tokend status`, human and JSON, in each state a token can be in.

use crate::harness::{TokenSpec, World, tokend};
use serde_json::Value;

fn status(w: &World) -> (i32, String, Value) {
    let cfg = w.config_path();
    let human = tokend(&["status", "--config", cfg.to_str().unwrap()]);
    let json = tokend(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(human.status.code(), json.status.code());
    (human.status.code().unwrap(), String::from_utf8(human.stdout).unwrap(), v)
}

#[tokio::test]
async fn status_in_each_state() {
    let w = World::new().await;
    w.write_config(&[
        TokenSpec::new("main"),
        TokenSpec::new("code").grant("grant = \"authorization_code\""),
    ]);
    // Nothing has run yet.
    let (code, text, v) = status(&w);
    assert_eq!(code, 1);
    assert_eq!(v[0]["health"], "no_state");
    assert_eq!(v[1]["health"], "needs_login");
    assert!(
        text.contains("main: NO STATE") && text.contains("tokend login --token code"),
        "{text}"
    );
    // Running: main is healthy with a next refresh; code still needs login.
    let mut d = w.daemon();
    d.wait_ready().await;
    let (_, text, v) = status(&w);
    assert_eq!(v[0]["health"], "ok");
    assert_eq!(v[0]["generation"], 1);
    assert_eq!(v[0]["daemon_pid"], d.pid());
    assert!(v[0]["access_expires_in_secs"].as_i64().unwrap() > 3000);
    assert!(v[0]["next_refresh_at"].is_string());
    assert!(
        text.contains(&format!("running (pid {})", d.pid()))
            && text.contains("access expires")
            && text.contains("next refresh"),
        "{text}"
    );
    // A failure shows up with the server's code.
    w.server.inject("status503,retry_after=60".parse().unwrap());
    d.signal(libc::SIGUSR1);
    d.wait_log("retrying", 1, std::time::Duration::from_secs(20)).await;
    crate::harness::wait_until(
        "status to record the error",
        std::time::Duration::from_secs(20),
        || status(&w).2[0]["last_error"]["code"] == "CMN-211",
    )
    .await;
    let (_, text, _) = status(&w);
    assert!(text.contains("last error      CMN-211") && text.contains("(transient)"), "{text}");
    assert!(d.stop().await.success());
    // A good token that nobody refreshes lapses within the hour: not healthy, exit 1.
    let (code, text, v) = status(&w);
    assert!(v[0]["next_refresh_at"].is_null() && text.contains("daemon not running"), "{text}");
    assert_eq!((code, v[0]["health"].as_str()), (1, Some("not_running")), "{text}");
    assert!(
        text.contains("main: NOT RUNNING") && text.contains("systemctl start tokend"),
        "{text}"
    );
    for secret in w.server.issued_tokens() {
        assert!(!text.contains(&secret) && !v.to_string().contains(&secret));
    }
    // The daemon's pid taken by another live process (here this test) is not a daemon.
    let lock = tokend::store::StateLock::path_for(&w.path("main.state.json"));
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let (code, text, v) = status(&w);
    assert_eq!((code, v[0]["health"].as_str()), (1, Some("not_running")), "{text}");
}

/// A first start writes each token's status file once: after the login, which writes it
/// anyway (a write before it was replaced a moment later: one durable write per token for
/// nothing at a bootstrap of 10,000 tokens), or at once when nothing is sent (needs login).
#[tokio::test]
async fn a_first_start_writes_the_status_file_once() {
    use inotify::{Inotify, WatchMask};
    let w = World::new().await;
    w.write_config(&[
        TokenSpec::new("main"),
        TokenSpec::new("code").grant("grant = \"authorization_code\""),
    ]);
    let mut ino = Inotify::init().unwrap();
    ino.watches().add(w.dir.path(), WatchMask::MOVED_TO).unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    let mut written = std::collections::BTreeMap::<String, usize>::new();
    let mut buf = [0u8; 4096];
    // Every rename so far is queued: read until the queue is empty (bounded: the daemon is
    // idle after ready, so a few reads drain it).
    for _ in 0..1000 {
        match ino.read_events(&mut buf) {
            Ok(events) => {
                for e in events {
                    let name = e.name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    *written.entry(name).or_default() += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("inotify: {e}"),
        }
    }
    assert_eq!(written.get("main.state.json.status"), Some(&1), "{written:?}");
    assert_eq!(written.get("code.state.json.status"), Some(&1), "{written:?}");
    assert_eq!(status(&w).2[0]["daemon_pid"], d.pid());
    assert!(d.stop().await.success());
}
