//! `tokend login` end to end against the fake server's authorize endpoint, with the test as
//! the browser: alone, pasted, and with a daemon already running that adopts the new state.

use crate::harness::{BIN, TokenSpec, World};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const T: Duration = Duration::from_secs(20);

fn code_token() -> TokenSpec {
    TokenSpec::new("code").grant("grant = \"authorization_code\"")
}

pub(crate) type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts `tokend login`, returns the child, its stdout and the authorize URL it printed.
async fn start_login(w: &World, extra: &[&str]) -> ((tokio::process::Child, Lines), String) {
    start_login_on(&w.config_path(), "code", extra).await
}

/// The same for any config and token.
pub(crate) async fn start_login_on(
    config: &std::path::Path,
    token: &str,
    extra: &[&str],
) -> ((tokio::process::Child, Lines), String) {
    let mut child = tokio::process::Command::new(BIN)
        .args(["login", "--config", config.to_str().unwrap(), "--token", token])
        .args(["--timeout", "30"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env("PATH", "/nonexistent") // no xdg-open: the test is the browser
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(T, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("login printed no URL");
            if let Some(u) = line.trim().strip_prefix("http") {
                return format!("http{u}");
            }
        }
    })
    .await
    .unwrap();
    ((child, lines), url)
}

pub(crate) async fn finish((mut child, mut lines): (tokio::process::Child, Lines)) -> String {
    let mut out = String::new();
    tokio::time::timeout(T, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            out.push_str(&l);
            out.push('\n');
        }
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(T, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "login failed: {out}");
    out
}

#[tokio::test]
async fn login_through_the_loopback_redirect_writes_the_state() {
    let w = World::new().await;
    w.write_config(&[code_token()]);
    let (child, url) = start_login(&w, &[]).await;
    assert!(
        url.contains("code_challenge_method=S256")
            && url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"),
        "{url}"
    );
    // The browser: the fake server approves at once and redirects to the loopback listener.
    let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(page.contains("authorized"), "{page}");
    let out = finish(child).await;
    assert!(out.contains("state written"), "{out}");
    let state = w.state("code");
    assert_eq!(state.generation, 1);
    assert!(state.refresh_token.is_some());
    assert_eq!(w.stats().logins_by_grant["authorization_code"], 1);
}

/// `tokend login` reads only its own token's secrets: another token's JWT that exists only
/// inside the unit (a systemd credential) does not stop it; its own missing client secret
/// stops it with the key named and the systemd-run line to use instead.
#[tokio::test]
async fn login_reads_only_its_own_tokens_secrets() {
    let w = World::new().await;
    let unit_only = TokenSpec::new("main").grant("grant = \"jwt\"\njwt = { credential = \"jwt\" }");
    w.write_config(&[unit_only, code_token()]);
    let (child, url) = start_login(&w, &[]).await;
    reqwest::get(&url).await.unwrap();
    assert!(finish(child).await.contains("state written"));
    assert_eq!(w.state("code").generation, 1);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    let own = text.replacen(
        &format!("client_secret = \"{}\"", crate::harness::CLIENT_SECRET),
        "client_secret = { credential = \"client_secret\" }",
        2,
    );
    std::fs::write(w.config_path(), own).unwrap();
    let out = crate::harness::tokend(&[
        "login",
        "--config",
        w.config_path().to_str().unwrap(),
        "--token",
        "code",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("key `token \"code\".client_secret`") && err.contains("systemd-run"),
        "{err}"
    );
}

#[tokio::test]
async fn login_accepts_a_pasted_redirect_url_without_a_browser() {
    let w = World::new().await;
    w.write_config(&[code_token()]);
    let ((mut child, lines), url) = start_login(&w, &["--no-browser"]).await;
    let http =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = http.get(&url).send().await.unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"not a code at all\n").await.unwrap();
    stdin.write_all(format!("{location}\n").as_bytes()).await.unwrap();
    finish((child, lines)).await;
    assert_eq!(w.state("code").generation, 1);
}

#[tokio::test]
async fn a_running_daemon_adopts_the_login_without_a_restart() {
    let w = World::new().await;
    w.write_config(&[code_token()]);
    let mut d = w.daemon();
    d.wait_ready().await;
    assert!(d.output().contains("needs login"));
    assert!(w.sink("code").is_none());
    let (child, url) = start_login(&w, &[]).await;
    reqwest::get(&url).await.unwrap();
    let out = finish(child).await;
    assert!(out.contains(&format!("pid {}", d.pid())), "{out}");
    w.wait_generation("code", 1, T).await;
    crate::harness::wait_until("the hand-off file to go once persisted", T, || {
        !w.path("code.state.json.login").exists()
    })
    .await;
    d.wait_log("adopted a new login", 1, T).await;
    // The chain continues from the adopted state.
    d.signal(libc::SIGUSR1);
    w.wait_generation("code", 2, T).await;
    let stats = w.stats();
    assert_eq!((stats.logins, stats.refreshes), (1, 1));
    assert!(d.stop().await.success());
}

/// Issue 14: `tokend login` for providers other than RingCentral, the test as the browser.
/// Google's authorize endpoint is its own, with the parameters without which Google issues no
/// refresh token; the browser is sent on to the fake's with the query tokend built. Okta's is
/// derived from the tenant's token URL. Then the daemon refreshes from the login's state.
#[tokio::test]
async fn login_for_google_and_okta_gets_a_refresh_token_the_daemon_uses() {
    let cases = [
        ("google", "/restapi/oauth", "https://accounts.google.com/o/oauth2/v2/auth"),
        ("okta", "/oauth2/default/v1", "{fake}/oauth2/default/v1/authorize"),
    ];
    for (provider, base, authorize) in cases {
        let fake = tokend::fake::FakeConfig::for_tests().with_provider(provider).unwrap();
        let w = World::with(fake).await;
        let fake = w.server.url();
        let spec = code_token()
            .extra(&format!("provider = \"{provider}\""))
            .extra(&format!("token_url = \"{fake}{base}/token\""));
        w.write_config(&[spec]);
        let (child, url) = start_login(&w, &[]).await;
        let (endpoint, query) = url.split_once('?').unwrap();
        assert_eq!(endpoint, authorize.replace("{fake}", &fake), "{provider}");
        if provider == "google" {
            assert!(query.contains("access_type=offline&prompt=consent"), "{url}");
        }
        let page = reqwest::get(format!("{fake}{base}/authorize?{query}")).await.unwrap();
        assert!(page.text().await.unwrap().contains("authorized"), "{provider}");
        assert!(finish(child).await.contains("state written"), "{provider}");
        let login = w.state("code").refresh_token.expect("a refresh token").expose().to_string();
        let mut d = w.daemon();
        d.wait_ready().await;
        d.signal(libc::SIGUSR1);
        w.wait_generation("code", 2, T).await;
        assert!(d.stop().await.success(), "{provider}");
        let stats = w.stats();
        assert_eq!((stats.logins_by_grant["authorization_code"], stats.refreshes), (1, 1));
        assert!(stats.rejected.is_empty(), "{provider}: {stats:?}");
        let held = w.state("code").refresh_token.unwrap().expose().to_string();
        assert_eq!(held == login, provider == "google", "{provider}: rotation as the provider's");
        eprintln!("{provider}: tokend login, then a refresh: {stats:?}");
    }
}

#[tokio::test]
async fn login_refuses_tokens_that_log_in_by_themselves() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let out = crate::harness::tokend(&[
        "login",
        "--config",
        w.config_path().to_str().unwrap(),
        "--token",
        "main",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("logs in by itself"));
    let out = crate::harness::tokend(&[
        "login",
        "--config",
        w.config_path().to_str().unwrap(),
        "--token",
        "nope",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens: main"));
}
