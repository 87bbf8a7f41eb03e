//! What one token shows the machine, the same on one host and in a cluster's mirror: the state
//! file and the sinks written from the newest state (persist, then publish; failed writes
//! retried), the metrics, and the status file.

use crate::config::TokenConfig;
use crate::metrics::Metrics;
use crate::oauth::OAuthError;
use crate::policy::{Next, Policy, Request, WriteRetry};
use crate::proxy::Gate;
use crate::store::{ErrorRecord, State, Status, blocking};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;
use tracing::{error, info, warn};

/// The state file and sinks of one token.
#[derive(Default)]
pub struct Publisher {
    state: Option<State>,
    /// The state file is behind `state` (a write failed, or not tried yet).
    dirty: bool,
    /// Sinks that do not hold `state` yet.
    stale: BTreeSet<PathBuf>,
    retry: WriteRetry,
    /// Run the `on_refresh` hook once `state` is written everywhere.
    hook_due: bool,
    /// Remove the refresh intent marker once `state` is durable (`set_login`).
    login: bool,
    /// The token's proxies: told each state once it is durable here.
    gate: Option<Arc<Gate>>,
}

impl Publisher {
    /// `gate`: the token's proxies, if it has any.
    pub fn new(gate: Option<Arc<Gate>>) -> Self {
        Self { gate, ..Self::default() }
    }

    pub fn state(&self) -> Option<&State> {
        self.state.as_ref()
    }

    /// The state file is behind the newest state.
    pub fn state_file_behind(&self) -> bool {
        self.dirty
    }

    /// Something is not written yet.
    pub fn unwritten(&self) -> bool {
        self.dirty || !self.stale.is_empty()
    }

    /// When the next write is due, if anything is unwritten.
    pub fn write_at(&self, now: Instant) -> Option<Instant> {
        self.unwritten().then(|| self.retry.at().unwrap_or(now))
    }

    /// A new state (a refresh, a login): to persist, then publish. `hook`: run the
    /// `on_refresh` hook once it is written everywhere.
    pub fn set(&mut self, cfg: &TokenConfig, state: State, hook: bool) {
        self.state = Some(state);
        self.dirty = true;
        self.hook_due = hook;
        self.login = false;
        self.all_stale(cfg);
    }

    /// `set`, for the state of a new login: the intent marker is removed once it is durable.
    /// After a refresh the marker stays (the new state's generation makes it stale, and a
    /// removal would free an inode per refresh: `store::intent`); a marker of generation 0
    /// (a first login from a configured refresh token) would count again with no state file,
    /// should the state ever be moved aside as corrupt.
    pub fn set_login(&mut self, cfg: &TokenConfig, state: State, hook: bool) {
        self.set(cfg, state, hook);
        self.login = true;
    }

    /// A state that is already durable in the state file: publish it to every sink.
    pub fn serve(&mut self, cfg: &TokenConfig, state: State) {
        self.state = Some(state);
        self.dirty = false;
        self.all_stale(cfg);
    }

    /// A durable state that must not be published (it has expired): kept to refresh from.
    pub fn keep(&mut self, state: State) {
        self.state = Some(state);
        self.dirty = false;
        self.stale.clear();
    }

    /// Writes the sinks again (a replayed refresh may have changed nothing on disk).
    pub fn all_stale(&mut self, cfg: &TokenConfig) {
        self.stale = cfg.sinks.iter().map(|s| s.path.clone()).collect();
    }

    /// Writes what is due: the retry time has come, or nothing failed yet.
    pub async fn flush_if_due(&mut self, cfg: &Arc<TokenConfig>, metrics: &Metrics, now: Instant) {
        if self.unwritten() && self.retry.due(now) {
            self.flush(cfg, metrics).await;
        }
    }

    /// Persist, then publish. True when everything is on disk. The writes run in the store's
    /// blocking pool, so a slow disk holds this token's task and no other; all of them in one
    /// trip there (state, intent marker, sinks), not one per file: each trip is a wake-up of
    /// a pool thread and of this task again, which a round of 10,000 tokens pays 10,000 times.
    pub async fn flush(&mut self, cfg: &Arc<TokenConfig>, metrics: &Metrics) -> bool {
        self.flush_with(cfg, metrics, None).await
    }

    /// `flush`, ending a token request: the status file in the same pool trip, after the
    /// sinks, and the proxies' gate opened before it (`Report::save_with`). A login or refresh
    /// then makes one trip to the pool for its writes instead of two (10,000 fewer hand-offs
    /// at a first start of 10,000 tokens, issue 15).
    pub async fn flush_with(
        &mut self,
        cfg: &Arc<TokenConfig>,
        metrics: &Metrics,
        status: Option<Status>,
    ) -> bool {
        let Some(state) = self.state.clone() else {
            if let Some(status) = status {
                if let Some(gate) = &self.gate {
                    gate.open();
                }
                let cfg = cfg.clone();
                blocking(move || save_status(&cfg, &status)).await;
            }
            return true;
        };
        let writes = Writes {
            cfg: cfg.clone(),
            state: Arc::new(state),
            persist: self.dirty,
            login: self.dirty && self.login,
            stale: std::mem::take(&mut self.stale),
            gate: self.gate.clone(),
            status,
        };
        let (persisted, stale, state) = blocking(move || writes.run()).await;
        self.stale = stale;
        if !persisted {
            self.retry.failed(Instant::now(), rand::random());
            return false;
        }
        self.dirty = false;
        self.login = false;
        if !self.stale.is_empty() {
            self.retry.failed(Instant::now(), rand::random());
            return false;
        }
        self.retry.succeeded();
        publish_metrics(cfg, metrics, &state);
        if std::mem::take(&mut self.hook_due)
            && let Some(hook) = &cfg.on_refresh
        {
            crate::hook::spawn(hook.clone(), cfg, &state);
        }
        true
    }
}

/// One flush's writes, made on a blocking thread in the order the design sets: the state file
/// (if it is behind; after a login the intent marker goes then), the proxies get the pair,
/// then the sinks.
struct Writes {
    cfg: Arc<TokenConfig>,
    state: Arc<State>,
    /// The state file is behind `state`.
    persist: bool,
    /// `state` is a new login's: remove the intent marker once it is durable.
    login: bool,
    /// Sinks that do not hold `state` yet.
    stale: BTreeSet<PathBuf>,
    gate: Option<Arc<Gate>>,
    /// The token request is over: open the gate, then write this status (`flush_with`).
    status: Option<Status>,
}

impl Writes {
    /// Returns whether the state is durable, the sinks still not written, and the state.
    fn run(mut self) -> (bool, BTreeSet<PathBuf>, Arc<State>) {
        let status = self.status.take();
        let (cfg, gate) = (self.cfg.clone(), self.gate.clone());
        let done = self.persist_and_publish();
        if let Some(status) = status {
            if let Some(gate) = &gate {
                gate.open();
            }
            save_status(&cfg, &status);
        }
        done
    }

    fn persist_and_publish(self) -> (bool, BTreeSet<PathBuf>, Arc<State>) {
        let Self { cfg, state, persist, login, mut stale, gate, status: _ } = self;
        if persist {
            if let Err(e) = state.save(&cfg.state_file) {
                error!(token = %cfg.name, path = %cfg.state_file.display(), error = %e, "cannot write state; keeping the new token in memory and not publishing until it is saved");
                return (false, stale, state);
            }
            // The new pair is durable: nothing is in flight any more. After a refresh the
            // marker names the generation before this one, which is enough.
            if login {
                clear_intent(&cfg);
            }
        }
        // The proxies send the pair once it is durable here (a follower's proxy replays a 401
        // once the leader's new pair is mirrored).
        if let Some(gate) = &gate {
            gate.publish(&state);
        }
        crate::store::write_stale_sinks(&cfg, &state, &mut stale);
        // An emptied BTreeSet keeps its node (280 bytes per token at rest); a new one has none.
        (true, if stale.is_empty() { BTreeSet::new() } else { stale }, state)
    }
}

/// Mirrors the published state into the metrics, including how close to expiry `/healthz`
/// starts to complain (half the margin the policy refreshes at).
fn publish_metrics(cfg: &TokenConfig, metrics: &Metrics, s: &State) {
    let lifetime = (s.access_expires_at - s.refreshed_at).to_std().unwrap_or_default();
    let near = cfg.safety_margin.min(lifetime / 2) / 2;
    metrics.update(&cfg.name, |m| {
        m.generation = s.generation;
        m.access_expires = Some(s.access_expires_at.timestamp());
        m.refresh_expires = s.refresh_expires_at.map(|t| t.timestamp());
        m.near_expiry = near;
    });
}

/// Removes the marker of a refresh in flight: a login's pair is durable now, or nothing is in
/// flight any more (a permanent failure).
pub fn clear_intent(cfg: &TokenConfig) {
    match std::fs::remove_file(State::intent_path(&cfg.state_file)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(token = %cfg.name, error = %e, "cannot remove the refresh intent marker"),
    }
}

/// The status file and the per-token metrics: what `tokend status`, `/metrics` and `/healthz`
/// show. Changes are kept in memory until `save`.
pub struct Report {
    /// The token's config, shared: not copies of its name and state file's path per token.
    cfg: Arc<TokenConfig>,
    metrics: Arc<Metrics>,
    status: Mutex<Status>,
    /// Held across taking the status and writing it (`save`).
    saving: tokio::sync::Mutex<()>,
}

impl Report {
    /// A task restarted after it died keeps showing that death (`Status::task`).
    pub fn new(cfg: &Arc<TokenConfig>, metrics: Arc<Metrics>, mut status: Status) -> Self {
        metrics.update(&cfg.name, |m| status.task.clone_from(&m.task));
        let (status, saving) = (Mutex::new(status), tokio::sync::Mutex::new(()));
        Self { cfg: cfg.clone(), metrics, status, saving }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    /// `update`, then `save`.
    #[cfg(feature = "etcd")]
    pub async fn write(&self, f: impl FnOnce(&mut Status)) {
        self.update(f);
        self.save().await;
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Writes the status file in the store's blocking pool (see `Publisher::flush`). Saves
    /// of one token take turns, each with the status as it is at its turn, so that the last
    /// written is the newest (a cluster host's leader and mirror both save).
    pub async fn save(&self) {
        let _turn = self.saving.lock().await;
        let (status, cfg) = (self.status(), self.cfg.clone());
        blocking(move || save_status(&cfg, &status)).await;
    }

    /// `save`, in the pool trip of `files`' flush (`Publisher::flush_with`). True when
    /// everything is on disk.
    pub async fn save_with(
        &self,
        files: &mut Publisher,
        cfg: &Arc<TokenConfig>,
        status: Status,
    ) -> bool {
        let _turn = self.saving.lock().await;
        files.flush_with(cfg, &self.metrics, Some(status)).await
    }

    /// Needs login or not, in the status and the metrics alike (set *and* cleared here only).
    pub fn needs_login(&self, yes: bool) {
        self.update(|s| s.needs_login = yes);
        self.metrics.update(&self.cfg.name, |m| m.needs_login = yes);
    }

    /// A token request goes out.
    pub fn attempt(&self, wall: DateTime<Utc>) {
        self.update(|s| s.last_attempt_at = Some(wall));
        self.metrics.update(&self.cfg.name, |m| m.attempts += 1);
    }

    /// A failed token request: counted by code, and kept as the last error.
    pub fn failure(&self, code: &str, message: &str, retry: bool, permanent: bool) {
        self.metrics.update(&self.cfg.name, |m| {
            *m.failures.entry(code.to_string()).or_default() += 1;
            m.retries += u64::from(retry);
        });
        self.error(code, message, permanent);
    }

    pub fn error(&self, code: &str, message: &str, permanent: bool) {
        let rec =
            ErrorRecord { at: Utc::now(), code: code.into(), message: message.into(), permanent };
        self.update(|s| s.last_error = Some(Box::new(rec)));
    }

    pub fn relogin(&self) {
        self.metrics.update(&self.cfg.name, |m| m.relogins += 1);
    }

    /// A new token is published: no error, no login needed.
    pub fn success(&self, wall: DateTime<Utc>) {
        self.update(|s| {
            s.last_error = None;
            s.last_success_at = Some(wall);
        });
        self.needs_login(false);
        self.metrics.update(&self.cfg.name, |m| m.last_success = Some(wall.timestamp()));
    }
}

/// Writes the status file; a failure is logged, and the next save tries again.
fn save_status(cfg: &TokenConfig, status: &Status) {
    if let Err(e) = status.save(&cfg.state_file) {
        warn!(token = %cfg.name, error = %e, "cannot write status file");
    }
}

/// The session budget as the policy keeps it, into the status file (which carries it over a
/// restart) and the metrics, in both modes, after each `Policy::begin`. `sent`: what went out.
pub fn report_sessions(report: &Report, cfg: &TokenConfig, policy: &Policy, sent: Option<Request>) {
    let (now, wall) = (Instant::now(), Utc::now());
    let since = |t: Instant| chrono::Duration::from_std(now.saturating_duration_since(t));
    let logins: Vec<DateTime<Utc>> =
        policy.recent_logins(now).map(|t| wall - since(t).unwrap_or_default()).collect();
    let until = |t: Instant| chrono::Duration::from_std(t.saturating_duration_since(now));
    let held = policy.logins_held_until().map(|t| wall + until(t).unwrap_or_default());
    if let Some(until) = held
        && report.status().logins_held_until.is_none()
    {
        warn!(
            token = %cfg.name,
            logins = logins.len(),
            session_budget = cfg.rate.sessions,
            until = %until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "session budget spent: no new login (new session) before then"
        );
    }
    if sent == Some(Request::Login) {
        info!(token = %cfg.name, grant = cfg.grant.name(), logins_last_hour = logins.len(), session_budget = cfg.rate.sessions, "login sent (a new session)");
    }
    report.metrics.update(&cfg.name, |m| {
        m.logins += u64::from(sent == Some(Request::Login));
        m.logins_held_until = held.map(|t| t.timestamp());
    });
    report.update(|s| (s.logins, s.logins_held_until) = (logins, held));
}

/// Logs and records a failed token request and what the policy decided, in both modes.
/// `request`: what was sent; a login that failed this way may have spent a session.
pub fn report_failure(
    report: &Report,
    cfg: &TokenConfig,
    (e, request): (&OAuthError, Request),
    (next, attempt): (Next, u32),
    serving: Option<&str>,
) {
    let (code, name) = (e.code(), &cfg.name);
    let starts_sessions = cfg.grant.starts_sessions();
    match next {
        Next::Retry(delay)
            if request == Request::Login && e.may_have_acted() && starts_sessions =>
        {
            report.failure(&code, &e.to_string(), true, false);
            warn!(token = %name, attempt, code = %code, error = %e, retry_in_ms = delay.as_millis() as u64, "login failed after the server may have started a session (possible spent session); retrying in minutes");
        }
        Next::Retry(delay) => {
            report.failure(&code, &e.to_string(), true, false);
            warn!(token = %name, attempt, code = %code, error = %e, retry_in_ms = delay.as_millis() as u64, "token request failed; retrying");
        }
        Next::Relogin => {
            report.failure(&code, &e.to_string(), false, true);
            report.relogin();
            warn!(token = %name, code = %code, "refresh chain is dead; logging in again (new session)");
        }
        Next::NeedsLogin => {
            report.failure(&code, &e.to_string(), false, true);
            report.needs_login(true);
            error!(
                token = %name,
                code = %code,
                error = %e,
                still_serving = serving.unwrap_or("nothing"),
                "permanent failure: needs login; will retry on the next tick or SIGHUP"
            );
        }
    }
}

/// A refresh was in flight when `whose` process stopped, its reply lost with it: logs and
/// records what the provider's replay rule decided (`Policy::lost_on_restart`), in both modes.
pub fn report_lost_in_flight(report: &Report, cfg: &TokenConfig, next: Next, whose: &str) {
    let (name, provider) = (&cfg.name, cfg.provider.name);
    match next {
        Next::Retry(_) => {
            info!(token = %name, provider, "a refresh was in flight when {whose} stopped; replaying it with the same refresh token before publishing");
        }
        Next::Relogin => {
            warn!(token = %name, provider, "a refresh was in flight when {whose} stopped, and this provider does not allow replaying it now; logging in again (new session)");
        }
        Next::NeedsLogin => {
            report.needs_login(true);
            error!(token = %name, provider, "a refresh was in flight when {whose} stopped, and this provider does not allow replaying it now: needs login (`tokend login --token {name}`)");
        }
    }
}

/// The INFO line of a new token, in both modes (`revision`: the pair's in etcd).
pub fn log_refreshed(
    name: &str,
    state: &State,
    new_session: bool,
    elapsed: Duration,
    revision: Option<i64>,
) {
    let secs = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    info!(
        token = %name,
        generation = state.generation,
        access_expires_at = %secs(state.access_expires_at),
        refresh_expires_at = %state.refresh_expires_at.map_or_else(|| "none".into(), secs),
        duration_ms = elapsed.as_millis() as u64,
        fingerprint = %state.access_token.fingerprint(),
        new_session,
        revision,
        "{}",
        if revision.is_some() { "refreshed and published to etcd" } else { "refreshed" }
    );
}
