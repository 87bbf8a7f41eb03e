//! `tokend login`: the interactive authorization-code bootstrap, with PKCE and a loopback
//! redirect listener. The new state goes to the state file under the daemon's lock, or, when
//! a daemon holds the lock, to a hand-off file that the daemon adopts on SIGUSR1.

use crate::config::{Config, Grant, TokenConfig};
use crate::oauth::OAuthClient;
use crate::store::{LockError, State, StateLock, write_atomic};
use base64::Engine;
use chrono::Utc;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::sync::mpsc;

/// Options of `tokend login`.
#[derive(Debug, Clone, Copy)]
pub struct LoginOptions {
    /// Do not try to open a browser; accept a pasted code or redirect URL on stdin too.
    pub no_browser: bool,
    /// How long to wait for the user.
    pub timeout: Duration,
}

/// What happened.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    /// No daemon was running: the state file was written.
    StateWritten,
    /// A daemon holds the lock: it was handed the new state (pid named).
    HandedToDaemon(u32),
    /// Multi-host mode, no daemon running here: the state file is etcd's mirror, so the new
    /// state waits in the hand-off file, which the daemon passes to the leader when it starts.
    LeftForCluster,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Runs the whole flow for token `name`.
pub async fn login(
    config: &Config,
    name: &str,
    opts: LoginOptions,
) -> anyhow::Result<LoginOutcome> {
    let cfg = config.token(name).ok_or_else(|| {
        let names: Vec<&str> = config.tokens.iter().map(|t| t.name.as_str()).collect();
        anyhow::anyhow!(
            "no token named {name:?} in {}; tokens: {}",
            config.path.display(),
            names.join(", ")
        )
    })?;
    let Grant::AuthorizationCode { redirect_uri } = &cfg.grant else {
        anyhow::bail!(
            "token {name:?} uses grant {:?}, which logs in by itself; `tokend login` is for authorization_code",
            cfg.grant.name()
        );
    };
    let verifier = b64(&rand::random::<[u8; 32]>());
    let state = b64(&rand::random::<[u8; 16]>());
    let (tx, mut rx) = mpsc::channel::<(String, Option<String>)>(2);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let redirect = redirect_uri.clone().unwrap_or_else(|| {
        format!("http://127.0.0.1:{}/callback", listener.local_addr().map_or(0, |a| a.port()))
    });
    let server = tokio::spawn(callback_server(listener, tx.clone()));
    let url = authorize_url(cfg, &redirect, &state, &verifier);
    println!("Open this URL in a browser to authorize tokend for token \"{name}\":\n  {url}");
    if opts.no_browser {
        println!("Then paste the code, or the whole URL the browser was sent to, here:");
        spawn_stdin_reader(tx);
    } else {
        open_browser(url.as_str());
    }
    let received = tokio::time::timeout(opts.timeout, rx.recv()).await;
    server.abort();
    let (code, got_state) = received
        .map_err(|_| anyhow::anyhow!("no authorization within {}s", opts.timeout.as_secs()))?
        .ok_or_else(|| anyhow::anyhow!("login input closed"))?;
    if got_state.as_ref().is_some_and(|s| *s != state) {
        anyhow::bail!(
            "the redirect's state does not match this login (a stale or forged redirect)"
        );
    }
    let tokens = OAuthClient::new(cfg.request_timeout)?
        .exchange_code(cfg, &code, &redirect, &verifier)
        .await?;
    let previous = State::load_for(&cfg.state_file, &cfg.name).ok().flatten();
    let new = crate::store::next_state(&cfg.name, tokens, previous.as_ref(), true, Utc::now());
    store(cfg, &new, config.cluster.is_some())
}

/// Writes under the lock, or hands the state to the daemon that holds it.
fn store(cfg: &TokenConfig, state: &State, cluster: bool) -> anyhow::Result<LoginOutcome> {
    match StateLock::acquire(&cfg.state_file) {
        Ok(_lock) if cluster => {
            write_handoff(cfg, state)?;
            Ok(LoginOutcome::LeftForCluster)
        }
        Ok(_lock) => {
            state.save(&cfg.state_file)?;
            Ok(LoginOutcome::StateWritten)
        }
        Err(LockError::Held { .. }) => {
            let pid_text = std::fs::read_to_string(StateLock::path_for(&cfg.state_file))?;
            let pid: u32 = pid_text
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("the lock holder did not record its pid"))?;
            write_handoff(cfg, state)?;
            crate::signal::send(pid, crate::signal::Signal::Usr1)?;
            Ok(LoginOutcome::HandedToDaemon(pid))
        }
        Err(e) => Err(e.into()),
    }
}

/// The new state, beside the state file, for a daemon to adopt.
fn write_handoff(cfg: &TokenConfig, state: &State) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(state)?;
    write_atomic(&State::handoff_path(&cfg.state_file), &bytes, 0o600)?;
    Ok(())
}

fn authorize_url(cfg: &TokenConfig, redirect: &str, state: &str, verifier: &str) -> reqwest::Url {
    let challenge = b64(&Sha256::digest(verifier.as_bytes()));
    let (mut url, extra) = cfg.provider.authorize_url(&cfg.server, &cfg.token_url);
    url.query_pairs_mut()
        .extend_pairs(extra.iter().copied())
        .append_pair("response_type", "code")
        .append_pair("client_id", &cfg.client_id)
        .append_pair("redirect_uri", redirect)
        .append_pair("state", state)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    url
}

/// Serves the redirect: `GET /callback?code=..&state=..`.
async fn callback_server(
    listener: tokio::net::TcpListener,
    tx: mpsc::Sender<(String, Option<String>)>,
) {
    use axum::extract::Query;
    use axum::routing::get;
    use std::collections::HashMap;
    let router = axum::Router::new().route(
        "/callback",
        get(move |Query(q): Query<HashMap<String, String>>| {
            let tx = tx.clone();
            async move {
                match q.get("code") {
                    Some(code) => {
                        let _ = tx.send((code.clone(), q.get("state").cloned())).await;
                        "tokend: authorized. You can close this window.\n".to_string()
                    }
                    None => format!(
                        "tokend: authorization failed: {}\n",
                        q.get("error_description")
                            .or(q.get("error"))
                            .map_or("no code", String::as_str)
                    ),
                }
            }
        }),
    );
    let _ = axum::serve(listener, router).await;
}

/// Accepts a bare code or a redirect URL carrying `code` (and `state`) on stdin.
fn spawn_stdin_reader(tx: mpsc::Sender<(String, Option<String>)>) {
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some(found) = parse_pasted(line.trim()) {
                let _ = tx.blocking_send(found);
                return;
            }
            eprintln!(
                "tokend login: no code found in that input; paste the code or the redirect URL"
            );
            line.clear();
        }
    });
}

/// `code` and `state` from a pasted redirect URL, or a bare code.
pub fn parse_pasted(input: &str) -> Option<(String, Option<String>)> {
    if input.is_empty() {
        return None;
    }
    if let Ok(url) = reqwest::Url::parse(input) {
        let get = |k: &str| url.query_pairs().find(|(n, _)| n == k).map(|(_, v)| v.into_owned());
        return get("code").map(|c| (c, get("state")));
    }
    (!input.contains(char::is_whitespace)).then(|| (input.to_string(), None))
}

fn open_browser(url: &str) {
    let opened = ["xdg-open", "open"].iter().any(|cmd| {
        std::process::Command::new(cmd)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
    });
    if !opened {
        println!("(no browser could be opened; open the URL yourself)");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pasted;

    #[test]
    fn pasted_input() {
        assert_eq!(parse_pasted("abc123"), Some(("abc123".into(), None)));
        assert_eq!(
            parse_pasted("http://127.0.0.1:5/callback?code=x%2By&state=s"),
            Some(("x+y".into(), Some("s".into())))
        );
        assert_eq!(parse_pasted("http://127.0.0.1:5/callback?error=denied"), None);
        assert_eq!(parse_pasted("two words"), None);
        assert_eq!(parse_pasted(""), None);
    }
}
