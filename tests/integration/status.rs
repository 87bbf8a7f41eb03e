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
