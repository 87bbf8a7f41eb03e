//! `tokend token` and `tokend watch`: the reader side for shells and other languages.

use crate::watch::{Mode, ReadError, Token, TokenWatcher, read_sink};
use chrono::Utc;
use std::path::Path;
use std::time::Duration;

/// Non-secret facts about a token, as `tokend token --json` and `tokend watch` show them.
pub fn describe(token: &Token) -> serde_json::Value {
    let now = Utc::now();
    serde_json::json!({
        "generation": token.generation,
        "expires_at": token.expires_at.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "expires_in": token.expires_at.map(|e| (e - now).num_seconds()),
        "token_type": token.token_type,
        "fingerprint": token.fingerprint(),
    })
}

/// One line for `tokend watch`.
pub fn line(token: &Token) -> String {
    let now = Utc::now();
    let generation = token.generation.map_or_else(|| "-".into(), |g| g.to_string());
    let expires = token
        .expires_at
        .map_or_else(|| "-".into(), |e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let left = token.expires_at.map_or_else(|| "-".into(), |e| crate::time::left(e, now));
    format!(
        "generation={generation} expires_at={expires} expires_in=\"{left}\" fingerprint={}",
        token.fingerprint()
    )
}

/// `tokend token PATH`: the access token, or a one-line reason. Expired tokens are refused.
pub fn token(path: &Path, json: bool) -> Result<String, String> {
    let token = read_sink(path).map_err(|e| e.to_string())?;
    if token.is_expired(Utc::now()) {
        let at = token
            .expires_at
            .map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        return Err(format!(
            "{}: token expired at {at} (is tokend running? see `tokend status`)",
            path.display()
        ));
    }
    Ok(if json { describe(&token).to_string() } else { token.access_token.expose().to_string() })
}

/// Options of `tokend watch`.
pub struct WatchOptions<'a> {
    pub path: &'a Path,
    pub command: &'a [String],
    pub poll: Option<Duration>,
    /// Stop after this many changes (the first token read counts as one).
    pub count: Option<u64>,
}

/// `tokend watch`: a line (or a command run) per change. Commands never overlap: changes
/// that arrive while one runs collapse into one run with the newest token.
pub async fn watch(opts: WatchOptions<'_>) -> Result<(), String> {
    let mode = opts.poll.map_or(Mode::Notify, Mode::Poll);
    let mut watcher = TokenWatcher::with_mode(opts.path, mode)
        .map_err(|e| format!("{}: {e}", opts.path.display()))?;
    // A FIFO, a device or a directory never becomes a sink: say so and stop, not wait.
    if let Some(e @ ReadError::Io { .. }) = watcher.last_error()
        && std::fs::metadata(opts.path).is_ok_and(|m| !m.is_file())
    {
        return Err(e.to_string());
    }
    let mut seen = 0u64;
    let mut next = watcher.current();
    let mut reported = None;
    loop {
        let token = match next.take() {
            Some(t) => t,
            None => next_token(&mut watcher, &mut reported).await?,
        };
        seen += 1;
        if opts.command.is_empty() {
            use std::io::Write;
            // A closed pipe (the reader went away) ends the watch quietly.
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{}", line(&token)).and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        } else {
            run(opts.command, &token).await;
        }
        if opts.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}

/// Waits for the next token; meanwhile says on stderr (once per new reason) why the file
/// gives none, so that a watch of the wrong file is not silent.
async fn next_token(
    watcher: &mut TokenWatcher,
    reported: &mut Option<ReadError>,
) -> Result<std::sync::Arc<Token>, String> {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        // A missing file is normal before the daemon's first write.
        let error = watcher.last_error().filter(|e| !matches!(e, ReadError::Missing { .. }));
        if error.is_some() && error != *reported {
            if let Some(e) = &error {
                eprintln!("tokend watch: waiting: {e}");
            }
            reported.clone_from(&error);
        }
        tokio::select! {
            t = watcher.changed() => {
                *reported = None;
                return t.ok_or_else(|| "watcher stopped".to_string());
            }
            _ = every.tick() => {}
        }
    }
}

async fn run(command: &[String], token: &Token) {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("TOKEND_ACCESS_TOKEN", token.access_token.expose())
        .env("TOKEND_FINGERPRINT", token.fingerprint());
    if let Some(g) = token.generation {
        cmd.env("TOKEND_GENERATION", g.to_string());
    }
    if let Some(e) = token.expires_at {
        cmd.env("TOKEND_EXPIRES_AT", e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    match cmd.status().await {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("tokend watch: {} exited with {s}", command[0]),
        Err(e) => eprintln!("tokend watch: cannot run {}: {e}", command[0]),
    }
}
