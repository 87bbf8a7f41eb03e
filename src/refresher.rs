//! One token's lifecycle: when to refresh (ticks, the expiry deadline, retries, the rate
//! budget), what to do with each outcome, and persisting then publishing. The only place that
//! decides *when*.

use crate::config::{Grant, TokenConfig};
use crate::hook;
use crate::metrics::Metrics;
use crate::oauth::{OAuthClient, OAuthError, TokenSet};
use crate::policy::{RequestBudget, backoff, refresh_deadline};
use crate::store::{ErrorRecord, STATE_VERSION, State, StateError, Status, blocking};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// What the daemon tells a refresher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A cron tick: refresh after this token's jitter.
    Tick,
    /// SIGUSR1: refresh now.
    RefreshNow,
    /// Finish any in-flight refresh, persist, and return.
    Stop,
    /// The wall clock jumped: recompute the wall-clock deadline.
    Recheck,
}

/// Longest single sleep. Suspend and clock jumps are caught by the daemon's `ClockWatch`,
/// which sends `Recheck`; this is only a backstop, long so 10,000 idle tokens stay idle.
const MAX_SLEEP: Duration = Duration::from_secs(900);

/// What all refreshers of a daemon share.
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

/// One token's refresher. Owns its state; nothing else writes this token's files.
pub struct Refresher {
    cfg: TokenConfig,
    metrics: Arc<Metrics>,
    /// Bounds token requests in flight across all tokens.
    requests: Arc<tokio::sync::Semaphore>,
    client: OAuthClient,
    state: Option<State>,
    status: Status,
    /// The in-memory state is newer than the state file (a write failed).
    state_dirty: bool,
    /// Sinks that do not hold the current generation yet.
    stale_sinks: BTreeSet<PathBuf>,
    /// When to retry failed writes.
    write_retry_at: Option<Instant>,
    write_failures: u32,
    /// A refresh is wanted at this time (tick plus jitter, SIGUSR1, bootstrap).
    pending: Option<Instant>,
    /// A transient failure: the next attempt waits until then.
    retry_at: Option<Instant>,
    attempt: u32,
    /// After a 429/503: nothing goes out before this.
    not_before: Option<Instant>,
    budget: RequestBudget,
    /// The refresh chain is dead: the next attempt logs in again (new session).
    relogin: bool,
    /// Random fraction taken off the safety margin per token generation.
    deadline_jitter: Duration,
    /// The proxies' gate: closed around each token request, told each durable token.
    gate: Option<Arc<crate::proxy::Gate>>,
}

impl Refresher {
    pub fn new(cfg: TokenConfig, shared: Shared) -> Self {
        let Shared { metrics, requests, client, gate } = shared;
        let budget = RequestBudget::new(cfg.rate.requests, cfg.rate.window);
        Self {
            client,
            state: None,
            status: Status { pid: std::process::id(), ..Status::default() },
            state_dirty: false,
            stale_sinks: BTreeSet::new(),
            write_retry_at: None,
            write_failures: 0,
            pending: None,
            retry_at: None,
            attempt: 0,
            not_before: None,
            budget,
            relogin: false,
            deadline_jitter: Duration::ZERO,
            gate,
            metrics,
            requests,
            cfg,
        }
    }

    /// Runs until `Stop` (or the channel closes). `ready` fires once the sinks are published
    /// from the state, or the first login has succeeded or failed.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, ready: oneshot::Sender<()>) {
        self.metrics.update(&self.cfg.name, |_| {});
        self.start().await;
        // A login handed over just before a crash or restart is newer than the state file.
        self.adopt_handoff().await;
        if self.pending.is_some_and(|p| p <= Instant::now()) {
            Box::pin(self.attempt_refresh()).await;
            // If that failed, publish what the state holds: better than empty sinks after a reboot.
            let unexpired = self.state.as_ref().is_some_and(|s| s.access_expires_at > Utc::now());
            if unexpired && !self.stale_sinks.is_empty() {
                self.flush().await;
            }
        }
        let _ = ready.send(());
        loop {
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Stop) => break,
                    Some(Command::Tick) => if !self.adopt_handoff().await { self.on_tick().await },
                    Some(Command::Recheck) => {}
                    Some(Command::RefreshNow) => if !self.adopt_handoff().await { self.want_now() },
                },
                () = tokio::time::sleep_until(wake.into()) => self.on_wake().await,
            }
        }
        if self.state_dirty || !self.stale_sinks.is_empty() {
            self.flush().await;
        }
        info!(token = %self.cfg.name, "refresher stopped");
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Start-up: load the state and publish from it at once (a reboot empties /run).
    async fn start(&mut self) {
        match State::load_for(&self.cfg.state_file, &self.cfg.name) {
            Ok(Some(state)) => self.adopt(state).await,
            Ok(None) => self.bootstrap("no state file yet"),
            Err(StateError::Corrupt { path, message }) => {
                match State::quarantine(&path) {
                    Ok(aside) => {
                        error!(token = %self.name(), path = %path.display(), kept_as = %aside.display(), reason = %message, "state file is corrupt; moved aside");
                    }
                    Err(e) => {
                        error!(token = %self.name(), path = %path.display(), reason = %message, error = %e, "state file is corrupt and cannot be moved aside");
                    }
                }
                self.bootstrap("state file was corrupt");
            }
            Err(e @ StateError::Io { .. }) => {
                // Never log in over a state file we cannot read: that would burn a session and
                // could overwrite a good refresh token. Retry reading on each tick.
                error!(token = %self.name(), error = %e, "cannot read state; will retry on the next tick");
                self.record_error("state-io", &e.to_string(), true);
            }
        }
        self.save_status().await;
    }

    async fn adopt(&mut self, state: State) {
        let now = Utc::now();
        info!(token = %self.name(), generation = state.generation, access_expires = %crate::time::left(state.access_expires_at, now), "loaded state");
        let expired = state.access_expires_at <= now;
        self.state = Some(state);
        self.new_deadline_jitter();
        if State::intent_path(&self.cfg.state_file).exists() {
            // Stopped mid-refresh: the server may already have killed this access token.
            // Replay the refresh (same refresh token, grace window) before publishing.
            info!(token = %self.name(), "a refresh was in flight when tokend stopped; replaying it before publishing");
            self.mark_all_sinks_stale();
            self.pending = Some(Instant::now());
        } else if expired {
            // Never publish an expired token; the deadline triggers a refresh at once.
            info!(token = %self.name(), "access token in state has expired; refreshing before publishing");
        } else {
            self.mark_all_sinks_stale();
            self.flush().await;
        }
    }

    fn bootstrap(&mut self, why: &str) {
        if matches!(self.cfg.grant, Grant::AuthorizationCode { .. }) {
            self.status.needs_login = true;
            self.metrics.update(&self.cfg.name, |m| m.needs_login = true);
            error!(token = %self.name(), reason = why, "needs login: run `tokend login --token {}`", self.name());
            return;
        }
        info!(token = %self.name(), grant = self.cfg.grant.name(), reason = why, "logging in (new session)");
        self.pending = Some(Instant::now());
    }

    /// Adopts a state that `tokend login` handed over while we hold the lock. Returns true
    /// when one was adopted (then no refresh is needed).
    async fn adopt_handoff(&mut self) -> bool {
        let path = State::handoff_path(&self.cfg.state_file);
        let handed = match State::load_for(&path, &self.cfg.name) {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                error!(token = %self.name(), error = %e, "cannot use the login hand-off file; leaving it for inspection");
                return false;
            }
        };
        let mut state = handed;
        if let Some(cur) = &self.state {
            state.generation =
                state.generation.max(next_generation(&self.cfg.name, cur.generation));
        }
        info!(token = %self.name(), generation = state.generation, fingerprint = %state.access_token.fingerprint(), "adopted a new login from `tokend login` (new session)");
        self.state = Some(state);
        self.state_dirty = true;
        self.mark_all_sinks_stale();
        self.status.needs_login = false;
        self.status.last_error = None;
        self.relogin = false;
        self.retry_at = None;
        self.pending = None;
        self.new_deadline_jitter();
        // Persist first: only then may the hand-off file go.
        if self.flush().await || !self.state_dirty {
            let _ = std::fs::remove_file(&path);
        }
        self.save_status().await;
        true
    }

    async fn on_tick(&mut self) {
        if self.state.is_none()
            && self.status.last_error.as_ref().is_some_and(|e| e.code == "state-io")
        {
            self.start().await;
            return;
        }
        if self.retry_at.is_some() {
            return; // already retrying on its own schedule
        }
        let jitter = self.cfg.jitter.mul_f64(rand::random::<f64>());
        let at = Instant::now() + jitter;
        self.pending = Some(self.pending.map_or(at, |p| p.min(at)));
    }

    fn want_now(&mut self) {
        self.retry_at = None;
        self.pending = Some(Instant::now());
    }

    /// The wall-clock deadline after which the published token would be inside the margin.
    fn deadline(&self) -> Option<DateTime<Utc>> {
        let s = self.state.as_ref()?;
        if self.status.needs_login {
            return None;
        }
        let d = refresh_deadline(s.refreshed_at, s.access_expires_at, self.cfg.safety_margin);
        Some(d - chrono::Duration::from_std(self.deadline_jitter).unwrap_or_default())
    }

    fn new_deadline_jitter(&mut self) {
        let Some(s) = &self.state else { return };
        let lifetime = (s.access_expires_at - s.refreshed_at).to_std().unwrap_or_default();
        let cap = (self.cfg.safety_margin.min(lifetime / 2) / 10).min(Duration::from_secs(30));
        self.deadline_jitter = cap.mul_f64(rand::random::<f64>());
    }

    /// When an attempt is due, ignoring the gates.
    fn due(&self, now: Instant) -> Option<Instant> {
        if let Some(r) = self.retry_at {
            return Some(r);
        }
        let deadline = self.deadline().map(|d| {
            let wait = (d - Utc::now()).to_std().unwrap_or_default();
            now + wait
        });
        match (self.pending, deadline) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    }

    /// The earliest instant an attempt may be sent: rate budget and Retry-After.
    fn gate(&self, now: Instant) -> Instant {
        let budget = self.budget.earliest(now);
        self.not_before.map_or(budget, |nb| nb.max(budget))
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + MAX_SLEEP;
        if self.state_dirty || !self.stale_sinks.is_empty() {
            wake = wake.min(self.write_retry_at.unwrap_or(now));
        }
        if !self.state_dirty
            && let Some(due) = self.due(now)
        {
            wake = wake.min(due.max(self.gate(now)));
        }
        wake
    }

    async fn on_wake(&mut self) {
        let now = Instant::now();
        if (self.state_dirty || !self.stale_sinks.is_empty())
            && self.write_retry_at.is_none_or(|t| t <= now)
        {
            self.flush().await;
        }
        // A refresh while the state file is behind would move the chain further from disk.
        if self.state_dirty {
            return;
        }
        if self.due(now).is_some_and(|d| d <= now) && self.gate(now) <= now {
            // Boxed: the HTTP request's future is large, and held inline it would be part of
            // every idle token's task (10,000 tasks) rather than only of the ones refreshing.
            Box::pin(self.attempt_refresh()).await;
        }
    }

    /// One request to the token endpoint, and its consequences.
    async fn attempt_refresh(&mut self) {
        let now = Instant::now();
        self.budget.record(now);
        self.metrics.update(&self.cfg.name, |m| m.attempts += 1);
        self.pending = None;
        self.status.last_attempt_at = Some(Utc::now());
        let refresh_token = match (&self.state, self.relogin) {
            (Some(s), false) => s.refresh_token.clone(),
            _ => None,
        };
        if refresh_token.is_some() {
            self.write_intent().await;
        }
        let permit = self.requests.clone().acquire_owned().await.expect("never closed");
        // Proxied requests still carrying the old token finish first; new ones wait for the
        // new token (opened below, after it is published).
        if let Some(gate) = &self.gate {
            gate.close().await;
        }
        let started = Instant::now();
        let result = match &refresh_token {
            Some(rt) => self.client.refresh(&self.cfg, rt).await,
            None => self.client.login(&self.cfg).await,
        };
        let elapsed = started.elapsed();
        drop(permit);
        match result {
            Ok(tokens) => self.on_success(tokens, refresh_token.is_none(), elapsed).await,
            Err(e) if e.is_transient() => self.on_transient(&e),
            Err(e)
                if refresh_token.is_some()
                    && e.is_invalid_grant()
                    && self.cfg.grant.can_relogin() =>
            {
                warn!(token = %self.name(), code = %e.code(), "refresh chain is dead; logging in again (new session)");
                self.record_error(&e.code(), &e.to_string(), true);
                self.relogin = true;
                self.count_failure(&e.code(), false);
                self.metrics.update(&self.cfg.name, |m| m.relogins += 1);
                self.pending = Some(Instant::now());
                self.attempt = 0;
            }
            Err(e) => self.on_permanent(&e),
        }
        if let Some(gate) = &self.gate {
            gate.open();
        }
        self.save_status().await;
    }

    fn on_transient(&mut self, e: &OAuthError) {
        self.attempt += 1;
        self.count_failure(&e.code(), true);
        let retry_after = e.retry_after();
        let delay = backoff(
            self.attempt,
            self.cfg.retry.initial,
            self.cfg.retry.max,
            retry_after,
            rand::random(),
        );
        let now = Instant::now();
        self.retry_at = Some(now + delay);
        if let Some(ra) = retry_after {
            self.not_before = Some(now + ra);
        }
        warn!(
            token = %self.name(),
            attempt = self.attempt,
            code = %e.code(),
            error = %e,
            retry_in_ms = delay.as_millis() as u64,
            "token request failed; retrying"
        );
        self.record_error(&e.code(), &e.to_string(), false);
    }

    async fn write_intent(&self) {
        let text = format!("refresh in flight since {}\n", Utc::now().to_rfc3339());
        let path = State::intent_path(&self.cfg.state_file);
        let written =
            blocking(move || crate::store::write_atomic(&path, text.as_bytes(), 0o600)).await;
        if let Err(e) = written {
            warn!(token = %self.name(), error = %e, "cannot write the refresh intent marker");
        }
    }

    fn clear_intent(&self) {
        match std::fs::remove_file(State::intent_path(&self.cfg.state_file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(token = %self.name(), error = %e, "cannot remove the refresh intent marker");
            }
        }
    }

    fn on_permanent(&mut self, e: &OAuthError) {
        self.clear_intent();
        self.count_failure(&e.code(), false);
        self.metrics.update(&self.cfg.name, |m| m.needs_login = true);
        self.retry_at = None;
        self.attempt = 0;
        self.status.needs_login = true;
        self.relogin = self.cfg.grant.can_relogin();
        let serving =
            self.state.as_ref().map(|s| crate::time::left(s.access_expires_at, Utc::now()));
        error!(
            token = %self.name(),
            code = %e.code(),
            error = %e,
            still_serving = serving.as_deref().unwrap_or("nothing"),
            "permanent failure: needs login; will retry on the next tick or SIGHUP"
        );
        self.record_error(&e.code(), &e.to_string(), true);
    }

    async fn on_success(&mut self, tokens: TokenSet, new_session: bool, elapsed: Duration) {
        let now = Utc::now();
        let state = next_state(&self.cfg.name, tokens, self.state.as_ref(), new_session, now);
        info!(
            token = %self.name(),
            generation = state.generation,
            access_expires_at = %state.access_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            refresh_expires_at = %state.refresh_expires_at.map_or_else(|| "none".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            duration_ms = elapsed.as_millis() as u64,
            fingerprint = %state.access_token.fingerprint(),
            new_session,
            "refreshed"
        );
        self.state = Some(state);
        self.state_dirty = true;
        self.mark_all_sinks_stale();
        self.relogin = false;
        self.retry_at = None;
        self.not_before = None;
        self.attempt = 0;
        self.status.needs_login = false;
        self.status.last_error = None;
        self.status.last_success_at = Some(now);
        self.metrics.update(&self.cfg.name, |m| m.last_success = Some(now.timestamp()));
        self.new_deadline_jitter();
        if self.flush().await {
            self.run_hook();
        }
    }

    /// Mirrors the published state into the metrics.
    fn publish_metrics(&self) {
        let Some(s) = &self.state else { return };
        let lifetime = (s.access_expires_at - s.refreshed_at).to_std().unwrap_or_default();
        let near = self.cfg.safety_margin.min(lifetime / 2) / 2;
        let needs_login = self.status.needs_login;
        self.metrics.update(&self.cfg.name, |m| {
            m.generation = s.generation;
            m.access_expires = Some(s.access_expires_at.timestamp());
            m.refresh_expires = s.refresh_expires_at.map(|t| t.timestamp());
            m.needs_login = needs_login;
            m.near_expiry = near;
        });
    }

    fn mark_all_sinks_stale(&mut self) {
        self.stale_sinks = self.cfg.sinks.iter().map(|s| s.path.clone()).collect();
    }

    /// Persist, then publish. Returns true when everything is on disk.
    /// The writes run in the store's blocking pool, so a slow disk holds this token's task
    /// and no other.
    async fn flush(&mut self) -> bool {
        let Some(state) = self.state.clone() else { return true };
        if self.state_dirty {
            let (s, path) = (state.clone(), self.cfg.state_file.clone());
            if let Err(e) = blocking(move || s.save(&path)).await {
                error!(token = %self.name(), path = %self.cfg.state_file.display(), error = %e, "cannot write state; keeping the new token in memory and not publishing until it is saved");
                self.schedule_write_retry();
                return false;
            }
            self.state_dirty = false;
            // The new pair is durable: nothing is in flight any more.
            self.clear_intent();
        }
        if let Some(gate) = &self.gate {
            gate.publish(&state);
        }
        let (cfg, mut stale) = (self.cfg.clone(), std::mem::take(&mut self.stale_sinks));
        self.stale_sinks = blocking(move || {
            crate::store::write_stale_sinks(&cfg, &state, &mut stale);
            stale
        })
        .await;
        if self.stale_sinks.is_empty() {
            self.write_failures = 0;
            self.write_retry_at = None;
            self.publish_metrics();
            true
        } else {
            self.schedule_write_retry();
            false
        }
    }

    fn schedule_write_retry(&mut self) {
        self.write_failures += 1;
        let delay = backoff(
            self.write_failures,
            Duration::from_millis(200),
            Duration::from_secs(10),
            None,
            rand::random(),
        );
        self.write_retry_at = Some(Instant::now() + delay);
    }

    fn run_hook(&self) {
        let (Some(hook), Some(state)) = (&self.cfg.on_refresh, &self.state) else { return };
        hook::spawn(hook.clone(), &self.cfg, state);
    }

    fn count_failure(&self, code: &str, retry: bool) {
        self.metrics.update(&self.cfg.name, |m| {
            *m.failures.entry(code.to_string()).or_default() += 1;
            m.retries += u64::from(retry);
        });
    }

    fn record_error(&mut self, code: &str, message: &str, permanent: bool) {
        self.status.last_error = Some(ErrorRecord {
            at: Utc::now(),
            code: code.into(),
            message: message.into(),
            permanent,
        });
    }

    async fn save_status(&mut self) {
        let due = self
            .due(Instant::now())
            .map(|d| Utc::now() + d.saturating_duration_since(Instant::now()));
        let tick = self.cfg.schedule.next_after(Utc::now());
        self.status.next_refresh_at = match (due, tick) {
            (Some(d), Some(t)) => Some(d.min(t)),
            (d, t) => d.or(t),
        };
        let (status, path) = (self.status.clone(), self.cfg.state_file.clone());
        if let Err(e) = blocking(move || status.save(&path)).await {
            warn!(token = %self.name(), error = %e, "cannot write status file");
        }
    }
}

/// The state after a successful token request: the generation grows by one; the session start
/// carries over unless this was a new login.
pub fn next_state(
    name: &str,
    tokens: TokenSet,
    previous: Option<&State>,
    new_session: bool,
    now: DateTime<Utc>,
) -> State {
    let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
    State {
        version: STATE_VERSION,
        name: name.to_string(),
        generation: previous.map_or(1, |p| next_generation(name, p.generation)),
        token_type: tokens.token_type,
        access_expires_at: now + secs(tokens.expires_in),
        refresh_expires_at: tokens.refresh_token_expires_in.map(|s| now + secs(s)),
        refreshed_at: now,
        session_started_at: match previous {
            Some(p) if !new_session => p.session_started_at,
            _ => now,
        },
        scope: tokens.scope,
        owner_id: tokens.owner_id,
        endpoint_id: tokens.endpoint_id,
        session_id: tokens.session_id,
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
    }
}

/// The generation after `g`: one more, but never past `MAX_GENERATION` (never a wrap to 0,
/// which would send it back); reaching the top is an ERROR, as nothing can grow any more.
pub fn next_generation(name: &str, g: u64) -> u64 {
    if g >= crate::store::MAX_GENERATION {
        error!(token = %name, generation = g, "the generation is at its maximum and stays there; readers that compare generations will not see new tokens (move the state file aside to start again at 1)");
        return crate::store::MAX_GENERATION;
    }
    g + 1
}
