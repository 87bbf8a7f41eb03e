//! Stage one: the raw serde schema (unknown keys refused), and its validation into `Config`.

use super::secret_source::{ConfigSecret, RawSecret, SecretSource};
use super::{
    ClusterConfig, Config, ConfigError, DEFAULT_MAX_CONCURRENT, DEFAULT_SCHEDULE, Grant, Hook,
    MetricsConfig, RateBudget, RetryPolicy, Schedule, SinkConfig, SinkFormat, TokenConfig,
};
use crate::logging::LogFormat;
use crate::provider::{ClientAuth, Profile};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    log: Option<RawLog>,
    metrics: Option<RawMetrics>,
    daemon: Option<RawDaemon>,
    cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    max_concurrent_requests: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    backend: Option<Spanned<String>>,
    endpoints: Spanned<Vec<String>>,
    prefix: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<RawSecret>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    encryption_key: Option<Spanned<RawSecret>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    textfile: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: Spanned<String>,
    provider: Option<Spanned<String>>,
    server: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    client_auth: Option<Spanned<String>>,
    audience: Option<String>,
    client_id: Spanned<String>,
    client_secret: Option<Spanned<RawSecret>>,
    grant: Spanned<String>,
    jwt: Option<Spanned<RawSecret>>,
    refresh_token: Option<Spanned<RawSecret>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<RawSecret>>,
    extension: Option<String>,
    redirect_uri: Option<String>,
    state_file: Spanned<String>,
    schedule: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    access_token_ttl: Option<Spanned<u64>>,
    access_token_lifetime: Option<Spanned<String>>,
    refresh_token_ttl: Option<Spanned<u64>>,
    safety_margin: Option<Spanned<String>>,
    retry_initial: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
    rate_limit: Option<Spanned<u64>>,
    rate_window: Option<Spanned<String>>,
    session_budget: Option<Spanned<u64>>,
    request_timeout: Option<Spanned<String>>,
    scope: Option<String>,
    on_refresh: Option<Spanned<Vec<String>>>,
    on_refresh_timeout: Option<Spanned<String>>,
    #[serde(default)]
    sink: Vec<RawSink>,
    #[serde(default)]
    proxy: Vec<super::proxy::RawProxy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    path: Spanned<String>,
    format: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    include_refresh_token: bool,
}

/// Turns byte offsets into line numbers and builds errors for one file.
pub(super) struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    /// Byte offset of each newline: a line number is a binary search, not a scan of the text
    /// before it (that scan made parsing 10,000 tokens quadratic: seconds of start-up).
    newlines: Vec<usize>,
    /// Each distinct schedule parsed once and shared by every token on it.
    schedules: std::cell::RefCell<std::collections::HashMap<String, Schedule>>,
}

impl<'a> Ctx<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        let newlines = text.match_indices('\n').map(|(i, _)| i).collect();
        Self { file, text, newlines, schedules: std::cell::RefCell::default() }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset.min(self.text.len())) + 1
    }

    fn schedule(&self, expr: &str) -> Result<Schedule, String> {
        if let Some(s) = self.schedules.borrow().get(expr) {
            return Ok(s.clone());
        }
        let s = Schedule::parse(expr)?;
        self.schedules.borrow_mut().insert(expr.to_string(), s.clone());
        Ok(s)
    }

    pub(super) fn err<T>(
        &self,
        spanned: &Spanned<T>,
        key: String,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(self.line_of(spanned.span().start)),
            key,
            message: message.into(),
        }
    }

    fn err_at(
        &self,
        offset: Option<usize>,
        key: String,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: offset.map(|o| self.line_of(o)),
            key,
            message: message.into(),
        }
    }

    /// A secret as the config names it; read later, by `Config::resolve_secrets`.
    fn secret(&self, s: &Spanned<RawSecret>, key: String) -> ConfigSecret {
        let source = SecretSource::from_raw(s.get_ref().clone());
        ConfigSecret::new(source, key, self.line_of(s.span().start))
    }

    /// A relative path in the config resolves against the config's directory.
    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            return p;
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::path::absolute(dir.join(&p)).unwrap_or_else(|_| dir.join(p))
    }

    /// The dotted key a serde error at `offset` refers to: the enclosing table header plus the
    /// key that starts the line.
    fn key_at(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let header = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let rest = &self.text[line_start..];
        let key = rest.split(['=', '\n']).next().unwrap_or("").trim();
        let key = if key.starts_with('[') { "" } else { key };
        match (header, key.is_empty()) {
            (Some(h), false) => format!("{h}.{key}"),
            (Some(h), true) => h,
            (None, _) => key.to_string(),
        }
    }
}

pub(super) fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx::new(file, text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let key = offset.map(|o| ctx.key_at(o)).unwrap_or_default();
        ctx.err_at(offset, key, e.message().trim().to_string())
    })?;
    let log_format = match raw.log.and_then(|l| l.format) {
        None => LogFormat::Text,
        Some(f) => match f.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ctx.err(
                    &f,
                    "log.format".into(),
                    format!("{other:?} is not a log format; valid: \"text\", \"json\""),
                ));
            }
        },
    };
    if raw.token.is_empty() {
        return Err(ctx.err_at(None, "token".into(), "no [[token]] table: nothing to keep alive"));
    }
    let mut names = HashSet::new();
    let mut state_files = HashSet::new();
    let mut sink_paths = HashSet::new();
    let mut tokens = Vec::new();
    for t in raw.token {
        let token = validate_token(&ctx, t)?;
        let key = |k: &str| format!("token \"{}\".{k}", token.name);
        if !names.insert(token.name.clone()) {
            return Err(ctx.err_at(
                None,
                key("name"),
                "duplicate token name; names must be unique",
            ));
        }
        if !state_files.insert(token.state_file.clone()) {
            return Err(ctx.err_at(
                None,
                key("state_file"),
                "another token already uses this state file",
            ));
        }
        for s in &token.sinks {
            if !sink_paths.insert(s.path.clone()) || state_files.contains(&s.path) {
                return Err(ctx.err_at(
                    None,
                    key("sink.path"),
                    format!("{} is written by another sink or is a state file", s.path.display()),
                ));
            }
        }
        tokens.push(token);
    }
    let metrics = metrics(&ctx, raw.metrics)?;
    let max_concurrent_requests = match raw.daemon.and_then(|d| d.max_concurrent_requests) {
        None => DEFAULT_MAX_CONCURRENT,
        Some(n) if !(1..=1024).contains(n.get_ref()) => {
            return Err(ctx.err(&n, "daemon.max_concurrent_requests".into(), "must be 1 to 1024"));
        }
        Some(n) => n.into_inner(),
    };
    let cluster = raw.cluster.map(|c| cluster(&ctx, c)).transpose()?;
    Ok(Config {
        path: file.to_path_buf(),
        warnings: mode_warnings(&tokens),
        log_format,
        metrics,
        max_concurrent_requests,
        cluster,
        tokens,
    })
}

fn cluster(ctx: &Ctx<'_>, raw: Spanned<RawCluster>) -> Result<ClusterConfig, ConfigError> {
    let key = |k: &str| format!("cluster.{k}");
    if !cfg!(feature = "etcd") {
        return Err(ctx.err(
            &raw,
            "cluster".into(),
            "this tokend was built without multi-host support; rebuild with \
             `cargo build --release --features etcd` (needs protoc: Debian protobuf-compiler \
             and libprotobuf-dev)",
        ));
    }
    let raw = raw.into_inner();
    if let Some(b) = &raw.backend
        && b.get_ref() != "etcd"
    {
        return Err(ctx.err(
            b,
            key("backend"),
            format!("{:?} is not a backend; valid: \"etcd\"", b.get_ref()),
        ));
    }
    if raw.endpoints.get_ref().is_empty() {
        return Err(ctx.err(
            &raw.endpoints,
            key("endpoints"),
            "needs at least one etcd URL, e.g. [\"http://127.0.0.1:2379\"]",
        ));
    }
    for e in raw.endpoints.get_ref() {
        match reqwest::Url::parse(e) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(ctx.err(
                    &raw.endpoints,
                    key("endpoints"),
                    format!("{e:?} is not an etcd URL like \"http://10.0.0.1:2379\""),
                ));
            }
        }
    }
    let tls = raw.endpoints.get_ref().iter().any(|e| e.starts_with("https:"));
    if tls != raw.endpoints.get_ref().iter().all(|e| e.starts_with("https:")) {
        return Err(ctx.err(
            &raw.endpoints,
            key("endpoints"),
            "mixes http:// and https:// endpoints",
        ));
    }
    let prefix = match &raw.prefix {
        None => super::DEFAULT_CLUSTER_PREFIX.to_string(),
        Some(p) => {
            let v = p.get_ref().trim_end_matches('/');
            if !v.starts_with('/') || v.len() < 2 {
                return Err(ctx.err(
                    p,
                    key("prefix"),
                    format!("{:?} is not a key prefix like \"/tokend\"", p.get_ref()),
                ));
            }
            v.to_string()
        }
    };
    let lease_ttl = match &raw.lease_ttl {
        None => super::DEFAULT_LEASE_TTL,
        Some(t) => {
            let d = duration(ctx, t, key("lease_ttl"))?;
            if d < Duration::from_secs(2) || d.subsec_nanos() != 0 || d > Duration::from_secs(300) {
                return Err(ctx.err(
                    t,
                    key("lease_ttl"),
                    "must be whole seconds from \"2s\" to \"5m\"",
                ));
            }
            d
        }
    };
    // Empty means "the host name", read by `resolve_cluster` (parsing reads nothing).
    let node = match &raw.node {
        Some(n) => {
            if n.get_ref().trim().is_empty() {
                return Err(ctx.err(n, key("node"), "must not be empty"));
            }
            n.get_ref().clone()
        }
        None => String::new(),
    };
    let access = cluster_access(ctx, &raw, tls)?;
    Ok(ClusterConfig {
        endpoints: raw.endpoints.into_inner(),
        prefix,
        lease_ttl,
        node,
        user: access.user,
        ca_file: access.ca_file,
        cert_file: access.cert_file,
        key_file: access.key_file,
        encryption_key: access.encryption_key,
        files: access.files,
    })
}

/// Who we are to etcd and how the stored values are sealed.
struct ClusterAccess {
    user: Option<(String, ConfigSecret)>,
    encryption_key: Option<ConfigSecret>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    files: Vec<(String, usize, PathBuf)>,
}

fn cluster_access(
    ctx: &Ctx<'_>,
    raw: &RawCluster,
    tls: bool,
) -> Result<ClusterAccess, ConfigError> {
    let key = |k: &str| format!("cluster.{k}");
    let user = match (&raw.username, &raw.password) {
        (None, None) => None,
        (Some(u), Some(p)) => Some((u.get_ref().clone(), ctx.secret(p, key("password")))),
        (Some(u), None) => return Err(ctx.err(u, key("password"), "username needs a password")),
        (None, Some(p)) => return Err(ctx.err(p, key("username"), "password needs a username")),
    };
    let encryption_key = match &raw.encryption_key {
        None => None,
        Some(k) => {
            // A literal key is checked now; one from elsewhere when it is read.
            if let RawSecret::Literal(secret) = k.get_ref() {
                check_encryption_key(secret).map_err(|m| ctx.err(k, key("encryption_key"), m))?;
            }
            Some(ctx.secret(k, key("encryption_key")))
        }
    };
    let mut files = Vec::new();
    let mut file = |f: &Option<Spanned<String>>, k: &str| -> Result<Option<PathBuf>, ConfigError> {
        let Some(f) = f else { return Ok(None) };
        let p = ctx.path(f.get_ref());
        if !tls {
            return Err(ctx.err(f, key(k), "TLS files need https:// endpoints"));
        }
        files.push((key(k), ctx.line_of(f.span().start), p.clone()));
        Ok(Some(p))
    };
    let (ca_file, cert_file, key_file) = (
        file(&raw.ca_file, "ca_file")?,
        file(&raw.cert_file, "cert_file")?,
        file(&raw.key_file, "key_file")?,
    );
    if cert_file.is_some() != key_file.is_some() {
        return Err(ctx.err_at(None, key("cert_file"), "cert_file and key_file go together"));
    }
    Ok(ClusterAccess { user, encryption_key, ca_file, cert_file, key_file, files })
}

fn check_encryption_key(secret: &crate::secret::Secret) -> Result<(), String> {
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret.expose().trim());
    if bytes.map(|b| b.len()) == Ok(32) {
        Ok(())
    } else {
        Err("must be 32 random bytes in base64; make one with `head -c 32 /dev/urandom | base64`"
            .into())
    }
}

/// `[cluster]`'s part of `Config::resolve_secrets`: the secrets, the host name as the default
/// node name, and the TLS files.
pub(super) fn resolve_cluster(file: &Path, c: &mut ClusterConfig) -> Result<(), ConfigError> {
    let err = |key: &str, line: Option<usize>, message: String| ConfigError {
        file: file.to_path_buf(),
        line,
        key: key.to_string(),
        message,
    };
    if let Some((_, password)) = &mut c.user {
        password.resolve(file)?;
    }
    if let Some(k) = &mut c.encryption_key {
        k.resolve(file)?;
        let line = Some(k.line());
        check_encryption_key(k.get()).map_err(|m| err("cluster.encryption_key", line, m))?;
    }
    if c.node.is_empty() {
        c.node = hostname().ok_or_else(|| {
            err("cluster.node", None, "cannot read the host name; set node = \"...\"".into())
        })?;
    }
    for (key, line, path) in &c.files {
        std::fs::metadata(path)
            .map_err(|e| err(key, Some(*line), format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The kernel's host name.
fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

fn metrics(ctx: &Ctx<'_>, raw: Option<RawMetrics>) -> Result<MetricsConfig, ConfigError> {
    let Some(raw) = raw else { return Ok(MetricsConfig::default()) };
    let listen = match &raw.listen {
        None => None,
        Some(l) => {
            let addr: std::net::SocketAddr = l.get_ref().parse().map_err(|_| {
                ctx.err(
                    l,
                    "metrics.listen".into(),
                    format!("{:?} is not an address like \"127.0.0.1:9464\"", l.get_ref()),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(ctx.err(l, "metrics.listen".into(), "metrics are served on loopback only (127.0.0.1 or ::1); scrape through a proxy if needed"));
            }
            Some(addr)
        }
    };
    Ok(MetricsConfig { textfile: raw.textfile.map(|t| ctx.path(t.get_ref())), listen })
}

fn validate_token(ctx: &Ctx<'_>, t: RawToken) -> Result<TokenConfig, ConfigError> {
    let name = token_name(ctx, &t.name)?;
    let key = |k: &str| format!("token \"{name}\".{k}");
    let provider = provider(ctx, &t, &key)?;
    let (server, token_url) = endpoints(ctx, &t, provider, &key)?;
    let client_secret = t.client_secret.as_ref().map(|s| ctx.secret(s, key("client_secret")));
    let grant = grant(ctx, &t, &key)?;
    grant_of_provider(ctx, &t, provider, client_secret.is_some(), &key)?;
    let client_auth = client_auth(ctx, &t, provider, &key)?;
    let schedule_text = t.schedule.as_ref().map_or(DEFAULT_SCHEDULE, |s| s.get_ref().as_str());
    let schedule = ctx.schedule(schedule_text).map_err(|m| match &t.schedule {
        Some(s) => ctx.err(s, key("schedule"), m),
        None => ctx.err_at(None, key("schedule"), m),
    })?;
    // Jitter: default up to 2 minutes, never more than a tenth of the gap between ticks.
    let jitter_cap = schedule.min_interval() / 10;
    let jitter = match &t.jitter {
        Some(j) => {
            let d = duration(ctx, j, key("jitter"))?;
            if d > jitter_cap {
                return Err(ctx.err(j, key("jitter"), format!("{} is more than a tenth of the time between two ticks ({}); use at most {}", fmt_d(d), fmt_d(schedule.min_interval()), fmt_d(jitter_cap))));
            }
            d
        }
        None => Duration::from_secs(120).min(jitter_cap),
    };
    let opt_duration = |s: &Option<Spanned<String>>,
                        k: &str,
                        default: Duration|
     -> Result<Duration, ConfigError> {
        let Some(s) = s else { return Ok(default) };
        let d = duration(ctx, s, key(k))?;
        within_bounds(k, d).map_err(|m| ctx.err(s, key(k), m))?;
        Ok(d)
    };
    let retry = RetryPolicy {
        initial: opt_duration(&t.retry_initial, "retry_initial", Duration::from_secs(1))?,
        max: opt_duration(&t.retry_max, "retry_max", Duration::from_secs(300))?,
    };
    retry_order(ctx, &t, retry, &key)?;
    let counts = counts(ctx, &t, &key)?;
    let rate = RateBudget {
        requests: counts.rate_limit,
        window: opt_duration(&t.rate_window, "rate_window", Duration::from_secs(60))?,
        sessions: counts.session_budget,
    };
    let sinks = t.sink.iter().map(|s| sink(ctx, s, &key)).collect::<Result<Vec<_>, _>>()?;
    let on_refresh = match &t.on_refresh {
        Some(argv) if argv.get_ref().is_empty() => {
            return Err(ctx.err(
                argv,
                key("on_refresh"),
                "an empty command; give argv like [\"/usr/bin/systemctl\", \"reload\", \"myapp\"]",
            ));
        }
        Some(argv) => Some(Hook {
            argv: argv.get_ref().clone(),
            timeout: opt_duration(
                &t.on_refresh_timeout,
                "on_refresh_timeout",
                Duration::from_secs(30),
            )?,
        }),
        None => None,
    };
    let has_literal_secret = has_literal_secret(&t);
    Ok(TokenConfig {
        provider,
        client_auth,
        audience: t.audience.clone(),
        proxies: super::proxy::validate_all(ctx, &t.proxy, &server, &key)?,
        has_literal_secret,
        state_file: ctx.path(t.state_file.get_ref()),
        server,
        token_url,
        client_id: t.client_id.get_ref().clone(),
        client_secret,
        grant,
        schedule,
        jitter,
        access_token_ttl: counts.access_token_ttl,
        access_token_lifetime: t
            .access_token_lifetime
            .as_ref()
            .map(|s| bounded_duration(ctx, s, "access_token_lifetime", &key))
            .transpose()?,
        refresh_token_ttl: counts.refresh_token_ttl,
        safety_margin: opt_duration(&t.safety_margin, "safety_margin", Duration::from_secs(300))?,
        retry,
        rate,
        request_timeout: opt_duration(
            &t.request_timeout,
            "request_timeout",
            Duration::from_secs(30),
        )?,
        scope: t.scope,
        on_refresh,
        sinks,
        name,
    })
}

/// `provider = ...`: the profile whose rules this token follows (default RingCentral).
fn provider(
    ctx: &Ctx<'_>,
    t: &RawToken,
    key: &dyn Fn(&str) -> String,
) -> Result<&'static Profile, ConfigError> {
    let Some(p) = &t.provider else { return Ok(Profile::default_profile()) };
    Profile::named(p.get_ref()).ok_or_else(|| {
        ctx.err(
            p,
            key("provider"),
            format!("{:?} is not a provider; valid: {}", p.get_ref(), Profile::names()),
        )
    })
}

/// `server` and `token_url`. RingCentral's token URL is a path on `server`, which it needs;
/// elsewhere the token URL comes from the profile or the config, and `server` (the proxies'
/// default upstream) defaults to the token URL's origin.
fn endpoints(
    ctx: &Ctx<'_>,
    t: &RawToken,
    provider: &Profile,
    key: &dyn Fn(&str) -> String,
) -> Result<(reqwest::Url, reqwest::Url), ConfigError> {
    let server = t.server.as_ref().map(|s| url(ctx, s, key("server"))).transpose()?;
    let token_url = match (&t.token_url, provider.token_url, &server) {
        (Some(u), ..) => url(ctx, u, key("token_url"))?,
        (None, Some(path), Some(server)) if path.starts_with('/') => {
            server.join(path).expect("static path joins")
        }
        (None, Some(path), None) if path.starts_with('/') => {
            return Err(ctx.err(&t.name, key("server"), format!("provider {:?} needs `server`, e.g. server = \"https://platform.ringcentral.com\"", provider.name)));
        }
        (None, Some(u), _) => reqwest::Url::parse(u).expect("profile URLs parse"),
        (None, None, _) => {
            return Err(ctx.err(&t.name, key("token_url"), format!("provider {:?} has no standard token endpoint (it is per tenant); set token_url, e.g. token_url = \"https://example.okta.com/oauth2/default/v1/token\"", provider.name)));
        }
    };
    let server = server.unwrap_or_else(|| {
        let mut origin = token_url.clone();
        origin.set_path("/");
        origin.set_query(None);
        origin
    });
    Ok((server, token_url))
}

/// The grant must be one the provider has; `client_credentials` needs a client secret.
fn grant_of_provider(
    ctx: &Ctx<'_>,
    t: &RawToken,
    provider: &Profile,
    has_secret: bool,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let g = t.grant.get_ref();
    if !provider.has_grant(g) {
        let valid = provider.grants.iter().map(|g| format!("{g:?}")).collect::<Vec<_>>();
        return Err(ctx.err(
            &t.grant,
            key("grant"),
            format!("provider {:?} has no {g:?} grant; valid: {}", provider.name, valid.join(", ")),
        ));
    }
    if g == "client_credentials" && !has_secret {
        return Err(ctx.err(
            &t.grant,
            key("client_secret"),
            "grant = \"client_credentials\" needs a `client_secret`",
        ));
    }
    Ok(())
}

/// `client_auth = "basic" | "body"`, default from the profile.
fn client_auth(
    ctx: &Ctx<'_>,
    t: &RawToken,
    provider: &Profile,
    key: &dyn Fn(&str) -> String,
) -> Result<ClientAuth, ConfigError> {
    match t.client_auth.as_ref().map(|c| (c, c.get_ref().as_str())) {
        None => Ok(provider.client_auth),
        Some((_, "basic")) => Ok(ClientAuth::Basic),
        Some((_, "body")) => Ok(ClientAuth::Body),
        Some((c, other)) => Err(ctx.err(
            c,
            key("client_auth"),
            format!("{other:?} is not a client authentication; valid: \"basic\", \"body\""),
        )),
    }
}

/// A token's name: `[a-z0-9_-]+` (it names files, log fields and metric labels).
fn token_name(ctx: &Ctx<'_>, name: &Spanned<String>) -> Result<String, ConfigError> {
    let n = name.get_ref();
    let valid = !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(ctx.err(
            name,
            "token.name".into(),
            format!("{n:?} is not a valid name; use [a-z0-9_-]+"),
        ));
    }
    Ok(n.clone())
}

/// Whether any secret of `t` is written in the config itself.
fn has_literal_secret(t: &RawToken) -> bool {
    let literal = |s: &Option<Spanned<RawSecret>>| {
        s.as_ref().is_some_and(|s| matches!(s.get_ref(), RawSecret::Literal(_)))
    };
    literal(&t.client_secret)
        || literal(&t.jwt)
        || literal(&t.refresh_token)
        || literal(&t.password)
}

fn grant(ctx: &Ctx<'_>, t: &RawToken, key: &dyn Fn(&str) -> String) -> Result<Grant, ConfigError> {
    let grant = match t.grant.get_ref().as_str() {
        "jwt" => {
            let jwt = t.jwt.as_ref().ok_or_else(|| {
                ctx.err(&t.grant, key("jwt"), "grant = \"jwt\" needs a `jwt` secret")
            })?;
            Grant::Jwt { assertion: ctx.secret(jwt, key("jwt")) }
        }
        "refresh_token" => {
            let rt = t.refresh_token.as_ref().ok_or_else(|| {
                ctx.err(
                    &t.grant,
                    key("refresh_token"),
                    "grant = \"refresh_token\" needs a `refresh_token` secret to bootstrap from",
                )
            })?;
            Grant::RefreshToken { refresh_token: ctx.secret(rt, key("refresh_token")) }
        }
        "password" => {
            let (Some(user), Some(pw)) = (&t.username, &t.password) else {
                return Err(ctx.err(
                    &t.grant,
                    key("password"),
                    "grant = \"password\" needs `username` and `password`",
                ));
            };
            Grant::Password {
                username: user.get_ref().clone(),
                password: ctx.secret(pw, key("password")),
                extension: t.extension.clone(),
            }
        }
        "authorization_code" => Grant::AuthorizationCode { redirect_uri: t.redirect_uri.clone() },
        "client_credentials" => Grant::ClientCredentials,
        other => {
            return Err(ctx.err(&t.grant, key("grant"), format!("{other:?} is not a grant; valid: \"jwt\", \"authorization_code\", \"refresh_token\", \"password\", \"client_credentials\"")));
        }
    };
    Ok(grant)
}

fn sink(
    ctx: &Ctx<'_>,
    s: &RawSink,
    key: &dyn Fn(&str) -> String,
) -> Result<SinkConfig, ConfigError> {
    let format = match s.format.as_ref().map(|f| (f, f.get_ref().as_str())) {
        None | Some((_, "json")) => SinkFormat::Json,
        Some((_, "raw")) => SinkFormat::Raw,
        Some((f, other)) => {
            return Err(ctx.err(
                f,
                key("sink.format"),
                format!("{other:?} is not a sink format; valid: \"json\", \"raw\""),
            ));
        }
    };
    let mode = match &s.mode {
        None => 0o640,
        Some(m) => mode(ctx, m, key("sink.mode"))?,
    };
    if s.include_refresh_token && mode & 0o077 != 0 {
        return Err(ctx.err(&s.path, key("sink.mode"), format!("include_refresh_token = true needs a private mode (0600 or stricter), not {mode:04o}")));
    }
    if s.include_refresh_token && format == SinkFormat::Raw {
        return Err(ctx.err(
            &s.path,
            key("sink.include_refresh_token"),
            "a raw sink holds only the access token",
        ));
    }
    Ok(SinkConfig {
        path: ctx.path(s.path.get_ref()),
        format,
        mode,
        include_refresh_token: s.include_refresh_token,
    })
}

pub(super) fn mode(ctx: &Ctx<'_>, m: &Spanned<String>, key: String) -> Result<u32, ConfigError> {
    u32::from_str_radix(m.get_ref(), 8).ok().filter(|v| *v <= 0o777).ok_or_else(|| {
        ctx.err(m, key, format!("{:?} is not an octal file mode like \"0640\"", m.get_ref()))
    })
}

pub(super) fn url(
    ctx: &Ctx<'_>,
    s: &Spanned<String>,
    key: String,
) -> Result<reqwest::Url, ConfigError> {
    let u = reqwest::Url::parse(s.get_ref()).map_err(|e| {
        ctx.err(
            s,
            key.clone(),
            format!(
                "{:?} is not a URL ({e}); e.g. \"https://platform.ringcentral.com\"",
                s.get_ref()
            ),
        )
    })?;
    if !matches!(u.scheme(), "https" | "http") {
        return Err(ctx.err(
            s,
            key,
            "only https:// (or http:// for a local fake server) is supported",
        ));
    }
    Ok(u)
}

pub(super) fn duration(
    ctx: &Ctx<'_>,
    s: &Spanned<String>,
    key: String,
) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.get_ref()).map_err(|e| {
        ctx.err(
            s,
            key,
            format!("{:?} is not a duration ({e}); e.g. \"2m\", \"30s\", \"500ms\"", s.get_ref()),
        )
    })
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// Logins (new sessions) per hour and token by default: RingCentral keeps 5 live sessions per
/// user and drops the oldest, so a budget of 3 leaves room for the user's other apps.
pub const DEFAULT_SESSION_BUDGET: usize = 3;

/// The most logins per hour `session_budget` may allow (more would be no budget at all).
pub const MAX_SESSION_BUDGET: u64 = 60;

/// The most token requests a `rate_window` may allow (more is no limit at all).
pub const MAX_RATE_LIMIT: u64 = 1000;

/// Each duration's allowed range: a zero retry or window turned a 500 into thousands of
/// requests a second, a zero timeout into requests that can never succeed; a duration of
/// years overflows the monotonic clock. (key, at least, at most)
const DURATION_BOUNDS: &[(&str, Duration, Duration)] = &[
    ("retry_initial", Duration::from_millis(100), Duration::from_secs(3600)),
    ("retry_max", Duration::from_millis(100), Duration::from_secs(86_400)),
    ("rate_window", Duration::from_secs(1), Duration::from_secs(86_400)),
    ("request_timeout", Duration::from_secs(1), Duration::from_secs(600)),
    ("safety_margin", Duration::ZERO, Duration::from_secs(7 * 86_400)),
    ("on_refresh_timeout", Duration::from_millis(100), Duration::from_secs(3600)),
    ("access_token_lifetime", Duration::from_secs(10), Duration::from_secs(366 * 86_400)),
];

/// Duration `k` of a token, inside its `DURATION_BOUNDS`.
fn bounded_duration(
    ctx: &Ctx<'_>,
    s: &Spanned<String>,
    k: &str,
    key: &dyn Fn(&str) -> String,
) -> Result<Duration, ConfigError> {
    let d = duration(ctx, s, key(k))?;
    within_bounds(k, d).map_err(|m| ctx.err(s, key(k), m))?;
    Ok(d)
}

/// Whether duration `key` = `d` is inside its bounds; the message names them.
fn within_bounds(key: &str, d: Duration) -> Result<(), String> {
    let Some((_, min, max)) = DURATION_BOUNDS.iter().find(|(k, ..)| *k == key) else {
        return Ok(());
    };
    if d < *min || d > *max {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        return Err(format!(
            "{} is out of range; use {} to {}",
            show(d),
            if min.is_zero() { "0s".into() } else { show(*min) },
            show(*max)
        ));
    }
    Ok(())
}

/// Sinks that others may write: anyone with write access can change the token in place
/// between two refreshes (the daemon replaces the file, it never checks it).
fn mode_warnings(tokens: &[TokenConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for t in tokens {
        for s in t.sinks.iter().filter(|s| s.mode & 0o022 != 0) {
            out.push(format!(
                "token \"{}\": sink {} has mode {:04o}, writable by {}; use 0640 or 0644",
                t.name,
                crate::text::path(&s.path),
                s.mode,
                if s.mode & 0o002 != 0 { "every user" } else { "its group" }
            ));
        }
    }
    out
}

/// A token's counts, each inside its range.
struct Counts {
    access_token_ttl: Option<u64>,
    refresh_token_ttl: Option<u64>,
    rate_limit: usize,
    session_budget: usize,
}

fn counts(
    ctx: &Ctx<'_>,
    t: &RawToken,
    key: &dyn Fn(&str) -> String,
) -> Result<Counts, ConfigError> {
    let count = |v: &Option<Spanned<u64>>, k: &str, range: std::ops::RangeInclusive<u64>| match v {
        Some(n) if !range.contains(n.get_ref()) => Err(ctx.err(
            n,
            key(k),
            format!("{} is out of range; use {} to {}", n.get_ref(), range.start(), range.end()),
        )),
        v => Ok(v.as_ref().map(|n| *n.get_ref())),
    };
    let max_ttl = crate::oauth::MAX_LIFETIME_SECS;
    Ok(Counts {
        access_token_ttl: count(&t.access_token_ttl, "access_token_ttl", 1..=max_ttl)?,
        // 0 asks RingCentral for no refresh token.
        refresh_token_ttl: count(&t.refresh_token_ttl, "refresh_token_ttl", 0..=max_ttl)?,
        rate_limit: count(&t.rate_limit, "rate_limit", 1..=MAX_RATE_LIMIT)?
            .map_or(5, |n| usize::try_from(n).unwrap_or(1)),
        session_budget: count(&t.session_budget, "session_budget", 1..=MAX_SESSION_BUDGET)?
            .map_or(DEFAULT_SESSION_BUDGET, |n| usize::try_from(n).unwrap_or(1)),
    })
}

/// Backoff grows from `retry_initial` to `retry_max`: the other way round is a mistake.
fn retry_order(
    ctx: &Ctx<'_>,
    t: &RawToken,
    retry: RetryPolicy,
    key: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if retry.max >= retry.initial {
        return Ok(());
    }
    let at = t.retry_max.as_ref().or(t.retry_initial.as_ref());
    Err(ctx.err_at(
        at.map(|s| s.span().start),
        key("retry_max"),
        format!(
            "retry_max ({}) is shorter than retry_initial ({})",
            fmt_d(retry.max),
            fmt_d(retry.initial)
        ),
    ))
}
