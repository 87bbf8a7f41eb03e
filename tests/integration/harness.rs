//! The test harness: a fake server in-process, the real `tokend` binary as a child process,
//! real files in a temp dir, real signals. Waits are on conditions, never bare sleeps.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokend::fake::{FakeConfig, FakeServer, Stats};
use tokend::store::SinkDoc;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokend");
pub const CLIENT_ID: &str = tokend::fake::DEFAULT_CLIENT_ID;
pub const CLIENT_SECRET: &str = tokend::fake::DEFAULT_CLIENT_SECRET;
pub const JWT: &str = tokend::fake::DEFAULT_JWT;

/// Every fault a client must survive by retrying (with `request_timeout = "1s"`, a 1.5 s
/// hang is a timeout).
pub const TRANSIENT_FAULTS: &[&str] = &[
    "status500",
    "status503,retry_after=1",
    "status429,retry_after=1",
    "hang,ms=1500",
    "reset",
    "malformed",
    "truncated",
    "html",
    "missing_access_token",
    "oversized",
];

/// A tool a test needs from outside the crate (an SDK, an interpreter): the test fails, never
/// passes, without it, in one line that says what is missing and what installs it.
pub fn require(ok: bool, missing: &str) {
    assert!(ok, "{missing}: run scripts/test, which installs it");
}

/// The longest time without a watchdog ping from `from` to now, given when each ping came
/// (those before `from` are skipped).
pub fn longest_gap(from: Instant, pings: impl Iterator<Item = Instant>) -> Duration {
    let at: Vec<Instant> =
        std::iter::once(from).chain(pings.filter(|t| *t >= from)).chain([Instant::now()]).collect();
    at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || std::future::ready(cond())).await;
}

/// `wait_until` for a condition that must await (an HTTP request, a child process): polls
/// every 10 ms, each poll bounded by what is left of `timeout`; panics with `what` on timeout.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if tokio::time::timeout(left, cond()).await == Ok(true) {
            return;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One token in a generated config. Defaults: JWT grant, a json and a raw sink, fast retries.
#[derive(Clone)]
pub struct TokenSpec {
    pub name: String,
    pub grant: String,
    pub schedule: String,
    /// Extra TOML lines inside the [[token]] table.
    pub extra: Vec<String>,
    /// TOML after the sinks (sub-tables such as `[[token.proxy]]`); `{dir}` is the token's directory.
    pub tail: String,
}

impl TokenSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            grant: format!("grant = \"jwt\"\njwt = \"{JWT}\""),
            schedule: "0 0 0 1 1 *".into(),
            extra: vec![
                "retry_initial = \"100ms\"".into(),
                "retry_max = \"2s\"".into(),
                "rate_limit = 1000".into(),
            ],
            tail: String::new(),
        }
    }

    pub fn tail(mut self, toml: &str) -> Self {
        self.tail = toml.into();
        self
    }

    pub fn schedule(mut self, s: &str) -> Self {
        self.schedule = s.into();
        self
    }

    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push(line.into());
        self
    }

    pub fn grant(mut self, toml: &str) -> Self {
        self.grant = toml.into();
        self
    }

    pub fn toml(&self, server: &str, dir: &Path) -> String {
        let n = &self.name;
        let d = dir.display();
        format!(
            "[[token]]\nname = \"{n}\"\nserver = \"{server}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n{}\nstate_file = \"{d}/{n}.state.json\"\nschedule = \"{}\"\n{}\n\n[[token.sink]]\npath = \"{d}/{n}.json\"\nformat = \"json\"\nmode = \"0640\"\n\n[[token.sink]]\npath = \"{d}/{n}.raw\"\nformat = \"raw\"\nmode = \"0644\"\n\n{}\n",
            self.grant,
            self.schedule,
            self.extra.join("\n"),
            self.tail.replace("{dir}", &d.to_string())
        )
    }
}

/// A test world: a temp dir and a fake server.
pub struct World {
    pub dir: tempfile::TempDir,
    pub server: FakeServer,
}

impl World {
    pub async fn new() -> Self {
        Self::with(FakeConfig::for_tests()).await
    }

    pub async fn with(config: FakeConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = FakeServer::start(config).await.expect("fake server");
        Self { dir, server }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Writes config.toml with these tokens.
    pub fn write_config(&self, tokens: &[TokenSpec]) {
        self.write_config_with("", tokens);
    }

    /// Writes config.toml with `prelude` (top-level tables such as `[metrics]`) and tokens.
    pub fn write_config_with(&self, prelude: &str, tokens: &[TokenSpec]) {
        let text: String =
            tokens.iter().map(|t| t.toml(&self.server.url(), self.dir.path())).collect();
        std::fs::write(self.config_path(), format!("{prelude}\n{text}")).expect("write config");
    }

    pub fn stats(&self) -> Stats {
        self.server.stats()
    }

    /// The json sink of `name`, if it exists and parses.
    pub fn sink(&self, name: &str) -> Option<SinkDoc> {
        let bytes = std::fs::read(self.path(&format!("{name}.json"))).ok()?;
        Some(serde_json::from_slice(&bytes).expect("json sink always parses"))
    }

    pub fn generation(&self, name: &str) -> u64 {
        self.sink(name).map_or(0, |s| s.generation)
    }

    pub fn state(&self, name: &str) -> tokend::store::State {
        tokend::store::State::load(&self.path(&format!("{name}.state.json")))
            .unwrap()
            .expect("state exists")
    }

    /// Whether `name`'s intent marker says a refresh from its state file was in flight (what
    /// a restart reads). The marker itself stays after a refresh (`store::intent`).
    pub fn refresh_in_flight(&self, name: &str) -> bool {
        let path = self.path(&format!("{name}.state.json.intent"));
        let state = tokend::store::State::load(&self.path(&format!("{name}.state.json")))
            .unwrap()
            .map(|s| s.generation);
        tokend::store::intent::in_flight(&path, state, chrono::Utc::now()).is_some()
    }

    /// Starts `tokend run` on config.toml.
    pub fn daemon(&self) -> Daemon {
        self.daemon_with(&[], "")
    }

    /// Starts `tokend run` with extra environment and a shell prefix (e.g. "umask 077;").
    pub fn daemon_with(&self, env: &[(&str, &str)], shell_prefix: &str) -> Daemon {
        self.daemon_on(&self.config_path(), env, shell_prefix)
    }

    /// Starts `tokend run` on another config file (several daemons in one world).
    pub fn daemon_on(&self, config: &Path, env: &[(&str, &str)], shell_prefix: &str) -> Daemon {
        let log = self.path(&format!("daemon-{}.log", rand_suffix()));
        let out =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        // The prefix may set WRAP to a command that runs the daemon (e.g. setpriv).
        let script = format!("{shell_prefix} exec $WRAP \"$0\" run --config \"$1\"");
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(BIN)
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("WRAP")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokend");
        let mut child = child;
        // The test copies the output: the daemon's own file limits (a disk-full test sets
        // RLIMIT_FSIZE on it) must not silence its log.
        let copiers = vec![
            copy_to(child.stdout.take().unwrap(), out.try_clone().unwrap()),
            copy_to(child.stderr.take().unwrap(), out),
        ];
        Daemon { child: Some(child), log, copiers }
    }

    /// Ends the session of this token at the fake server (`POST /restapi/oauth/revoke`).
    pub async fn revoke(&self, token: &str) {
        let resp = reqwest::Client::new()
            .post(format!("{}/restapi/oauth/revoke", self.server.url()))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    /// A refresh token from a JWT login made by the test itself (a new session), as a user
    /// would bring to a `grant = "refresh_token"` config.
    pub async fn refresh_token_from_elsewhere(&self) -> String {
        let reply: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/restapi/oauth/token", self.server.url()))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", JWT),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply["refresh_token"].as_str().expect("a refresh token").to_string()
    }

    /// Waits for the json sink of `name` to reach `generation`.
    pub async fn wait_generation(&self, name: &str, generation: u64, timeout: Duration) {
        wait_until(&format!("{name} generation {generation}"), timeout, || {
            self.generation(name) >= generation
        })
        .await;
    }
}

fn copy_to(
    mut from: impl std::io::Read + Send + 'static,
    mut to: std::fs::File,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                break;
            }
        }
    })
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running `tokend run`; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    /// The threads copying stdout and stderr to `log`: an exited daemon's last lines are in
    /// the log only once they finish.
    copiers: Vec<std::thread::JoinHandle<()>>,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of output containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.output().lines().filter(|l| l.contains(needle)).count()
    }

    pub async fn wait_log(&self, needle: &str, times: usize, timeout: Duration) {
        wait_until(&format!("{times}x {needle:?} in the log"), timeout, || {
            self.count(needle) >= times
        })
        .await;
    }

    pub async fn wait_ready(&self) {
        self.wait_log("tokend ready", 1, Duration::from_secs(20)).await;
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe_free_kill(self.pid(), sig);
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for exit (killing after `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                // The pipes close at exit, unless a child of the daemon (a hook) still holds
                // them: bounded, so such a child cannot hang the test.
                let copied = Instant::now();
                while !self.copiers.iter().all(std::thread::JoinHandle::is_finished)
                    && copied.elapsed() < Duration::from_secs(5)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!("tokend did not exit within {timeout:?}; log:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM and wait.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(20)).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `kill(2)` through the `kill` utility, keeping the tests free of `unsafe`.
fn unsafe_free_kill(pid: i32, sig: i32) -> i32 {
    let status =
        Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    status.code().unwrap_or(1)
}

/// Runs `tokend ARGS...` to completion.
pub fn tokend(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env_remove("RUST_LOG").output().expect("run tokend")
}
