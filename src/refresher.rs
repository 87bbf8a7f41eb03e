//! One token on one host: the I/O around the refresh policy (`policy.rs` decides *when* and
//! *what*): the state file and the login hand-off, the token request, and publishing through
//! `publish.rs`.

use crate::config::TokenConfig;
use crate::oauth::{OAuthClient, OAuthError, TokenSet};
use crate::policy::{ChainHome, Failure, Lifetimes, Next, Policy, Request, Rules};
use crate::publish::{Publisher, Report, log_refreshed, report_failure, report_sessions};
use crate::store::{State, StateError, Status, blocking, intent, next_generation, next_state};
use crate::task::{CancellationToken, Command, Commands, Shared};
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// One token's refresher. Owns its state; nothing else writes this token's files.
pub struct Refresher {
    /// Shared with the supervisor that starts it again if it dies (`supervise.rs`) and the
    /// daemon's handle of the token: one copy per token.
    cfg: Arc<TokenConfig>,
    /// Bounds token requests in flight across all tokens.
    requests: Arc<tokio::sync::Semaphore>,
    client: OAuthClient,
    policy: Policy,
    files: Publisher,
    report: Report,
    /// The proxies' gate: closed around each token request (the hook around a refresh).
    gate: Option<Arc<crate::proxy::Gate>>,
}

/// How long ago the refresh in flight when tokend stopped began (its intent marker), if one
/// was: a marker written from the state of generation `state` (`None`: no state yet).
fn intent_age(cfg: &TokenConfig, state: Option<u64>) -> Option<Duration> {
    intent::in_flight(&State::intent_path(&cfg.state_file), state, Utc::now())
}

impl Refresher {
    pub fn new(cfg: Arc<TokenConfig>, shared: Shared) -> Self {
        let Shared { metrics, requests, client, gate, start_ups: _ } = shared;
        let status = Status { pid: std::process::id(), ..Status::default() };
        Self {
            client,
            policy: Policy::new(Rules::new(&cfg, ChainHome::StateFile)),
            files: Publisher::new(gate.clone()),
            gate,
            report: Report::new(&cfg, metrics, status),
            requests,
            cfg,
        }
    }

    /// Runs until `stop`; an in-flight refresh finishes first. `ready` fires once the sinks are published
    /// from the state, or the first login has succeeded or failed.
    ///
    /// Not an `async fn`: one of those keeps its by-value arguments twice in its future
    /// (rust-lang/rust#62958), and this future, with the 1 kB refresher in it, is an idle
    /// token's whole task (measured with heaptrack: 2.3 kB per token, now 1.3 kB). The block
    /// moves `self` in once and works on it in place.
    ///
    /// `start_ups` bounds the refreshers starting up at once (`task::START_UPS_BEYOND_REQUESTS`).
    #[allow(clippy::manual_async_fn)] // the point: see above
    pub fn run(
        mut self,
        commands: &mut Commands,
        stop: CancellationToken,
        ready: oneshot::Sender<()>,
        start_ups: Arc<tokio::sync::Semaphore>,
    ) -> impl Future<Output = ()> + Send {
        async move { self.serve(commands, stop, ready, start_ups).await }
    }

    async fn serve(
        &mut self,
        commands: &mut Commands,
        stop: CancellationToken,
        ready: oneshot::Sender<()>,
        start_ups: Arc<tokio::sync::Semaphore>,
    ) {
        // Each step is boxed, so that this future holds the wait, and a step's larger future
        // exists only while it runs (measured with heaptrack: 6.3 kB per task with the steps
        // inline).
        // A token still waiting for its turn when the daemon stops (a SIGTERM during the
        // bootstrap of many tokens, or during a reload that added them) never begins its
        // first login: that would be a session for a daemon that is going away.
        let starting = tokio::select! {
            biased;
            () = stop.cancelled() => {
                info!(token = %self.cfg.name, "refresher stopped before its start-up");
                return;
            }
            permit = start_ups.acquire_owned() => permit.expect("never closed"),
        };
        Box::pin(self.start_up()).await;
        drop(starting);
        let _ = ready.send(());
        loop {
            let wake = self.next_wake(Instant::now());
            tokio::select! {
                () = stop.cancelled() => break,
                cmd = commands.recv() => Box::pin(self.on_command(cmd)).await,
                () = tokio::time::sleep_until(wake.into()) => {
                    if crate::task::test_fault(self.name()).is_some() {
                        return;
                    }
                    Box::pin(self.on_wake()).await;
                }
            }
        }
        if self.files.unwritten() {
            Box::pin(self.flush()).await;
        }
        info!(token = %self.cfg.name, "refresher stopped");
    }

    /// Load the state, adopt a login hand-off, and refresh at once where the policy wants it.
    /// The status file is written once, when that is over: a request that goes out at once
    /// writes it after its reply (a first start is a login), so a write before it would be
    /// replaced a moment later (10,000 tokens: 10,000 durable writes of 14 at a bootstrap).
    async fn start_up(&mut self) {
        self.import_sessions();
        self.load().await;
        // A login handed over just before a crash or restart is newer than the state file.
        let adopted = self.adopt_handoff().await;
        if self.policy.wanted(Instant::now()) {
            self.attempt_refresh().await;
            // If that failed, publish what the state holds: better than empty sinks after a reboot.
            let unexpired = self.state().is_some_and(|s| s.access_expires_at > Utc::now());
            if unexpired && self.files.unwritten() {
                self.flush().await;
            }
        } else if !adopted {
            self.save_status().await;
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Tick => {
                if !self.adopt_handoff().await {
                    self.on_tick().await;
                }
            }
            Command::Recheck => {}
            Command::RefreshNow => {
                if !self.adopt_handoff().await {
                    self.policy.refresh_now(Instant::now());
                }
            }
        }
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn state(&self) -> Option<&State> {
        self.files.state()
    }

    async fn flush(&mut self) -> bool {
        self.files.flush(&self.cfg, self.report.metrics()).await
    }

    /// The logins an earlier daemon sent in the last hour count against the session budget:
    /// a restart (or a crash loop) must not start it afresh.
    fn import_sessions(&mut self) {
        let Some(old) = Status::load(&self.cfg.state_file) else { return };
        self.policy.import_logins(&old.logins, Instant::now(), Utc::now());
        report_sessions(&self.report, &self.cfg, &self.policy, None);
    }

    /// `load`, then the status file.
    async fn start(&mut self) {
        self.load().await;
        self.save_status().await;
    }

    /// Start-up: load the state and publish from it at once (a reboot empties /run).
    async fn load(&mut self) {
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
                self.report.error("state-io", &e.to_string(), true);
            }
        }
    }

    async fn adopt(&mut self, state: State) {
        let now = Utc::now();
        info!(token = %self.name(), generation = state.generation, access_expires = %crate::time::left(state.access_expires_at, now), "loaded state");
        let expired = state.access_expires_at <= now;
        self.policy.token_changed(Lifetimes::of(&state), rand::random());
        if let Some(age) = intent_age(&self.cfg, Some(state.generation)) {
            // Stopped mid-refresh: the server may already have killed this access token.
            // Replay the refresh (same refresh token) before publishing, where the provider
            // makes that safe; elsewhere a new login, or wait for a person.
            self.resume_lost(age);
            self.files.serve(&self.cfg, state);
            if self.policy.needs_login() && !expired {
                self.flush().await;
            }
        } else if expired {
            // Never publish an expired token; the deadline triggers a refresh at once.
            info!(token = %self.name(), "access token in state has expired; refreshing before publishing");
            self.files.keep(state);
        } else {
            self.files.serve(&self.cfg, state);
            self.flush().await;
        }
    }

    /// The refresh in flight when tokend stopped, `age` ago, lost its reply. After a new
    /// login or "needs login" the intent file stays until a login is persisted: a crash or
    /// restart before that must not send the abandoned refresh token either.
    fn resume_lost(&mut self, age: Duration) {
        let next = self.policy.lost_on_restart(Instant::now(), age);
        crate::publish::report_lost_in_flight(&self.report, &self.cfg, next, "tokend");
    }

    fn bootstrap(&mut self, why: &str) {
        // The bootstrap from a configured refresh token was in flight when tokend stopped:
        // sent again only where the provider allows a replay. For other grants a marker
        // does not count here, so it is not read (a failed open per token at a first start).
        let configured_rt = matches!(self.cfg.grant, crate::config::Grant::RefreshToken { .. });
        if let Some(age) = configured_rt.then(|| intent_age(&self.cfg, None)).flatten() {
            self.resume_lost(age);
            if self.policy.needs_login() {
                return;
            }
        }
        if !self.policy.bootstrap(Instant::now()) {
            self.report.needs_login(true);
            error!(token = %self.name(), reason = why, "needs login: run `tokend login --token {}`", self.name());
            return;
        }
        info!(token = %self.name(), grant = self.cfg.grant.name(), reason = why, "logging in (new session)");
    }

    /// Adopts a state that `tokend login` handed over while we hold the lock. Returns true
    /// when one was adopted (then no refresh is needed).
    async fn adopt_handoff(&mut self) -> bool {
        let path = State::handoff_path(&self.cfg.state_file);
        let mut state = match State::load_for(&path, &self.cfg.name) {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                error!(token = %self.name(), error = %e, "cannot use the login hand-off file; leaving it for inspection");
                return false;
            }
        };
        if let Some(cur) = self.state() {
            state.generation =
                state.generation.max(next_generation(&self.cfg.name, cur.generation));
        }
        info!(token = %self.name(), generation = state.generation, fingerprint = %state.access_token.fingerprint(), "adopted a new login from `tokend login` (new session)");
        self.policy.logged_in();
        self.policy.token_changed(Lifetimes::of(&state), rand::random());
        self.files.set_login(&self.cfg, state, false);
        self.report.update(|s| s.last_error = None);
        self.report.needs_login(false);
        // Persist first: only then may the hand-off file go.
        if self.flush().await || !self.files.state_file_behind() {
            let _ = std::fs::remove_file(&path);
        }
        self.save_status().await;
        true
    }

    async fn on_tick(&mut self) {
        let unreadable = self.report.status().last_error.is_some_and(|e| e.code == "state-io");
        if self.state().is_none() && unreadable {
            Box::pin(self.start()).await;
            return;
        }
        self.policy.on_tick(Instant::now(), rand::random());
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let wake = self.policy.next_wake(now, Utc::now(), self.files.state_file_behind());
        self.files.write_at(now).map_or(wake, |w| w.min(wake))
    }

    async fn on_wake(&mut self) {
        let now = Instant::now();
        self.files.flush_if_due(&self.cfg, self.report.metrics(), now).await;
        if self.policy.should_attempt(now, Utc::now(), self.files.state_file_behind()) {
            // Boxed apart from the write retry that shares this wake-up: the HTTP request's
            // future is the largest, allocated only for a request.
            Box::pin(self.attempt_refresh()).await;
        }
    }

    /// One request to the token endpoint, and its consequences.
    async fn attempt_refresh(&mut self) {
        let has_rt = self.state().is_some_and(|s| s.refresh_token.is_some());
        let request = self.policy.begin(Instant::now(), has_rt);
        report_sessions(&self.report, &self.cfg, &self.policy, request);
        let Some(request) = request else {
            // authorization_code: only `tokend login` gives a first token; or the session
            // budget is spent and the login waits.
            self.save_status().await;
            return;
        };
        self.report.attempt(Utc::now());
        let refresh_token = match request {
            Request::Refresh => self.state().and_then(|s| s.refresh_token.clone()),
            Request::Login => None,
        };
        // A bootstrap from a configured refresh token sends one too: its lost reply must not
        // be replayed where the provider punishes reuse either.
        let bootstrap_rt = request == Request::Login
            && matches!(self.cfg.grant, crate::config::Grant::RefreshToken { .. });
        if refresh_token.is_some() || bootstrap_rt {
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
            Ok(tokens) => {
                self.on_success(tokens, refresh_token.is_none(), elapsed);
                // The state, the sinks and the status in one trip to the write pool; the
                // proxies' gate opens there once the sinks are written.
                let status = self.status_now();
                self.report.save_with(&mut self.files, &self.cfg, status).await;
            }
            Err(e) => {
                self.on_failure(&e, request);
                if let Some(gate) = &self.gate {
                    gate.open();
                }
                self.save_status().await;
            }
        }
    }

    fn on_failure(&mut self, e: &OAuthError, request: Request) {
        let failure = Failure::of(e, request == Request::Refresh);
        let next = self.policy.on_failure(Instant::now(), failure, rand::random());
        if next == Next::NeedsLogin && failure != Failure::LostReply {
            // Nothing is in flight any more: the next attempt starts afresh. (After a lost
            // reply the intent stays, so that a restart does not send the spent token.)
            crate::publish::clear_intent(&self.cfg);
        }
        let serving = self.state().map(|s| crate::time::left(s.access_expires_at, Utc::now()));
        let attempt = self.policy.attempt();
        report_failure(&self.report, &self.cfg, (e, request), (next, attempt), serving.as_deref());
    }

    /// Marks the refresh from the current state (generation 0: none yet) as in flight, durably,
    /// before its request goes out. The marker stays after the refresh: the new state, one
    /// generation newer, makes it stale (`store::intent`).
    async fn write_intent(&self) {
        let generation = self.state().map_or(0, |s| s.generation);
        let path = State::intent_path(&self.cfg.state_file);
        let written = blocking(move || intent::write(&path, generation, Utc::now())).await;
        if let Err(e) = written {
            warn!(token = %self.name(), error = %e, "cannot write the refresh intent marker");
        }
    }

    /// A new pair: to persist and publish (the caller flushes).
    fn on_success(&mut self, tokens: TokenSet, new_session: bool, elapsed: Duration) {
        let now = Utc::now();
        let state = next_state(&self.cfg.name, tokens, self.state(), new_session, now);
        log_refreshed(&self.cfg.name, &state, new_session, elapsed, None);
        self.policy.on_success(Lifetimes::of(&state), rand::random());
        self.report.success(now);
        if new_session {
            self.files.set_login(&self.cfg, state, true);
        } else {
            self.files.set(&self.cfg, state, true);
        }
    }

    async fn save_status(&mut self) {
        self.status_now();
        self.report.save().await;
    }

    /// The status with the next refresh as the policy now sees it.
    fn status_now(&mut self) -> Status {
        let (now, wall) = (Instant::now(), Utc::now());
        let due = self.policy.due(now, wall).map(|d| wall + d.saturating_duration_since(now));
        let tick = self.cfg.schedule.next_after(wall);
        self.report.update(|s| {
            s.next_refresh_at = match (due, tick) {
                (Some(d), Some(t)) => Some(d.min(t)),
                (d, t) => d.or(t),
            };
        });
        self.report.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each idle token's task is this future: 10,000 of them must fit in the 64 MB the daemon
    /// is allowed. It holds the refresher and its wait, not a copy of the refresher (an
    /// `async fn` holds its by-value `self` twice) nor the steps' futures (boxed while they run).
    #[test]
    fn an_idle_tokens_task_holds_little_beyond_its_refresher() {
        let (cfg, shared) = crate::task::test_token();
        let refresher = Refresher::new(cfg, shared);
        let (_tx, mut rx) = crate::task::commands();
        let start_ups = Arc::new(tokio::sync::Semaphore::new(1));
        let task =
            refresher.run(&mut rx, CancellationToken::new(), oneshot::channel().0, start_ups);
        let (future, itself) = (std::mem::size_of_val(&task), std::mem::size_of::<Refresher>());
        assert!(
            future < itself + 512,
            "the task's future is {future} bytes, its refresher {itself}"
        );
    }
}
