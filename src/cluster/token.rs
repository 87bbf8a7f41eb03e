//! One token in cluster mode: what its two tasks share, and how they start. The tasks:
//!
//! - the **mirror** (`mirror.rs`, every host): keeps this host's state file and sinks equal to
//!   the pair stored in etcd;
//! - the **candidate** (`campaign.rs`, every host): campaigns for the token's election on the
//!   node's lease; once elected it runs the **leader** (`leader.rs`), the only host that talks
//!   to the token endpoint, every write of which is fenced.
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

use super::{Budget, Cluster, Intent, codec::decode_state};
use crate::config::TokenConfig;
use crate::publish::Report;
use crate::store::{ClusterStatus, State, Status};
use crate::task::{Commands, Shared};
use etcd_client::{Txn, TxnOp};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What a token's tasks share.
pub(super) struct Ctx {
    pub cfg: Arc<TokenConfig>,
    pub shared: Shared,
    pub cluster: Cluster,
    pub pair_key: String,
    pub intent_key: String,
    pub budget_key: String,
    pub handoff_key: String,
    /// Present while the leader's token needs login (its value: the leader's node name), so
    /// that every host's status and `/healthz` say so, not only the leader's. Put on the
    /// leader's lease: it goes with a dead leader, whose successor decides again.
    pub needs_login_key: String,
    pub election: String,
    /// Status file and metrics, written by both tasks.
    pub report: Report,
}

/// The pair key as last read: its mod revision is the second half of every fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PairRev {
    /// No pair stored yet: a write must find the key absent.
    Absent,
    /// The pair as stored at this mod revision.
    At(i64),
    /// Present but undecodable (wrong key, corrupt): never overwritten, never refreshed.
    Unreadable,
}

impl Ctx {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Changes the status and writes the status file.
    pub async fn update_status(&self, f: impl FnOnce(&mut Status)) {
        self.report.write(f).await;
    }

    pub async fn set_role(&self, role: &str) {
        self.update_status(|s| {
            if let Some(c) = &mut s.cluster {
                c.role = role.into();
            }
        })
        .await;
    }

    /// The pair and its mod revision, the intent, the rate budget, whether the leader needs
    /// a login, and the store revision.
    pub async fn read(&self) -> Result<Snapshot, etcd_client::Error> {
        let mut kv = self.cluster.clients().await?.short;
        let txn = Txn::new().and_then([
            TxnOp::get(self.pair_key.as_bytes(), None),
            TxnOp::get(self.intent_key.as_bytes(), None),
            TxnOp::get(self.budget_key.as_bytes(), None),
            TxnOp::get(self.needs_login_key.as_bytes(), None),
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
        let mut snap =
            Snapshot { revision, pair: None, intent: None, budget: None, needs_login: false };
        for (i, op) in resp.op_responses().into_iter().enumerate() {
            let etcd_client::TxnOpResponse::Get(get) = op else { continue };
            let Some(kv) = get.kvs().first() else { continue };
            let codec = self.cluster.codec();
            match i {
                0 => snap.pair = Some(self.decode_pair(kv.value(), kv.mod_revision())),
                1 => snap.intent = codec.decode(kv.value(), self.intent_key.as_bytes()).ok(),
                3 => snap.needs_login = true,
                _ => snap.budget = codec.decode(kv.value(), self.budget_key.as_bytes()).ok(),
            }
        }
        Ok(snap)
    }

    fn decode_pair(&self, bytes: &[u8], revision: i64) -> Stored {
        match decode_state(self.cluster.codec(), bytes, self.pair_key.as_bytes()) {
            Ok(s) => Stored::Pair(Box::new(s), revision),
            Err(e) => Stored::Unreadable(e),
        }
    }
}

pub(super) struct Snapshot {
    pub revision: i64,
    pub pair: Option<Stored>,
    pub intent: Option<Intent>,
    pub budget: Option<Budget>,
    /// The leader said the token needs login (`Ctx::needs_login_key`).
    pub needs_login: bool,
}

pub(super) enum Stored {
    Pair(Box<State>, i64),
    /// Present but undecodable (wrong key, corrupt): never overwritten by a new login.
    Unreadable(String),
}

/// Runs one token until `stop`. `ready` fires once the mirror has published from etcd, or
/// from the local state file if etcd is unreachable.
pub async fn run(
    cfg: Arc<TokenConfig>,
    shared: Shared,
    cluster: Cluster,
    commands: &mut Commands,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let status = Status {
        pid: std::process::id(),
        cluster: Some(Box::new(ClusterStatus {
            node: cluster.node().to_string(),
            role: "follower".into(),
            etcd_reachable: true,
            ..ClusterStatus::default()
        })),
        ..Status::default()
    };
    let ctx = Arc::new(Ctx {
        // The mirror watches `needs_login` to `pair` as one range: no key may sort between.
        pair_key: cluster.key(&cfg.name, "pair"),
        intent_key: cluster.key(&cfg.name, "intent"),
        budget_key: cluster.key(&cfg.name, "budget"),
        handoff_key: cluster.key(&cfg.name, "handoff"),
        needs_login_key: cluster.key(&cfg.name, "needs_login"),
        election: cluster.key(&cfg.name, "election"),
        report: Report::new(&cfg, shared.metrics.clone(), status),
        cfg,
        shared,
        cluster,
    });
    // The mirror stops with the candidate, also when the candidate dies (the guard cancels on
    // unwinding too): a restarted task must not find an old mirror still writing.
    let mirror_stop = stop.child_token();
    let guard = mirror_stop.clone().drop_guard();
    let mut mirror = tokio::spawn(super::mirror::run(ctx.clone(), mirror_stop, ready));
    tokio::select! {
        () = super::campaign::run(&ctx, commands, &stop) => {}
        // The mirror ends only on `stop`: before it, it died, and so does the token's task,
        // for its supervisor to report and restart.
        ended = &mut mirror => match ended {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ if !stop.is_cancelled() => panic!("the cluster mirror of token {} ended before its stop", ctx.name()),
            _ => return,
        },
    }
    // The mirror stops with the candidate; it flushes what it has not written yet.
    drop(guard);
    let _ = mirror.await;
    info!(token = %ctx.name(), "token stopped (cluster)");
}
