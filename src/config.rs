//! The TOML config in two stages: a raw serde schema that refuses unknown keys, then a
//! validated `Config` of proper types. Every error names the file, the line and the key.

mod files;
mod plan;
mod proxy;
mod raw;
mod secret_source;

use crate::logging::LogFormat;
use chrono::{DateTime, Utc};
pub use proxy::{Listen, ProxyConfig};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use files::{BASE_FILES, FileProblem};
pub use secret_source::{ConfigSecret, SecretSource};

/// The default config path of `tokend run`.
pub const DEFAULT_PATH: &str = "/etc/tokend/config.toml";
/// Default bound on token requests in flight at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// The default schedule: every 30 minutes, on the minute.
pub const DEFAULT_SCHEDULE: &str = "0 */30 * * * *";

/// A config error: where it is and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `token[0].schedule` (or `token "main" .schedule`).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// Problems that do not stop the program (logged at WARN, printed by `check`).
    pub warnings: Vec<String>,
    pub log_format: LogFormat,
    pub metrics: MetricsConfig,
    /// Token requests in flight at once, across all tokens (`[daemon]`).
    pub max_concurrent_requests: usize,
    /// Multi-host mode (`[cluster]`): hosts share each token through etcd.
    pub cluster: Option<ClusterConfig>,
    pub tokens: Vec<TokenConfig>,
}

/// `[cluster]`: several hosts keep each token through etcd, with exactly one refresher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs; the first is preferred (put the local member first).
    pub endpoints: Vec<String>,
    /// Every key tokend writes starts with this (no trailing slash).
    pub prefix: String,
    /// The election lease: a dead leader is replaced after about this long.
    pub lease_ttl: Duration,
    /// This host's name in the election and in logs (default: the host name, read by
    /// `Config::resolve_secrets`; empty until then).
    pub node: String,
    /// etcd authentication (user, password).
    pub user: Option<(String, ConfigSecret)>,
    /// TLS to etcd: the CA to trust, and an optional client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// AES-256-GCM key (32 bytes, base64) sealing the values stored in etcd.
    pub encryption_key: Option<ConfigSecret>,
    /// The TLS files, checked for existence when resolving (key, line, path).
    pub(crate) files: Vec<(String, usize, PathBuf)>,
}

/// Default etcd key prefix.
pub const DEFAULT_CLUSTER_PREFIX: &str = "/tokend";
/// Default election lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// Where metrics go; both optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// A node_exporter textfile-collector file, rewritten atomically on every change.
    pub textfile: Option<PathBuf>,
    /// A loopback address serving `/metrics` and `/healthz`.
    pub listen: Option<std::net::SocketAddr>,
}

/// How a token logs in when there is no state (and after a dead refresh chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Jwt {
        assertion: ConfigSecret,
    },
    /// Bootstrap from a refresh token obtained elsewhere; usable once.
    RefreshToken {
        refresh_token: ConfigSecret,
    },
    /// Legacy; RingCentral is switching it off.
    Password {
        username: String,
        password: ConfigSecret,
        extension: Option<String>,
    },
    /// Interactive: `tokend login` writes the first state.
    AuthorizationCode {
        redirect_uri: Option<String>,
    },
    /// Machine to machine (RFC 6749 section 4.4): the client secret alone gets an access
    /// token, and no refresh token; each "refresh" is a new request of this grant.
    ClientCredentials,
}

impl Grant {
    pub fn name(&self) -> &'static str {
        match self {
            Grant::Jwt { .. } => "jwt",
            Grant::RefreshToken { .. } => "refresh_token",
            Grant::Password { .. } => "password",
            Grant::AuthorizationCode { .. } => "authorization_code",
            Grant::ClientCredentials => "client_credentials",
        }
    }

    /// Whether the daemon can start a new session on its own.
    pub fn can_relogin(&self) -> bool {
        matches!(self, Grant::Jwt { .. } | Grant::Password { .. } | Grant::ClientCredentials)
    }

    /// Whether a login of this grant starts a new session at the server (RingCentral keeps 5
    /// per user and drops the oldest): such logins count against `session_budget` and, when
    /// they fail transiently, wait minutes. Sending a configured refresh token continues the
    /// session it came from. Exhaustive on purpose: a new grant must say.
    pub fn starts_sessions(&self) -> bool {
        match self {
            Grant::Jwt { .. } | Grant::Password { .. } | Grant::AuthorizationCode { .. } => true,
            // client_credentials gets every token by a "login" that starts no session.
            Grant::RefreshToken { .. } | Grant::ClientCredentials => false,
        }
    }
}

/// A cron schedule with a seconds field, kept with its source text.
///
/// The parsed form is shared: croner keeps about 5 kB of bit fields per expression, and
/// each token's config is held in several places, so 10,000 tokens on one schedule would
/// otherwise hold 200 MB of identical copies. `raw::parse` parses each distinct expression once.
#[derive(Clone)]
pub struct Schedule {
    pub expr: String,
    parsed: std::sync::Arc<Parsed>,
}

/// A schedule's parsed form and what is derived from it once, not once per token.
struct Parsed {
    cron: croner::Cron,
    /// `Schedule::min_interval`: each token's jitter is checked against it, and it takes nine
    /// searches for the next tick (about 15% of the parse of 10,000 tokens, issue 15).
    min_interval: Duration,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.expr)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expr)
            .map_err(|e| {
                format!(
                    "{expr:?} is not a cron expression with a seconds field ({e}); \
                     e.g. \"0 */30 * * * *\" for every 30 minutes"
                )
            })?;
        let first = next_tick(&cron, Utc::now()).ok_or_else(|| format!("{expr:?} never fires"))?;
        let min_interval = min_interval(&cron, first);
        Ok(Self {
            expr: expr.to_string(),
            parsed: std::sync::Arc::new(Parsed { cron, min_interval }),
        })
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_tick(&self.parsed.cron, t)
    }

    /// Whether the schedule fires more than once from now ("0 0 0 1 1 * 2099" does not).
    pub fn fires_again(&self) -> bool {
        self.next_after(Utc::now()).and_then(|t| self.next_after(t)).is_some()
    }

    /// The shortest gap between ticks over the next few occurrences after the parse: bounds
    /// the jitter.
    pub fn min_interval(&self) -> Duration {
        self.parsed.min_interval
    }
}

fn next_tick(cron: &croner::Cron, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&t, false).ok()
}

/// The shortest gap between the eight ticks after `first` (an hour if it never fires again).
fn min_interval(cron: &croner::Cron, first: DateTime<Utc>) -> Duration {
    let (mut t, mut min) = (first, Duration::MAX);
    for _ in 0..8 {
        let Some(next) = next_tick(cron, t) else { break };
        min = min.min((next - t).to_std().unwrap_or_default());
        t = next;
    }
    if min == Duration::MAX { Duration::from_secs(3600) } else { min }
}

/// One reader-facing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub path: PathBuf,
    pub format: SinkFormat,
    pub mode: u32,
    pub include_refresh_token: bool,
}

/// The two sink formats of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    Json,
    Raw,
}

/// A command run after each refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

/// Retry behaviour after transient errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

/// RingCentral's auth group budget that this token's requests must stay inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateBudget {
    pub requests: usize,
    pub window: Duration,
    /// `session_budget`: logins (each a new session) allowed per hour.
    pub sessions: usize,
}

/// One token, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenConfig {
    pub name: String,
    /// The provider's refresh rules (`provider = ...`, default RingCentral).
    pub provider: &'static crate::provider::Profile,
    /// How the client authenticates: the profile's unless `client_auth` is set.
    pub client_auth: crate::provider::ClientAuth,
    /// Some secret of this token is written in the config itself.
    pub has_literal_secret: bool,
    pub server: reqwest::Url,
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub client_secret: Option<ConfigSecret>,
    pub grant: Grant,
    pub state_file: PathBuf,
    pub schedule: Schedule,
    /// Upper bound of the random delay after each tick.
    pub jitter: Duration,
    pub access_token_ttl: Option<u64>,
    /// The access token's lifetime when a reply has no `expires_in` (Salesforce); without
    /// one such a reply is refused.
    pub access_token_lifetime: Option<Duration>,
    pub refresh_token_ttl: Option<u64>,
    /// Refresh before the published access token comes this close to expiry.
    pub safety_margin: Duration,
    pub retry: RetryPolicy,
    pub rate: RateBudget,
    pub request_timeout: Duration,
    pub scope: Option<String>,
    /// Sent as `audience` on every token request (Auth0's API identifier).
    pub audience: Option<String>,
    pub on_refresh: Option<Hook>,
    pub sinks: Vec<SinkConfig>,
    /// Local API proxies that add this token's current access token.
    pub proxies: Vec<ProxyConfig>,
}

impl Config {
    /// Reads, parses and validates; reads no secret (see `load_resolved`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Self::parse(path, &text)?;
        config.warn_if_exposed(path);
        Ok(config)
    }

    /// A literal secret in a file that others can read is a leak waiting to happen.
    fn warn_if_exposed(&mut self, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let literal = self.tokens.iter().any(|t| t.has_literal_secret);
        let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777);
        if literal && mode & 0o004 != 0 {
            self.warnings.push(format!(
                "{} holds a literal secret and is readable by every user (mode {mode:04o}); \
                 chmod 0600 it, or use {{ file = .. }}, {{ env = .. }} or {{ credential = .. }}",
                path.display()
            ));
        }
    }

    /// `load`, then `resolve_secrets`: for the commands that use the secrets (`run`, `login`).
    pub fn load_resolved(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::load(path)?;
        config.resolve_secrets()?;
        Ok(config)
    }

    /// Parses `text` as if read from `path` (relative paths in it resolve against its
    /// directory). Pure: reads no file, no environment, no secret.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        raw::parse(path, text)
    }

    /// The second step, for the commands that talk to a server: reads every secret (env,
    /// file, systemd credential), the host name and the TLS files. Errors name file, line, key.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let file = self.path.clone();
        for t in &mut self.tokens {
            for s in t.secrets_mut() {
                s.resolve(&file)?;
            }
        }
        if let Some(c) = &mut self.cluster {
            raw::resolve_cluster(&file, c)?;
        }
        Ok(())
    }

    /// Only token `name`'s secrets: `tokend login` needs that token's client secret, not the
    /// other tokens' secrets (which may exist only inside the unit). No such token: nothing.
    pub fn resolve_token_secrets(&mut self, name: &str) -> Result<(), ConfigError> {
        let file = self.path.clone();
        if let Some(t) = self.tokens.iter_mut().find(|t| t.name == name) {
            for s in t.secrets_mut() {
                s.resolve(&file)?;
            }
        }
        Ok(())
    }

    pub fn token(&self, name: &str) -> Option<&TokenConfig> {
        self.tokens.iter().find(|t| t.name == name)
    }
}

impl TokenConfig {
    /// Every secret of this token.
    fn secrets_mut(&mut self) -> impl Iterator<Item = &mut ConfigSecret> {
        let grant = match &mut self.grant {
            Grant::Jwt { assertion: s }
            | Grant::RefreshToken { refresh_token: s }
            | Grant::Password { password: s, .. } => Some(s),
            Grant::AuthorizationCode { .. } | Grant::ClientCredentials => None,
        };
        self.client_secret.as_mut().into_iter().chain(grant)
    }
}

#[cfg(test)]
mod tests;
