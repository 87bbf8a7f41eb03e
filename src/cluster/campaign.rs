//! The candidate of one token (every host): waits for the node's lease, campaigns for the
//! token's election on it, leads (`leader.rs`) until the lease or the fence is lost, and
//! campaigns again. While it does not lead it forwards `tokend login`'s hand-off to the leader.

use super::Lease;
use super::leader::{Leader, Outcome};
use super::token::Ctx;
use crate::policy::{ChainHome, Policy, Rules, store_backoff};
use crate::store::State;
use crate::task::Commands;
use etcd_client::{LeaderKey, ResignOptions};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How a campaign ended.
enum Campaign {
    Won(LeaderKey),
    /// The lease ended first, or the election answered without a key: campaign again.
    Again,
    /// etcd failed: wait, then campaign again.
    Failed,
    Stop,
}

/// Campaigns and leads until `stop`. The policy lives here, across terms: the rate budget
/// of a host that leads again must still count its last term's requests.
pub(super) async fn run(ctx: &Ctx, commands: &mut Commands, stop: &CancellationToken) {
    let mut policy = Policy::new(Rules::new(&ctx.cfg, ChainHome::Etcd));
    let mut lease_rx = ctx.cluster.lease();
    let mut failures = 0u32;
    // A `tokend login` made while this daemon was stopped.
    forward_handoff(ctx).await;
    loop {
        let Some(lease) = wait_for_lease(ctx, &mut lease_rx, commands, stop).await else {
            return;
        };
        // Waiting in the election queue: a follower until elected.
        ctx.set_role("follower").await;
        let key = match campaign(ctx, lease, &mut lease_rx, commands, stop).await {
            Campaign::Won(key) => key,
            Campaign::Again => continue,
            Campaign::Stop => return,
            Campaign::Failed => {
                failures += 1;
                if idle(ctx, commands, stop, store_backoff(failures, rand::random())).await {
                    return;
                }
                continue;
            }
        };
        failures = 0;
        info!(token = %ctx.name(), node = %ctx.cluster.node(), fence = key.rev(), "elected leader: this host refreshes the token");
        ctx.set_role("leader").await;
        let mut leader = Leader::new(ctx, key, lease, &mut lease_rx, &mut policy);
        let outcome = leader.run(commands, stop).await;
        // Resign either way: stepping down hands over at once instead of after the TTL.
        resign(ctx, leader.into_key()).await;
        match outcome {
            Outcome::Stop => return,
            Outcome::Lost => {
                ctx.set_role("follower").await;
                info!(token = %ctx.name(), "no longer the leader");
            }
        }
    }
}

/// A lease first: its keep-alive is already running when the campaign starts. None: stop.
async fn wait_for_lease(
    ctx: &Ctx,
    lease_rx: &mut watch::Receiver<Lease>,
    commands: &mut Commands,
    stop: &CancellationToken,
) -> Option<i64> {
    loop {
        let current = *lease_rx.borrow_and_update();
        if let Lease::Held { id, .. } = current
            && current.valid(id, Instant::now())
        {
            return Some(id);
        }
        ctx.set_role("offline").await;
        tokio::select! {
            _ = lease_rx.changed() => {}
            _ = commands.recv() => forward_handoff(ctx).await,
            () = stop.cancelled() => return None,
        }
    }
}

async fn campaign(
    ctx: &Ctx,
    lease: i64,
    lease_rx: &mut watch::Receiver<Lease>,
    commands: &mut Commands,
    stop: &CancellationToken,
) -> Campaign {
    let Ok(clients) = ctx.cluster.clients().await else { return Campaign::Failed };
    let mut election = clients.long.clone();
    let mut pending =
        Box::pin(election.campaign(ctx.election.as_bytes(), ctx.cluster.node().as_bytes(), lease));
    loop {
        tokio::select! {
            r = &mut pending => return match r.map(|mut r| r.take_leader()) {
                Ok(Some(key)) => Campaign::Won(key),
                Ok(None) => Campaign::Again,
                Err(e) => {
                    ctx.cluster.failed(&e).await;
                    warn!(token = %ctx.name(), error = %e, "campaign failed; retrying");
                    Campaign::Failed
                }
            },
            _ = lease_rx.changed() => {
                if !lease_rx.borrow_and_update().valid(lease, Instant::now()) {
                    return Campaign::Again;
                }
            }
            _ = commands.recv() => forward_handoff(ctx).await,
            () = stop.cancelled() => return Campaign::Stop,
        }
    }
}

/// On a host that does not lead, each command (a tick, a signal) is a moment to forward a
/// login: a `tokend login` left its new state in the hand-off file
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

/// Sleeps, answering commands; true when told to stop.
async fn idle(ctx: &Ctx, commands: &mut Commands, stop: &CancellationToken, d: Duration) -> bool {
    let until = tokio::time::Instant::now() + d;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return false,
            _ = commands.recv() => forward_handoff(ctx).await,
            () = stop.cancelled() => return true,
        }
    }
}
