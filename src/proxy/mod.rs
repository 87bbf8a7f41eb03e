//! The local API proxy (`[[token.proxy]]`): programs call the API through tokend, which sets
//! the token's current access token on every request, holds requests across a rotation and
//! replays one that a rotation made fail, so callers never see a rotation.
//!
//! - `gate`: the refresher's hook (the current token; close before a refresh, open after)
//! - `forward`: one request (token, replay), `body`: replay buffering, `headers`: hop-by-hop
//! - `server`: listeners; `conn`: a client connection's HTTP/1.1 loop, `wire`: its parsing
//!   and framing, `inbody`: request bodies read off it, `idle`: its idle timeout
//! - `plain`: plain-HTTP upstream connections, `upwire`: their requests' and answers' heads

mod body;
mod conn;
mod forward;
pub mod gate;
mod headers;
mod idle;
mod inbody;
mod plain;
mod server;
mod upwire;
mod wire;

pub use gate::Gate;

use crate::config::{Listen, ProxyConfig};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The proxies' upstream client: hyper's pooled client, HTTPS through rustls with the
/// platform's roots (as reqwest does for the token requests), plain HTTP for a loopback upstream.
pub type Upstream = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    body::UpBody,
>;

/// One HTTP client for every proxy of a daemon: its pool keeps upstream connections (HTTP/2
/// where the upstream offers it over TLS). No redirects followed, no timeout of its own (a
/// slow upstream is passed through; the caller decides how long to wait), no added headers
/// besides `Host`.
pub fn upstream_client() -> Upstream {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    // Small requests and answers: no Nagle delay on top of the upstream's latency.
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(https)
}

fn tls_config() -> rustls::ClientConfig {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(BuilderVerifierExt::with_platform_verifier)
        // The daemon built its token client on this same verifier before any proxy starts,
        // and stopped with exit 69 if the machine has no CA certificates: this cannot fail.
        .expect("the platform's certificate verifier, already built once by the token client")
        .with_no_client_auth()
}

/// Binds every proxy of a token and serves them until `shutdown`, when each drains (see
/// `server::serve`); its task ends once drained. Aborting a task ends its connections at once.
pub async fn start(
    configs: &[ProxyConfig],
    gate: &Arc<Gate>,
    client: &Upstream,
    shutdown: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, (Listen, std::io::Error)> {
    let mut tasks = Vec::new();
    for cfg in configs {
        let listener = match server::bind(&cfg.listen).await {
            Ok(l) => l,
            Err(e) => {
                for t in &tasks {
                    JoinHandle::abort(t);
                }
                return Err((cfg.listen.clone(), e));
            }
        };
        tracing::info!(token = %gate.name(), listen = %cfg.listen, upstream = %cfg.upstream, "proxy listening");
        let runtimes = workers();
        let proxies = forward::Proxy::per_worker(cfg, gate, client, runtimes.len());
        let workers = runtimes.iter().cloned().zip(proxies).collect();
        tasks.push(tokio::spawn(server::serve(listener, workers, shutdown.clone())));
    }
    Ok(tasks)
}

/// The proxies' threads, one per core, each a single-threaded runtime (as nginx runs one
/// event loop per worker process), given accepted connections in turn: a connection and its
/// upstream connections live on one thread, so a request wakes no other thread. On the daemon's work-stealing runtime, the
/// workers woke each other about once per proxied request (a futex wake and wait, and a
/// context switch): about a tenth of the proxy's CPU per request in issue 13's benchmark.
/// Started with the first proxy; they run until the process exits.
fn workers() -> &'static [tokio::runtime::Handle] {
    static WORKERS: std::sync::OnceLock<Vec<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    WORKERS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        (0..n).map(worker).collect()
    })
}

fn worker(i: usize) -> tokio::runtime::Handle {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime (the daemon's own was built the same way)");
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name(format!("tokend-proxy-{i}"))
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .expect("a proxy thread");
    handle
}
