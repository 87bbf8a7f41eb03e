//! A token's task that dies is never silent: a panic or an unexpected return of its task (a
//! `Refresher` on one host, the cluster's candidate and mirror) is caught, logged at ERROR,
//! counted (`tokend_task_restarts_total`), shown by `tokend status` as unhealthy, and the task
//! is started again after a backoff. Before this a panic left the daemon running, `status`
//! saying OK and the token silently expiring (issue 17 #1).

use crate::config::TokenConfig;
use crate::refresher::Refresher;
use crate::store::{LockError, StateLock, Status, TaskFailure, blocking};
use crate::task::{CancellationToken, Commands, Shared};
use chrono::Utc;
use futures_util::FutureExt;
use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
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

/// A token's lock (one refresher per token) as its task starts.
pub enum Lock {
    /// Taken before the task started: a reload takes the locks of the tokens it starts before
    /// it stops anything.
    Held(StateLock),
    /// Taken by the task itself as it starts up, beside the other tokens' start-ups: at a first
    /// start of 10,000 tokens, creating their lock files one after another before any token
    /// started took 1 s on a quiet machine and 8-10 s on a loaded one. Another tokend holding it
    /// is sent to the daemon through `refused`, which then stops and exits, naming it; no token
    /// whose lock is refused sends anything. Then the temp files a killed writer left beside
    /// the token's files (`leftovers`, found by the daemon's one scan of each directory) are
    /// removed: only the lock's holder may.
    Take { leftovers: Vec<PathBuf>, refused: mpsc::UnboundedSender<LockError> },
}

/// Runs the token's task until `stop`, restarting it whenever it dies before. `ready` fires
/// once the first run has published (or reported its failure), or when it dies first. Returns
/// the token's lock, for a successor on the same state file to take over; none if it was
/// refused (the task then only waits for `stop`).
pub async fn run(
    cfg: Arc<TokenConfig>,
    shared: Shared,
    mode: Mode,
    mut commands: Commands,
    stop: CancellationToken,
    mut lock: Lock,
    ready: oneshot::Sender<()>,
) -> Option<StateLock> {
    let mut ready = Some(ready);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let ready = ready.take().unwrap_or_else(|| oneshot::channel().0);
        let task = once(&cfg, &shared, &mode, &mut commands, &stop, &mut lock, ready);
        let outcome = AssertUnwindSafe(task).catch_unwind().await;
        match (stop.is_cancelled(), lock) {
            (true, Lock::Held(held)) => return Some(held),
            (true, Lock::Take { .. }) => return None,
            (false, Lock::Take { .. }) if matches!(outcome, Ok(())) => {
                stop.cancelled().await;
                return None;
            }
            (false, l) => lock = l,
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
            () = stop.cancelled() => return held(lock),
            () = tokio::time::sleep(delay) => {}
        }
        info!(token = %cfg.name, "restarting the token's task");
    }
}

fn held(lock: Lock) -> Option<StateLock> {
    match lock {
        Lock::Held(held) => Some(held),
        Lock::Take { .. } => None,
    }
}

/// Takes the token's lock unless it is held already, on the write pool (at a first start it is
/// a new file). False when another tokend holds it: the refusal is sent to the daemon, and
/// `lock` stays `Take` (with nothing left to remove).
async fn take_lock(cfg: &TokenConfig, lock: &mut Lock) -> bool {
    let Lock::Take { leftovers, refused } = lock else { return true };
    let (path, leftovers) = (cfg.state_file.clone(), std::mem::take(leftovers));
    let taken = blocking(move || {
        let held = StateLock::acquire(&path)?;
        for temp in leftovers {
            let _ = std::fs::remove_file(temp);
        }
        Ok(held)
    })
    .await;
    match taken {
        Ok(held) => {
            *lock = Lock::Held(held);
            true
        }
        Err(e) => {
            let _ = refused.send(e);
            false
        }
    }
}

/// A refresher's turn among those starting up at once (`task::START_UPS_BEYOND_REQUESTS`), with
/// its lock held: the lock is taken within that turn, so that taking the locks goes on beside
/// the first tokens' logins and writes. None when the lock is refused or the daemon stops
/// first (the daemon stopping after a refusal does not start up the others).
async fn turn(
    cfg: &TokenConfig,
    shared: &Shared,
    stop: &CancellationToken,
    lock: &mut Lock,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let starting = tokio::select! {
        permit = shared.start_ups.clone().acquire_owned() => permit.expect("never closed"),
        () = stop.cancelled() => return None,
    };
    (take_lock(cfg, lock).await && !stop.is_cancelled()).then_some(starting)
}

/// One run of the token's task, once its lock is held; returns at once if it is refused.
async fn once(
    cfg: &Arc<TokenConfig>,
    shared: &Shared,
    mode: &Mode,
    commands: &mut Commands,
    stop: &CancellationToken,
    lock: &mut Lock,
    ready: oneshot::Sender<()>,
) {
    match mode {
        Mode::Single => {
            let Some(starting) = Box::pin(turn(cfg, shared, stop, lock)).await else { return };
            let refresher = Refresher::new(cfg.clone(), shared.clone());
            Box::pin(refresher.run(commands, stop.clone(), ready, starting)).await;
        }
        #[cfg(feature = "etcd")]
        Mode::Cluster(cluster) => {
            if !Box::pin(take_lock(cfg, lock)).await || stop.is_cancelled() {
                return;
            }
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
        let lock = Lock::Take { leftovers: Vec::new(), refused: mpsc::unbounded_channel().0 };
        let task = run(cfg, shared, Mode::Single, rx, stop, lock, oneshot::channel().0);
        let size = std::mem::size_of_val(&task);
        assert!(size < 512, "the supervised task's future is {size} bytes");
    }
}
