//! The mirror of one token (every host): reads the pair from etcd, watches it from the next
//! revision, and publishes each new pair through this host's `Publisher` (state file, sinks,
//! metrics), as the single-host refresher does; re-reads after errors, after compaction and
//! every minute.

use super::codec::decode_state;
use super::token::{Ctx, Stored};
use crate::policy::store_backoff;
use crate::publish::Publisher;
use crate::store::State;
use chrono::Utc;
use etcd_client::{EventType, WatchOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The mirror re-reads the pair this often even when the watch is quiet: a backstop.
const BACKSTOP: Duration = Duration::from_secs(60);

/// This host's files, written from the pairs etcd holds.
struct Mirror {
    files: Publisher,
    /// Whether `Ctx::needs_login_key` was there when last seen. Only its changes are passed
    /// to this host's status: on the leader's host the leader sets it first, and a read that
    /// raced with the leader's write must not clear it.
    leader_needs_login: bool,
}

impl Mirror {
    /// Starts from the local state file: serves it at once while etcd is not yet read.
    async fn load(ctx: &Ctx) -> Self {
        let mut files = Publisher::new(ctx.shared.gate.clone());
        match State::load(&ctx.cfg.state_file) {
            Ok(Some(s)) if s.access_expires_at > Utc::now() => {
                files.serve(&ctx.cfg, s);
                files.flush(&ctx.cfg, ctx.report.metrics()).await;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(token = %ctx.name(), error = %e, "cannot use the local state file; waiting for etcd");
            }
        }
        Self { files, leader_needs_login: false }
    }

    /// The leader's word on the token needing login, into this host's status and metrics.
    async fn leader_needs_login(&mut self, ctx: &Ctx, yes: bool) {
        if self.leader_needs_login != yes {
            self.leader_needs_login = yes;
            ctx.report.needs_login(yes);
            ctx.report.save().await;
            if yes {
                warn!(token = %ctx.name(), "the leader says this token needs login: run `tokend login --token {}` on any host of the cluster", ctx.name());
            }
        }
    }

    /// A pair from etcd: written if it is not what the files already hold. The hook runs for
    /// each new pair but the first (which may be the one this host served before a restart).
    async fn update(&mut self, ctx: &Ctx, state: State, revision: i64) {
        let same = self.files.state().is_some_and(|s| {
            s.access_token == state.access_token && s.generation == state.generation
        });
        if same {
            return;
        }
        let first = self.files.state().is_none();
        debug!(token = %ctx.name(), generation = state.generation, revision, "mirroring a new pair");
        self.files.set(&ctx.cfg, state, !first);
        self.files.flush(&ctx.cfg, ctx.report.metrics()).await;
        ctx.update_status(|s| {
            if let Some(c) = &mut s.cluster {
                c.revision = revision;
            }
        })
        .await;
    }

    async fn flush_if_due(&mut self, ctx: &Ctx) {
        self.files.flush_if_due(&ctx.cfg, ctx.report.metrics(), Instant::now()).await;
    }
}

/// Every host: keeps the local files equal to the pair in etcd, until `stop`.
pub(super) async fn run(ctx: Arc<Ctx>, stop: CancellationToken, ready: oneshot::Sender<()>) {
    let mut mirror = Mirror::load(&ctx).await;
    let mut ready = Some(ready);
    let mut up = ctx.cluster.up();
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let reachable = *up.borrow_and_update();
        note_reachability(&ctx, reachable).await;
        let read = tokio::select! {
            r = ctx.read() => r,
            () = stop.cancelled() => break,
        };
        let snap = match read {
            Ok(snap) => snap,
            Err(e) => {
                // Serving the local state file is the best this host can do for now.
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                failures += 1;
                debug!(token = %ctx.name(), error = %e, "cannot read the pair; retrying");
                let wait = store_backoff(failures, rand::random());
                if wait_or_stop(&mut mirror, &ctx, &stop, wait).await {
                    break;
                }
                continue;
            }
        };
        failures = 0;
        mirror.leader_needs_login(&ctx, snap.needs_login).await;
        match snap.pair {
            Some(Stored::Pair(state, rev)) => mirror.update(&ctx, *state, rev).await,
            Some(Stored::Unreadable(why)) => {
                error!(token = %ctx.name(), key = %ctx.pair_key, reason = %why, "the pair in etcd is unreadable; keeping the local files");
            }
            None => {}
        }
        note_reachability(&ctx, true).await;
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        if follow(&ctx, &mut mirror, &stop, snap.revision + 1).await {
            break;
        }
    }
    if mirror.files.unwritten() {
        mirror.files.flush(&ctx.cfg, ctx.report.metrics()).await;
    }
}

async fn note_reachability(ctx: &Ctx, reachable: bool) {
    ctx.update_status(|s| {
        if let Some(c) = &mut s.cluster
            && c.etcd_reachable != reachable
        {
            c.etcd_reachable = reachable;
            c.etcd_unreachable_since = (!reachable).then(Utc::now);
        }
    })
    .await;
}

/// Sleeps `d` while retrying failed local writes; true when told to stop.
async fn wait_or_stop(
    mirror: &mut Mirror,
    ctx: &Ctx,
    stop: &CancellationToken,
    d: Duration,
) -> bool {
    let until = Instant::now() + d;
    loop {
        let wake = mirror.files.write_at(Instant::now()).map_or(until, |r| r.min(until));
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {
                mirror.flush_if_due(ctx).await;
                if Instant::now() >= until {
                    return false;
                }
            }
            () = stop.cancelled() => return true,
        }
    }
}

/// Watches the pair from `start`; returns to re-read after an error, a compaction, the
/// node's reconnecting (the watch may hang on a frozen member) or the backstop interval.
/// True when told to stop.
async fn follow(ctx: &Ctx, mirror: &mut Mirror, stop: &CancellationToken, start: i64) -> bool {
    let mut reconnects = ctx.cluster.reconnects();
    let Ok(mut clients) = ctx.cluster.clients().await else { return false };
    let (from, to) = watched(&ctx.needs_login_key, &ctx.pair_key);
    let opts = WatchOptions::new().with_start_revision(start).with_range(to);
    let opening = Box::pin(clients.long.watch(from, Some(opts)));
    let mut stream = match ctx.cluster.open("watch", opening).await {
        Ok(s) => s,
        Err(e) => {
            ctx.cluster.failed(&e).await;
            return wait_or_stop(mirror, ctx, stop, Duration::from_millis(500)).await;
        }
    };
    let backstop = Instant::now() + BACKSTOP;
    loop {
        let wake = mirror.files.write_at(Instant::now()).map_or(backstop, |r| r.min(backstop));
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() != 0 {
                        info!(token = %ctx.name(), compacted = resp.compact_revision(), "watch canceled (compaction?); re-reading the pair");
                        return false;
                    }
                    for ev in resp.events() {
                        on_event(ctx, mirror, ev).await;
                    }
                }
                Ok(None) => return false,
                Err(e) => {
                    ctx.cluster.failed(&e).await;
                    return false;
                }
            },
            () = tokio::time::sleep_until(wake.into()) => {
                mirror.flush_if_due(ctx).await;
                if Instant::now() >= backstop {
                    return false;
                }
            }
            _ = reconnects.changed() => return false,
            () = stop.cancelled() => return true,
        }
    }
}

/// The keys the mirror watches, one range: from `needs_login` to `pair`, both included. No
/// other key of the token sorts between them (`the_watched_range_holds_two_keys`).
fn watched(needs_login_key: &str, pair_key: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = pair_key.as_bytes().to_vec();
    end.push(0);
    (needs_login_key.as_bytes().to_vec(), end)
}

async fn on_event(ctx: &Ctx, mirror: &mut Mirror, ev: &etcd_client::Event) {
    let Some(kv) = ev.kv() else { return };
    if kv.key() == ctx.needs_login_key.as_bytes() {
        mirror.leader_needs_login(ctx, ev.event_type() == EventType::Put).await;
        return;
    }
    if ev.event_type() != EventType::Put {
        warn!(token = %ctx.name(), "the pair was deleted from etcd; keeping the local files");
        return;
    }
    match decode_state(ctx.cluster.codec(), kv.value(), ctx.pair_key.as_bytes()) {
        Ok(state) => mirror.update(ctx, state, kv.mod_revision()).await,
        Err(why) => {
            error!(token = %ctx.name(), reason = %why, "a new pair in etcd is unreadable; keeping the local files");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_watched_range_holds_two_keys() {
        // Every key of a token (`token.rs`), and the election's keys below `election/`.
        let kinds = ["pair", "intent", "budget", "handoff", "needs_login", "election/7a3f"];
        let key = |k: &str| format!("/tokend/main/{k}").into_bytes();
        let (from, to) = super::watched("/tokend/main/needs_login", "/tokend/main/pair");
        let inside: Vec<&str> =
            kinds.into_iter().filter(|k| (from.clone()..to.clone()).contains(&key(k))).collect();
        assert_eq!(inside, ["pair", "needs_login"]);
    }
}
