//! The hook between a token's refresher and its proxies: the current access token, and a gate
//! the refresher closes before a token request (new requests wait, those in flight finish) and
//! opens once the new token is published, so that no proxied call carries a token a refresh killed.

use crate::secret::AccessToken;
use crate::store::State;
use chrono::{DateTime, Utc};
use hyper::header::HeaderValue;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// At most one refresh per this long is asked for by 401s on the current token.
pub const FORCED_REFRESH_EVERY: Duration = Duration::from_secs(60);

/// The token the proxies send.
#[derive(Debug)]
pub struct Current {
    pub token: AccessToken,
    /// `Bearer <token>`, made once per token rather than once per request; marked sensitive
    /// (its `Debug` is redacted, HTTP/2 never indexes it). `None`: not a valid header value.
    pub auth: Option<HeaderValue>,
    pub generation: u64,
    pub expires_at: DateTime<Utc>,
}

fn bearer(token: &AccessToken) -> Option<HeaderValue> {
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose())).ok()?;
    auth.set_sensitive(true);
    Some(auth)
}

/// One token's gate, shared by its refresher (or cluster task) and all its proxies.
///
/// Admission is two atomics (a request adds itself to `in_flight`, then checks `closed`; a
/// close sets `closed`, then checks `in_flight`: sequentially consistent, one of the two sees
/// the other), so a request through an open gate takes no lock and wakes no one.
pub struct Gate {
    name: String,
    /// A refresh is about to start or running: new requests wait.
    closed: AtomicBool,
    /// Requests sent upstream whose response headers have not come back yet.
    in_flight: AtomicUsize,
    /// Woken when the gate opens (the held requests go).
    opened: Notify,
    /// Woken when the last request in flight leaves a closed gate (the drain is over).
    drained: Notify,
    current: watch::Sender<Option<Arc<Current>>>,
    drain_timeout: Duration,
    /// Asks the token's refresher for a refresh now (a 401 on the current token).
    refresh: crate::task::CommandSender,
    last_forced: Mutex<Option<Instant>>,
    pub counters: Arc<crate::metrics::ProxyCounters>,
}

/// A request admitted through the gate; the refresher's drain waits for it to drop.
pub struct Admitted {
    gate: Arc<Gate>,
    /// How long the request waited for a refresh to finish.
    pub held: Option<Duration>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl Gate {
    pub fn new(
        name: &str,
        drain_timeout: Duration,
        refresh: crate::task::CommandSender,
        counters: Arc<crate::metrics::ProxyCounters>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            closed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            opened: Notify::new(),
            drained: Notify::new(),
            current: watch::Sender::new(None),
            drain_timeout,
            refresh,
            last_forced: Mutex::new(None),
            counters,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Before a token request: stop admitting, then wait (at most `drain_timeout`) for the
    /// requests in flight, which still carry the token the request is about to kill.
    pub async fn close(&self) {
        self.closed.store(true, SeqCst);
        let drained = async {
            loop {
                let woken = self.drained.notified();
                if self.in_flight.load(SeqCst) == 0 {
                    return;
                }
                woken.await;
            }
        };
        if tokio::time::timeout(self.drain_timeout, drained).await.is_err() {
            tracing::warn!(token = %self.name, timeout_ms = self.drain_timeout.as_millis() as u64, "proxied requests still in flight at the drain timeout; refreshing anyway (a 401 among them is replayed)");
        }
    }

    /// After the attempt (published or failed): release the held requests.
    pub fn open(&self) {
        if self.closed.swap(false, SeqCst) {
            self.opened.notify_waiters();
        }
    }

    /// Makes `state`'s access token the one the proxies send (once it is durable).
    pub fn publish(&self, state: &State) {
        self.current.send_if_modified(|cur| {
            let same = cur
                .as_ref()
                .is_some_and(|c| c.generation == state.generation && c.token == state.access_token);
            if !same {
                *cur = Some(Arc::new(Current {
                    auth: bearer(&state.access_token),
                    token: state.access_token.clone(),
                    generation: state.generation,
                    expires_at: state.access_expires_at,
                }));
            }
            !same
        });
    }

    /// Waits while the gate is closed, then counts the request in flight. The wait is boxed:
    /// every request's future would otherwise carry its state.
    pub async fn admit(self: &Arc<Self>) -> Admitted {
        match self.try_admit() {
            Some(admitted) => admitted,
            None => Box::pin(self.admit_held()).await,
        }
    }

    /// Counts the request in flight if the gate is open.
    fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        self.in_flight.fetch_add(1, SeqCst);
        if self.closed.load(SeqCst) {
            self.leave();
            return None;
        }
        Some(Admitted { gate: self.clone(), held: None })
    }

    async fn admit_held(self: &Arc<Self>) -> Admitted {
        let mut held_since = None;
        loop {
            self.in_flight.fetch_add(1, SeqCst);
            if !self.closed.load(SeqCst) {
                let held = held_since.map(|t: Instant| t.elapsed());
                return Admitted { gate: self.clone(), held };
            }
            self.leave();
            held_since.get_or_insert_with(Instant::now);
            // Made before the check: an `open` after the check wakes it.
            let woken = self.opened.notified();
            if self.closed.load(SeqCst) {
                woken.await;
            }
        }
    }

    /// A request leaves (answered, or turned back by a closed gate).
    fn leave(&self) {
        if self.in_flight.fetch_sub(1, SeqCst) == 1 && self.closed.load(SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// The token to send now, waiting up to `wait` for one when there is none or it expired.
    pub async fn token(&self, wait: Duration) -> Option<Arc<Current>> {
        // The usual case, without a receiver or a timer; the wait is boxed (see `admit`).
        match self.usable_now() {
            Some(c) => Some(c),
            None => Box::pin(self.wait_token(wait)).await,
        }
    }

    fn usable_now(&self) -> Option<Arc<Current>> {
        self.current.borrow().as_ref().filter(|c| c.expires_at > Utc::now()).cloned()
    }

    async fn wait_token(&self, wait: Duration) -> Option<Arc<Current>> {
        let usable =
            |c: &Option<Arc<Current>>| c.as_ref().is_some_and(|c| c.expires_at > Utc::now());
        let mut rx = self.current.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(usable)).await;
        match found {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }

    /// A token newer than `generation`, waiting up to `wait` for one.
    pub async fn newer_than(&self, generation: u64, wait: Duration) -> Option<Arc<Current>> {
        let mut rx = self.current.subscribe();
        let newer =
            |c: &Option<Arc<Current>>| c.as_ref().is_some_and(|c| c.generation > generation);
        match tokio::time::timeout(wait, rx.wait_for(newer)).await {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }

    /// Whether a refresh was asked for within `window` (it may still be under way).
    pub fn forced_within(&self, window: Duration) -> bool {
        let last = *self.last_forced.lock().expect("gate lock");
        last.is_some_and(|t| t.elapsed() < window)
    }

    /// A 401 on the current, unexpired token: ask for a refresh now, at most once per
    /// `FORCED_REFRESH_EVERY` (a storm of 401s makes one refresh). Returns whether it asked.
    pub fn force_refresh(&self) -> bool {
        let now = Instant::now();
        {
            let mut last = self.last_forced.lock().expect("gate lock");
            if last.is_some_and(|t| now.duration_since(t) < FORCED_REFRESH_EVERY) {
                return false;
            }
            *last = Some(now);
        }
        self.refresh.send(crate::task::Command::RefreshNow);
        self.counters.forced_refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(token = %self.name, "the server refused the current access token (revoked?); refreshing now");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(drain: Duration) -> (Arc<Gate>, crate::task::Commands) {
        let (tx, rx) = crate::task::commands();
        (Gate::new("t", drain, tx, Arc::default()), rx)
    }

    #[tokio::test]
    async fn close_waits_for_in_flight_and_holds_new_requests_until_open() {
        let (g, _rx) = gate(Duration::from_secs(30));
        let first = g.admit().await;
        let closer = {
            let g = g.clone();
            tokio::spawn(async move { g.close().await })
        };
        tokio::task::yield_now().await;
        let held = {
            let g = g.clone();
            tokio::spawn(async move { g.admit().await.held })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closer.is_finished(), "close returned with a request in flight");
        drop(first);
        closer.await.unwrap();
        assert!(!held.is_finished(), "a request was admitted while closed");
        g.open();
        assert!(held.await.unwrap().is_some(), "the held request reports its wait");
    }

    #[tokio::test]
    async fn close_gives_up_at_the_drain_timeout() {
        let (g, _rx) = gate(Duration::from_millis(50));
        let _stuck = g.admit().await;
        tokio::time::timeout(Duration::from_secs(10), g.close()).await.expect("bounded");
    }

    /// Requests racing closes on two threads: once `close` returns, none is in flight, and
    /// none gets in until `open`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_is_in_flight_between_close_and_open_under_contention() {
        let (g, _rx) = gate(Duration::from_secs(60));
        // Set from the end of a drain to the next open: no request may be admitted then.
        let drained = Arc::new(AtomicBool::new(false));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (g, drained) = (g.clone(), drained.clone());
                tokio::spawn(async move {
                    for _ in 0..2_000 {
                        let admitted = g.admit().await;
                        assert!(!drained.load(SeqCst), "a request admitted while closed");
                        tokio::task::yield_now().await;
                        assert!(!drained.load(SeqCst), "a request in flight after the drain");
                        drop(admitted);
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            if callers.iter().any(tokio::task::JoinHandle::is_finished) {
                break; // one failed (or all are done): its panic is reported below
            }
            g.close().await;
            drained.store(true, SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            drained.store(false, SeqCst);
            g.open();
            tokio::task::yield_now().await;
        }
        for c in callers {
            tokio::time::timeout(Duration::from_secs(60), c).await.expect("bounded").unwrap();
        }
    }

    #[tokio::test]
    async fn a_storm_of_forced_refreshes_asks_once() {
        let (g, mut rx) = gate(Duration::from_secs(1));
        let asked = (0..100).filter(|_| g.force_refresh()).count();
        assert_eq!(asked, 1);
        assert!(rx.try_recv().is_some());
        assert!(rx.try_recv().is_none());
    }
}
