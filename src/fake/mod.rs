//! A lifecycle-faithful fake RingCentral auth server, for tokend's tests, its demo, and
//! users' own integration tests.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use tokend::fake::{FakeConfig, FakeServer};
//! let server = FakeServer::start(FakeConfig::for_tests()).await?;
//! println!("token endpoint: {}/restapi/oauth/token", server.url());
//! assert_eq!(server.stats().logins, 0);
//! server.shutdown().await;
//! # Ok(()) }
//! ```

mod auth;
mod config;
mod faults;
mod http;
mod stats;
mod tls;

pub use auth::pkce_matches;
pub use config::{
    App, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, GrantKind,
    ProviderRules, RateLimit, Reuse, User,
};
pub use faults::{Fault, FaultKind};
pub use stats::Stats;
pub use tls::TestTls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// State shared by all connections. Locks are never held across an `.await`.
pub(crate) struct Shared {
    auth: Mutex<auth::Auth>,
    faults: Mutex<faults::FaultQueue>,
    /// Token requests being handled now.
    in_flight: std::sync::atomic::AtomicU64,
}

/// Counts one token request in flight for as long as it lives.
pub(crate) struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Shared {
    fn stats(&self) -> Stats {
        let auth = self.auth.lock().expect("auth lock");
        let mut stats = auth.stats.clone();
        stats.live_sessions = auth.live_sessions();
        stats
    }

    fn issued_tokens(&self) -> Vec<String> {
        self.auth.lock().expect("auth lock").all_tokens()
    }

    fn inject(&self, fault: Fault) {
        self.faults.lock().expect("faults lock").push(fault);
    }

    fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut auth = self.auth.lock().expect("auth lock");
        auth.stats.max_concurrent_token_requests =
            auth.stats.max_concurrent_token_requests.max(now);
        InFlight(self)
    }

    fn next_fault(&self) -> Option<FaultKind> {
        let fault = self.faults.lock().expect("faults lock").next();
        if fault.is_some() {
            self.auth.lock().expect("auth lock").stats.faults_injected += 1;
        }
        fault
    }
}

/// A running fake server. Dropping it without `shutdown` leaves it serving until the runtime ends.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FakeServer {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(config: FakeConfig) -> std::io::Result<Self> {
        Self::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr`.
    pub async fn bind(config: FakeConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let latency = config.latency;
        let shared = Arc::new(Shared {
            auth: Mutex::new(auth::Auth::new(config)),
            faults: Mutex::new(faults::FaultQueue::default()),
            in_flight: std::sync::atomic::AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let router = http::router(shared.clone(), latency);
        let task = tokio::spawn(http::serve(listener, router, stopped));
        Ok(Self { addr, shared, stop, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the value for a token's `server` key.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Queues a fault for the next token request(s).
    pub fn inject(&self, fault: Fault) {
        self.shared.inject(fault);
    }

    /// Every access and refresh token issued so far (to check that none leaks into logs).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.issued_tokens()
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
