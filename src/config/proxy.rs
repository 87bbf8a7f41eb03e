//! `[[token.proxy]]`: a local API proxy that adds the token's current access token. Only
//! loopback TCP or a unix socket with an explicit mode: whoever can connect acts as the token's user.

use super::ConfigError;
use super::raw::Ctx;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// Default bound on waiting for requests in flight before a refresh.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Default largest request body kept for a replay.
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 1 << 20;
/// Default bound on a proxy's open connections to a plain-HTTP upstream (idle and busy).
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    listen: Spanned<String>,
    mode: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    replay_body_limit: Option<Spanned<u64>>,
    max_upstream_connections: Option<Spanned<u64>>,
    #[serde(default)]
    access_log: bool,
}

/// Where a proxy listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket created with exactly this mode (group: the daemon's).
    Unix { path: PathBuf, mode: u32 },
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix { path, mode } => write!(f, "unix:{} (mode {mode:04o})", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// One validated `[[token.proxy]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: Listen,
    /// Base URL requests go to; the token's `server` unless set.
    pub upstream: reqwest::Url,
    /// How long a refresh waits for requests in flight before it goes ahead anyway.
    pub drain_timeout: Duration,
    /// Request bodies up to this size are kept so that a 401 can be replayed.
    pub replay_body_limit: usize,
    /// At most this many connections to a plain-HTTP upstream are open at once; a request
    /// that finds them all busy waits for one (bounded), then gets a 503.
    pub max_upstream_connections: usize,
    /// One INFO line per request (method, path without query, status, duration, held, replayed).
    pub access_log: bool,
}

pub(super) fn validate_all(
    ctx: &Ctx<'_>,
    proxies: &[RawProxy],
    server: &reqwest::Url,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<ProxyConfig>, ConfigError> {
    proxies.iter().map(|p| validate(ctx, p, server, key)).collect()
}

fn validate(
    ctx: &Ctx<'_>,
    p: &RawProxy,
    server: &reqwest::Url,
    key: &dyn Fn(&str) -> String,
) -> Result<ProxyConfig, ConfigError> {
    let upstream = match &p.upstream {
        Some(u) => super::raw::url(ctx, u, key("proxy.upstream"))?,
        None => server.clone(),
    };
    let drain_timeout = match &p.drain_timeout {
        Some(d) => super::raw::duration(ctx, d, key("proxy.drain_timeout"))?,
        None => DEFAULT_DRAIN_TIMEOUT,
    };
    let replay_body_limit = p
        .replay_body_limit
        .as_ref()
        .map_or(DEFAULT_REPLAY_BODY_LIMIT, |l| usize::try_from(*l.get_ref()).unwrap_or(usize::MAX));
    Ok(ProxyConfig {
        listen: listen(ctx, p, key)?,
        upstream,
        drain_timeout,
        replay_body_limit,
        max_upstream_connections: max_upstream_connections(ctx, p, key)?,
        access_log: p.access_log,
    })
}

fn max_upstream_connections(
    ctx: &Ctx<'_>,
    p: &RawProxy,
    key: &dyn Fn(&str) -> String,
) -> Result<usize, ConfigError> {
    let Some(max) = &p.max_upstream_connections else {
        return Ok(DEFAULT_MAX_UPSTREAM_CONNECTIONS);
    };
    match usize::try_from(*max.get_ref()) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(ctx.err(
            max,
            key("proxy.max_upstream_connections"),
            format!("must be at least 1 (the default is {DEFAULT_MAX_UPSTREAM_CONNECTIONS})"),
        )),
    }
}

fn listen(
    ctx: &Ctx<'_>,
    p: &RawProxy,
    key: &dyn Fn(&str) -> String,
) -> Result<Listen, ConfigError> {
    let text = p.listen.get_ref();
    if let Some(path) = text.strip_prefix("unix:") {
        let Some(m) = &p.mode else {
            return Err(ctx.err(
                &p.listen,
                key("proxy.mode"),
                "a unix socket needs an explicit mode, e.g. mode = \"0660\" (the daemon's group may connect)",
            ));
        };
        let mode = super::raw::mode(ctx, m, key("proxy.mode"))?;
        if path.is_empty() {
            return Err(ctx.err(
                &p.listen,
                key("proxy.listen"),
                "\"unix:\" needs a path, e.g. \"unix:/run/tokend/main.sock\"",
            ));
        }
        return Ok(Listen::Unix { path: ctx.path(path), mode });
    }
    let addr: SocketAddr = text.parse().map_err(|_| {
        ctx.err(
            &p.listen,
            key("proxy.listen"),
            format!("{text:?} is neither \"unix:PATH\" nor an address like \"127.0.0.1:8081\" or \"[::1]:8081\""),
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(ctx.err(
            &p.listen,
            key("proxy.listen"),
            format!("{addr} is not a loopback address: whoever reaches the proxy acts as the token's user; use 127.0.0.1, [::1] or \"unix:PATH\""),
        ));
    }
    if p.mode.is_some() {
        return Err(ctx.err(
            &p.listen,
            key("proxy.mode"),
            "mode applies to unix sockets only (\"unix:PATH\")",
        ));
    }
    Ok(Listen::Tcp(addr))
}
