//! The client connections' idle timeout: a connection on which no request is in progress, and
//! none started or ended for a whole check interval, is closed at the next check. It replaces
//! hyper's header read timeout, which armed and cancelled a timer (a boxed sleep in the
//! runtime's timer wheel) for every request; this arms one per connection per interval. It
//! closes both an idle keep-alive connection and one whose request head dribbles in (a
//! slowloris client), as hyper's did, and never a request in progress (a long download).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// What the check sees of a connection. Atomics only because a connection's task must be
/// `Send`: a connection lives on one thread, so they are never contended.
#[derive(Default)]
pub struct Activity {
    /// Requests in progress: from the head's arrival to the end of the answer's body.
    busy: AtomicUsize,
    /// Grows whenever a request starts or ends.
    moves: AtomicU64,
}

impl Activity {
    /// A request starts (its head is in).
    pub fn begin(&self) {
        self.busy.fetch_add(1, Relaxed);
        self.moves.fetch_add(1, Relaxed);
    }

    /// A request ends (its answer is written, or the client went away).
    pub fn end(&self) {
        self.busy.fetch_sub(1, Relaxed);
        self.moves.fetch_add(1, Relaxed);
    }

    /// Waits until the connection has been idle for at least `every` (at most twice that):
    /// checked every `every`, it is idle once no request was in progress at a check and none
    /// started or ended since the check before.
    pub async fn idle(&self, every: Duration) {
        let start = tokio::time::Instant::now() + every;
        let mut check = tokio::time::interval_at(start, every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = self.moves.load(Relaxed);
        loop {
            check.tick().await;
            let now = self.moves.load(Relaxed);
            if now == seen && self.busy.load(Relaxed) == 0 {
                return;
            }
            seen = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// Bounded: a check that never says idle fails the test instead of hanging it.
    async fn idle_within_30_s(a: &Activity, every: Duration) {
        tokio::time::timeout(Duration::from_secs(30), a.idle(every)).await.expect("never idle");
    }

    #[tokio::test]
    async fn idle_only_after_a_whole_interval_without_a_request() {
        let every = Duration::from_millis(100);
        let a = Arc::new(Activity::default());
        let started = Instant::now();
        idle_within_30_s(&a, every).await;
        assert!(started.elapsed() >= every, "an unused connection: idle before the first check");

        // A request in progress across many checks (a long download) is never idle.
        a.begin();
        let long = tokio::time::timeout(every * 5, a.idle(every)).await;
        assert!(long.is_err(), "idle with a request in progress");
        // Once it ends, a whole interval passes before the connection is idle.
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { idle_within_30_s(&a, every).await }
        });
        tokio::time::sleep(every / 2).await;
        let ended = Instant::now();
        a.end();
        waiting.await.unwrap();
        assert!(ended.elapsed() >= every, "idle less than an interval after the request");
    }

    /// Requests more often than the interval keep the connection (2 s: a loaded machine may
    /// stall a 100 ms sleep, not by that much).
    #[tokio::test]
    async fn requests_keep_a_connection() {
        let every = Duration::from_secs(2);
        let a = Arc::new(Activity::default());
        let calls = async {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.begin();
                a.end();
            }
        };
        tokio::select! {
            () = a.idle(every) => panic!("closed while used"),
            () = calls => {}
        }
    }
}
