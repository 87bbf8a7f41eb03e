//! `[[token.proxy]]` end to end: the real daemon proxying to the fake server (and to a small
//! upstream of the test's own for hangs, resets and odd headers), over unix sockets and loopback.

use crate::harness::{Daemon, TokenSpec, World, tokend, wait_until};
use crate::rotation::EXTENSION;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Writes config.toml: `spec` plus one `[[token.proxy]]` with these lines, and `prelude`.
pub fn write_proxy_config(w: &World, spec: &TokenSpec, prelude: &str, proxy: &str) {
    let spec = spec.clone().tail(&format!("[[token.proxy]]\n{proxy}"));
    let text = format!("{prelude}\n{}", spec.toml(&w.server.url(), w.dir.path()));
    std::fs::write(w.config_path(), text).unwrap();
}

/// The default proxy lines: a unix socket in the world's directory.
pub fn unix_proxy(w: &World) -> String {
    format!("listen = \"unix:{}\"\nmode = \"0660\"", w.path("main.sock").display())
}

/// A client that talks to the proxy's unix socket; URLs are `http://proxy/...`.
pub fn client(socket: &Path) -> reqwest::Client {
    reqwest::Client::builder().unix_socket(socket).build().unwrap()
}

async fn started(w: &World, proxy: &str) -> Daemon {
    write_proxy_config(w, &TokenSpec::new("main"), "", proxy);
    let d = w.daemon();
    d.wait_ready().await;
    d
}

/// Refreshes with the daemon's own refresh token behind its back (a refresher elsewhere):
/// the access token the proxy holds dies at once.
async fn refresh_elsewhere(w: &World) {
    let rt = w.state("main").refresh_token.unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/restapi/oauth/token", w.server.url()))
        .basic_auth(crate::harness::CLIENT_ID, Some(crate::harness::CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt.expose())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

pub fn assert_no_token_in(w: &World, text: &str) {
    for t in w.server.issued_tokens() {
        assert!(!text.contains(&t), "a token appears in the output");
    }
}

#[tokio::test]
async fn proxy_sends_the_current_token_whatever_the_caller_sends() {
    let w = World::new().await;
    let mut d = started(&w, &format!("{}\naccess_log = true", unix_proxy(&w))).await;
    let c = client(&w.path("main.sock"));
    for auth in [None, Some("Bearer not-a-token"), Some("Basic eDp5")] {
        let mut req = c.get(format!("http://proxy{EXTENSION}?q=secret-query"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{auth:?}");
        assert!(resp.headers().contains_key("rcrequestid"), "upstream headers pass through");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["id"], "100000");
    }
    assert_eq!(w.stats().api_accepted, 3);
    d.wait_log("proxied", 3, T).await;
    let log = d.output();
    let line = log.lines().find(|l| l.contains("proxied")).unwrap();
    for field in [
        "method=GET",
        "path=/restapi/v1.0/account/~/extension/~",
        "status=200",
        "duration_ms=",
        "replayed=false",
    ] {
        assert!(line.contains(field), "access log lacks {field}: {line}");
    }
    assert!(!log.contains("secret-query"), "the access log leaves the query out");
    assert!(d.stop().await.success());
    assert_no_token_in(&w, &d.output());
}

#[tokio::test]
async fn post_with_a_body_is_replayed_once_with_the_new_token_after_a_refresh_elsewhere() {
    let w = World::new().await;
    let d = started(&w, &unix_proxy(&w)).await;
    let c = client(&w.path("main.sock"));
    refresh_elsewhere(&w).await;
    let body = vec![b'x'; 100_000];
    let resp = c
        .post(format!("http://proxy{EXTENSION}/sms"))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the 401 was replayed with the new token");
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["bytes"], 100_000, "the replay carried the whole body");
    assert_eq!(w.stats().api_rejected["OAU-129"], 1, "one 401, then the replay");
    d.wait_log("refreshing now", 1, T).await;
    assert_eq!(d.count("refreshing now"), 1);
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_streamed_and_its_401_passed_back() {
    let w = World::new().await;
    let d = started(&w, &format!("{}\nreplay_body_limit = 1024", unix_proxy(&w))).await;
    let c = client(&w.path("main.sock"));
    refresh_elsewhere(&w).await;
    let send = |n: usize| c.post(format!("http://proxy{EXTENSION}/sms")).body(vec![b'y'; n]).send();
    let resp = send(4096).await.unwrap();
    assert_eq!(resp.status(), 401, "not replayed: the body was over the limit");
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["errors"][0]["errorCode"], "OAU-129", "the upstream's error body as it came");
    // The 401 still made the daemon fetch a live token for the next call.
    d.wait_log("refreshed", 2, T).await;
    let resp = send(4096).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["bytes"], 4096);
}

#[tokio::test]
async fn a_revoked_token_under_a_storm_of_calls_causes_one_refresh() {
    let w = World::new().await;
    let d = started(&w, &unix_proxy(&w)).await;
    let c = client(&w.path("main.sock"));
    w.revoke(w.sink("main").unwrap().access_token.as_str()).await;
    let calls = (0..32).map(|_| c.get(format!("http://proxy{EXTENSION}")).send());
    let results = futures_util::future::join_all(calls).await;
    for r in results {
        assert_eq!(r.unwrap().status(), 200, "every call replayed on the new session's token");
    }
    assert_eq!(d.count("refreshing now"), 1, "one refresh for the storm:\n{}", d.output());
    let stats = w.stats();
    assert_eq!(stats.logins, 2, "the dead session was replaced by one new login");
    assert_eq!(w.generation("main"), 2);
}

#[tokio::test]
async fn a_large_download_streams_through_without_being_buffered() {
    let w = World::new().await;
    let d = started(&w, &unix_proxy(&w)).await;
    let c = client(&w.path("main.sock"));
    let before = peak_rss_kib(d.pid());
    let size: u64 = 256 << 20;
    let mut resp = c
        .get(format!("http://proxy/restapi/v1.0/account/~/recording/{size}/content"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(size), "Content-Length passes through");
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
    }
    assert_eq!(got, size);
    let grew = peak_rss_kib(d.pid()) - before;
    assert!(grew < 64 * 1024, "the daemon's peak memory grew {grew} KiB for a 256 MiB download");
}

/// The daemon's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn non_loopback_listen_and_a_socket_without_mode_are_config_errors() {
    let w = World::new().await;
    for (proxy, key, needle) in [
        ("listen = \"0.0.0.0:8081\"", "proxy.listen", "not a loopback address"),
        ("listen = \"192.168.1.10:8081\"", "proxy.listen", "not a loopback address"),
        ("listen = \"unix:/tmp/x.sock\"", "proxy.mode", "explicit mode"),
        ("listen = \"localhost:8081\"", "proxy.listen", "neither"),
        ("listen = \"127.0.0.1:8081\"\nmode = \"0660\"", "proxy.mode", "unix sockets only"),
        ("listen = \"unix:/tmp/x.sock\"\nmode = \"rw\"", "proxy.mode", "octal"),
        ("listen = \"127.0.0.1:8081\"\nbogus = 1", "bogus", "unknown field"),
        (
            "listen = \"127.0.0.1:8081\"\nmax_upstream_connections = 0",
            "proxy.max_upstream_connections",
            "at least 1",
        ),
    ] {
        write_proxy_config(&w, &TokenSpec::new("main"), "", proxy);
        let out = tokend(&["check", "--config", w.config_path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{proxy}: {err}");
        let at = err.split("config.toml:").nth(1).unwrap_or_default();
        assert!(at.starts_with(|c: char| c.is_ascii_digit()), "no line named: {err}");
        assert!(err.contains(key) && err.contains(needle), "{proxy}: {err}");
    }
    write_proxy_config(&w, &TokenSpec::new("main"), "", "listen = \"[::1]:8081\"");
    let out = tokend(&["check", "--config", w.config_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("proxy           [::1]:8081 ->"));
}

#[tokio::test]
async fn unix_socket_has_its_mode_and_refuses_a_user_outside_the_group() {
    assert!(
        std::process::Command::new("id").arg("-u").output().unwrap().stdout == b"0\n",
        "this test switches users with setpriv and must run as root (CI does)"
    );
    let w = World::new().await;
    // Let the other users reach the socket itself; its own mode decides.
    std::fs::set_permissions(w.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let _d = started(&w, &unix_proxy(&w)).await;
    let sock = w.path("main.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o660);
    // Async: the fake server runs on this test's runtime and must answer meanwhile.
    let curl_as = |gid: &str| {
        tokio::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                &format!("--regid={gid}"),
                "--clear-groups",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
                "--unix-socket",
            ])
            .arg(&sock)
            .arg(format!("http://proxy{EXTENSION}"))
            .output()
    };
    let outsider = curl_as("65534").await.expect("setpriv and curl (util-linux, curl)");
    assert_eq!(outsider.status.code(), Some(7), "curl as nobody:nogroup must fail to connect");
    let member = curl_as("0").await.expect("setpriv and curl");
    assert_eq!(String::from_utf8_lossy(&member.stdout), "200", "{member:?}");
}

#[tokio::test]
async fn loopback_tcp_proxy_works() {
    let w = World::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _d = started(&w, &format!("listen = \"127.0.0.1:{port}\"")).await;
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{EXTENSION}")).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn proxy_metrics_count_requests_by_class() {
    let w = World::new().await;
    let prelude = format!("[metrics]\ntextfile = \"{}\"", w.path("metrics.prom").display());
    write_proxy_config(&w, &TokenSpec::new("main"), &prelude, &unix_proxy(&w));
    let d = w.daemon();
    d.wait_ready().await;
    let c = client(&w.path("main.sock"));
    for _ in 0..3 {
        assert_eq!(c.get(format!("http://proxy{EXTENSION}")).send().await.unwrap().status(), 200);
    }
    assert_eq!(c.get("http://proxy/restapi/v1.0/nothing-here").send().await.unwrap().status(), 404);
    // The textfile is rewritten on the next refresh.
    d.signal(libc::SIGUSR1);
    wait_until("proxy metrics in the textfile", T, || {
        let text = std::fs::read_to_string(w.path("metrics.prom")).unwrap_or_default();
        text.contains("tokend_proxy_requests_total{token=\"main\",class=\"2xx\"} 3")
            && text.contains("tokend_proxy_requests_total{token=\"main\",class=\"4xx\"} 1")
            && text.contains("tokend_proxy_replays_total{token=\"main\"} 0")
    })
    .await;
}

/// The README's recipes: the official JS and Python SDKs with `server` = the proxy, calling
/// with no pause while the daemon rotates the token every second over a 100 ms round trip.
#[tokio::test]
async fn official_js_and_python_sdks_call_through_the_proxy_across_rotations() {
    let python = crate::interop::python();
    let node_sdk = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/node/node_modules/@ringcentral/sdk"
    ))
    .exists();
    crate::harness::require(node_sdk, "examples/node/node_modules is missing");
    let w = World::with(crate::rotation::wan_fake()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = TokenSpec::new("main").schedule("* * * * * *");
    write_proxy_config(&w, &spec, "", &format!("listen = \"127.0.0.1:{port}\""));
    let d = w.daemon();
    d.wait_ready().await;
    let url = format!("http://127.0.0.1:{port}");
    let ex = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut jobs = Vec::new();
    {
        let py = python;
        let args = vec![format!("{ex}/python/sdk_proxy.py"), url.clone(), "id".into(), "6".into()];
        jobs.push(("python sdk", tokio::spawn(sdk_run(py.display().to_string(), args))));
    }
    {
        let args = vec![
            format!("{ex}/node/ringcentral-sdk-proxy.js"),
            url.clone(),
            "id".into(),
            "6".into(),
        ];
        jobs.push(("js sdk", tokio::spawn(sdk_run("node".into(), args))));
    }
    let start = w.generation("main");
    for (name, job) in jobs {
        let summary = job.await.unwrap();
        eprintln!("{name} through the proxy: {summary}");
        assert_eq!(summary["failed"], 0, "{name}: {summary}");
        assert!(summary["ok"].as_u64().unwrap() > 20, "{name}: {summary}");
    }
    assert!(w.generation("main") >= start + 3, "too few rotations during the run");
    assert_no_token_in(&w, &d.output());
}

async fn sdk_run(program: String, args: Vec<String>) -> serde_json::Value {
    let out = tokio::process::Command::new(&program).args(&args).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}
