//! What the daemon gives each token's task, in either mode (a `Refresher` on one host, the
//! cluster's candidate and mirror with `--features etcd`): commands, the resources all tokens
//! share, and a `CancellationToken` to stop it — the one way anything in tokend is stopped.

use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use std::sync::Arc;

pub use tokio_util::sync::CancellationToken;

/// What the daemon tells a token's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A cron tick: refresh after this token's jitter.
    Tick,
    /// SIGUSR1: refresh now.
    RefreshNow,
    /// The wall clock jumped: recompute the wall-clock deadline.
    Recheck,
}

/// What all token tasks of a daemon share.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Bounds token requests in flight across all tokens.
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Bounds the refreshers starting up at once (`start_ups`).
    pub start_ups: Arc<tokio::sync::Semaphore>,
    /// One HTTP client (connection pool, TLS config) for every token.
    pub client: OAuthClient,
    /// This token's proxy gate, when it has `[[token.proxy]]`s (set per token by the daemon).
    pub gate: Option<Arc<crate::proxy::Gate>>,
}

/// Refreshers starting up at once beyond the token requests' bound. A start-up's future
/// (loading the state, the login, the writes) is about 3 kB; 10,000 of them allocated at once,
/// each beside its token's long-lived data, left 10,000 holes of 3 kB behind (28 MB of the
/// 101 MB heap at 10,000 tokens, in glibc's `malloc_info`) that no trim can hand back. A
/// few hundred at a time reuse each other's memory, and still keep the requests' bound and
/// the write pool (`store::MAX_WRITES`) busy.
pub const START_UPS_BEYOND_REQUESTS: usize = 2 * crate::store::MAX_WRITES;

/// A fault for tests, set by `TOKEND_TEST_TASK_FAULT=panic:NAME[:COUNT]` or `exit:NAME[:COUNT]`
/// (debug builds only; release builds ignore it): the task of token NAME panics, or returns as
/// if it had nothing left to do, at its next COUNT wake-ups (default 1). Since the overflow
/// panics of issue 17 are fixed no input makes a task die, yet the supervisor that catches one
/// (`supervise.rs`) must be tested through the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(debug_assertions), allow(dead_code, reason = "release builds have no test faults"))]
pub enum TestFault {
    Exit,
}

/// Applies the test fault of token `name`, if one is set and left: panics, or returns
/// `Some(TestFault::Exit)` when the task must return.
#[cfg(debug_assertions)]
pub fn test_fault(name: &str) -> Option<TestFault> {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static FAULT: LazyLock<Option<(bool, String, AtomicU32)>> = LazyLock::new(|| {
        let v = std::env::var("TOKEND_TEST_TASK_FAULT").ok()?;
        let mut parts = v.split(':');
        let panic = match parts.next()? {
            "panic" => true,
            "exit" => false,
            _ => return None,
        };
        let name = parts.next()?.to_string();
        let count = parts.next().map_or(Some(1), |c| c.parse().ok())?;
        Some((panic, name, AtomicU32::new(count)))
    });
    let (panic, token, left) = FAULT.as_ref()?;
    if token != name
        || left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1)).is_err()
    {
        return None;
    }
    assert!(!panic, "TOKEND_TEST_TASK_FAULT: token {name}'s task panics here (a test-only fault)");
    Some(TestFault::Exit)
}

/// Release builds have no test faults.
#[cfg(not(debug_assertions))]
pub fn test_fault(_name: &str) -> Option<TestFault> {
    None
}
