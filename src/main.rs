//! The `tokend` command line: parses arguments, sets up logging, calls the library, maps
//! errors to exit codes. Nothing else lives here.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokend::config::Config;
use tokend::daemon;
use tokend::fake::{self, FakeConfig, FakeServer};
use tokend::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps OAuth tokens alive and publishes them to files other programs read."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: keep every configured token alive and publish it to its sinks.
    ///
    /// Signals: SIGTERM/SIGINT stop gracefully, SIGHUP reloads config and secrets, SIGUSR1
    /// refreshes every token now. Exit codes: 78 config error, 73 directory not writable,
    /// 75 another tokend holds a token's lock, 69 open-file limit too low for the tokens or
    /// no CA certificates for TLS.
    Run(ConfigArg),
    /// Show each token's health, expiries, last and next refresh, and last error.
    ///
    /// Reads the state files; works while the daemon runs. Exit 0 when every token is
    /// healthy, 1 otherwise (needs login, expired, no state).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Authorize a token that uses the authorization-code flow (PKCE, loopback redirect).
    ///
    /// Prints the authorize URL (and opens a browser when one is available), waits for the
    /// redirect on 127.0.0.1, exchanges the code and writes the state. A running daemon is
    /// handed the new state and picks it up without a restart.
    Login {
        #[command(flatten)]
        config: ConfigArg,
        /// The token to authorize.
        #[arg(long)]
        token: String,
        /// Do not open a browser; also accept the code or redirect URL pasted on stdin.
        #[arg(long)]
        no_browser: bool,
        /// Seconds to wait for the authorization.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Validate the config and print the resolved plan (no secrets). Exit 0 when valid, 78 when not.
    Check(ConfigArg),
    /// The whole job in one command: a fake RingCentral server, the daemon refreshing every few
    /// seconds in a temp dir, and a watcher using each new token for an API call.
    Demo {
        /// Stop after the watcher has seen this many tokens (default: run until Ctrl-C).
        #[arg(long)]
        cycles: Option<u64>,
        /// Seconds between scheduled refreshes.
        #[arg(long, default_value_t = 3)]
        every: u32,
    },
    /// Print the access token from a sink file (json or raw).
    ///
    /// Exits non-zero with a one-line reason when the file is missing, unparsable or the token
    /// has expired. Use as: curl -H "Authorization: Bearer $(tokend token /run/tokend/main.json)"
    Token {
        /// The sink file.
        path: PathBuf,
        /// Print generation, expiry and fingerprint as JSON instead of the token.
        #[arg(long)]
        json: bool,
    },
    /// Print one line each time the token in a sink file changes, or run a command.
    ///
    /// With `-- COMMAND ARGS...` the command runs after each change (never two at once) with
    /// TOKEND_ACCESS_TOKEN, TOKEND_GENERATION, TOKEND_EXPIRES_AT and TOKEND_FINGERPRINT set.
    /// Lines show generation, expiry and fingerprint, never the token.
    Watch {
        /// The sink file (it need not exist yet).
        path: PathBuf,
        /// Poll every this many milliseconds instead of using inotify (for NFS and the like);
        /// at least 10.
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=86_400_000))]
        poll_ms: Option<u64>,
        /// Exit after this many tokens (the current one counts).
        #[arg(long)]
        count: Option<u64>,
        /// The command to run on each change.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// A lifecycle-faithful fake RingCentral auth server for tests and demos.
    ///
    /// Prints its base URL (http://ADDR) as the first line of stdout, then serves until
    /// SIGTERM or Ctrl-C. Admin API on the same port, loopback only: GET /__admin/stats,
    /// GET|POST|DELETE /__admin/faults, GET /__admin/tokens.
    FakeServer(Box<FakeServerArgs>),
}

#[derive(Args)]
struct ConfigArg {
    /// The config file.
    #[arg(long, short, default_value = tokend::config::DEFAULT_PATH, env = "TOKEND_CONFIG")]
    config: PathBuf,
}

#[derive(Args)]
struct FakeServerArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The app's client id.
    #[arg(long, default_value = fake::DEFAULT_CLIENT_ID)]
    client_id: String,
    /// The app's client secret.
    #[arg(long, default_value = fake::DEFAULT_CLIENT_SECRET)]
    client_secret: String,
    /// The JWT credential of user 0; users 1..N get "JWT-1", "JWT-2", ...
    #[arg(long, default_value = fake::DEFAULT_JWT)]
    jwt: String,
    /// How many users (owner ids 100000, 100001, ...; passwords "passwordN" for user "userN").
    #[arg(long, default_value_t = 1)]
    users: usize,
    /// Allow the legacy password grant.
    #[arg(long)]
    enable_password: bool,
    /// Access token TTL when the client asks for none, in seconds.
    #[arg(long, default_value_t = 3600)]
    access_ttl: u64,
    /// Lowest access_token_ttl accepted before clamping (RingCentral: 600).
    #[arg(long, default_value_t = 600)]
    access_ttl_min: u64,
    /// Refresh token TTL when the client asks for none, in seconds.
    #[arg(long, default_value_t = 604_800)]
    refresh_ttl: u64,
    /// Seconds an old refresh token keeps replaying after the new access token's first use.
    #[arg(long, default_value = "10", value_parser = secs)]
    grace_after_use: Duration,
    /// Seconds an old refresh token keeps replaying when the new access token is never used.
    #[arg(long, default_value = "3600", value_parser = secs)]
    grace_unused: Duration,
    /// Seconds a replaced access token answers OAU-129 before OAU-213.
    #[arg(long, default_value = "10", value_parser = secs)]
    corrupted_window: Duration,
    /// Live sessions per user and app before the oldest is dropped.
    #[arg(long, default_value_t = 5)]
    max_sessions: usize,
    /// Token requests per user per window; 0 turns the rate limit off.
    #[arg(long, default_value_t = 5)]
    rate_limit: usize,
    /// The rate-limit window in seconds.
    #[arg(long, default_value = "60", value_parser = secs)]
    rate_window: Duration,
    /// The penalty after the limit is hit, in seconds; each request during it restarts it.
    #[arg(long, default_value = "60", value_parser = secs)]
    rate_penalty: Duration,
    /// Added round trip on API and token calls in milliseconds, half each way (a WAN).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// A fault for the first token requests: KIND[,key=value...], e.g. "status503,retry_after=2,count=3".
    /// Kinds: status500 status503 status429 hang(ms=) reset malformed truncated html
    /// missing_access_token oversized(bytes=) commit_then_drop. Repeatable.
    #[arg(long = "fault")]
    faults: Vec<fake::Fault>,
    /// Play this provider's refresh rules (rotation, reuse of an old refresh token, replies
    /// without refresh_token or expires_in, client_credentials): ringcentral google microsoft
    /// salesforce zoom okta auth0 dropbox xero quickbooks generic.
    #[arg(long, default_value = "ringcentral", value_parser = provider_name)]
    provider: String,
}

fn provider_name(s: &str) -> Result<String, String> {
    fake::ProviderRules::named(s).map(|p| p.name.to_string()).ok_or_else(|| {
        format!("{s:?} is not a provider; valid: {}", tokend::provider::Profile::names())
    })
}

fn secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

impl FakeServerArgs {
    fn config(&self) -> FakeConfig {
        let mut config = FakeConfig {
            users: (0..self.users.max(1)).map(|n| fake::User::numbered(&self.jwt, n)).collect(),
            access_ttl_default: self.access_ttl,
            access_ttl_min: self.access_ttl_min,
            refresh_ttl_default: self.refresh_ttl,
            grace_after_use: self.grace_after_use,
            grace_unused: self.grace_unused,
            corrupted_window: self.corrupted_window,
            max_sessions: self.max_sessions,
            rate_limit: (self.rate_limit > 0).then_some(fake::RateLimit {
                requests: self.rate_limit,
                window: self.rate_window,
                penalty: self.rate_penalty,
            }),
            latency: Duration::from_millis(self.latency_ms),
            ..FakeConfig::default()
        };
        let app = &mut config.apps[0];
        app.client_id.clone_from(&self.client_id);
        app.client_secret = Some(self.client_secret.clone());
        if self.enable_password {
            app.grants.push(fake::GrantKind::Password);
        }
        config.with_provider(&self.provider).expect("checked by provider_name")
    }
}

/// What to do when `login` runs outside the unit that holds the credentials.
const LOGIN_HINT: &str = "\n  the secrets are systemd credentials of tokend.service: run the login with them, \
     as the README shows:\n  sudo systemd-run --pipe --wait --collect --quiet -p User=tokend \
     -p Group=tokend-readers -p LoadCredential=client_secret:/etc/tokend/client_secret \
     tokend login --config /etc/tokend/config.toml --token NAME --no-browser";

/// A failure with the exit code it maps to.
struct Failure(u8, String);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self(1, format!("{e:#}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Built only by the commands that need one: `tokend token` stays a plain, fast process.
    let runtime = || tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match cli.command {
        Command::Run(args) => {
            tokend::malloc::limit_arenas();
            runtime().block_on(run(&args.config))
        }
        Command::Check(args) => check(&args.config),
        Command::Login { config, token, no_browser, timeout } => {
            let opts =
                tokend::login::LoginOptions { no_browser, timeout: Duration::from_secs(timeout) };
            runtime().block_on(login(&config.config, &token, opts))
        }
        Command::Status { config, json } => status(&config.config, json),
        Command::Demo { cycles, every } => {
            init_logging(LogFormat::Text);
            let opts = tokend::demo::DemoOptions { cycles, every };
            runtime().block_on(tokend::demo::run(opts)).map(drop).map_err(Failure::from)
        }
        Command::Token { path, json } => match tokend::reader_cli::token(&path, json) {
            Ok(out) => {
                println!("{out}");
                Ok(())
            }
            Err(reason) => Err(Failure(1, reason)),
        },
        Command::Watch { path, poll_ms, count, command } => {
            let opts = tokend::reader_cli::WatchOptions {
                path: &path,
                command: &command,
                poll: poll_ms.map(Duration::from_millis),
                count,
            };
            runtime().block_on(tokend::reader_cli::watch(opts)).map_err(|e| Failure(1, e))
        }
        Command::FakeServer(args) => {
            init_logging(LogFormat::Text);
            runtime().block_on(fake_server(*args)).map_err(Failure::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("tokend: {message}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(format: LogFormat) {
    tokend::logging::init(format);
}

/// The config as `check`, `status` read it: parsed and validated, no secret read.
fn load(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure(78, e.to_string()))
}

/// The config with its secrets, for the daemon.
fn load_resolved(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load_resolved(path).map_err(|e| Failure(78, e.to_string()))
}

async fn run(path: &std::path::Path) -> Result<(), Failure> {
    let config = load_resolved(path)?;
    init_logging(config.log_format);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let controls = daemon::signal_controls().map_err(|e| Failure(1, format!("signals: {e}")))?;
    daemon::run(config, controls).await.map_err(|e| Failure(e.exit_code(), e.to_string()))
}

fn status(path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let reports = tokend::status::reports(&load(path)?);
    if json {
        println!("{}", serde_json::to_string_pretty(&reports).expect("serializable"));
    } else {
        print!("{}", tokend::status::render(&reports));
    }
    if reports.iter().all(|r| r.health == "ok") {
        Ok(())
    } else {
        Err(Failure(1, "some tokens are not healthy".into()))
    }
}

async fn login(
    path: &std::path::Path,
    token: &str,
    opts: tokend::login::LoginOptions,
) -> Result<(), Failure> {
    let mut config = load(path)?;
    config.resolve_token_secrets(token).map_err(|e| {
        let message = e.to_string();
        let hint = if message.contains("CREDENTIALS_DIRECTORY") { LOGIN_HINT } else { "" };
        Failure(78, format!("{message}{hint}"))
    })?;
    match tokend::login::login(&config, token, opts).await? {
        tokend::login::LoginOutcome::StateWritten => {
            println!("tokend login: state written for \"{token}\"; start or restart tokend");
        }
        tokend::login::LoginOutcome::HandedToDaemon(pid) => println!(
            "tokend login: handed to the running tokend (pid {pid}), which publishes it now"
        ),
        tokend::login::LoginOutcome::LeftForCluster => println!(
            "tokend login: saved for \"{token}\"; tokend passes it to the cluster's leader when it starts"
        ),
    }
    Ok(())
}

fn check(path: &std::path::Path) -> Result<(), Failure> {
    let config = load(path)?;
    // What `run` and a reload check on disk: distinct files, writable directories, limits.
    config.check_files().map_err(|e| Failure(78, e.to_string()))?;
    for w in &config.warnings {
        eprintln!("tokend: warning: {w}");
    }
    print!("{}", config.plan());
    Ok(())
}

async fn fake_server(args: FakeServerArgs) -> anyhow::Result<()> {
    let server = FakeServer::bind(args.config(), args.listen).await?;
    for fault in args.faults {
        server.inject(fault);
    }
    println!("{}", server.url());
    tokend::shutdown::signalled().await;
    server.shutdown().await;
    Ok(())
}
