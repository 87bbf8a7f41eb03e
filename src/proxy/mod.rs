//! The local API proxy (`[[token.proxy]]`): programs call the API through tokend, which sets
//! the token's current access token on every request, holds requests across a rotation and
//! replays one that a rotation made fail, so callers never see a rotation.
//!
//! - `gate`: the refresher's hook (the current token; close before a refresh, open after)
//! - `forward`: one request (token, replay), `body`: replay buffering, `headers`: hop-by-hop
//! - `server`: listeners and the connection loop

mod body;
mod forward;
pub mod gate;
mod headers;
mod server;

pub use gate::Gate;

use crate::config::{Listen, ProxyConfig};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// One HTTP client for every proxy of a daemon: its pool keeps upstream connections (HTTP/2
/// where the upstream offers it over TLS). No redirects followed, no timeout of its own (a
/// slow upstream is passed through; the caller decides how long to wait), no added headers.
pub fn upstream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(reqwest::header::HeaderMap::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("a client with a static configuration")
}

/// Binds every proxy of a token and serves them; abort the tasks to stop.
pub async fn start(
    configs: &[ProxyConfig],
    gate: &Arc<Gate>,
    client: &reqwest::Client,
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
        let proxy = Arc::new(forward::Proxy {
            cfg: cfg.clone(),
            gate: gate.clone(),
            client: client.clone(),
        });
        tasks.push(tokio::spawn(server::serve(listener, proxy)));
    }
    Ok(tasks)
}
