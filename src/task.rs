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
    /// One HTTP client (connection pool, TLS config) for every token.
    pub client: OAuthClient,
    /// This token's proxy gate, when it has `[[token.proxy]]`s (set per token by the daemon).
    pub gate: Option<Arc<crate::proxy::Gate>>,
}
