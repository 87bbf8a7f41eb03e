//! All tokens of one config: locks, the cron scheduler, control (signals), reload, readiness
//! and graceful shutdown. Each token runs in its own refresher task, so one failing never
//! delays another.

use crate::config::{Config, ConfigError, TokenConfig};
use crate::metrics::{Metrics, TokenMetrics};
use crate::store::{LockError, StateLock, check_dir_writable};
use crate::supervise::Mode;
use crate::task::{CancellationToken, Command, CommandSender, Commands, Shared};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};
use tracing::{error, info, warn};

/// What the outside world asks of the daemon (signals in production, channels in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGHUP: reload config and secrets.
    Reload,
    /// SIGUSR1: refresh every token now.
    RefreshAll,
    /// SIGTERM/SIGINT: stop gracefully.
    Stop,
}

/// Why the daemon could not start (each maps to its own exit code in `main`).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Lock(#[from] LockError),
    #[error("{path} is not writable: {source}")]
    NotWritable { path: PathBuf, source: std::io::Error },
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("metrics.listen {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("token {token}: proxy.listen {listen}: {source}")]
    ProxyListen { token: String, listen: crate::config::Listen, source: std::io::Error },
    #[error("{0}")]
    Files(#[from] crate::config::FileProblem),
    /// EMFILE/ENFILE: not a lock held by another tokend, and not fixed by a restart.
    #[error(
        "too many open files at {path}: raise the open-file limit (systemd: LimitNOFILE=; the daemon raises its soft limit to the hard one at start)"
    )]
    TooManyFiles { path: PathBuf },
    #[error("{0}")]
    Tls(#[from] crate::oauth::TlsSetupError),
}

impl DaemonError {
    /// Exit codes: sysexits.h values, so systemd's `RestartPreventExitStatus=` can tell a
    /// config error (78) from a transient one.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Cluster(_)
            | Self::Files(crate::config::FileProblem::Alias { .. }) => 78,
            Self::NotWritable { .. } | Self::Files(crate::config::FileProblem::Dir { .. }) => 73,
            Self::Lock(_) => 75,
            Self::Scheduler(_) => 70,
            Self::Listen { .. } | Self::ProxyListen { .. } => 71,
            Self::Files(crate::config::FileProblem::Limit(_))
            | Self::TooManyFiles { .. }
            | Self::Tls(_) => 69,
        }
    }
}

/// Up to this many tokens, the `systemctl status` line names each one.
const SUMMARY_TOKENS: usize = 8;

/// Notices suspend and wall-clock jumps: refreshers sleep on the monotonic clock, which
/// stops during suspend, so after one they are told to recheck their wall-clock deadlines.
/// One timer for the daemon instead of a periodic wake-up per token.
struct ClockWatch {
    interval: tokio::time::Interval,
    wall: chrono::DateTime<chrono::Utc>,
    mono: std::time::Instant,
}

impl ClockWatch {
    fn new() -> Self {
        let mut interval = tokio::time::interval(Duration::from_secs(10));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { interval, wall: chrono::Utc::now(), mono: std::time::Instant::now() }
    }

    /// Resolves when the clocks disagree by more than 2 s since the last check.
    async fn tick(&mut self) {
        loop {
            self.interval.tick().await;
            let wall = (chrono::Utc::now() - self.wall).num_milliseconds();
            let mono = i64::try_from(self.mono.elapsed().as_millis()).unwrap_or(i64::MAX);
            (self.wall, self.mono) = (chrono::Utc::now(), std::time::Instant::now());
            if (wall - mono).abs() > 2000 {
                info!(
                    jump_ms = wall - mono,
                    "the wall clock jumped (suspend or time change); rechecking deadlines"
                );
                return;
            }
        }
    }
}

/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// How often memory freed by refreshes is handed back (`malloc::trim`): a refresh round's
/// buffers would otherwise stay in the resident set until the next round reuses them.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// How long a stopping refresher may take to finish an in-flight refresh.
const STOP_GRACE: Duration = Duration::from_secs(90);

struct TokenHandle {
    /// Shared with the token's task: one copy of each token's config in the daemon.
    cfg: Arc<TokenConfig>,
    tx: CommandSender,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The token's proxies (listeners and their connections).
    proxies: Vec<JoinHandle<()>>,
    lock: StateLock,
}

/// A running daemon.
/// Tokens on one cron expression share one scheduler job: the scheduler's cost grows with
/// the number of distinct schedules, not with the number of tokens.
struct ScheduleGroup {
    job: uuid::Uuid,
    members: Arc<std::sync::Mutex<BTreeMap<String, CommandSender>>>,
}

pub struct Daemon {
    /// The running config without its tokens: each token's config is kept once, in its
    /// `TokenHandle` (and its task), not in a third copy here.
    config: Config,
    schedules: BTreeMap<String, ScheduleGroup>,
    /// Metrics, the request bound and the HTTP client, shared with every refresher.
    shared: Shared,
    /// The metrics textfile writer and HTTP server.
    exporters: Vec<JoinHandle<()>>,
    scheduler: JobScheduler,
    tokens: BTreeMap<String, TokenHandle>,
    /// The proxies' upstream client (one pool for the daemon), made when a proxy first needs it.
    upstream: std::sync::OnceLock<crate::proxy::Upstream>,
    /// Multi-host mode: the etcd connection and the task keeping the node's lease.
    #[cfg(feature = "etcd")]
    cluster: Option<(crate::cluster::Cluster, JoinHandle<()>)>,
}

/// Installs SIGTERM/SIGINT/SIGHUP/SIGUSR1 handlers that feed a control channel.
pub fn signal_controls() -> std::io::Result<mpsc::Receiver<Control>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    // A file-size limit (RLIMIT_FSIZE) must fail the write with EFBIG, which we report and
    // retry, instead of killing the daemon with SIGXFSZ.
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, std::sync::Arc::default())?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let control = match sig {
                SIGHUP => Control::Reload,
                SIGUSR1 => Control::RefreshAll,
                _ => Control::Stop,
            };
            if tx.send(control).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Runs the daemon until `Control::Stop` or the channel closes.
pub async fn run(config: Config, mut control: mpsc::Receiver<Control>) -> Result<(), DaemonError> {
    let mut daemon = Daemon::start(config).await?;
    let mut watchdog = crate::systemd::Watchdog::from_env();
    let mut status_every = tokio::time::interval(STATUS_EVERY);
    status_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock = ClockWatch::new();
    let mut trim = tokio::time::interval_at(tokio::time::Instant::now() + TRIM_EVERY, TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            c = control.recv() => match c {
                None | Some(Control::Stop) => break,
                Some(Control::Reload) => {
                    if !reload_fed(&mut daemon, &mut watchdog, &mut control).await {
                        break;
                    }
                }
                Some(Control::RefreshAll) => daemon.refresh_all(),
            },
            () = watchdog.tick() => {}
            _ = status_every.tick(), if crate::systemd::enabled() => crate::systemd::status(&daemon.summary()),
            () = clock.tick() => daemon.broadcast(Command::Recheck),
            _ = trim.tick() => crate::malloc::trim(),

        }
    }
    crate::systemd::stopping();
    daemon.stop().await;
    Ok(())
}

/// A reload, with the watchdog pinged while it runs: it waits for the changed tokens' in-flight
/// refreshes (up to `STOP_GRACE` each) and for the added tokens' first publish, which a slow
/// server or disk stretches past `WatchdogSec=`; systemd would then kill the daemon mid-reload.
/// While it waits for the added tokens, SIGTERM stops the daemon at once (the tokens that have
/// not begun their first login then never begin it) and SIGUSR1 is served; a second SIGHUP
/// reloads again once this reload is over. Returns `false` when the daemon is to stop.
async fn reload_fed(
    daemon: &mut Daemon,
    watchdog: &mut crate::systemd::Watchdog,
    control: &mut mpsc::Receiver<Control>,
) -> bool {
    loop {
        let reloading = {
            let started = daemon.reload();
            tokio::pin!(started);
            loop {
                tokio::select! {
                    r = &mut started => break r,
                    () = watchdog.tick() => {}
                }
            }
        };
        let Some(Reloading { readies, config }) = reloading else { return true };
        let mut again = false;
        let added = futures_util::future::join_all(readies);
        tokio::pin!(added);
        loop {
            tokio::select! {
                _ = &mut added => break,
                () = watchdog.tick() => {}
                c = control.recv() => match c {
                    None | Some(Control::Stop) => {
                        info!("stop asked during a reload: the added tokens still logging in stop after it");
                        return false;
                    }
                    Some(Control::Reload) => again = true,
                    Some(Control::RefreshAll) => daemon.refresh_all(),
                },
            }
        }
        daemon.reloaded(config);
        if !again {
            return true;
        }
    }
}

/// A reload that has started the added tokens and waits for their first publish.
struct Reloading {
    readies: Vec<oneshot::Receiver<()>>,
    config: Config,
}

impl Daemon {
    /// Takes every lock, checks every directory, starts every refresher and waits until each
    /// has published from its state (or reported its failure). Then tells systemd READY=1.
    pub async fn start(mut config: Config) -> Result<Self, DaemonError> {
        raise_open_files();
        // Everything `check` checks, before anything starts or any lock is taken.
        config.check_files()?;
        let tokens = std::mem::take(&mut config.tokens);
        let scheduler =
            JobScheduler::new().await.map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        scheduler.start().await.map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let metrics = Arc::new(Metrics::default());
        let exporters = start_exporters(&config, &metrics).await?;
        let shared = Shared {
            metrics,
            requests: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
            start_ups: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_requests + crate::task::START_UPS_BEYOND_REQUESTS,
            )),
            client: crate::oauth::OAuthClient::new(std::time::Duration::from_secs(30))?,
            gate: None,
        };
        #[cfg(feature = "etcd")]
        let cluster = match &config.cluster {
            None => None,
            Some(c) => {
                let cluster =
                    crate::cluster::Cluster::new(c.clone()).map_err(DaemonError::Cluster)?;
                info!(node = %c.node, endpoints = ?c.endpoints, prefix = %c.prefix, lease_ttl_s = c.lease_ttl.as_secs(), "cluster mode: one host refreshes each token, every host mirrors it");
                let keeper = cluster.start();
                Some((cluster, keeper))
            }
        };
        let mut daemon = Self {
            config,
            shared,
            exporters,
            scheduler,
            tokens: BTreeMap::new(),
            upstream: std::sync::OnceLock::new(),
            schedules: BTreeMap::new(),
            #[cfg(feature = "etcd")]
            cluster,
        };
        let locks = prepare(&tokens)?;
        let mut readies = Vec::new();
        for (cfg, lock) in tokens.into_iter().zip(locks) {
            readies.push(daemon.spawn(cfg, lock).await?);
        }
        for ready in readies {
            let _ = ready.await;
        }
        // What start-up freed (the parsed config, the logins' buffers) goes back before idling.
        crate::malloc::trim();
        info!(tokens = daemon.tokens.len(), config = %daemon.config.path.display(), "tokend ready");
        if crate::systemd::enabled() {
            crate::systemd::ready(&daemon.summary());
        }
        Ok(daemon)
    }

    /// One line for `systemctl status`: each token's health, generation and time left; with
    /// many tokens, how many are ok and which are not (a line per token would be megabytes).
    /// From the daemon's own figures, no file read: this runs on the loop that pings the
    /// watchdog, every `STATUS_EVERY`, and reading each token's files there stalled the pings
    /// on a slow disk (and took seconds of a core at 10,000 tokens).
    fn summary(&self) -> String {
        let now = chrono::Utc::now();
        self.shared.metrics.read(|all| {
            let health = |m: Option<&TokenMetrics>| m.map_or("no_state", |m| m.health(now));
            let names = self.tokens.keys();
            if self.tokens.len() <= SUMMARY_TOKENS {
                let part = |name: &String| match all.get(name) {
                    Some(m) if m.health(now) == "ok" => {
                        let left = m.access_expires.unwrap_or_default() - now.timestamp();
                        format!("{name} ok gen {}, {left}s left", m.generation)
                    }
                    m => format!("{name} {}", health(m).replace('_', " ")),
                };
                return names.map(part).collect::<Vec<_>>().join("; ");
            }
            let not_ok: Vec<String> = names
                .filter_map(|name| match health(all.get(name)) {
                    "ok" => None,
                    h => Some(format!("{name} {}", h.replace('_', " "))),
                })
                .collect();
            let ok = self.tokens.len() - not_ok.len();
            let mut line = format!("{} tokens: {ok} ok", self.tokens.len());
            if !not_ok.is_empty() {
                let shown = not_ok.len().min(SUMMARY_TOKENS);
                let _ = write!(line, ", {} not ok: {}", not_ok.len(), not_ok[..shown].join("; "));
                if not_ok.len() > shown {
                    line.push_str("; ...");
                }
            }
            line
        })
    }

    async fn spawn(
        &mut self,
        cfg: TokenConfig,
        lock: StateLock,
    ) -> Result<oneshot::Receiver<()>, DaemonError> {
        let (tx, rx) = crate::task::commands();
        let (ready_tx, ready_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let (gate, proxies) = self.start_proxies(&cfg, &tx, &stop).await?;
        self.join_schedule(&cfg, tx.clone()).await?;
        let cfg = Arc::new(cfg);
        let task = self.spawn_task(cfg.clone(), gate, rx, stop.clone(), ready_tx);
        info!(token = %cfg.name, schedule = %cfg.schedule.expr, sinks = cfg.sinks.len(), proxies = cfg.proxies.len(), "token started");
        let handle = TokenHandle { cfg, tx, stop, task, proxies, lock };
        self.tokens.insert(handle.cfg.name.clone(), handle);
        Ok(ready_rx)
    }

    /// Binds the token's proxies, with the gate its refresher will drive.
    async fn start_proxies(
        &self,
        cfg: &TokenConfig,
        tx: &CommandSender,
        stop: &CancellationToken,
    ) -> Result<(Option<Arc<crate::proxy::Gate>>, Vec<JoinHandle<()>>), DaemonError> {
        if cfg.proxies.is_empty() {
            return Ok((None, Vec::new()));
        }
        let drain = cfg.proxies.iter().map(|p| p.drain_timeout).max().unwrap_or_default();
        let counters = self.shared.metrics.proxy(&cfg.name);
        let gate = crate::proxy::Gate::new(&cfg.name, drain, tx.clone(), counters);
        let client = self.upstream.get_or_init(crate::proxy::upstream_client);
        let tasks = crate::proxy::start(&cfg.proxies, &gate, client, stop).await.map_err(
            |(listen, source)| DaemonError::ProxyListen { token: cfg.name.clone(), listen, source },
        )?;
        Ok((Some(gate), tasks))
    }

    /// The token's task, supervised: the cluster's (election and mirror) in multi-host mode,
    /// else a refresher.
    fn spawn_task(
        &self,
        cfg: Arc<TokenConfig>,
        gate: Option<Arc<crate::proxy::Gate>>,
        rx: Commands,
        stop: CancellationToken,
        ready: oneshot::Sender<()>,
    ) -> JoinHandle<()> {
        let shared = Shared { gate, ..self.shared.clone() };
        let mode = match () {
            #[cfg(feature = "etcd")]
            () if let Some((cluster, _)) = &self.cluster => Mode::Cluster(cluster.clone()),
            () => Mode::Single,
        };
        tokio::spawn(crate::supervise::run(cfg, shared, mode, rx, stop, ready))
    }

    async fn join_schedule(
        &mut self,
        cfg: &TokenConfig,
        tx: CommandSender,
    ) -> Result<(), DaemonError> {
        let expr = &cfg.schedule.expr;
        if !self.schedules.contains_key(expr) {
            let members: Arc<std::sync::Mutex<BTreeMap<String, CommandSender>>> = Arc::default();
            let fire = members.clone();
            let job = Job::new_async(expr.as_str(), move |_, _| {
                for tx in fire.lock().expect("schedule lock").values() {
                    // A tick already pending is the same tick.
                    tx.send(Command::Tick);
                }
                Box::pin(async {})
            })
            .map_err(|e| DaemonError::Scheduler(format!("token {}: {e}", cfg.name)))?;
            let job =
                self.scheduler.add(job).await.map_err(|e| DaemonError::Scheduler(e.to_string()))?;
            self.schedules.insert(expr.clone(), ScheduleGroup { job, members });
        }
        self.schedules[expr].members.lock().expect("schedule lock").insert(cfg.name.clone(), tx);
        Ok(())
    }

    async fn leave_schedule(&mut self, cfg: &TokenConfig) {
        let expr = &cfg.schedule.expr;
        let Some(group) = self.schedules.get(expr) else { return };
        let empty = {
            let mut members = group.members.lock().expect("schedule lock");
            members.remove(&cfg.name);
            members.is_empty()
        };
        if empty {
            let _ = self.scheduler.remove(&group.job).await;
            self.schedules.remove(expr);
        }
    }

    fn broadcast(&self, command: Command) {
        for t in self.tokens.values() {
            t.tx.send(command);
        }
    }

    fn refresh_all(&self) {
        info!(tokens = self.tokens.len(), "SIGUSR1: refreshing every token now");
        for t in self.tokens.values() {
            t.tx.send(Command::RefreshNow);
        }
    }

    /// SIGHUP: a new config replaces the old only if it is valid; tokens that changed restart.
    /// Returns the added tokens' first publishes to wait for (`reloaded` then ends the reload),
    /// or `None` when the new config was refused.
    async fn reload(&mut self) -> Option<Reloading> {
        let mut new = match Config::load_resolved(&self.config.path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "config reload failed; keeping the running config");
                return None;
            }
        };
        // Everything that can be checked is checked before anything stops: a reload that
        // cannot start a token keeps the running one (and the whole running config).
        let mut locks = match self.reload_locks(&new) {
            Ok(locks) => locks,
            Err(e) => {
                error!(error = %e, "config reload refused; keeping the running config");
                return None;
            }
        };
        self.stop_changed(&new, &mut locks).await;
        // Started together and awaited together, as at start: one slow bootstrap does not
        // hold the others back.
        let mut readies = Vec::new();
        for cfg in std::mem::take(&mut new.tokens) {
            if self.tokens.contains_key(&cfg.name) {
                continue;
            }
            let name = cfg.name.clone();
            let Some(lock) = locks.remove(&cfg.state_file) else {
                error!(token = %name, "cannot start token after reload: its lock was not taken");
                continue;
            };
            clean_temps(std::slice::from_ref(&cfg));
            match self.spawn(cfg, lock).await {
                Ok(ready) => readies.push(ready),
                Err(e) => error!(token = %name, error = %e, "cannot start token after reload"),
            }
        }
        Some(Reloading { readies, config: new })
    }

    /// Ends a reload once the added tokens have published (or failed their first login).
    fn reloaded(&mut self, new: Config) {
        if new.log_format != self.config.log_format
            || new.metrics != self.config.metrics
            || new.cluster != self.config.cluster
        {
            warn!("[log], [metrics] and [cluster] changes take effect on restart");
        }
        self.config = new;
        info!(tokens = self.tokens.len(), "config reloaded");
        if crate::systemd::enabled() {
            crate::systemd::status(&self.summary());
        }
    }

    /// Stops the running tokens that the new config changes or drops. A changed token on the
    /// same state file hands its own lock to its successor.
    async fn stop_changed(&mut self, new: &Config, locks: &mut BTreeMap<PathBuf, StateLock>) {
        // Indexed once: a linear lookup per token made a reload of 10,000 tokens quadratic.
        let by_name: HashMap<&str, &TokenConfig> =
            new.tokens.iter().map(|c| (c.name.as_str(), c)).collect();
        let changed: Vec<String> = self
            .tokens
            .iter()
            .filter(|(name, h)| by_name.get(name.as_str()).is_none_or(|c| **c != *h.cfg))
            .map(|(name, _)| name.clone())
            .collect();
        // Cancelled together first, so that each one's drain runs beside the others'.
        for name in &changed {
            self.tokens[name].stop.cancel();
        }
        for name in changed {
            if let Some((path, lock)) = self.stop_token(&name).await {
                locks.entry(path).or_insert(lock);
            }
        }
    }

    /// Checks the new config's files and takes the locks of the tokens that will start on
    /// state files no running token holds; a changed token's own lock is handed over later.
    fn reload_locks(&self, new: &Config) -> Result<BTreeMap<PathBuf, StateLock>, DaemonError> {
        new.check_files()?;
        let held: std::collections::BTreeSet<&PathBuf> =
            self.tokens.values().map(|t| &t.cfg.state_file).collect();
        let mut locks = BTreeMap::new();
        for cfg in &new.tokens {
            let unchanged = self.tokens.get(&cfg.name).is_some_and(|h| *h.cfg == *cfg);
            if !unchanged && !held.contains(&cfg.state_file) {
                locks.insert(cfg.state_file.clone(), lock(&cfg.state_file)?);
            }
        }
        Ok(locks)
    }

    /// Stops a token; returns its state file and lock for a successor to take over.
    async fn stop_token(&mut self, name: &str) -> Option<(PathBuf, StateLock)> {
        let handle = self.tokens.remove(name)?;
        // The proxies stop accepting at once and drain (bounded by `proxy::SHUTDOWN_GRACE`);
        // awaited so that their socket files are gone before a reload binds the paths again.
        handle.stop.cancel();
        for p in handle.proxies {
            let _ = p.await;
        }
        self.leave_schedule(&handle.cfg).await;
        if tokio::time::timeout(STOP_GRACE, handle.task).await.is_err() {
            error!(token = %name, "refresher did not stop in time");
        }
        self.shared.metrics.remove(name);
        info!(token = %name, "token stopped");
        Some((handle.cfg.state_file.clone(), handle.lock))
    }

    /// Stops every refresher; each finishes and persists an in-flight refresh first.
    pub async fn stop(mut self) {
        info!("stopping");
        let names: Vec<String> = self.tokens.keys().cloned().collect();
        for h in self.tokens.values() {
            h.stop.cancel();
        }
        for name in names {
            self.stop_token(&name).await;
        }
        #[cfg(feature = "etcd")]
        if let Some((cluster, keeper)) = self.cluster.take() {
            // After every token resigned: revoking the lease ends this node's terms at once.
            cluster.shutdown(keeper).await;
        }
        let _ = self.scheduler.shutdown().await;
        for e in &self.exporters {
            e.abort();
        }
        info!("stopped");
    }
}

async fn start_exporters(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, DaemonError> {
    let mut tasks = Vec::new();
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen { addr, source })?;
        info!(%addr, "serving /metrics and /healthz");
        tasks.push(tokio::spawn(crate::metrics::serve(metrics.clone(), listener)));
    }
    if let Some(path) = &config.metrics.textfile {
        let dir = parent(path);
        check_dir_writable(dir)
            .map_err(|source| DaemonError::NotWritable { path: dir.into(), source })?;
        tasks.push(tokio::spawn(crate::metrics::write_textfile(metrics.clone(), path.clone())));
    }
    Ok(tasks)
}

/// The tokens' locks (writable directories and distinct files were checked by
/// `Config::check_files`), then the leftovers of a killed writer are removed.
fn prepare(tokens: &[TokenConfig]) -> Result<Vec<StateLock>, DaemonError> {
    let locks = tokens.iter().map(|cfg| lock(&cfg.state_file)).collect::<Result<Vec<_>, _>>()?;
    clean_temps(tokens);
    Ok(locks)
}

/// Removes temp files a killed writer left beside the tokens' files. Call only while holding
/// their locks: then such temp files can only be leftovers.
fn clean_temps(tokens: &[TokenConfig]) {
    // Keyed by the directory's bytes as written: hashing a `Path` parses its components, and
    // 10,000 tokens have 50,000 files here, before any token starts (two spellings of one
    // directory only make it scanned twice).
    let mut dirs: HashMap<&std::ffi::OsStr, std::collections::BTreeSet<std::ffi::OsString>> =
        HashMap::new();
    let name = |path: &Path| path.file_name().unwrap_or_default().to_os_string();
    for cfg in tokens {
        // The intent marker and the status file are ours too (not the login hand-off file,
        // which `tokend login` writes); a kill during their write leaves a temp file as well.
        let siblings = [
            crate::store::State::intent_path(&cfg.state_file),
            crate::store::Status::path_for(&cfg.state_file),
        ];
        let names = dirs.entry(parent(&cfg.state_file).as_os_str()).or_default();
        names.insert(name(&cfg.state_file));
        names.extend(siblings.iter().map(|s| name(s)));
        for sink in &cfg.sinks {
            dirs.entry(parent(&sink.path).as_os_str()).or_default().insert(name(&sink.path));
        }
    }
    for (dir, names) in &dirs {
        crate::store::remove_stale_temps(Path::new(dir), names);
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Takes a token's lock; running out of file descriptors is told apart from a held lock.
fn lock(state_file: &Path) -> Result<StateLock, DaemonError> {
    StateLock::acquire(state_file).map_err(|e| match e {
        LockError::Io { path, source } if crate::limits::is_too_many_files(&source) => {
            DaemonError::TooManyFiles { path }
        }
        e => DaemonError::Lock(e),
    })
}

/// Raises the soft open-file limit to the hard one (one lock file per token). Under
/// `SystemCallFilter=~@resources` setrlimit fails with EPERM: the unit's `LimitNOFILE=`
/// is then what applies, and `check_files` has already compared it with the tokens.
fn raise_open_files() {
    match crate::limits::raise_open_files() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => {
            let limit = crate::limits::open_files().map_or(0, |(soft, _)| soft);
            info!(error = %e, limit, "cannot raise the open-file soft limit; keeping it");
        }
    }
}
