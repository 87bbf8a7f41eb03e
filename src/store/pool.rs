//! Durable writes off the async worker threads: a bounded pool of blocking threads.
//!
//! An fsync can take seconds on a busy or failing disk. Run on a runtime worker it would stall
//! every token, the signal handling and the systemd watchdog ping behind it (a 2-core machine
//! has two workers), and it would serialize a refresh round of 10,000 tokens on those two
//! threads instead of letting the disk's queue take many writes at once. Here each write runs
//! on tokio's blocking pool, at most `MAX_WRITES` at a time across the daemon.

use std::sync::LazyLock;
use tokio::sync::Semaphore;

/// Durable writes in flight at once: enough for a disk's queue to merge many fsyncs into few
/// journal commits, few enough that a crawling disk does not gather thousands of blocked
/// threads.
pub const MAX_WRITES: usize = 64;

static WRITES: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(MAX_WRITES));

/// Runs `write` (file I/O, fsync) on a blocking thread once one of the `MAX_WRITES` slots is
/// free, and returns its result. The caller's task waits; the runtime's workers do not.
pub async fn blocking<T, F>(write: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _slot = WRITES.acquire().await.expect("the write semaphore is never closed");
    match tokio::task::spawn_blocking(write).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
