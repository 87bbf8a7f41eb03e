//! Every refresh decision of one token, for one host and for a cluster's leader alike: when
//! the next token request goes out (tick plus jitter, the expiry deadline with its jitter,
//! retries with backoff, `Retry-After`, the rate budget), whether it refreshes or logs in, and
//! when the token needs a login. A pure state machine: each method takes the monotonic `now`,
//! the wall clock and the random draw as arguments, so tests drive it with a made-up clock.
//! The refresher (`refresher.rs`) and the cluster leader (`cluster/leader.rs`) keep only I/O.

use crate::config::TokenConfig;
use crate::oauth::OAuthError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest single sleep. Suspend and clock jumps are caught by the daemon's `ClockWatch`,
/// which sends `Recheck`; this is only a backstop, long so 10,000 idle tokens stay idle.
pub const MAX_SLEEP: Duration = Duration::from_secs(900);

/// Logins (new sessions) count against `Rules::sessions` over this window: an hour.
pub const SESSION_WINDOW: Duration = Duration::from_secs(3600);

/// A login that failed transiently may still have started a session on the server (a lost or
/// unusable reply): it is retried after minutes, not seconds. Retried at the refresh backoff,
/// a lost login reply burnt RingCentral's 5 sessions per user in 15 s (issue 17 #5).
pub const LOGIN_RETRY_INITIAL: Duration = Duration::from_secs(120);
pub const LOGIN_RETRY_MAX: Duration = Duration::from_secs(1800);

/// A published token's times (wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// When it was issued: also when the refresh token was last used (the refresh or login
    /// that got this token).
    pub issued: DateTime<Utc>,
    pub access_expires: DateTime<Utc>,
    /// The refresh token's expiry, where the server said (`refresh_token_expires_in`).
    pub refresh_expires: Option<DateTime<Utc>>,
}

impl Lifetimes {
    pub fn of(state: &crate::store::State) -> Self {
        Self {
            issued: state.refreshed_at,
            access_expires: state.access_expires_at,
            refresh_expires: state.refresh_expires_at,
        }
    }
}

/// What refreshing does to the refresh token's expiry, as the last two tokens showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshExpiry {
    /// It moves on: the deadline keeps ahead of it.
    Sliding,
    /// It stays (a session's end): it cannot be outrun, and chasing it would refresh in a
    /// loop as it nears.
    Absolute,
}

/// Where the newest refresh token is durable before anything is published: the one point on
/// which one host and a cluster must decide differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainHome {
    /// One host: the state file. While it is behind (a write failed), no refresh goes out: a
    /// refresh would move the chain further from what is on disk.
    StateFile,
    /// A cluster: etcd, written by the leader's fenced transaction before any host publishes.
    /// A host's own files are only a mirror, so a failed local write never holds a refresh.
    Etcd,
}

/// What the next token request sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The stored refresh token.
    Refresh,
    /// The configured grant: a new session.
    Login,
}

/// How a token request failed, as the policy needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connect, timeout, 5xx, 408, 429: try again later.
    Transient { retry_after: Option<Duration> },
    /// `invalid_grant` on a refresh: the refresh chain is dead (in a cluster: confirmed in etcd).
    DeadChain,
    /// Anything else the server refuses for good (`invalid_client`, a refused login).
    Permanent,
    /// The cluster store did not answer (etcd): retry soon, on the store's own backoff.
    Store,
    /// A refresh whose reply was lost after the server may have rotated the refresh token:
    /// sent again only where the provider's profile makes a replay safe.
    LostReply,
}

impl Failure {
    /// How the policy sees an error of the token endpoint (`was_refresh`: not a login).
    pub fn of(e: &OAuthError, was_refresh: bool) -> Self {
        if e.is_transient() && was_refresh && e.reply_may_be_lost() {
            Self::LostReply
        } else if e.is_transient() {
            Self::Transient { retry_after: e.retry_after() }
        } else if was_refresh && e.is_invalid_grant() {
            Self::DeadChain
        } else {
            Self::Permanent
        }
    }
}

/// What the policy decided after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after this delay (the attempt number is `Policy::attempt`).
    Retry(Duration),
    /// Log in again at once (a new session).
    Relogin,
    /// Stop trying on the deadline; keep serving; try again on the next tick, SIGUSR1 or SIGHUP.
    NeedsLogin,
}

/// The rules of one token, from its config.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub jitter: Duration,
    pub safety_margin: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub requests: usize,
    pub window: Duration,
    /// Logins (each a new session) allowed per `SESSION_WINDOW`; more wait.
    pub sessions: usize,
    /// The grant's logins start sessions (jwt, password): they count against `sessions` and
    /// back off in minutes.
    pub logins_start_sessions: bool,
    /// The grant can start a new session without a person (jwt, password).
    pub can_relogin: bool,
    /// The grant can get a first token without a person (all but authorization_code: a
    /// configured refresh token counts, though it cannot start a second session).
    pub can_log_in: bool,
    pub home: ChainHome,
    /// Whether a lost refresh may be replayed with the same refresh token (the provider's).
    pub replay: crate::provider::Replay,
    /// The refresh token dies after this long unused (the provider's; None without a refresh
    /// token, as with client_credentials).
    pub idle_expiry: Option<Duration>,
}

impl Rules {
    pub fn new(cfg: &TokenConfig, home: ChainHome) -> Self {
        Self {
            jitter: cfg.jitter,
            safety_margin: cfg.safety_margin,
            retry_initial: cfg.retry.initial,
            retry_max: cfg.retry.max,
            requests: cfg.rate.requests,
            window: cfg.rate.window,
            sessions: cfg.rate.sessions,
            logins_start_sessions: cfg.grant.starts_sessions(),
            can_relogin: cfg.grant.can_relogin(),
            can_log_in: !matches!(cfg.grant, crate::config::Grant::AuthorizationCode { .. }),
            home,
            replay: cfg.provider.replay,
            idle_expiry: cfg
                .provider
                .idle_expiry
                .filter(|_| !matches!(cfg.grant, crate::config::Grant::ClientCredentials)),
        }
    }
}

/// One token's refresh state machine. A cluster's candidate keeps it across terms, as the
/// rate budget must survive a change of leader on the same host.
#[derive(Debug)]
pub struct Policy {
    rules: Rules,
    /// A refresh is wanted at this time (tick plus jitter, SIGUSR1, bootstrap, replay).
    pending: Option<Instant>,
    /// A transient failure: the next attempt waits until then.
    retry_at: Option<Instant>,
    attempt: u32,
    /// After a `Retry-After`: nothing goes out before this.
    not_before: Option<Instant>,
    budget: RequestBudget,
    /// The logins sent (each may have started a session), against `Rules::sessions`.
    logins: RequestBudget,
    /// The session budget is spent: a login waits until then.
    logins_held_until: Option<Instant>,
    /// What the last request sent (a failed login backs off longer).
    sent: Option<Request>,
    /// The refresh chain is dead: the next attempt logs in (new session).
    relogin: bool,
    /// A person must log in (or the config be fixed): no refresh on the deadline.
    needs_login: bool,
    /// The published token's times.
    token: Option<Lifetimes>,
    /// Refresh by then, or the refresh token dies unused (`Rules::idle_expiry`).
    idle_deadline: Option<DateTime<Utc>>,
    /// Whether refreshing moves the refresh token's expiry (`Lifetimes::refresh_expires`) on.
    refresh_expiry: RefreshExpiry,
    /// Random draw in [0,1): the fraction of a tenth of the safety margin (at most 30 s) taken
    /// off the deadline per token, so tokens issued together spread their refreshes.
    deadline_draw: f64,
    /// When the first reply of the refresh being replayed was lost.
    lost_at: Option<Instant>,
    /// The held refresh token may have been rotated away by a lost reply, and this provider
    /// punishes its reuse (family revocation): it is never sent again, nor is a configured
    /// bootstrap refresh token of the same family; only a new login helps.
    spent: bool,
}

impl Policy {
    pub fn new(rules: Rules) -> Self {
        Self {
            budget: RequestBudget::new(rules.requests, rules.window),
            logins: RequestBudget::new(rules.sessions, SESSION_WINDOW),
            logins_held_until: None,
            sent: None,
            rules,
            pending: None,
            retry_at: None,
            attempt: 0,
            not_before: None,
            relogin: false,
            needs_login: false,
            token: None,
            idle_deadline: None,
            refresh_expiry: RefreshExpiry::Sliding,
            deadline_draw: 0.0,
            lost_at: None,
            spent: false,
        }
    }

    pub fn needs_login(&self) -> bool {
        self.needs_login
    }

    /// Transient failures in a row.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The token now published and a new deadline jitter (`rand01` in [0,1)). The refresh
    /// token's idle expiry counts from `t.issued`.
    pub fn token_changed(&mut self, t: Lifetimes, rand01: f64) {
        let seen = self.token.and_then(|p| Some((p.issued, p.refresh_expires?)));
        self.refresh_expiry = match (seen, t.refresh_expires) {
            // An expiry that moved on by less than half the time between the two tokens is
            // absolute (RingCentral's session end, Auth0's absolute lifetime).
            (Some((issued, expires)), Some(now_expires)) if t.issued > issued => {
                if (now_expires - expires) * 2 > t.issued - issued {
                    RefreshExpiry::Sliding
                } else {
                    RefreshExpiry::Absolute
                }
            }
            // The same token again (a mirror, a reload) tells nothing new.
            (Some(_), Some(_)) => self.refresh_expiry,
            // First sight: assume it slides; one refresh near its end tells.
            _ => RefreshExpiry::Sliding,
        };
        self.token = Some(t);
        self.idle_deadline = self.rules.idle_expiry.map(|idle| idle_deadline(t.issued, idle));
        self.deadline_draw = rand01.clamp(0.0, 1.0);
    }

    /// No token to refresh: the next attempt logs in if the grant can, else a person must.
    /// True when a login is scheduled.
    pub fn bootstrap(&mut self, now: Instant) -> bool {
        if self.rules.can_log_in {
            self.pending = Some(now);
        } else {
            self.needs_login = true;
        }
        self.rules.can_log_in
    }

    /// A refresh is wanted by now (bootstrap, replay), whatever the deadline says.
    pub fn wanted(&self, now: Instant) -> bool {
        self.pending.is_some_and(|p| p <= now)
    }

    /// The token must be refreshed before it is published (a refresh was in flight).
    pub fn replay(&mut self, now: Instant) {
        self.pending = Some(now);
    }

    /// Started with a refresh in flight `age` ago (its reply lost with the process): replayed
    /// where the provider allows it (`Retry(0)`), else a new login or "needs login".
    pub fn lost_on_restart(&mut self, now: Instant, age: Duration) -> Next {
        if self.rules.replay.allows(age) {
            self.replay(now);
            return Next::Retry(Duration::ZERO);
        }
        self.spent = true;
        self.on_failure(now, Failure::DeadChain, 0.0)
    }

    /// The store holds something this host must not refresh or log in over (an unreadable
    /// pair): wait for a person.
    pub fn hold(&mut self) {
        self.needs_login = true;
        self.relogin = false;
        self.pending = None;
    }

    /// A cron tick: refresh after a random part (`rand01`) of the jitter, unless a retry is
    /// already scheduled on its own.
    pub fn on_tick(&mut self, now: Instant, rand01: f64) {
        if self.retry_at.is_some() {
            return;
        }
        let at = now + self.rules.jitter.mul_f64(rand01.clamp(0.0, 1.0));
        self.pending = Some(self.pending.map_or(at, |p| p.min(at)));
    }

    /// SIGUSR1: refresh now, whatever the backoff (the rate budget and `Retry-After` still hold).
    pub fn refresh_now(&mut self, now: Instant) {
        self.retry_at = None;
        self.pending = Some(now);
    }

    /// A person logged in (`tokend login`): the new state needs nothing until its deadline.
    pub fn logged_in(&mut self) {
        self.spent = false;
        (self.needs_login, self.relogin, self.retry_at, self.pending, self.attempt) =
            (false, false, None, None, 0);
        self.logins_held_until = None;
    }

    /// The request starts a new session: a login of a grant that starts them.
    fn is_session(&self, request: Request) -> bool {
        request == Request::Login && self.rules.logins_start_sessions
    }

    /// While the session budget is spent: when the next login may go out.
    pub fn logins_held_until(&self) -> Option<Instant> {
        self.logins_held_until
    }

    /// The logins sent in the last `SESSION_WINDOW`, oldest first.
    pub fn recent_logins(&self, now: Instant) -> impl Iterator<Item = Instant> + '_ {
        self.logins.sent().filter(move |t| now.duration_since(*t) < SESSION_WINDOW)
    }

    /// The wall-clock time after which the published token would be inside the margin, or
    /// the refresh token too close to its idle expiry or to the expiry the server gave it,
    /// whichever comes first. The refresh token's bind only where the access token outlives
    /// most of them (a long `access_token_lifetime`, a short `refresh_token_ttl`): else the
    /// access deadline refreshes long before.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        let t = self.token?;
        if self.needs_login {
            return None;
        }
        let margin = self.rules.safety_margin;
        // The shorter-lived of the two tokens binds, and its lifetime caps the jitter.
        let sliding = self.refresh_expiry == RefreshExpiry::Sliding;
        let rt = t.refresh_expires.filter(|rt| sliding && *rt < t.access_expires);
        let expires = rt.unwrap_or(t.access_expires);
        let mut d = refresh_deadline(t.issued, expires, margin);
        d = self.idle_deadline.map_or(d, |idle| idle.min(d));
        let lifetime = (expires - t.issued).to_std().unwrap_or_default();
        let cap = (margin.min(lifetime / 2) / 10).min(Duration::from_secs(30));
        Some(d - chrono::Duration::from_std(cap.mul_f64(self.deadline_draw)).unwrap_or_default())
    }

    /// When an attempt is due, ignoring the gates.
    pub fn due(&self, now: Instant, wall: DateTime<Utc>) -> Option<Instant> {
        if let Some(r) = self.retry_at {
            return Some(r);
        }
        let deadline = self.deadline().map(|d| now + (d - wall).to_std().unwrap_or_default());
        match (self.pending, deadline) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    }

    /// The earliest instant an attempt may be sent: rate budget, `Retry-After`, and the
    /// session budget while a login is held.
    pub fn gate(&self, now: Instant) -> Instant {
        let budget = self.budget.earliest(now);
        [self.not_before, self.logins_held_until].into_iter().flatten().fold(budget, Instant::max)
    }

    /// One host only: a refresh waits while the state file is behind (see `ChainHome`).
    fn held_by_disk(&self, state_file_behind: bool) -> bool {
        self.rules.home == ChainHome::StateFile && state_file_behind
    }

    /// When to wake next for a token request (at most `MAX_SLEEP` away).
    pub fn next_wake(&self, now: Instant, wall: DateTime<Utc>, state_file_behind: bool) -> Instant {
        let max = now + MAX_SLEEP;
        if self.held_by_disk(state_file_behind) {
            return max;
        }
        self.due(now, wall).map_or(max, |d| d.max(self.gate(now)).min(max))
    }

    /// Whether a token request should go out now.
    pub fn should_attempt(
        &self,
        now: Instant,
        wall: DateTime<Utc>,
        state_file_behind: bool,
    ) -> bool {
        !self.held_by_disk(state_file_behind)
            && self.due(now, wall).is_some_and(|d| d <= now)
            && self.gate(now) <= now
    }

    /// A token request goes out now, counted in the budget; None when there is nothing the
    /// grant can send without a person (authorization_code with no refresh token): then only
    /// `tokend login` helps. `has_refresh_token`: the published state holds one.
    /// A login is also None while the session budget is spent (`logins_held_until` says
    /// until when): it stays wanted and goes out once the oldest login leaves the hour.
    pub fn begin(&mut self, now: Instant, has_refresh_token: bool) -> Option<Request> {
        self.pending = None;
        if self.spent && !self.rules.can_relogin {
            return None;
        }
        let request = if has_refresh_token && !self.relogin && !self.spent {
            Request::Refresh
        } else if self.rules.can_log_in {
            Request::Login
        } else {
            return None;
        };
        if self.is_session(request) {
            let free = self.logins.earliest(now);
            if free > now {
                (self.logins_held_until, self.pending) = (Some(free), Some(now));
                return None;
            }
            self.logins_held_until = None;
            self.logins.record(now);
        }
        self.budget.record(now);
        self.sent = Some(request);
        Some(request)
    }

    /// The request `begin` returned did not go out (a cluster leader could not store its
    /// intent first): it spends neither the rate budget nor a session.
    pub fn not_sent(&mut self) {
        let Some(request) = self.sent.take() else { return };
        if self.is_session(request) {
            self.logins.unrecord();
        }
        self.budget.unrecord();
    }

    /// A new token is published: everything starts afresh.
    pub fn on_success(&mut self, t: Lifetimes, rand01: f64) {
        (self.lost_at, self.spent) = (None, false);
        (self.relogin, self.needs_login, self.retry_at, self.not_before, self.attempt) =
            (false, false, None, None, 0);
        self.logins_held_until = None;
        self.token_changed(t, rand01);
    }

    /// A failed request (or a failed store write in a cluster); `rand01` draws the backoff jitter.
    pub fn on_failure(&mut self, now: Instant, failure: Failure, rand01: f64) -> Next {
        match failure {
            Failure::Transient { retry_after } => {
                self.attempt += 1;
                let r = self.rules;
                let (initial, max) = if self.sent.is_some_and(|r| self.is_session(r)) {
                    (LOGIN_RETRY_INITIAL.max(r.retry_initial), LOGIN_RETRY_MAX.max(r.retry_max))
                } else {
                    (r.retry_initial, r.retry_max)
                };
                let delay = backoff(self.attempt, initial, max, retry_after, rand01);
                self.retry_at = Some(now + delay);
                if let Some(ra) = retry_after {
                    self.not_before = Some(now + ra);
                }
                Next::Retry(delay)
            }
            Failure::Store => {
                self.attempt += 1;
                let delay = store_backoff(self.attempt, rand01);
                self.retry_at = Some(now + delay);
                Next::Retry(delay)
            }
            Failure::LostReply => {
                let since = now - *self.lost_at.get_or_insert(now);
                if self.rules.replay.allows(since) {
                    return self.on_failure(now, Failure::Transient { retry_after: None }, rand01);
                }
                (self.lost_at, self.spent) = (None, true);
                self.on_failure(now, Failure::DeadChain, rand01)
            }
            Failure::DeadChain if self.rules.can_relogin => {
                (self.relogin, self.pending, self.retry_at, self.attempt) =
                    (true, Some(now), None, 0);
                Next::Relogin
            }
            Failure::DeadChain | Failure::Permanent => {
                (self.needs_login, self.retry_at, self.attempt) = (true, None, 0);
                self.relogin = self.rules.can_relogin;
                Next::NeedsLogin
            }
        }
    }

    /// The rate state to hand to the next leader (wall clock, as hosts share no monotonic one).
    pub fn export_budget(&self, now: Instant, wall: DateTime<Utc>) -> Budget {
        let ago = |t: Instant| chrono::Duration::from_std(now - t).unwrap_or_default();
        Budget {
            sent: self.budget.sent().map(|t| wall - ago(t)).collect(),
            logins: self.recent_logins(now).map(|t| wall - ago(t)).collect(),
            not_before: self
                .not_before
                .filter(|nb| *nb > now)
                .map(|nb| wall + chrono::Duration::from_std(nb - now).unwrap_or_default()),
        }
    }

    /// Takes over the last leader's rate state: its requests count against this window, and its
    /// `Retry-After` holds here too. Returns the `Retry-After` end when one still holds.
    pub fn import_budget(
        &mut self,
        b: &Budget,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let at = |t: DateTime<Utc>| {
            now.checked_sub((wall - t).to_std().unwrap_or_default()).unwrap_or(now)
        };
        self.budget.replace(b.sent.iter().map(|t| at(*t)));
        self.import_logins(&b.logins, now, wall);
        let nb = b.not_before.filter(|nb| *nb > wall)?;
        let until = now + (nb - wall).to_std().unwrap_or_default();
        self.not_before = Some(self.not_before.map_or(until, |x| x.max(until)));
        Some(nb)
    }

    /// Takes over the logins an earlier daemon or the last leader sent (wall clock), so that
    /// neither a restart nor a new leader starts the session budget afresh.
    pub fn import_logins(&mut self, logins: &[DateTime<Utc>], now: Instant, wall: DateTime<Utc>) {
        let ago = |t: &DateTime<Utc>| (wall - *t).to_std().unwrap_or_default();
        let mut recent: Vec<Instant> = logins
            .iter()
            .map(ago)
            .filter(|ago| *ago < SESSION_WINDOW)
            .map(|ago| now.checked_sub(ago).unwrap_or(now))
            .collect();
        recent.sort();
        self.logins.replace(recent);
    }
}

/// Backoff after the cluster store failed: quick, as etcd usually answers again soon.
pub fn store_backoff(attempt: u32, rand01: f64) -> Duration {
    backoff(attempt, Duration::from_millis(200), Duration::from_secs(5), None, rand01)
}

/// When to retry a failed local write (state file or sink): quick and capped, as the disk is
/// ours and a full one is often freed within seconds.
#[derive(Debug, Default)]
pub struct WriteRetry {
    failures: u32,
    at: Option<Instant>,
}

impl WriteRetry {
    pub fn failed(&mut self, now: Instant, rand01: f64) {
        self.failures += 1;
        let delay = backoff(
            self.failures,
            Duration::from_millis(200),
            Duration::from_secs(10),
            None,
            rand01,
        );
        self.at = Some(now + delay);
    }

    pub fn succeeded(&mut self) {
        (self.failures, self.at) = (0, None);
    }

    /// When the next write is due, if one failed.
    pub fn at(&self) -> Option<Instant> {
        self.at
    }

    pub fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| t <= now)
    }
}

/// The token endpoint's rate state, which every leader must honour, not just the one that
/// made the requests: RingCentral limits token requests per user (5 a minute), and a request
/// made during a 429's penalty restarts it. In a cluster it is written (fenced) with each
/// intent, before the request goes out, and after each `Retry-After`; read by every new leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// When the latest token requests went out (wall clock; at most the budget's limit).
    pub sent: Vec<chrono::DateTime<chrono::Utc>>,
    /// When the logins of the last hour went out: the session budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<chrono::DateTime<chrono::Utc>>,
    /// Nothing may go out before this: the last `Retry-After` the server sent.
    #[serde(default)]
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
}

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

/// When a refresh token last used at `used` must be used again so that it never reaches
/// its idle expiry `idle`: a tenth of it early (Google: 18 days, Xero: 6), which leaves
/// room for days of failed retries (a provider outage) before the token is lost.
pub fn idle_deadline(used: DateTime<Utc>, idle: Duration) -> DateTime<Utc> {
    let early = chrono::Duration::from_std(idle / 10 * 9).unwrap_or(chrono::TimeDelta::MAX);
    used.checked_add_signed(early).unwrap_or(DateTime::<Utc>::MAX_UTC)
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

    /// Forgets the latest request (it was never sent).
    pub fn unrecord(&mut self) {
        self.sent.pop_back();
    }

    pub fn record(&mut self, now: Instant) {
        // What left the window no longer counts: with a large limit, keeping it would hold up
        // to `limit` instants per token for nothing.
        while self.sent.front().is_some_and(|t| now.saturating_duration_since(*t) >= self.window) {
            self.sent.pop_front();
        }
        self.sent.push_back(now);
        while self.sent.len() > self.limit {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests;
