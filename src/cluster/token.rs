//! One token in cluster mode. Two tasks:
//!
//! - the **mirror** (every host): reads the pair from etcd, watches it from the next
//!   revision, and writes each new pair into this host's state file and sinks with the usual
//!   durable atomic write; re-reads after errors, after compaction and every minute;
//! - the **candidate** (every host): campaigns for the token's election on the node's lease;
//!   once elected it is the only host that talks to the token endpoint, and every write it
//!   makes is fenced by its election key's create revision and the pair's mod revision.
//!
//! Before each refresh the leader writes an intent (fenced) naming the refresh token it is
//! about to use; the publishing transaction deletes it. A leader that dies or pauses between
//! the two leaves the intent behind, and the next leader replays that same refresh token:
//! RingCentral's grace window returns the same pair again instead of killing the chain.
//!
//! `tokend login` may run on any host: a host that does not lead forwards the hand-off file
//! to `<prefix>/<token>/handoff`, and the leader, while the token needs login, publishes it
//! as the pair (deleting the key in the same fenced transaction). Only the leader writes the
//! pair.

use super::{Budget, Cluster, Intent, Lease, codec::decode_state};
use crate::config::{Grant, TokenConfig};
use crate::oauth::{OAuthError, TokenSet};
use crate::policy::{RequestBudget, backoff, refresh_deadline};
use crate::refresher::{Command, Shared, next_state};
use crate::store::{ClusterStatus, ErrorRecord, State, Status};
use chrono::Utc;
use etcd_client::{
    Compare, CompareOp, EventType, LeaderKey, ResignOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// The mirror re-reads the pair this often even when the watch is quiet: a backstop.
const BACKSTOP: Duration = Duration::from_secs(60);

/// While a token needs login, its leader looks for a login forwarded by another host this often.
const HANDOFF_POLL: Duration = Duration::from_secs(1);

/// What a token task shares between its two halves.
struct Ctx {
    cfg: TokenConfig,
    shared: Shared,
    cluster: Cluster,
    pair_key: String,
    intent_key: String,
    budget_key: String,
    handoff_key: String,
    election: String,
    status: Mutex<Status>,
}

impl Ctx {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().expect("status lock");
        f(&mut status);
        if let Err(e) = status.save(&self.cfg.state_file) {
            warn!(token = %self.cfg.name, error = %e, "cannot write status file");
        }
    }

    fn set_role(&self, role: &str) {
        self.update_status(|s| {
            if let Some(c) = &mut s.cluster {
                c.role = role.into();
            }
        });
    }

    /// The pair and its mod revision, the intent, the rate budget, and the store revision.
    async fn read(&self) -> Result<Snapshot, etcd_client::Error> {
        let mut kv = self.cluster.clients().await?.short;
        let txn = Txn::new().and_then([
            TxnOp::get(self.pair_key.as_bytes(), None),
            TxnOp::get(self.intent_key.as_bytes(), None),
            TxnOp::get(self.budget_key.as_bytes(), None),
        ]);
        let resp = match Box::pin(kv.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                self.cluster.failed(&e).await;
                return Err(e);
            }
        };
        self.cluster.succeeded().await;
        let revision = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let mut snap = Snapshot { revision, pair: None, intent: None, budget: None };
        for (i, op) in resp.op_responses().into_iter().enumerate() {
            let etcd_client::TxnOpResponse::Get(get) = op else { continue };
            let Some(kv) = get.kvs().first() else { continue };
            let codec = self.cluster.codec();
            if i == 0 {
                snap.pair = Some(match decode_state(codec, kv.value(), self.pair_key.as_bytes()) {
                    Ok(s) => Stored::Pair(Box::new(s), kv.mod_revision()),
                    Err(e) => Stored::Unreadable(e),
                });
            } else if i == 1 {
                snap.intent = codec.decode(kv.value(), self.intent_key.as_bytes()).ok();
            } else {
                snap.budget = codec.decode(kv.value(), self.budget_key.as_bytes()).ok();
            }
        }
        Ok(snap)
    }
}

struct Snapshot {
    revision: i64,
    pair: Option<Stored>,
    intent: Option<Intent>,
    budget: Option<Budget>,
}

enum Stored {
    Pair(Box<State>, i64),
    /// Present but undecodable (wrong key, corrupt): never overwritten by a new login.
    Unreadable(String),
}

/// Runs one token until `Stop`. `ready` fires once the mirror has published from etcd, or
/// from the local state file if etcd is unreachable.
pub async fn run(
    cfg: TokenConfig,
    shared: Shared,
    cluster: Cluster,
    mut commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<()>,
) {
    let ctx = Arc::new(Ctx {
        pair_key: cluster.key(&cfg.name, "pair"),
        intent_key: cluster.key(&cfg.name, "intent"),
        budget_key: cluster.key(&cfg.name, "budget"),
        handoff_key: cluster.key(&cfg.name, "handoff"),
        election: cluster.key(&cfg.name, "election"),
        status: Mutex::new(Status {
            pid: std::process::id(),
            cluster: Some(ClusterStatus {
                node: cluster.node().to_string(),
                role: "follower".into(),
                etcd_reachable: true,
                ..ClusterStatus::default()
            }),
            ..Status::default()
        }),
        cfg,
        shared,
        cluster,
    });
    ctx.shared.metrics.update(ctx.name(), |_| {});
    let (stop_tx, stop_rx) = watch::channel(false);
    let mirror = tokio::spawn(mirror(ctx.clone(), stop_rx, ready));
    let mut policy = Policy::new(&ctx.cfg);
    campaign_loop(&ctx, &mut commands, &mut policy).await;
    let _ = stop_tx.send(true);
    let _ = mirror.await;
    info!(token = %ctx.name(), "token stopped (cluster)");
}

/// Waits for a lease, campaigns, leads until the lease or the fence is lost; again.
async fn campaign_loop(ctx: &Ctx, commands: &mut mpsc::Receiver<Command>, policy: &mut Policy) {
    let mut lease_rx = ctx.cluster.lease();
    let mut attempt = 0u32;
    // A `tokend login` made while this daemon was stopped.
    forward_handoff(ctx).await;
    loop {
        // A lease first: its keep-alive is already running when the campaign starts.
        let lease = loop {
            let current = *lease_rx.borrow_and_update();
            if let Lease::Held { id, .. } = current
                && current.valid(id, Instant::now())
            {
                break id;
            }
            ctx.set_role("offline");
            tokio::select! {
                _ = lease_rx.changed() => {}
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Stop) => return,
                    Some(_) => forward_handoff(ctx).await,
                },
            }
        };
        // Waiting in the election queue: a follower until elected.
        ctx.set_role("follower");
        let Ok(clients) = ctx.cluster.clients().await else {
            attempt += 1;
            if idle(commands, retry_wait(attempt)).await {
                return;
            }
            continue;
        };
        let mut election = clients.long.clone();
        let mut campaign = Box::pin(election.campaign(
            ctx.election.as_bytes(),
            ctx.cluster.node().as_bytes(),
            lease,
        ));
        let won = loop {
            tokio::select! {
                r = &mut campaign => break Some(r),
                _ = lease_rx.changed() => {
                    if !lease_rx.borrow_and_update().valid(lease, Instant::now()) {
                        break None;
                    }
                }
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Stop) => return,
                    Some(_) => forward_handoff(ctx).await,
                },
            }
        };
        let key = match won {
            None => continue,
            Some(Ok(mut r)) => match r.take_leader() {
                Some(k) => k,
                None => continue,
            },
            Some(Err(e)) => {
                ctx.cluster.failed(&e).await;
                attempt += 1;
                warn!(token = %ctx.name(), error = %e, "campaign failed; retrying");
                if idle(commands, retry_wait(attempt)).await {
                    return;
                }
                continue;
            }
        };
        attempt = 0;
        info!(token = %ctx.name(), node = %ctx.cluster.node(), fence = key.rev(), "elected leader: this host refreshes the token");
        ctx.set_role("leader");
        let mut leader = Leader { ctx, key, lease, lease_rx: &mut lease_rx, policy: &mut *policy };
        let outcome = leader.run(commands).await;
        let key = leader.key;
        // Resign either way: stepping down hands over at once instead of after the TTL.
        resign(ctx, key).await;
        match outcome {
            Outcome::Stop => return,
            Outcome::Lost => {
                ctx.set_role("follower");
                info!(token = %ctx.name(), "no longer the leader");
            }
        }
    }
}

/// On a host that does not lead: a `tokend login` left its new state in the hand-off file
/// beside the state file. Forward it to the leader through etcd, then remove the file (it
/// stays, and is retried on the next tick or signal, while etcd cannot take it).
async fn forward_handoff(ctx: &Ctx) {
    let path = State::handoff_path(&ctx.cfg.state_file);
    let Ok(Some(state)) = State::load(&path) else { return };
    let value = ctx.cluster.codec().encode(&state, ctx.handoff_key.as_bytes());
    let Ok(mut c) = ctx.cluster.clients().await else { return };
    match Box::pin(c.short.put(ctx.handoff_key.as_bytes(), value, None)).await {
        Ok(_) => {
            ctx.cluster.succeeded().await;
            let _ = std::fs::remove_file(&path);
            info!(token = %ctx.name(), key = %ctx.handoff_key, "handed the new login to the leader through etcd");
        }
        Err(e) => {
            ctx.cluster.failed(&e).await;
            warn!(token = %ctx.name(), error = %e, "cannot hand the new login to the leader through etcd; keeping it, will retry");
        }
    }
}

async fn resign(ctx: &Ctx, key: LeaderKey) {
    let Ok(mut c) = ctx.cluster.clients().await else { return };
    match Box::pin(c.short.resign(Some(ResignOptions::new().with_leader(key)))).await {
        Ok(_) => debug!(token = %ctx.name(), "resigned"),
        Err(e) => debug!(token = %ctx.name(), error = %e, "cannot resign; the lease ends the term"),
    }
}

fn retry_wait(attempt: u32) -> Duration {
    backoff(attempt, Duration::from_millis(200), Duration::from_secs(5), None, rand::random())
}

/// Sleeps, answering commands; true when told to stop.
async fn idle(commands: &mut mpsc::Receiver<Command>, d: Duration) -> bool {
    let until = tokio::time::Instant::now() + d;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return false,
            cmd = commands.recv() => if matches!(cmd, None | Some(Command::Stop)) { return true },
        }
    }
}

/// When to refresh; survives changes of leadership, as the rate budget must.
struct Policy {
    pending: Option<Instant>,
    retry_at: Option<Instant>,
    attempt: u32,
    not_before: Option<Instant>,
    budget: RequestBudget,
    relogin: bool,
    needs_login: bool,
}

impl Policy {
    fn new(cfg: &TokenConfig) -> Self {
        Self {
            pending: None,
            retry_at: None,
            attempt: 0,
            not_before: None,
            budget: RequestBudget::new(cfg.rate.requests, cfg.rate.window),
            relogin: false,
            needs_login: false,
        }
    }
}

enum Outcome {
    Stop,
    /// The lease or the fence is gone: campaign again.
    Lost,
}

struct Leader<'a> {
    ctx: &'a Ctx,
    key: LeaderKey,
    lease: i64,
    lease_rx: &'a mut watch::Receiver<Lease>,
    policy: &'a mut Policy,
}

/// The pair as the leader last read or wrote it.
struct Current {
    state: Option<State>,
    /// Mod revision of the pair key (0: no pair yet).
    revision: i64,
}

impl Leader<'_> {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    /// The fencing comparison: our election key still exists at its create revision.
    fn fence(&self) -> Compare {
        Compare::create_revision(self.key.key(), CompareOp::Equal, self.key.rev())
    }

    fn unchanged(&self, revision: i64) -> Compare {
        if revision == 0 {
            Compare::create_revision(self.ctx.pair_key.as_bytes(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.ctx.pair_key.as_bytes(), CompareOp::Equal, revision)
        }
    }

    fn lease_ok(&self) -> bool {
        self.lease_rx.borrow().valid(self.lease, Instant::now())
    }

    async fn run(&mut self, commands: &mut mpsc::Receiver<Command>) -> Outcome {
        let Some(mut cur) = self.load().await else { return Outcome::Lost };
        // An absolute time: the lease's keep-alive wakes this loop more often than that.
        let mut handoff_at = Instant::now() + HANDOFF_POLL;
        loop {
            let mut wake = self.next_wake(&cur, Instant::now());
            if self.policy.needs_login {
                wake = wake.min(handoff_at);
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Stop) => return Outcome::Stop,
                    Some(Command::Tick) => {
                        if self.policy.retry_at.is_none() {
                            let at = Instant::now() + self.ctx.cfg.jitter.mul_f64(rand::random::<f64>());
                            self.policy.pending = Some(self.policy.pending.map_or(at, |p| p.min(at)));
                        }
                        if self.policy.needs_login && !self.adopt_local(&mut cur, true).await {
                            return Outcome::Lost;
                        }
                    }
                    Some(Command::RefreshNow) => {
                        self.policy.retry_at = None;
                        self.policy.pending = Some(Instant::now());
                        if self.policy.needs_login && !self.adopt_local(&mut cur, true).await {
                            return Outcome::Lost;
                        }
                    }
                    Some(Command::Recheck) => {}
                },
                () = tokio::time::sleep_until(wake.into()) => {
                    if !self.lease_ok() {
                        return Outcome::Lost;
                    }
                    if self.policy.needs_login && Instant::now() >= handoff_at {
                        handoff_at = Instant::now() + HANDOFF_POLL;
                        // A login made on this host (kept while etcd was away), or forwarded.
                        if !self.adopt_local(&mut cur, true).await
                            || (self.policy.needs_login && !self.adopt_handoff(&mut cur).await)
                        {
                            return Outcome::Lost;
                        }
                    }
                    let now = Instant::now();
                    if self.due(&cur, now).is_some_and(|d| d <= now) && self.gate(now) <= now
                        && !self.attempt(&mut cur).await
                    {
                        return Outcome::Lost;
                    }
                }
                _ = self.lease_rx.changed() => if !self.lease_ok() {
                    warn!(token = %self.name(), "lost the election lease; stepping down");
                    return Outcome::Lost;
                },
            }
        }
    }

    /// Reads the pair and any intent; bootstraps the first pair when there is none.
    async fn load(&mut self) -> Option<Current> {
        let mut attempt = 0;
        let snap = loop {
            match self.ctx.read().await {
                Ok(s) => break s,
                Err(e) => {
                    attempt += 1;
                    warn!(token = %self.name(), error = %e, "cannot read the pair from etcd");
                    tokio::time::sleep(retry_wait(attempt)).await;
                    if !self.lease_ok() {
                        return None;
                    }
                }
            }
        };
        if let Some(b) = &snap.budget {
            self.adopt_budget(b);
        }
        let mut cur = match snap.pair {
            Some(Stored::Pair(state, revision)) => Current { state: Some(*state), revision },
            Some(Stored::Unreadable(why)) => {
                error!(token = %self.name(), key = %self.ctx.pair_key, reason = %why, "the pair in etcd is unreadable; not refreshing and not logging in over it (fix cluster.encryption_key or delete the key)");
                self.policy.needs_login = true;
                return Some(Current { state: None, revision: -1 });
            }
            None => Current { state: None, revision: 0 },
        };
        if cur.state.is_none() {
            if !self.adopt_local(&mut cur, false).await {
                return None;
            }
            if cur.state.is_none() {
                if self.ctx.cfg.grant.can_relogin()
                    || matches!(self.ctx.cfg.grant, Grant::RefreshToken { .. })
                {
                    info!(token = %self.name(), grant = self.ctx.cfg.grant.name(), "no pair in etcd yet; logging in (new session)");
                    self.policy.relogin = true;
                    self.policy.pending = Some(Instant::now());
                } else {
                    self.policy.needs_login = true;
                    self.ctx.update_status(|s| s.needs_login = true);
                    error!(token = %self.name(), "needs login: run `tokend login --token {}` on any host of the cluster", self.name());
                }
            }
        }
        if let Some(intent) = snap.intent
            && intent.pair_revision == cur.revision
            && cur.state.is_some()
        {
            info!(token = %self.name(), started_by = %intent.node, since = %intent.at.to_rfc3339(), "a refresh was in flight when the last leader stopped; replaying it with the same refresh token");
            self.policy.pending = Some(Instant::now());
        }
        Some(cur)
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
            state.generation = state.generation.max(prev.generation + 1);
        }
        match self.publish(&state, cur.revision, &[]).await {
            Publish::Done(revision) => {
                info!(token = %self.name(), path = %source.display(), generation = state.generation, "imported the local state into etcd");
                if source == handoff {
                    let _ = std::fs::remove_file(&handoff);
                }
                self.adopted(cur, state, revision);
                true
            }
            Publish::Rejected(_) => false,
            Publish::Failed => true,
        }
    }

    /// While the token needs login: a `tokend login` made on another host, forwarded through
    /// the hand-off key, becomes the pair; the key is deleted in the same fenced transaction.
    /// False when the fence is lost.
    async fn adopt_handoff(&mut self, cur: &mut Current) -> bool {
        let key = self.ctx.handoff_key.clone();
        let Ok(mut c) = self.ctx.cluster.clients().await else { return true };
        let bytes = match Box::pin(c.short.get(key.as_bytes(), None)).await {
            Ok(r) => {
                self.ctx.cluster.succeeded().await;
                match r.kvs().first() {
                    Some(kv) => kv.value().to_vec(),
                    None => return true,
                }
            }
            Err(e) => {
                self.ctx.cluster.failed(&e).await;
                return true;
            }
        };
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
            state.generation = state.generation.max(prev.generation + 1);
        }
        match self.publish(&state, cur.revision, &[key.as_bytes()]).await {
            Publish::Done(revision) => {
                info!(token = %self.name(), generation = state.generation, fingerprint = %state.access_token.fingerprint(), "adopted a new login from `tokend login` on another host (new session)");
                self.adopted(cur, state, revision);
                true
            }
            Publish::Rejected(_) => false,
            Publish::Failed => true,
        }
    }

    /// A login from `tokend login` is now the pair: the token no longer needs one.
    fn adopted(&mut self, cur: &mut Current, state: State, revision: i64) {
        *cur = Current { state: Some(state), revision };
        self.policy.needs_login = false;
        self.policy.relogin = false;
        self.ctx.update_status(|s| s.needs_login = false);
    }

    /// The rate budget as stored in etcd, for the next leader.
    fn budget_put(&self) -> TxnOp {
        let (now, wall) = (Instant::now(), Utc::now());
        let ago = |t: Instant| chrono::Duration::from_std(now - t).unwrap_or_default();
        let budget = Budget {
            sent: self.policy.budget.sent().map(|t| wall - ago(t)).collect(),
            not_before: self
                .policy
                .not_before
                .filter(|nb| *nb > now)
                .map(|nb| wall + chrono::Duration::from_std(nb - now).unwrap_or_default()),
        };
        let value = self.ctx.cluster.codec().encode(&budget, self.ctx.budget_key.as_bytes());
        TxnOp::put(self.ctx.budget_key.as_bytes(), value, None)
    }

    /// Takes over the budget the last leader stored: its requests count against this one's
    /// window, and its `Retry-After` holds here too. (Wall clocks: hosts should run NTP.)
    fn adopt_budget(&mut self, b: &Budget) {
        let (now, wall) = (Instant::now(), Utc::now());
        let at = |t: chrono::DateTime<Utc>| {
            now.checked_sub((wall - t).to_std().unwrap_or_default()).unwrap_or(now)
        };
        self.policy.budget.replace(b.sent.iter().map(|t| at(*t)));
        if let Some(nb) = b.not_before
            && nb > wall
        {
            let until = now + (nb - wall).to_std().unwrap_or_default();
            self.policy.not_before = Some(self.policy.not_before.map_or(until, |x| x.max(until)));
            info!(token = %self.name(), until = %nb.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "the server told the last leader to wait (Retry-After): nothing is sent before then");
        }
    }

    fn deadline(&self, cur: &Current) -> Option<chrono::DateTime<Utc>> {
        let s = cur.state.as_ref()?;
        if self.policy.needs_login {
            return None;
        }
        Some(refresh_deadline(s.refreshed_at, s.access_expires_at, self.ctx.cfg.safety_margin))
    }

    fn due(&self, cur: &Current, now: Instant) -> Option<Instant> {
        if let Some(r) = self.policy.retry_at {
            return Some(r);
        }
        let deadline =
            self.deadline(cur).map(|d| now + (d - Utc::now()).to_std().unwrap_or_default());
        match (self.policy.pending, deadline) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        }
    }

    fn gate(&self, now: Instant) -> Instant {
        let budget = self.policy.budget.earliest(now);
        self.policy.not_before.map_or(budget, |nb| nb.max(budget))
    }

    fn next_wake(&self, cur: &Current, now: Instant) -> Instant {
        let max = now + Duration::from_secs(60);
        self.due(cur, now).map_or(max, |d| d.max(self.gate(now)).min(max))
    }

    /// One token request, fenced on both sides. False when leadership is lost.
    async fn attempt(&mut self, cur: &mut Current) -> bool {
        if self.policy.needs_login && !self.policy.relogin {
            self.policy.pending = None;
            return true;
        }
        let now = Instant::now();
        self.policy.budget.record(now);
        self.policy.pending = None;
        let metrics = &self.ctx.shared.metrics;
        metrics.update(self.name(), |m| m.attempts += 1);
        let refresh_token = match (&cur.state, self.policy.relogin) {
            (Some(s), false) => s.refresh_token.clone(),
            _ => None,
        };
        // Before the request: the budget (this request included) and, for a refresh, the
        // intent, in one fenced write. A leader that lost the fence sends nothing.
        let mut ops = vec![self.budget_put()];
        if let Some(rt) = &refresh_token {
            let intent = Intent {
                node: self.ctx.cluster.node().into(),
                pair_revision: cur.revision,
                refresh_token: rt.fingerprint(),
                at: Utc::now(),
            };
            let value = self.ctx.cluster.codec().encode(&intent, self.ctx.intent_key.as_bytes());
            ops.push(TxnOp::put(self.ctx.intent_key.as_bytes(), value, None));
        }
        let txn = Txn::new().when([self.fence(), self.unchanged(cur.revision)]).and_then(ops);
        match self.txn(txn).await {
            Some(true) => {}
            Some(false) => {
                warn!(token = %self.name(), "the fence rejected the write before the token request (intent and rate budget): another host leads now");
                return false;
            }
            None => {
                self.on_transient_etcd();
                return true;
            }
        }
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
        let keep = self.after_request(cur, result, refresh_token.is_some(), elapsed).await;
        if let Some(gate) = &self.ctx.shared.gate {
            gate.open();
        }
        keep
    }

    async fn after_request(
        &mut self,
        cur: &mut Current,
        result: Result<crate::oauth::TokenSet, crate::oauth::OAuthError>,
        refreshed: bool,
        elapsed: std::time::Duration,
    ) -> bool {
        match result {
            Ok(tokens) => self.on_success(cur, tokens, !refreshed, elapsed).await,
            Err(e) if e.is_transient() => {
                self.on_transient(&e);
                if e.retry_after().is_some() {
                    // The next leader must wait for it too.
                    let txn = Txn::new().when([self.fence()]).and_then([self.budget_put()]);
                    if self.txn(txn).await == Some(false) {
                        return false;
                    }
                }
                true
            }
            Err(e) if refreshed && e.is_invalid_grant() => self.on_invalid_grant(cur, &e).await,
            Err(e) => {
                self.on_permanent(&e);
                true
            }
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
        // Keep trying to publish while we still lead: the pair exists nowhere else.
        let mut tries = 0;
        loop {
            match self.publish(&state, cur.revision, &[self.ctx.intent_key.as_bytes()]).await {
                Publish::Done(revision) => {
                    info!(
                        token = %self.name(),
                        generation = state.generation,
                        access_expires_at = %state.access_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        duration_ms = elapsed.as_millis() as u64,
                        fingerprint = %state.access_token.fingerprint(),
                        new_session,
                        revision,
                        "refreshed and published to etcd"
                    );
                    *cur = Current { state: Some(state), revision };
                    let p = &mut *self.policy;
                    (p.relogin, p.needs_login, p.retry_at, p.not_before, p.attempt) =
                        (false, false, None, None, 0);
                    self.ctx
                        .shared
                        .metrics
                        .update(self.name(), |m| m.last_success = Some(now.timestamp()));
                    self.ctx.update_status(|s| {
                        s.needs_login = false;
                        s.last_error = None;
                        s.last_success_at = Some(now);
                        s.last_attempt_at = Some(now);
                    });
                    return true;
                }
                Publish::Rejected(Rejection::Fence) => {
                    warn!(token = %self.name(), generation = state.generation, "the fence rejected publishing the new pair: this host no longer leads; the leader replays this refresh");
                    return false;
                }
                Publish::Rejected(Rejection::PairChanged) => {
                    warn!(token = %self.name(), generation = state.generation, "the pair in etcd changed under this leader; not publishing over it, re-reading");
                    return false;
                }
                Publish::Failed => {
                    tries += 1;
                    if !self.lease_ok() {
                        warn!(token = %self.name(), "cannot publish the new pair and the lease is gone; the next leader replays this refresh");
                        return false;
                    }
                    tokio::time::sleep(retry_wait(tries)).await;
                }
            }
        }
    }

    /// Fenced write of a pair, deleting the keys in `delete` in the same transaction.
    async fn publish(&mut self, state: &State, revision: i64, delete: &[&[u8]]) -> Publish {
        let value = self.ctx.cluster.codec().encode(state, self.ctx.pair_key.as_bytes());
        let mut ops = vec![TxnOp::put(self.ctx.pair_key.as_bytes(), value, None)];
        ops.extend(delete.iter().map(|k| TxnOp::delete(*k, None)));
        // On failure, read our election key back: it tells a lost fence from a changed pair.
        let txn = Txn::new()
            .when([self.fence(), self.unchanged(revision)])
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

    /// `invalid_grant` in cluster mode first means "read etcd again": another leader may have
    /// rotated the pair. Only a pair that is still the one we used is really dead.
    async fn on_invalid_grant(&mut self, cur: &mut Current, e: &OAuthError) -> bool {
        self.count_failure(&e.code(), false);
        match self.ctx.read().await {
            Ok(Snapshot { pair: Some(Stored::Pair(state, revision)), .. })
                if revision != cur.revision =>
            {
                info!(token = %self.name(), generation = state.generation, "refresh token was rotated by another host; using the newer pair from etcd");
                *cur = Current { state: Some(*state), revision };
                self.policy.pending = Some(Instant::now());
                true
            }
            Ok(_) if self.ctx.cfg.grant.can_relogin() => {
                warn!(token = %self.name(), code = %e.code(), "refresh chain is dead (confirmed in etcd); logging in again (new session)");
                self.record_error(&e.code(), &e.to_string(), true);
                self.policy.relogin = true;
                self.policy.pending = Some(Instant::now());
                self.ctx.shared.metrics.update(self.name(), |m| m.relogins += 1);
                true
            }
            Ok(_) => {
                self.on_permanent(e);
                true
            }
            Err(_) => {
                self.on_transient_etcd();
                true
            }
        }
    }

    fn on_transient(&mut self, e: &OAuthError) {
        self.policy.attempt += 1;
        self.count_failure(&e.code(), true);
        let retry_after = e.retry_after();
        let cfg = &self.ctx.cfg;
        let delay = backoff(
            self.policy.attempt,
            cfg.retry.initial,
            cfg.retry.max,
            retry_after,
            rand::random(),
        );
        let now = Instant::now();
        self.policy.retry_at = Some(now + delay);
        if let Some(ra) = retry_after {
            self.policy.not_before = Some(now + ra);
        }
        warn!(token = %self.name(), attempt = self.policy.attempt, code = %e.code(), error = %e, retry_in_ms = delay.as_millis() as u64, "token request failed; retrying");
        self.record_error(&e.code(), &e.to_string(), false);
    }

    fn on_transient_etcd(&mut self) {
        self.policy.attempt += 1;
        self.policy.retry_at = Some(Instant::now() + retry_wait(self.policy.attempt));
    }

    fn on_permanent(&mut self, e: &OAuthError) {
        self.count_failure(&e.code(), false);
        self.policy.needs_login = true;
        self.policy.relogin = self.ctx.cfg.grant.can_relogin();
        self.policy.retry_at = None;
        self.ctx.shared.metrics.update(self.name(), |m| m.needs_login = true);
        error!(token = %self.name(), code = %e.code(), error = %e, "permanent failure: needs login; will retry on the next tick");
        self.record_error(&e.code(), &e.to_string(), true);
        self.ctx.update_status(|s| s.needs_login = true);
    }

    fn count_failure(&self, code: &str, retry: bool) {
        self.ctx.shared.metrics.update(self.name(), |m| {
            *m.failures.entry(code.to_string()).or_default() += 1;
            m.retries += u64::from(retry);
        });
    }

    fn record_error(&self, code: &str, message: &str, permanent: bool) {
        let rec =
            ErrorRecord { at: Utc::now(), code: code.into(), message: message.into(), permanent };
        self.ctx.update_status(|s| {
            s.last_error = Some(rec);
            s.last_attempt_at = Some(Utc::now());
        });
    }
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

/// This host's files: the state file and the sinks, written from the pairs etcd holds.
struct LocalFiles {
    state: Option<State>,
    revision: i64,
    dirty: bool,
    stale: BTreeSet<PathBuf>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl LocalFiles {
    /// Starts from the local state file: serves it at once while etcd is not yet read.
    fn load(ctx: &Ctx) -> Self {
        let mut me = Self {
            state: None,
            revision: 0,
            dirty: false,
            stale: BTreeSet::new(),
            failures: 0,
            retry_at: None,
        };
        match State::load(&ctx.cfg.state_file) {
            Ok(Some(s)) if s.access_expires_at > Utc::now() => {
                me.state = Some(s);
                me.stale = ctx.cfg.sinks.iter().map(|s| s.path.clone()).collect();
                me.flush(ctx);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(token = %ctx.name(), error = %e, "cannot use the local state file; waiting for etcd");
            }
        }
        me
    }

    /// A pair from etcd: written if it is not what the files already hold.
    fn update(&mut self, ctx: &Ctx, state: State, revision: i64) {
        self.revision = revision;
        let same = self.state.as_ref().is_some_and(|s| {
            s.access_token == state.access_token && s.generation == state.generation
        });
        if same {
            return;
        }
        let first = self.state.is_none();
        debug!(token = %ctx.name(), generation = state.generation, revision, "mirroring a new pair");
        self.state = Some(state);
        self.dirty = true;
        self.stale = ctx.cfg.sinks.iter().map(|s| s.path.clone()).collect();
        if self.flush(ctx)
            && !first
            && let (Some(hook), Some(state)) = (&ctx.cfg.on_refresh, &self.state)
        {
            crate::hook::spawn(hook.clone(), &ctx.cfg, state);
        }
        ctx.update_status(|s| {
            if let Some(c) = &mut s.cluster {
                c.revision = revision;
            }
        });
    }

    /// Persist, then publish. True when everything is on disk.
    fn flush(&mut self, ctx: &Ctx) -> bool {
        let Some(state) = &self.state else { return true };
        if self.dirty {
            if let Err(e) = state.save(&ctx.cfg.state_file) {
                error!(token = %ctx.name(), path = %ctx.cfg.state_file.display(), error = %e, "cannot write state; will retry");
                self.schedule_retry();
                return false;
            }
            self.dirty = false;
        }
        // The proxies send the pair once it is durable here (a follower's proxy replays a 401
        // once the leader's new pair is mirrored).
        if let Some(gate) = &ctx.shared.gate {
            gate.publish(state);
        }
        crate::store::write_stale_sinks(&ctx.cfg, state, &mut self.stale);
        if !self.stale.is_empty() {
            self.schedule_retry();
            return false;
        }
        (self.failures, self.retry_at) = (0, None);
        ctx.shared.metrics.update(ctx.name(), |m| {
            m.generation = state.generation;
            m.access_expires = Some(state.access_expires_at.timestamp());
            m.refresh_expires = state.refresh_expires_at.map(|t| t.timestamp());
        });
        true
    }

    fn schedule_retry(&mut self) {
        self.failures += 1;
        self.retry_at = Some(
            Instant::now()
                + backoff(
                    self.failures,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                    None,
                    rand::random(),
                ),
        );
    }
}

/// Every host: keeps the local files equal to the pair in etcd.
async fn mirror(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>, ready: oneshot::Sender<()>) {
    let mut files = LocalFiles::load(&ctx);
    let mut ready = Some(ready);
    let mut up = ctx.cluster.up();
    let mut attempt = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        note_reachability(&ctx, *up.borrow_and_update());
        let read = tokio::select! {
            r = ctx.read() => r,
            _ = stop.changed() => break,
        };
        let revision = match read {
            Ok(snap) => {
                attempt = 0;
                match snap.pair {
                    Some(Stored::Pair(state, rev)) => files.update(&ctx, *state, rev),
                    Some(Stored::Unreadable(why)) => {
                        error!(token = %ctx.name(), key = %ctx.pair_key, reason = %why, "the pair in etcd is unreadable; keeping the local files");
                    }
                    None => {}
                }
                snap.revision
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                attempt += 1;
                debug!(token = %ctx.name(), error = %e, "cannot read the pair; retrying");
                let wait = retry_wait(attempt);
                if wait_or_stop(&mut files, &ctx, &mut stop, wait).await {
                    break;
                }
                continue;
            }
        };
        note_reachability(&ctx, true);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        if follow(&ctx, &mut files, &mut stop, revision + 1).await {
            break;
        }
    }
    if files.dirty || !files.stale.is_empty() {
        files.flush(&ctx);
    }
}

fn note_reachability(ctx: &Ctx, reachable: bool) {
    ctx.update_status(|s| {
        if let Some(c) = &mut s.cluster
            && c.etcd_reachable != reachable
        {
            c.etcd_reachable = reachable;
            c.etcd_unreachable_since = (!reachable).then(Utc::now);
        }
    });
}

/// Sleeps `d` while retrying failed local writes; true when told to stop.
async fn wait_or_stop(
    files: &mut LocalFiles,
    ctx: &Ctx,
    stop: &mut watch::Receiver<bool>,
    d: Duration,
) -> bool {
    let until = Instant::now() + d;
    loop {
        let wake = files.retry_at.map_or(until, |r| r.min(until));
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {
                if files.retry_at.is_some_and(|r| r <= Instant::now()) {
                    files.flush(ctx);
                }
                if Instant::now() >= until {
                    return false;
                }
            }
            _ = stop.changed() => return true,
        }
    }
}

/// Watches the pair from `start`; returns to re-read after an error, a compaction or the
/// backstop interval. True when told to stop.
async fn follow(
    ctx: &Ctx,
    files: &mut LocalFiles,
    stop: &mut watch::Receiver<bool>,
    start: i64,
) -> bool {
    let Ok(mut clients) = ctx.cluster.clients().await else { return false };
    let opts = WatchOptions::new().with_start_revision(start);
    let mut stream = match Box::pin(clients.long.watch(ctx.pair_key.as_bytes(), Some(opts))).await {
        Ok(s) => s,
        Err(e) => {
            ctx.cluster.failed(&e).await;
            return wait_or_stop(files, ctx, stop, Duration::from_millis(500)).await;
        }
    };
    let backstop = tokio::time::Instant::now() + BACKSTOP;
    loop {
        let retry = files.retry_at.map_or(backstop, |r| backstop.min(r.into()));
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() != 0 {
                        info!(token = %ctx.name(), compacted = resp.compact_revision(), "watch canceled (compaction?); re-reading the pair");
                        return false;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if ev.event_type() != EventType::Put {
                            warn!(token = %ctx.name(), "the pair was deleted from etcd; keeping the local files");
                            continue;
                        }
                        match decode_state(ctx.cluster.codec(), kv.value(), ctx.pair_key.as_bytes()) {
                            Ok(state) => files.update(ctx, state, kv.mod_revision()),
                            Err(why) => error!(token = %ctx.name(), reason = %why, "a new pair in etcd is unreadable; keeping the local files"),
                        }
                    }
                }
                Ok(None) => return false,
                Err(e) => {
                    ctx.cluster.failed(&e).await;
                    return false;
                }
            },
            () = tokio::time::sleep_until(retry) => {
                if files.retry_at.is_some_and(|r| r <= Instant::now()) {
                    files.flush(ctx);
                }
                if tokio::time::Instant::now() >= backstop {
                    return false;
                }
            }
            _ = stop.changed() => return true,
        }
    }
}
