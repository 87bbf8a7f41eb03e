//! The optional `on_refresh` command: run after the sinks are written, with facts about the
//! new token in its environment (never the token itself), bounded by a timeout.

use crate::config::{Hook, TokenConfig};
use crate::store::State;
use std::process::Stdio;
use tracing::{info, warn};

/// Starts the hook in the background; its failure is logged and never affects the refresh.
pub fn spawn(hook: Hook, cfg: &TokenConfig, state: &State) {
    let sinks =
        std::env::join_paths(cfg.sinks.iter().map(|s| s.path.as_os_str())).unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&hook.argv[0]);
    cmd.args(&hook.argv[1..])
        .env("TOKEND_TOKEN_NAME", &cfg.name)
        .env("TOKEND_GENERATION", state.generation.to_string())
        .env(
            "TOKEND_EXPIRES_AT",
            state.access_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
        .env("TOKEND_SINKS", sinks)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let name = cfg.name.clone();
    let generation = state.generation;
    tokio::spawn(async move {
        let program = hook.argv[0].clone();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                warn!(token = %name, hook = %program, error = %e, "on_refresh hook could not start");
                return;
            }
        };
        match tokio::time::timeout(hook.timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => {
                info!(token = %name, generation, hook = %program, "on_refresh hook done");
            }
            Ok(Ok(status)) => {
                warn!(token = %name, generation, hook = %program, %status, "on_refresh hook failed");
            }
            Ok(Err(e)) => {
                warn!(token = %name, hook = %program, error = %e, "on_refresh hook: wait failed");
            }
            Err(_) => {
                let _ = child.kill().await;
                warn!(token = %name, generation, hook = %program, timeout_ms = hook.timeout.as_millis() as u64, "on_refresh hook timed out and was killed");
            }
        }
    });
}
