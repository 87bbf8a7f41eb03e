//! `tokend demo`: the whole job in one command. A fake RingCentral server, the daemon on a
//! fast schedule in a temp dir, a watcher that uses each new token for an API call, and beside
//! it a caller that calls the API through the daemon's proxy with no pause and never sees a token.

use crate::config::Config;
use crate::daemon::{self, Control};
use crate::fake::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, FakeServer};
use crate::watch::TokenWatcher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Demo options.
pub struct DemoOptions {
    /// Stop after this many tokens seen by the watcher; `None` runs until Ctrl-C.
    pub cycles: Option<u64>,
    /// Seconds between scheduled refreshes.
    pub every: u32,
}

/// Runs the demo; returns the fake server's final statistics as pretty JSON.
pub async fn run(opts: DemoOptions) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new().prefix("tokend-demo-").tempdir()?;
    let server = FakeServer::start(FakeConfig::for_tests()).await?;
    let every = opts.every.clamp(1, 59);
    let config_path = dir.path().join("config.toml");
    let d = dir.path().display();
    let text = format!(
        "[[token]]\nname = \"demo\"\nserver = \"{}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = \"{DEFAULT_CLIENT_SECRET}\"\ngrant = \"jwt\"\njwt = \"{DEFAULT_JWT}\"\nstate_file = \"{d}/demo.state.json\"\nschedule = \"*/{every} * * * * *\"\naccess_token_ttl = {}\nrate_limit = 100\n\n[[token.sink]]\npath = \"{d}/demo.json\"\nformat = \"json\"\nmode = \"0640\"\n\n[[token.proxy]]\nlisten = \"unix:{d}/demo.sock\"\nmode = \"0600\"\n",
        server.url(),
        u64::from(every) * 4,
    );
    std::fs::write(&config_path, text)?;
    println!("tokend demo: fake server {} , files in {d}", server.url());
    println!(
        "tokend demo: daemon refreshes every {every}s; the watcher calls the API with each new token,\n\
         the proxied caller calls it through {d}/demo.sock with no pause and no token. Ctrl-C stops.\n"
    );
    let config = Config::load_resolved(&config_path)?;
    let (tx, rx) = mpsc::channel(4);
    forward_signals(tx.clone())?;
    let daemon = tokio::spawn(daemon::run(config, rx));
    let sink = dir.path().join("demo.json");
    let proxied = Arc::new(Proxied::default());
    let caller = tokio::spawn(call_through_proxy(dir.path().join("demo.sock"), proxied.clone()));
    let watched = watch(&server, &sink, opts.cycles, tx.clone(), &proxied);
    tokio::select! {
        r = watched => r?,
        () = tx.closed() => {}
    }
    caller.abort();
    let _ = tx.send(Control::Stop).await;
    daemon.await??;
    let stats = server.stats();
    println!(
        "\ntokend demo: {} login(s), {} refresh(es), {} API call(s) accepted, {} refused",
        stats.logins,
        stats.refreshes,
        stats.api_accepted,
        stats.api_rejected.values().sum::<u64>()
    );
    server.shutdown().await;
    Ok(serde_json::to_string_pretty(&stats)?)
}

fn forward_signals(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    let mut signals = daemon::signal_controls()?;
    tokio::spawn(async move {
        while let Some(c) = signals.recv().await {
            if tx.send(c).await.is_err() || c == Control::Stop {
                break;
            }
        }
    });
    Ok(())
}

/// Calls through the proxy and the calls that failed.
#[derive(Default)]
struct Proxied {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Calls the API through the proxy with no pause, as a busy program would.
async fn call_through_proxy(socket: std::path::PathBuf, count: Arc<Proxied>) {
    // The daemon binds the socket as it starts.
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Ok(http) = reqwest::Client::builder().unix_socket(socket).build() else { return };
    loop {
        let sent = http.get("http://proxy/restapi/v1.0/account/~/extension/~").send().await;
        let ok = sent.is_ok_and(|r| r.status().is_success());
        let counter = if ok { &count.ok } else { &count.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if !ok {
            // The daemon is starting or stopping: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Follows the sink; for each new token, makes an API call with it, like a real consumer.
async fn watch(
    server: &FakeServer,
    sink: &std::path::Path,
    cycles: Option<u64>,
    stop: mpsc::Sender<Control>,
    proxied: &Proxied,
) -> anyhow::Result<()> {
    let mut watcher = TokenWatcher::open(sink)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let url = format!("{}/restapi/v1.0/account/~/extension/~", server.url());
    let mut seen = 0;
    let mut next = watcher.current();
    loop {
        let token = match next.take() {
            Some(t) => t,
            None => match watcher.changed().await {
                Some(t) => t,
                None => return Ok(()),
            },
        };
        let status = http.get(&url).bearer_auth(token.access_token.expose()).send().await?.status();
        println!(
            "watcher: {}  -> API {}   | proxied caller: {} calls, {} failed",
            crate::reader_cli::line(&token),
            status.as_u16(),
            proxied.ok.load(Ordering::Relaxed),
            proxied.failed.load(Ordering::Relaxed)
        );
        seen += 1;
        if cycles.is_some_and(|c| seen >= c) {
            let _ = stop.send(Control::Stop).await;
            return Ok(());
        }
    }
}
