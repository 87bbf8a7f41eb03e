//! Waiting for a termination signal (SIGTERM or SIGINT), for the foreground commands.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn signalled() {
    match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
        Ok(mut signals) => {
            signals.next().await;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers; waiting forever");
            std::future::pending::<()>().await;
        }
    }
}
