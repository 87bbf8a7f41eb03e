//! The refresh decisions as pure functions: when the published token must be replaced, how
//! long to back off, and how many token requests the rate limit still allows.

use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a token issued at `issued` and expiring at `expires` must be refreshed so that it is
/// never published within `margin` of expiry. The margin shrinks to half the lifetime for
/// short-lived tokens, so a 10 s token is refreshed after 5 s, not immediately.
pub fn refresh_deadline(
    issued: DateTime<Utc>,
    expires: DateTime<Utc>,
    margin: Duration,
) -> DateTime<Utc> {
    let lifetime = (expires - issued).to_std().unwrap_or_default();
    let margin = margin.min(lifetime / 2);
    expires - chrono::Duration::from_std(margin).unwrap_or_default()
}

/// The delay before retry number `attempt` (1-based): exponential from `initial`, capped at
/// `max`, with "equal jitter" (`rand01` in [0,1) picks between half and all of it), and never
/// shorter than the server's `Retry-After`.
pub fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    rand01: f64,
) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
    let capped = exp.min(max);
    let jittered = capped.mul_f64(0.5 + 0.5 * rand01.clamp(0.0, 1.0));
    jittered.max(retry_after.unwrap_or_default())
}

/// A sliding-window budget of token requests (RingCentral: 5 per 60 s per user).
#[derive(Debug)]
pub struct RequestBudget {
    limit: usize,
    window: Duration,
    sent: VecDeque<Instant>,
}

impl RequestBudget {
    pub fn new(limit: usize, window: Duration) -> Self {
        Self { limit: limit.max(1), window, sent: VecDeque::new() }
    }

    /// The earliest instant at which one more request stays inside the budget.
    pub fn earliest(&self, now: Instant) -> Instant {
        let live = self.sent.iter().filter(|t| now.duration_since(**t) < self.window).count();
        if live < self.limit {
            return now;
        }
        // The oldest request still counted must leave the window first.
        let oldest = self.sent[self.sent.len() - self.limit];
        oldest + self.window
    }

    /// The requests still remembered, oldest first.
    pub fn sent(&self) -> impl Iterator<Item = Instant> + '_ {
        self.sent.iter().copied()
    }

    /// Forgets the record and takes this one (oldest first), e.g. the last leader's.
    pub fn replace(&mut self, sent: impl IntoIterator<Item = Instant>) {
        self.sent.clear();
        for t in sent {
            self.record(t);
        }
    }

    pub fn record(&mut self, now: Instant) {
        self.sent.push_back(now);
        while self.sent.len() > self.limit {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_budget_counts_the_last_leaders_requests() {
        let now = Instant::now() + Duration::from_secs(100);
        let mut b = RequestBudget::new(2, Duration::from_secs(60));
        b.record(now);
        let ago = |s| now.checked_sub(Duration::from_secs(s)).unwrap();
        b.replace([ago(50), ago(10), ago(5)]);
        assert_eq!(b.sent().collect::<Vec<_>>(), [ago(10), ago(5)], "the newest, up to the limit");
        assert_eq!(b.earliest(now), ago(10) + Duration::from_secs(60));
    }

    #[test]
    fn deadline_keeps_margin_or_half_the_lifetime() {
        let t0 = Utc::now();
        let hour = t0 + chrono::Duration::seconds(3600);
        assert_eq!(
            refresh_deadline(t0, hour, Duration::from_secs(300)),
            hour - chrono::Duration::seconds(300)
        );
        let short = t0 + chrono::Duration::seconds(10);
        assert_eq!(
            refresh_deadline(t0, short, Duration::from_secs(300)),
            t0 + chrono::Duration::seconds(5)
        );
        assert_eq!(
            refresh_deadline(short, t0, Duration::from_secs(300)),
            t0,
            "already expired: now"
        );
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(1, i, m, None, 0.999_999), Duration::from_secs(1).mul_f64(0.999_999_5));
        assert_eq!(backoff(1, i, m, None, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, i, m, None, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(40, i, m, None, 0.0), Duration::from_secs(30));
        assert!(backoff(40, i, m, None, 1.0) <= m);
        assert_eq!(backoff(1, i, m, Some(Duration::from_secs(90)), 0.5), Duration::from_secs(90));
    }

    #[test]
    fn budget_spaces_requests() {
        let t0 = Instant::now();
        let mut b = RequestBudget::new(2, Duration::from_secs(60));
        assert_eq!(b.earliest(t0), t0);
        b.record(t0);
        b.record(t0 + Duration::from_secs(10));
        assert_eq!(b.earliest(t0 + Duration::from_secs(20)), t0 + Duration::from_secs(60));
        assert_eq!(b.earliest(t0 + Duration::from_secs(61)), t0 + Duration::from_secs(61));
    }
}
