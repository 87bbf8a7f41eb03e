//! The client connections' idle timeout: a connection on which no request is in progress, and
//! none started or ended for a whole check interval, is closed at the next check. It replaces
//! hyper's header read timeout, which armed and cancelled a timer (a boxed sleep in the
//! runtime's timer wheel) for every request; this arms one per connection per interval. It
//! closes both an idle keep-alive connection and one whose request head dribbles in (a
//! slowloris client), as hyper's did, and never a request in progress (a long download).

use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

/// What the check sees of a connection. Atomics only because hyper's connection must be
/// `Send`: a connection lives on one thread, so they are never contended.
#[derive(Default)]
pub struct Activity {
    /// Requests in progress: from the head's arrival to the end (or drop) of the answer's body.
    busy: AtomicUsize,
    /// Grows whenever a request starts or ends.
    moves: AtomicU64,
}

impl Activity {
    /// A request starts; it ends when the returned guard drops.
    pub fn start(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Relaxed);
        self.moves.fetch_add(1, Relaxed);
        Busy(self.clone())
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

/// A request in progress.
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
        self.0.moves.fetch_add(1, Relaxed);
    }
}

/// An answer's body that keeps its request in progress until hyper has written it whole (or
/// dropped it: the client went away).
pub struct Tracked<B> {
    pub body: B,
    pub _busy: Busy,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let busy = a.start();
        let long = tokio::time::timeout(every * 5, a.idle(every)).await;
        assert!(long.is_err(), "idle with a request in progress");
        // Once it ends, a whole interval passes before the connection is idle.
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { idle_within_30_s(&a, every).await }
        });
        tokio::time::sleep(every / 2).await;
        let ended = Instant::now();
        drop(busy);
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
                drop(a.start());
            }
        };
        tokio::select! {
            () = a.idle(every) => panic!("closed while used"),
            () = calls => {}
        }
    }
}
