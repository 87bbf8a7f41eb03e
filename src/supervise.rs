//! A token's task that dies is never silent: a panic or an unexpected return of its task (a
//! `Refresher` on one host, the cluster's candidate and mirror) is caught, logged at ERROR,
//! counted (`tokend_task_restarts_total`), shown by `tokend status` as unhealthy, and the task
//! is started again after a backoff. Before this a panic left the daemon running, `status`
//! saying OK and the token silently expiring (issue 17 #1).

use crate::config::TokenConfig;
use crate::refresher::Refresher;
use crate::store::{Status, TaskFailure, blocking};
use crate::task::{CancellationToken, Commands, Shared};
use chrono::Utc;
use futures_util::FutureExt;
use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, info};

/// The first restart waits this long, doubling up to `RESTART_MAX`: a task that dies at once
/// each time must not spin a core or flood the log.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(300);

/// A task that ran this long before dying starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(600);

/// How a token's task runs: alone, or as part of a cluster.
#[derive(Clone)]
pub enum Mode {
    Single,
    #[cfg(feature = "etcd")]
    Cluster(crate::cluster::Cluster),
}

/// Runs the token's task until `stop`, restarting it whenever it dies before. `ready` fires
/// once the first run has published (or reported its failure), or when it dies first.
pub async fn run(
    cfg: Arc<TokenConfig>,
    shared: Shared,
    mode: Mode,
    mut commands: Commands,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let ready = ready.take().unwrap_or_else(|| oneshot::channel().0);
        let task = once(&cfg, &shared, &mode, &mut commands, &stop, ready);
        let outcome = AssertUnwindSafe(task).catch_unwind().await;
        if stop.is_cancelled() {
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures += 1;
        let delay =
            crate::policy::backoff(failures, RESTART_INITIAL, RESTART_MAX, None, rand::random());
        // Boxed: inline, its status write would sit in every token's idle task (500 bytes).
        Box::pin(died(&cfg, &shared, &reason(outcome.err()), delay)).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        info!(token = %cfg.name, "restarting the token's task");
    }
}

/// One run of the token's task.
async fn once(
    cfg: &Arc<TokenConfig>,
    shared: &Shared,
    mode: &Mode,
    commands: &mut Commands,
    stop: &CancellationToken,
    ready: oneshot::Sender<()>,
) {
    match mode {
        Mode::Single => {
            let start_ups = shared.start_ups.clone();
            let refresher = Refresher::new(cfg.clone(), shared.clone());
            Box::pin(refresher.run(commands, stop.clone(), ready, start_ups)).await;
        }
        #[cfg(feature = "etcd")]
        Mode::Cluster(cluster) => {
            let (cfg, shared, cluster) = (cfg.clone(), shared.clone(), cluster.clone());
            Box::pin(crate::cluster::run_token(
                cfg,
                shared,
                cluster,
                commands,
                stop.clone(),
                ready,
            ))
            .await;
        }
    }
}

/// What ended the task: the panic's message, or a return before `stop`. Only the message, with
/// control characters escaped and cut short: it is logged and shown by `tokend status`.
fn reason(panic: Option<Box<dyn Any + Send>>) -> String {
    let Some(payload) = panic else { return "returned unexpectedly".into() };
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    let short: String = message.chars().take(300).collect();
    format!("panicked: {}", crate::text::escape_controls(&short))
}

/// Reports the death: ERROR log, metrics, the status file. Opens the proxies' gate, which a
/// task that died during a refresh left closed.
async fn died(cfg: &TokenConfig, shared: &Shared, reason: &str, delay: Duration) {
    let now = Utc::now();
    let mut record = None;
    shared.metrics.update(&cfg.name, |m| {
        let restarts = m.task.as_ref().map_or(0, |t| t.restarts) + 1;
        let restart_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
        m.task =
            Some(Box::new(TaskFailure { restarts, at: now, reason: reason.into(), restart_at }));
        record.clone_from(&m.task);
    });
    let restarts = record.as_ref().map_or(0, |t| t.restarts);
    error!(token = %cfg.name, reason, restarts, restart_in_ms = delay.as_millis() as u64, "the token's task died; restarting it");
    if let Some(gate) = &shared.gate {
        gate.open();
    }
    let path = cfg.state_file.clone();
    let saved = blocking(move || {
        let mut status = Status::load(&path).unwrap_or_default();
        (status.task, status.pid) = (record, std::process::id());
        status.save(&path)
    })
    .await;
    if let Err(e) = saved {
        error!(token = %cfg.name, error = %e, "cannot write status file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_message_escaped_and_short() {
        assert_eq!(reason(None), "returned unexpectedly");
        assert_eq!(reason(Some(Box::new("boom"))), "panicked: boom");
        let long = format!("a\nb{}", "x".repeat(1000));
        let r = reason(Some(Box::new(long)));
        assert!(r.starts_with(r"panicked: a\nb") && r.len() < 320, "{r}");
        assert_eq!(reason(Some(Box::new(42))), "panicked: a panic without a message");
    }

    /// Each token's task is this future (its refresher boxed apart): 10,000 of them must fit
    /// in the 64 MB the daemon is allowed.
    #[test]
    fn a_tokens_supervised_task_holds_no_refresher() {
        let (cfg, shared) = crate::task::test_token();
        let (_tx, rx) = crate::task::commands();
        let stop = CancellationToken::new();
        let task = run(cfg, shared, Mode::Single, rx, stop, oneshot::channel().0);
        let size = std::mem::size_of_val(&task);
        assert!(size < 512, "the supervised task's future is {size} bytes");
    }
}
