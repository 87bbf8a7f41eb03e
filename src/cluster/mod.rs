//! Multi-host mode: every host runs tokend with the same `[cluster]`; per token the hosts
//! elect one leader through etcd, only the leader talks to the token endpoint, and every host
//! mirrors the pair stored in etcd into its own local files.
//!
//! Safety does not rest on the lease alone. Every write is an etcd transaction that requires
//! the writer's election key to still exist at its create revision (the fencing token) and
//! the pair key to be unchanged since it was read, so a paused or partitioned ex-leader cannot
//! overwrite anything. RingCentral is outside etcd, so the fence cannot stop a stale leader's
//! *request*; the intent record and the server's grace window cover that (see `token.rs`).

mod campaign;
mod codec;
mod leader;
mod local;
mod mirror;
mod token;

pub use crate::fake::TestTls;
pub use codec::{Budget, Codec, Intent};
pub use local::LocalEtcd;
pub use token::run as run_token;

use crate::config::ClusterConfig;
use etcd_client::{Client, ConnectOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, watch};
use tracing::{error, info, warn};

/// The lease this node campaigns with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// No lease: etcd is unreachable or the lease expired. Nobody here may act as leader.
    None,
    /// Held until `valid_until` by this node's monotonic clock (measured from when the
    /// grant or keep-alive was *sent*, so a slow reply only shortens it).
    Held { id: i64, valid_until: Instant },
}

impl Lease {
    pub fn valid(&self, id: i64, now: Instant) -> bool {
        matches!(self, Lease::Held { id: held, valid_until } if *held == id && *valid_until > now)
    }
}

/// The two clients of one endpoint: `short` has a request timeout; `long` has none, for the
/// blocking campaign and for watches, which a timeout would cancel.
/// Boxed: an etcd `Client` is kilobytes, and every future holding one would be as large.
#[derive(Clone)]
pub struct Clients {
    pub short: Box<Client>,
    pub long: Box<Client>,
}

struct Conn {
    clients: Option<Clients>,
    /// Index into the endpoints of the member in use; the first is preferred.
    endpoint: usize,
    failures: u32,
    /// etcd's refusal (`refused`) is logged for this outage: an outage that began with a
    /// timeout (a slow connect) says why once etcd answers and refuses.
    refusal_logged: bool,
}

/// Whether etcd answered and refused: wrong credentials, or a role without a permission.
/// Retrying cannot help until the config or the role is fixed, so the log says which.
fn refused(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    ["authentication failed", "permission denied", "invalid auth token", "user name not found"]
        .iter()
        .any(|m| text.contains(m))
}

/// Failures in a row before moving to the next endpoint.
const ROTATE_AFTER: u32 = 3;

/// HTTP/2 pings on an open request or stream: twice etcd's default minimum between pings.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// One node's connection to etcd and its election lease, shared by every token.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClusterConfig,
    codec: Codec,
    conn: Mutex<Conn>,
    lease: watch::Sender<Lease>,
    /// etcd reachable as far as this node knows (for status and logs).
    up: watch::Sender<bool>,
    /// Counts the times this node dropped its clients to connect again (`failed`).
    reconnects: watch::Sender<u64>,
    stop: tokio_util::sync::CancellationToken,
}

impl Cluster {
    /// Builds the node; connects lazily, so a daemon starts (and serves its local files)
    /// while etcd is down. `start` begins the lease keeper.
    pub fn new(cfg: ClusterConfig) -> Result<Self, String> {
        let codec = Codec::new(cfg.encryption_key.as_ref().map(crate::config::ConfigSecret::get))?;
        let inner = Inner {
            cfg,
            codec,
            conn: Mutex::new(Conn {
                clients: None,
                endpoint: 0,
                failures: 0,
                refusal_logged: false,
            }),
            lease: watch::Sender::new(Lease::None),
            up: watch::Sender::new(true),
            reconnects: watch::Sender::new(0),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn start(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().keep_lease())
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.cfg
    }

    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    pub fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    pub fn lease(&self) -> watch::Receiver<Lease> {
        self.inner.lease.subscribe()
    }

    pub fn up(&self) -> watch::Receiver<bool> {
        self.inner.up.subscribe()
    }

    /// Changes when the clients are dropped to connect again: a stream opened on the old ones
    /// (a watch) may hang on a frozen member, which no ping on it reveals for a while.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.inner.reconnects.subscribe()
    }

    /// A key under the prefix for one token: `<prefix>/<token>/<what>`.
    pub fn key(&self, token: &str, what: &str) -> String {
        format!("{}/{token}/{what}", self.inner.cfg.prefix)
    }

    /// How long one etcd request may take: a third of the lease, so a leader notices a dead
    /// etcd and stops well before its lease could have passed to someone else.
    pub fn request_timeout(&self) -> Duration {
        (self.inner.cfg.lease_ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    /// The clients of the endpoint in use, connecting if needed.
    pub async fn clients(&self) -> Result<Clients, etcd_client::Error> {
        let mut conn = self.inner.conn.lock().await;
        if let Some(c) = &conn.clients {
            return Ok(c.clone());
        }
        let endpoint = self.inner.cfg.endpoints[conn.endpoint].clone();
        let short = Box::pin(Client::connect(
            [&endpoint],
            Some(self.options(Some(self.request_timeout()))),
        ))
        .await;
        let long = Box::pin(Client::connect([&endpoint], Some(self.options(None)))).await;
        match (short, long) {
            (Ok(short), Ok(long)) => {
                let clients = Clients { short: Box::new(short), long: Box::new(long) };
                conn.clients = Some(clients.clone());
                Ok(clients)
            }
            (Err(e), _) | (_, Err(e)) => {
                drop(conn);
                self.failed(&e).await;
                Err(e)
            }
        }
    }

    fn options(&self, timeout: Option<Duration>) -> ConnectOptions {
        let cfg = &self.inner.cfg;
        // etcd closes a connection (GOAWAY "too_many_pings") after three pings sent sooner
        // than its --grpc-keepalive-min-time (5 s by default) or with no request open: then a
        // request in flight fails, perhaps applied with its reply lost. So pings go out only
        // while a request or stream is open, and no more often than that; an idle connection
        // found dead is re-made by the next request, which the request timeout bounds.
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout())
            .with_keep_alive(KEEP_ALIVE_INTERVAL, self.request_timeout())
            .with_keep_alive_while_idle(false);
        if let Some(t) = timeout {
            o = o.with_timeout(t);
        }
        if let Some((user, password)) = &cfg.user {
            o = o
                .with_user(user.clone(), password.get().expose().to_string())
                .with_auto_token_refresh(true);
        }
        if cfg.endpoints.iter().any(|e| e.starts_with("https:")) {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file
                && let Ok(pem) = std::fs::read(ca)
            {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file)
                && let (Ok(c), Ok(k)) = (std::fs::read(c), std::fs::read(k))
            {
                tls = tls.identity(etcd_client::Identity::from_pem(c, k));
            }
            o = o.with_tls(tls);
        }
        o
    }

    /// Opens a stream on the `long` client, which has no request timeout, within the request
    /// timeout: a frozen member takes the request and never answers, and no ping on an idle
    /// connection (see `options`) would end the wait soon.
    pub async fn open<T>(
        &self,
        what: &str,
        opening: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, etcd_client::Error> {
        tokio::time::timeout(self.request_timeout(), opening).await.unwrap_or_else(|_| {
            Err(etcd_client::Error::WatchError(format!("opening the {what} timed out")))
        })
    }

    /// Reports a request that worked: etcd is up.
    pub async fn succeeded(&self) {
        let mut conn = self.inner.conn.lock().await;
        (conn.failures, conn.refusal_logged) = (0, false);
        drop(conn);
        self.inner.up.send_if_modified(|up| !std::mem::replace(up, true));
    }

    /// Reports a failed request. After a few in a row, moves to the next endpoint (a frozen
    /// member keeps its TCP connection open, so the client would otherwise stay with it).
    pub async fn failed(&self, e: &etcd_client::Error) {
        let mut conn = self.inner.conn.lock().await;
        conn.failures += 1;
        if conn.failures >= ROTATE_AFTER {
            conn.failures = 0;
            conn.clients = None;
            self.inner.reconnects.send_modify(|n| *n += 1);
            let n = self.inner.cfg.endpoints.len();
            if n > 1 {
                conn.endpoint = (conn.endpoint + 1) % n;
                warn!(endpoint = %self.inner.cfg.endpoints[conn.endpoint], error = %e, "etcd requests keep failing; trying the next endpoint");
            }
        }
        let refusal = refused(e);
        let first_refusal = refusal && !std::mem::replace(&mut conn.refusal_logged, true);
        drop(conn);
        if self.inner.up.send_if_modified(|up| std::mem::replace(up, false)) || first_refusal {
            if refusal {
                error!(error = %e, prefix = %self.inner.cfg.prefix, "etcd is unreachable: it refuses tokend's login or a key; check [cluster] username and password, and that the user's role may read and write the keys under the prefix; nobody can refresh until it is fixed; serving the last token");
            } else {
                error!(error = %e, "etcd is unreachable: nobody can refresh until it returns; serving the last token");
            }
        }
    }

    /// Grants the node's lease and keeps it alive until `shutdown`; re-grants after it is
    /// lost. The keep-alive runs before any campaign starts, and at a third of the TTL.
    async fn keep_lease(self) {
        let ttl = self.inner.cfg.lease_ttl;
        let stop = self.inner.stop.clone();
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let granted = tokio::select! {
                r = self.grant(ttl) => r,
                () = stop.cancelled() => return,
            };
            let Ok((id, mut keeper, mut stream)) = granted else {
                attempt += 1;
                let wait = crate::policy::store_backoff(attempt, rand::random());
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = stop.cancelled() => return,
                }
            };
            attempt = 0;
            let mut tick = tokio::time::interval(ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => {
                        self.revoke(id).await;
                        return;
                    }
                }
                let sent = Instant::now();
                let renewed = tokio::time::timeout(self.request_timeout(), async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                match renewed {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        let valid_until = sent + Duration::from_secs(r.ttl().unsigned_abs());
                        self.inner.lease.send_replace(Lease::Held { id, valid_until });
                        self.succeeded().await;
                    }
                    Ok(Ok(Some(_))) => {
                        warn!(
                            lease = id,
                            "the election lease expired; campaigning again with a new one"
                        );
                        break;
                    }
                    other => {
                        if let Ok(Err(e)) = &other {
                            self.failed(e).await;
                        } else {
                            self.failed(&etcd_client::Error::WatchError(
                                "lease keep-alive timed out".into(),
                            ))
                            .await;
                        }
                        if !self.inner.lease.borrow().valid(id, Instant::now()) {
                            warn!(
                                lease = id,
                                "lost the election lease (etcd unreachable past its TTL)"
                            );
                            break;
                        }
                        // The stream may be dead; open a new one on the same lease.
                        if let Ok(c) = self.clients().await
                            && let Ok((k, s)) = self
                                .open(
                                    "lease keep-alive",
                                    Box::pin(c.long.clone().lease_keep_alive(id)),
                                )
                                .await
                        {
                            (keeper, stream) = (k, s);
                        }
                    }
                }
            }
            self.inner.lease.send_replace(Lease::None);
        }
    }

    async fn grant(
        &self,
        ttl: Duration,
    ) -> Result<(i64, etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), ()> {
        let clients = self.clients().await.map_err(|_| ())?;
        let sent = Instant::now();
        let granted = Box::pin(clients.short.clone().lease_grant(ttl.as_secs() as i64, None)).await;
        let grant = match granted {
            Ok(g) => g,
            Err(e) => {
                self.failed(&e).await;
                return Err(());
            }
        };
        let id = grant.id();
        let valid_until = sent + Duration::from_secs(grant.ttl().unsigned_abs());
        let mut long = clients.long.clone();
        let keep_alive = Box::pin(long.lease_keep_alive(id));
        let (keeper, stream) = match self.open("lease keep-alive", keep_alive).await {
            Ok(ks) => ks,
            Err(e) => {
                self.failed(&e).await;
                return Err(());
            }
        };
        self.succeeded().await;
        info!(node = %self.node(), lease = id, ttl_s = ttl.as_secs(), "holding an election lease");
        self.inner.lease.send_replace(Lease::Held { id, valid_until });
        Ok((id, keeper, stream))
    }

    async fn revoke(&self, id: i64) {
        self.inner.lease.send_replace(Lease::None);
        if let Ok(c) = self.clients().await {
            match Box::pin(c.short.clone().lease_revoke(id)).await {
                Ok(_) => {
                    info!(
                        lease = id,
                        "revoked the election lease: another host takes over at once"
                    );
                }
                Err(e) => {
                    warn!(lease = id, error = %e, "cannot revoke the election lease; it expires by itself");
                }
            }
        }
    }

    /// Stops the keeper, which revokes the lease. Call after every token has stopped.
    pub async fn shutdown(&self, keeper: tokio::task::JoinHandle<()>) {
        self.inner.stop.cancel();
        let _ = tokio::time::timeout(self.request_timeout() * 2, keeper).await;
    }
}
