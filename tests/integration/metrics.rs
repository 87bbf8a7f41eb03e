//! Metrics: the textfile and the loopback endpoint change with each refresh and failure;
//! `/healthz` turns unhealthy when a token needs login.

use crate::harness::{TokenSpec, World, wait_until};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn textfile_and_endpoint_follow_refreshes_failures_and_health() {
    let w = World::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let prom = w.path("tokend.prom");
    let prelude =
        format!("[metrics]\ntextfile = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n", prom.display());
    w.write_config_with(&prelude, &[TokenSpec::new("main")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let read = || std::fs::read_to_string(&prom).unwrap_or_default();
    wait_until("generation 1 in the textfile", T, || {
        value(&read(), "tokend_generation{token=\"main\"}") == Some(1.0)
    })
    .await;
    let text = read();
    assert!(
        value(&text, "tokend_access_token_expiry_timestamp_seconds{token=\"main\"}").unwrap()
            > chrono::Utc::now().timestamp() as f64
    );
    assert!(text.contains("# TYPE tokend_refresh_attempts_total counter"));
    // A failure then a success.
    w.server.inject("status500".parse().unwrap());
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, T).await;
    wait_until("the failure and the new generation in the textfile", T, || {
        let t = read();
        value(&t, "tokend_generation{token=\"main\"}") == Some(2.0)
            && value(&t, "tokend_refresh_failures_total{token=\"main\",code=\"CMN-102\"}")
                == Some(1.0)
            && value(&t, "tokend_refresh_retries_total{token=\"main\"}") == Some(1.0)
            && value(&t, "tokend_refresh_attempts_total{token=\"main\"}") == Some(3.0)
    })
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(value(&metrics, "tokend_generation{token=\"main\"}"), Some(2.0));
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Revoke the session and break the JWT: the re-login fails, the token needs login.
    let rt = w.state("main").refresh_token.unwrap();
    http.post(format!("{}/restapi/oauth/revoke", w.server.url()))
        .basic_auth(crate::harness::CLIENT_ID, Some(crate::harness::CLIENT_SECRET))
        .form(&[("token", rt.expose())])
        .send()
        .await
        .unwrap();
    let text = std::fs::read_to_string(w.config_path())
        .unwrap()
        .replace("jwt = \"tokend-demo-jwt\"", "jwt = \"a-wrong-jwt\"");
    std::fs::write(w.config_path(), text).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", 1, T).await;
    d.signal(libc::SIGUSR1);
    wait_until("healthz to turn 503", T, || {
        let t = read();
        value(&t, "tokend_needs_login{token=\"main\"}") == Some(1.0)
    })
    .await;
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert!(health.text().await.unwrap().contains("main: needs login"));
    assert!(value(&read(), "tokend_relogins_total{token=\"main\"}").is_some());
    assert!(d.stop().await.success());
}
