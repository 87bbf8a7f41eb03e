//! One term of a token's leader: the I/O around the refresh policy (`policy.rs`) in cluster
//! mode. Every write is an etcd transaction fenced by the election key's create revision and
//! the pair's mod revision; before a refresh goes out, the intent and the rate budget are
//! stored, so that the next leader replays the refresh and honours the budget.

use super::codec::decode_state;
use super::token::{Ctx, PairRev, Snapshot, Stored};
use super::{Intent, Lease};
use crate::oauth::{OAuthError, TokenSet};
use crate::policy::{Failure, Lifetimes, Next, Policy, Request, store_backoff};
use crate::publish::{log_refreshed, report_failure, report_lost_in_flight, report_sessions};
use crate::store::{State, next_generation, next_state};
use crate::task::Command;
use chrono::Utc;
use etcd_client::{Compare, CompareOp, LeaderKey, Txn, TxnOp};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// While a token needs login, its leader looks for a login forwarded by another host this often.
const HANDOFF_POLL: Duration = Duration::from_secs(1);

pub(super) enum Outcome {
    Stop,
    /// The lease or the fence is gone: campaign again.
    Lost,
}

pub(super) struct Leader<'a> {
    ctx: &'a Ctx,
    key: LeaderKey,
    lease: i64,
    lease_rx: &'a mut watch::Receiver<Lease>,
    policy: &'a mut Policy,
    /// What etcd says of the token needing login, as this term last wrote it (None: not yet
    /// written this term; a previous leader's key may be there).
    shown_needs_login: Option<bool>,
}

/// The pair as the leader last read or wrote it.
struct Current {
    state: Option<State>,
    rev: PairRev,
}

enum Publish {
    Done(i64),
    /// The fence or the pair's revision did not match.
    Rejected(Rejection),
    /// etcd error.
    Failed,
}

#[derive(Debug, Clone, Copy)]
enum Rejection {
    /// Our election key is gone or re-created: another host may lead.
    Fence,
    /// We still lead, but the pair changed since we read it.
    PairChanged,
}

impl<'a> Leader<'a> {
    pub fn new(
        ctx: &'a Ctx,
        key: LeaderKey,
        lease: i64,
        lease_rx: &'a mut watch::Receiver<Lease>,
        policy: &'a mut Policy,
    ) -> Self {
        Self { ctx, key, lease, lease_rx, policy, shown_needs_login: None }
    }

    pub fn into_key(self) -> LeaderKey {
        self.key
    }

    fn name(&self) -> &str {
        self.ctx.name()
    }

    /// The fencing comparison: our election key still exists at its create revision.
    fn fence(&self) -> Compare {
        Compare::create_revision(self.key.key(), CompareOp::Equal, self.key.rev())
    }

    /// The pair is still what we read.
    fn unchanged(&self, rev: PairRev) -> Compare {
        let key = self.ctx.pair_key.as_bytes();
        match rev {
            PairRev::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            PairRev::At(r) => Compare::mod_revision(key, CompareOp::Equal, r),
            // No revision matches -1: nothing is ever written over an unreadable pair.
            PairRev::Unreadable => Compare::mod_revision(key, CompareOp::Equal, -1),
        }
    }

    fn lease_ok(&self) -> bool {
        self.lease_rx.borrow().valid(self.lease, Instant::now())
    }

    /// A new current pair: the policy's deadline follows it.
    fn set_current(&mut self, cur: &mut Current, state: State, revision: i64) {
        self.policy.token_changed(Lifetimes::of(&state), rand::random());
        *cur = Current { state: Some(state), rev: PairRev::At(revision) };
    }

    pub async fn run(
        &mut self,
        commands: &mut crate::task::Commands,
        stop: &CancellationToken,
    ) -> Outcome {
        let Some(mut cur) = self.load().await else { return Outcome::Lost };
        // An absolute time: the lease's keep-alive wakes this loop more often than that.
        let mut handoff_at = Instant::now() + HANDOFF_POLL;
        loop {
            self.show_needs_login().await;
            let mut wake = self.policy.next_wake(Instant::now(), Utc::now(), false);
            if self.policy.needs_login() {
                wake = wake.min(handoff_at);
            }
            let kept = tokio::select! {
                () = stop.cancelled() => return Outcome::Stop,
                cmd = commands.recv() => self.on_command(cmd, &mut cur).await,
                () = tokio::time::sleep_until(wake.into()) => {
                    if crate::task::test_fault(self.name()).is_some() {
                        return Outcome::Stop;
                    }
                    self.on_wake(&mut cur, &mut handoff_at).await
                }
                _ = self.lease_rx.changed() => self.lease_ok() || {
                    warn!(token = %self.name(), "lost the election lease; stepping down");
                    false
                },
            };
            if !kept {
                return Outcome::Lost;
            }
        }
    }

    /// Tells every host whether the token needs login (`Ctx::needs_login_key`), when that
    /// changed. Fenced, so a deposed leader cannot contradict its successor; a failed write is
    /// tried again on the next turn of the loop (while the token needs login, every second).
    async fn show_needs_login(&mut self) {
        let yes = self.policy.needs_login();
        if self.shown_needs_login == Some(yes) {
            return;
        }
        let key = self.ctx.needs_login_key.as_bytes();
        let op = if yes {
            let lease = etcd_client::PutOptions::new().with_lease(self.lease);
            TxnOp::put(key, self.ctx.cluster.node(), Some(lease))
        } else {
            TxnOp::delete(key, None)
        };
        if self.txn(Txn::new().when([self.fence()]).and_then([op])).await == Some(true) {
            self.shown_needs_login = Some(yes);
        }
    }

    /// False when leadership is lost.
    async fn on_command(&mut self, cmd: Command, cur: &mut Current) -> bool {
        let now = Instant::now();
        match cmd {
            Command::Tick => self.policy.on_tick(now, rand::random()),
            Command::RefreshNow => self.policy.refresh_now(now),
            Command::Recheck => return true,
        }
        !self.policy.needs_login() || self.adopt_local(cur, true).await
    }

    /// False when leadership is lost.
    async fn on_wake(&mut self, cur: &mut Current, handoff_at: &mut Instant) -> bool {
        if !self.lease_ok() {
            return false;
        }
        if self.policy.needs_login() && Instant::now() >= *handoff_at {
            *handoff_at = Instant::now() + HANDOFF_POLL;
            // A login made on this host (kept while etcd was away), or forwarded.
            if !self.adopt_local(cur, true).await
                || (self.policy.needs_login() && !self.adopt_handoff(cur).await)
            {
                return false;
            }
        }
        if self.policy.should_attempt(Instant::now(), Utc::now(), false) {
            return self.attempt(cur).await;
        }
        true
    }

    /// Reads the pair from etcd until it answers; None when the lease ends meanwhile.
    async fn snapshot(&mut self) -> Option<Snapshot> {
        let mut failures = 0;
        loop {
            match self.ctx.read().await {
                Ok(s) => return Some(s),
                Err(e) => {
                    failures += 1;
                    warn!(token = %self.name(), error = %e, "cannot read the pair from etcd");
                    tokio::time::sleep(store_backoff(failures, rand::random())).await;
                    if !self.lease_ok() {
                        return None;
                    }
                }
            }
        }
    }

    /// Reads the pair and any intent; bootstraps the first pair when there is none.
    async fn load(&mut self) -> Option<Current> {
        let snap = self.snapshot().await?;
        if let Some(b) = &snap.budget
            && let Some(until) = self.policy.import_budget(b, Instant::now(), Utc::now())
        {
            info!(token = %self.name(), until = %until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "the server told the last leader to wait (Retry-After): nothing is sent before then");
        }
        let mut cur = Current { state: None, rev: PairRev::Absent };
        match snap.pair {
            Some(Stored::Pair(state, revision)) => self.set_current(&mut cur, *state, revision),
            Some(Stored::Unreadable(why)) => {
                error!(token = %self.name(), key = %self.ctx.pair_key, reason = %why, "the pair in etcd is unreadable; not refreshing and not logging in over it (fix cluster.encryption_key or delete the key)");
                self.policy.hold();
                return Some(Current { state: None, rev: PairRev::Unreadable });
            }
            None => {}
        }
        if cur.state.is_none() && !self.bootstrap(&mut cur).await {
            return None;
        }
        if let Some(intent) = snap.intent.filter(|i| PairRev::At(i.pair_revision) == cur.rev) {
            self.resume_intent(&intent).await;
        }
        Some(cur)
    }

    /// The refresh `intent` names was in flight when its leader stopped, its reply lost: the
    /// provider's replay rule decides by the intent's age, through the same policy as one
    /// host after a restart (replay, a new login, or needs login; never a replay where reuse
    /// revokes the family). The intent stays until a new pair is published.
    async fn resume_intent(&mut self, intent: &Intent) {
        // Another host's wall clock: an intent from the future counts as just written.
        let age = (Utc::now() - intent.at).to_std().unwrap_or_default();
        info!(token = %self.name(), started_by = %intent.node, since = %intent.at.to_rfc3339(), "found the intent of a refresh in flight");
        let next = self.policy.lost_on_restart(Instant::now(), age);
        report_lost_in_flight(&self.ctx.report, &self.ctx.cfg, next, "the last leader");
        self.ctx.report.save().await;
    }

    /// No pair in etcd: import a local state, else log in, else wait for `tokend login`.
    /// False when the fence is lost.
    async fn bootstrap(&mut self, cur: &mut Current) -> bool {
        if !self.adopt_local(cur, false).await {
            return false;
        }
        if cur.state.is_some() {
            return true;
        }
        if self.policy.bootstrap(Instant::now()) {
            info!(token = %self.name(), grant = self.ctx.cfg.grant.name(), "no pair in etcd yet; logging in (new session)");
        } else {
            self.ctx.report.needs_login(true);
            self.ctx.report.save().await;
            error!(token = %self.name(), "needs login: run `tokend login --token {}` on any host of the cluster", self.name());
        }
        true
    }

    /// With no pair in etcd (or a dead one), adopts a local state: `tokend login`'s hand-off
    /// file, or, at bootstrap only, the local state file (importing a single-host setup).
    /// Create-only: it never replaces a pair another host has stored. False when the fence is lost.
    async fn adopt_local(&mut self, cur: &mut Current, handoff_only: bool) -> bool {
        let handoff = State::handoff_path(&self.ctx.cfg.state_file);
        let mut source = handoff.clone();
        let mut found = State::load(&handoff).ok().flatten();
        if found.is_none() && !handoff_only {
            source = self.ctx.cfg.state_file.clone();
            found = State::load(&source).ok().flatten();
        }
        let Some(mut state) = found else { return true };
        if !state.can_refresh(Utc::now()) {
            info!(token = %self.name(), path = %source.display(), "local state has no usable refresh token; not importing it");
            return true;
        }
        if let Some(prev) = &cur.state {
            state.generation = state.generation.max(next_generation(self.name(), prev.generation));
        }
        let published = self.publish(&state, cur.rev, &[]).await;
        match self.settle(published, &state).await {
            Publish::Done(revision) => {
                info!(token = %self.name(), path = %source.display(), generation = state.generation, "imported the local state into etcd");
                if source == handoff {
                    let _ = std::fs::remove_file(&handoff);
                }
                self.adopted(cur, state, revision).await;
                true
            }
            Publish::Rejected(_) => false,
            Publish::Failed => true,
        }
    }

    /// The login another host forwarded through the hand-off key, if any (None: nothing there,
    /// or etcd did not answer).
    async fn forwarded(&self) -> Option<Vec<u8>> {
        let mut c = self.ctx.cluster.clients().await.ok()?;
        match Box::pin(c.short.get(self.ctx.handoff_key.as_bytes(), None)).await {
            Ok(r) => {
                self.ctx.cluster.succeeded().await;
                r.kvs().first().map(|kv| kv.value().to_vec())
            }
            Err(e) => {
                self.ctx.cluster.failed(&e).await;
                None
            }
        }
    }

    /// While the token needs login: a `tokend login` made on another host, forwarded through
    /// the hand-off key, becomes the pair; the key is deleted in the same fenced transaction.
    /// False when the fence is lost.
    async fn adopt_handoff(&mut self, cur: &mut Current) -> bool {
        let key = self.ctx.handoff_key.clone();
        let Some(bytes) = self.forwarded().await else { return true };
        let mut state = match decode_state(self.ctx.cluster.codec(), &bytes, key.as_bytes()) {
            Ok(s) if s.can_refresh(Utc::now()) => s,
            Ok(_) | Err(_) => {
                warn!(token = %self.name(), key = %key, "a login forwarded through etcd is unusable (no live refresh token, or unreadable); deleting it");
                let txn =
                    Txn::new().when([self.fence()]).and_then([TxnOp::delete(key.as_bytes(), None)]);
                return self.txn(txn).await != Some(false);
            }
        };
        if let Some(prev) = &cur.state {
            state.generation = state.generation.max(next_generation(self.name(), prev.generation));
        }
        let published = self.publish(&state, cur.rev, &[key.as_bytes()]).await;
        match self.settle(published, &state).await {
            Publish::Done(revision) => {
                info!(token = %self.name(), generation = state.generation, fingerprint = %state.access_token.fingerprint(), "adopted a new login from `tokend login` on another host (new session)");
                self.adopted(cur, state, revision).await;
                true
            }
            Publish::Rejected(_) => false,
            Publish::Failed => true,
        }
    }

    /// An adopted login is published once: a failed write may have been applied with its
    /// reply lost, having deleted the hand-off it came from, so none would come again and this
    /// leader would wait for a login that is already in etcd. Done if etcd holds `state`.
    async fn settle(&mut self, published: Publish, state: &State) -> Publish {
        let Publish::Failed = published else { return published };
        // Read until etcd answers: the first request after a reset may fail too.
        let Some(snap) = self.snapshot().await else { return Publish::Failed };
        match snap.pair {
            Some(Stored::Pair(stored, revision)) if same_pair(&stored, state) => {
                info!(token = %self.name(), generation = state.generation, revision, "the reply to publishing the login was lost, but etcd holds it");
                Publish::Done(revision)
            }
            _ => Publish::Failed,
        }
    }

    /// A login from `tokend login` is now the pair: the token no longer needs one.
    async fn adopted(&mut self, cur: &mut Current, state: State, revision: i64) {
        self.set_current(cur, state, revision);
        self.policy.logged_in();
        self.ctx.report.needs_login(false);
        self.ctx.report.save().await;
    }

    /// The rate budget as stored in etcd, for the next leader.
    fn budget_put(&self) -> TxnOp {
        let budget = self.policy.export_budget(Instant::now(), Utc::now());
        let value = self.ctx.cluster.codec().encode(&budget, self.ctx.budget_key.as_bytes());
        TxnOp::put(self.ctx.budget_key.as_bytes(), value, None)
    }

    /// Before the request: the budget (this request included) and, for a refresh, the intent,
    /// in one fenced write. Some(false): the fence rejected it; None: etcd did not answer.
    async fn announce(
        &self,
        cur: &Current,
        refresh_token: Option<&crate::secret::RefreshToken>,
    ) -> Option<bool> {
        let mut ops = vec![self.budget_put()];
        if let (Some(rt), PairRev::At(pair_revision)) = (refresh_token, cur.rev) {
            let intent = Intent {
                node: self.ctx.cluster.node().into(),
                pair_revision,
                refresh_token: rt.fingerprint(),
                at: Utc::now(),
            };
            let value = self.ctx.cluster.codec().encode(&intent, self.ctx.intent_key.as_bytes());
            ops.push(TxnOp::put(self.ctx.intent_key.as_bytes(), value, None));
        }
        let txn = Txn::new().when([self.fence(), self.unchanged(cur.rev)]).and_then(ops);
        self.txn(txn).await
    }

    /// One token request, fenced on both sides. False when leadership is lost.
    async fn attempt(&mut self, cur: &mut Current) -> bool {
        if cur.rev == PairRev::Unreadable {
            // Neither a refresh nor a login may go over a pair this host cannot read.
            self.policy.hold();
            return true;
        }
        let has_rt = cur.state.as_ref().is_some_and(|s| s.refresh_token.is_some());
        let Some(request) = self.policy.begin(Instant::now(), has_rt) else {
            // authorization_code: only `tokend login` gives a first token; or the session
            // budget is spent and the login waits.
            report_sessions(&self.ctx.report, &self.ctx.cfg, self.policy, None);
            self.ctx.report.save().await;
            return true;
        };
        let refresh_token = match request {
            Request::Refresh => cur.state.as_ref().and_then(|s| s.refresh_token.clone()),
            Request::Login => None,
        };
        // A leader that lost the fence sends nothing; one that could not store its intent
        // sends nothing either, and that spends no session.
        match self.announce(cur, refresh_token.as_ref()).await {
            Some(true) => {}
            Some(false) => {
                warn!(token = %self.name(), "the fence rejected the write before the token request (intent and rate budget): another host leads now");
                self.policy.not_sent();
                return false;
            }
            None => {
                self.policy.not_sent();
                self.policy.on_failure(Instant::now(), Failure::Store, rand::random());
                return true;
            }
        }
        report_sessions(&self.ctx.report, &self.ctx.cfg, self.policy, Some(request));
        self.ctx.report.attempt(Utc::now());
        if !self.lease_ok() {
            return false;
        }
        let cfg = &self.ctx.cfg;
        let permit = self.ctx.shared.requests.clone().acquire_owned().await.expect("never closed");
        // This host's proxied requests on the old token finish first (see proxy::Gate).
        if let Some(gate) = &self.ctx.shared.gate {
            gate.close().await;
        }
        let started = Instant::now();
        let result = match &refresh_token {
            Some(rt) => self.ctx.shared.client.refresh(cfg, rt).await,
            None => self.ctx.shared.client.login(cfg).await,
        };
        let elapsed = started.elapsed();
        drop(permit);
        let kept = match result {
            Ok(tokens) => self.on_success(cur, tokens, refresh_token.is_none(), elapsed).await,
            Err(e) => self.on_failure(cur, &e, request).await,
        };
        if let Some(gate) = &self.ctx.shared.gate {
            gate.open();
        }
        kept
    }

    /// False when leadership is lost.
    async fn on_failure(&mut self, cur: &mut Current, e: &OAuthError, request: Request) -> bool {
        let failure = Failure::of(e, request == Request::Refresh);
        if failure == Failure::DeadChain {
            match self.rotated_elsewhere(cur, e).await {
                Some(true) => return true,
                Some(false) => {}
                None => {
                    self.policy.on_failure(Instant::now(), Failure::Store, rand::random());
                    return true;
                }
            }
        }
        let next = self.policy.on_failure(Instant::now(), failure, rand::random());
        let serving =
            cur.state.as_ref().map(|s| crate::time::left(s.access_expires_at, Utc::now()));
        let attempt = self.policy.attempt();
        report_failure(
            &self.ctx.report,
            &self.ctx.cfg,
            (e, request),
            (next, attempt),
            serving.as_deref(),
        );
        self.ctx.report.save().await;
        if matches!(next, Next::Retry(_)) && e.retry_after().is_some() {
            // The next leader must wait for it too.
            let txn = Txn::new().when([self.fence()]).and_then([self.budget_put()]);
            return self.txn(txn).await != Some(false);
        }
        true
    }

    /// `invalid_grant` in cluster mode first means "read etcd again": another leader may have
    /// rotated the pair. Only a pair that is still the one we used is really dead. Some(true):
    /// rotated, retry with the newer pair; None: etcd did not answer.
    async fn rotated_elsewhere(&mut self, cur: &mut Current, e: &OAuthError) -> Option<bool> {
        let snap = self.ctx.read().await.ok()?;
        match snap.pair {
            Some(Stored::Pair(state, revision)) if PairRev::At(revision) != cur.rev => {
                info!(token = %self.name(), generation = state.generation, code = %e.code(), "refresh token was rotated by another host; using the newer pair from etcd");
                self.set_current(cur, *state, revision);
                // Its refresh token may itself have been in flight: then the replay rule holds.
                match snap.intent.filter(|i| PairRev::At(i.pair_revision) == cur.rev) {
                    Some(intent) => self.resume_intent(&intent).await,
                    None => self.policy.replay(Instant::now()),
                }
                Some(true)
            }
            _ => Some(false),
        }
    }

    async fn on_success(
        &mut self,
        cur: &mut Current,
        tokens: TokenSet,
        new_session: bool,
        elapsed: Duration,
    ) -> bool {
        let now = Utc::now();
        let state = next_state(self.name(), tokens, cur.state.as_ref(), new_session, now);
        let Some(revision) = self.publish_new(&state, cur.rev).await else { return false };
        log_refreshed(self.name(), &state, new_session, elapsed, Some(revision));
        self.policy.on_success(Lifetimes::of(&state), rand::random());
        self.set_current(cur, state, revision);
        self.ctx.report.success(now);
        self.ctx.report.save().await;
        true
    }

    /// Publishes a new pair (deleting the intent) until etcd holds it: its revision, or None
    /// when leadership is lost. Keeps trying while we still lead: the pair exists nowhere else.
    async fn publish_new(&mut self, state: &State, rev: PairRev) -> Option<i64> {
        let mut tries = 0;
        loop {
            match self.publish(state, rev, &[self.ctx.intent_key.as_bytes()]).await {
                Publish::Done(revision) => return Some(revision),
                Publish::Rejected(Rejection::Fence) => {
                    warn!(token = %self.name(), generation = state.generation, "the fence rejected publishing the new pair: this host no longer leads; the leader replays this refresh");
                    return None;
                }
                // A failed try may have been applied with its reply lost: then the pair
                // "changed" by our own write, and giving up would drop a published refresh.
                Publish::Rejected(Rejection::PairChanged) if tries > 0 => {
                    return self.stored_as(state).await;
                }
                Publish::Rejected(Rejection::PairChanged) => {
                    warn!(token = %self.name(), generation = state.generation, "the pair in etcd changed under this leader; not publishing over it, re-reading");
                    return None;
                }
                Publish::Failed => {
                    tries += 1;
                    if !self.lease_ok() {
                        // A failed try may have been applied with its reply lost: the next
                        // leader then finds the new pair published, else the intent to replay.
                        warn!(token = %self.name(), "cannot publish the new pair and the lease is gone; the next leader finds it published (if etcd applied a try whose reply was lost) or replays this refresh");
                        return None;
                    }
                    tokio::time::sleep(store_backoff(tries, rand::random())).await;
                }
            }
        }
    }

    /// After a publish whose reply was lost, the pair etcd holds: its revision if it is
    /// `state` (a revision alone cannot tell our write from another's), else None.
    async fn stored_as(&mut self, state: &State) -> Option<i64> {
        let snap = self.snapshot().await?;
        if let Some(Stored::Pair(stored, revision)) = snap.pair
            && same_pair(&stored, state)
        {
            info!(token = %self.name(), generation = state.generation, revision, "the reply to publishing the new pair was lost, but etcd holds it: published");
            return Some(revision);
        }
        warn!(token = %self.name(), generation = state.generation, "the pair in etcd changed under this leader, and not by its own write; not publishing over it, re-reading");
        None
    }

    /// Fenced write of a pair, deleting the keys in `delete` in the same transaction.
    async fn publish(&mut self, state: &State, rev: PairRev, delete: &[&[u8]]) -> Publish {
        let value = self.ctx.cluster.codec().encode(state, self.ctx.pair_key.as_bytes());
        let mut ops = vec![TxnOp::put(self.ctx.pair_key.as_bytes(), value, None)];
        ops.extend(delete.iter().map(|k| TxnOp::delete(*k, None)));
        // On failure, read our election key back: it tells a lost fence from a changed pair.
        let txn = Txn::new()
            .when([self.fence(), self.unchanged(rev)])
            .and_then(ops)
            .or_else([TxnOp::get(self.key.key(), None)]);
        let Ok(mut c) = self.ctx.cluster.clients().await else { return Publish::Failed };
        match Box::pin(c.short.txn(txn)).await {
            Ok(r) if r.succeeded() => {
                self.ctx.cluster.succeeded().await;
                Publish::Done(r.header().map_or(0, etcd_client::ResponseHeader::revision))
            }
            Ok(r) => {
                let ours = r.op_responses().into_iter().any(|op| {
                    matches!(op, etcd_client::TxnOpResponse::Get(g)
                        if g.kvs().first().is_some_and(|kv| kv.create_revision() == self.key.rev()))
                });
                Publish::Rejected(if ours { Rejection::PairChanged } else { Rejection::Fence })
            }
            Err(e) => {
                self.ctx.cluster.failed(&e).await;
                warn!(token = %self.name(), error = %e, "cannot write to etcd");
                Publish::Failed
            }
        }
    }

    /// Some(succeeded), or None on an etcd error.
    async fn txn(&self, txn: Txn) -> Option<bool> {
        let mut c = self.ctx.cluster.clients().await.ok()?;
        match Box::pin(c.short.txn(txn)).await {
            Ok(r) => {
                self.ctx.cluster.succeeded().await;
                Some(r.succeeded())
            }
            Err(e) => {
                self.ctx.cluster.failed(&e).await;
                None
            }
        }
    }
}

/// The same pair: access and refresh tokens are new with every token request, so with the
/// generation they name one write.
fn same_pair(a: &State, b: &State) -> bool {
    a.generation == b.generation
        && a.access_token == b.access_token
        && a.refresh_token == b.refresh_token
}
