//! tokend's benchmarks, each beside the floor the operating system sets.
//!
//!   cargo run --release --example bench                 # a few minutes on 2 cores
//!   cargo run --release --example bench -- --idle 60 --tokens 1000,10000
//!
//! Prints one table; the README quotes the last run. The state files go to a temp directory
//! on disk, the sinks to a tmpfs (`/run`, else `/dev/shm`), as an installed tokend has them
//! (`/var/lib/tokend`, `/run/tokend`); `--sinks disk` puts the sinks beside the state files.
#![allow(clippy::needless_pass_by_value, clippy::too_many_lines, clippy::format_push_string)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokend::fake::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, FakeServer, User,
};
use tokend::watch::TokenWatcher;

const ROTATIONS: usize = 1000;

struct Args {
    idle_secs: u64,
    tokens: Vec<usize>,
    /// Only the bootstrap and round rows of each `--tokens` count (`--only rounds`): a quick
    /// iteration on them, without the propagation, footprint and spread rows.
    rounds_only: bool,
    /// Seconds between the daemon's round and the floor's bootstrap (`--settle`), see
    /// `settle`.
    settle_secs: u64,
    /// The tmpfs that holds the sinks (`--sinks tmpfs`, the default); `None`: on disk, beside
    /// the state files (`--sinks disk`).
    sinks_tmpfs: Option<PathBuf>,
}

const USAGE: &str = "usage: bench [--idle SECONDS] [--tokens N,M] [--only rounds] [--settle SECONDS] [--sinks tmpfs|disk]

Prints the performance table of the README: propagation, publish, `tokend token`, RSS and idle
CPU of one token, then for each token count a bootstrap and a SIGUSR1 refresh round with their
floors (the same durable writes by a few lines of Rust, after a --settle pause, default 70 s),
RSS and idle CPU (--idle, default 20 s), and the spread of token requests after a tick.
--only rounds: just the bootstrap and round rows. --sinks: the json sinks on a tmpfs (/run or
/dev/shm, as installed; the default) or on disk beside the state files.";

/// A usage error: the usage on stderr, exit 2.
fn usage_error(what: &str) -> ! {
    eprintln!("bench: {what}\n{USAGE}");
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| usage_error(&format!("{flag}: {v:?} is not a number")))
}

fn args() -> Args {
    let mut a = Args {
        idle_secs: 20,
        tokens: vec![1000],
        rounds_only: false,
        settle_secs: 70,
        sinks_tmpfs: None,
    };
    let mut sinks_on_disk = false;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("-h" | "--help", _) => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            ("--idle", Some(v)) => a.idle_secs = number("--idle", v),
            ("--tokens", Some(v)) => {
                a.tokens = v.split(',').map(|n| number("--tokens", n)).collect();
            }
            ("--only", Some(v)) if v == "rounds" => a.rounds_only = true,
            ("--settle", Some(v)) => a.settle_secs = number("--settle", v),
            ("--sinks", Some(v)) if v == "disk" || v == "tmpfs" => sinks_on_disk = v == "disk",
            (flag, _) => usage_error(&format!("unknown or incomplete option {flag:?}")),
        }
    }
    if !sinks_on_disk {
        a.sinks_tmpfs = Some(tmpfs().unwrap_or_else(|| {
            eprintln!("bench: no tmpfs for the sinks (neither /run nor /dev/shm is a tmpfs mount); run with --sinks disk");
            std::process::exit(2)
        }));
    }
    a
}

/// `/run` if it is a tmpfs (on a systemd machine it is, and `/run/tokend` holds the sinks),
/// else `/dev/shm`: where a sink's fsync costs what it costs in production, nothing.
fn tmpfs() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    ["/run", "/dev/shm"].into_iter().map(PathBuf::from).find(|dir| {
        mounts.lines().any(|l| {
            let mut fields = l.split(' ').skip(1);
            fields.next() == dir.to_str() && fields.next() == Some("tmpfs")
        })
    })
}

/// Where one run's files go: state files under `<dir>/state` on disk, sinks in `sinks`.
struct Files {
    dir: tempfile::TempDir,
    sinks: PathBuf,
    /// The sinks' directory on the tmpfs, removed with this.
    _tmpfs: Option<tempfile::TempDir>,
}

impl Files {
    /// In a new temp directory (under `parent`, else the system's), sinks as `a` says.
    fn new(parent: Option<&Path>, a: &Args) -> Self {
        let dir = match parent {
            Some(p) => tempfile::tempdir_in(p),
            None => tempfile::tempdir(),
        }
        .unwrap();
        let tmpfs = a.sinks_tmpfs.as_ref().map(|t| tempfile::tempdir_in(t).unwrap());
        let sinks = tmpfs.as_ref().map_or_else(|| dir.path().join("run"), |t| t.path().into());
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::create_dir_all(&sinks).unwrap();
        Self { dir, sinks, _tmpfs: tmpfs }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn sink(&self, i: usize) -> PathBuf {
        self.sinks.join(format!("t{i}.json"))
    }
}

/// Median, p99 and max of durations, in microseconds.
fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 99 / 100]), us(v[v.len() - 1]))
}

fn row(name: &str, ours: String, floor: String, ratio: String, target: &str) {
    println!("| {name:<44} | {ours:>22} | {floor:>22} | {ratio:>7} | {target:<22} |");
}

fn sink_json(generation: usize) -> String {
    format!(
        r#"{{"name":"b","access_token":"token-{generation:08}","token_type":"bearer","expires_at":"2030-01-01T00:00:00Z","expire_time":0,"expires_in":0,"generation":{generation},"refreshed_at":"2030-01-01T00:00:00Z"}}"#
    )
}

/// The non-durable half of a publish (temp file, rename): what propagation measures from.
fn publish_fast(path: &Path, generation: usize) -> Instant {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, sink_json(generation)).unwrap();
    let t0 = Instant::now();
    std::fs::rename(&tmp, path).unwrap();
    t0
}

fn propagation_floor(dir: &Path) -> Vec<Duration> {
    use inotify::{Inotify, WatchMask};
    let path = dir.join("floor.json");
    let mut ino = Inotify::init().unwrap();
    ino.watches().add(dir, WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE).unwrap();
    let mut buf = [0u8; 4096];
    (1..=ROTATIONS)
        .map(|g| {
            let t0 = publish_fast(&path, g);
            loop {
                let events = ino.read_events_blocking(&mut buf).unwrap();
                if events.into_iter().any(|e| {
                    e.name.is_some_and(|n| n == "floor.json")
                        && e.mask.contains(inotify::EventMask::MOVED_TO)
                }) {
                    return t0.elapsed();
                }
            }
        })
        .collect()
}

fn propagation_library(dir: &Path) -> Vec<Duration> {
    let path = dir.join("lib.json");
    std::fs::write(&path, sink_json(0)).unwrap();
    let w = TokenWatcher::open(&path).unwrap();
    (1..=ROTATIONS)
        .map(|g| {
            let seen = w.changes();
            let t0 = publish_fast(&path, g);
            let (_, token) = w.wait_blocking(seen, Duration::from_secs(5)).expect("change seen");
            let at = t0.elapsed();
            assert_eq!(token.generation, Some(g as u64));
            at
        })
        .collect()
}

fn propagation_cli(dir: &Path, bin: &Path) -> Vec<Duration> {
    let path = dir.join("cli.json");
    std::fs::write(&path, sink_json(0)).unwrap();
    let mut child =
        Command::new(bin).arg("watch").arg(&path).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap(); // the current token
    let v = (1..=ROTATIONS)
        .map(|g| {
            let t0 = publish_fast(&path, g);
            let line = lines.next().unwrap().unwrap();
            let at = t0.elapsed();
            assert!(line.starts_with(&format!("generation={g} ")), "{line}");
            at
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    v
}

/// One durable write-and-rename by hand: the floor for publish and the rounds.
fn durable_floor(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("floor-tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    // The directory's fsync shared with the other writers there, as tokend shares it: a floor
    // with one per file would make 30,000 more fsyncs in a round of 10,000 tokens.
    tokend::store::dir_sync::after_rename(path.parent().unwrap()).unwrap();
}

fn publish(dir: &Path) -> (Duration, Duration) {
    use tokend::secret::{AccessToken, RefreshToken};
    use tokend::store::{STATE_VERSION, State, render_sink, write_atomic};
    let now = chrono::Utc::now();
    let state = State {
        version: STATE_VERSION,
        name: "b".into(),
        generation: 1,
        access_token: AccessToken::new("a".repeat(48)),
        token_type: "bearer".into(),
        access_expires_at: now,
        refresh_token: Some(RefreshToken::new("r".repeat(48))),
        refresh_expires_at: Some(now),
        refreshed_at: now,
        session_started_at: now,
        scope: Some("ReadAccounts".into()),
        owner_id: Some("100000".into()),
        endpoint_id: Some("e".repeat(48)),
        session_id: Some("1".into()),
    };
    let (sp, jp, rp) = (dir.join("p.state.json"), dir.join("p.json"), dir.join("p.raw"));
    let json = render_sink(&state, tokend::config::SinkFormat::Json, false, now);
    let raw = render_sink(&state, tokend::config::SinkFormat::Raw, false, now);
    let state_bytes = serde_json::to_vec_pretty(&state).unwrap();
    let n = 200;
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        state.save(&sp).unwrap();
        write_atomic(
            &jp,
            &render_sink(&state, tokend::config::SinkFormat::Json, false, now),
            0o640,
        )
        .unwrap();
        write_atomic(&rp, &render_sink(&state, tokend::config::SinkFormat::Raw, false, now), 0o644)
            .unwrap();
        ours.push(t.elapsed());
        let t = Instant::now();
        durable_floor(&dir.join("f.state.json"), &state_bytes);
        durable_floor(&dir.join("f.json"), &json);
        durable_floor(&dir.join("f.raw"), &raw);
        floor.push(t.elapsed());
    }
    ours.sort();
    floor.sort();
    (ours[n / 2], floor[n / 2])
}

fn median_process(mut cmd: impl FnMut() -> Command, n: usize) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let out = cmd().output().unwrap();
            assert!(out.status.success());
            t.elapsed()
        })
        .collect();
    v.sort();
    v[n / 2]
}

fn current_ns(dir: &Path) -> f64 {
    let path = dir.join("cur.json");
    std::fs::write(&path, sink_json(1)).unwrap();
    let w = TokenWatcher::open(&path).unwrap();
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(w.current());
    }
    t.elapsed().as_secs_f64() * 1e9 / f64::from(n)
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Run time of each of the process's threads, in nanoseconds by thread id, from schedstat,
/// since `utime + stime` counts 10 ms ticks, too coarse for an idle daemon (one tick in 20 s
/// is already 0.05%).
fn thread_times(pid: u32) -> std::collections::HashMap<String, u64> {
    let mut times = std::collections::HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let ns = s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        times.insert(t.file_name().to_string_lossy().into_owned(), ns);
    }
    times
}

/// CPU the process used over `secs` of idling, in percent of one core: what each thread
/// alive at the end ran since the start. A sum over the threads alive at each end would go
/// negative when the blocking pool's threads (idle, they exit after 10 s) are gone at the
/// end, taking their whole past with them.
fn idle_cpu_pct(pid: u32, secs: u64) -> f64 {
    let before = thread_times(pid);
    std::thread::sleep(Duration::from_secs(secs)); // measuring idle is the point
    let ns: u64 = thread_times(pid)
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    ns as f64 / 1e9 / secs as f64 * 100.0
}

struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, config: &Path, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,tokend::daemon=info")
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// Waits for `needle` in the daemon's log, reading only what was added since the last
    /// look: the log of a 10,000-token start has a line per token (about 1 MB), and reading it
    /// whole every 5 ms took CPU from the bootstrap it measured.
    fn wait_log(&self, needle: &str, timeout: Duration) {
        use std::io::Read;
        let (start, text, needle) = (Instant::now(), needle, needle.as_bytes());
        let mut log = std::fs::File::open(&self.log).unwrap();
        let mut unread = Vec::new();
        loop {
            log.read_to_end(&mut unread).unwrap();
            if unread.windows(needle.len()).any(|w| w == needle) {
                return;
            }
            // Keep what could be the start of the needle, cut by the end of the file so far.
            unread.drain(..unread.len().saturating_sub(needle.len()));
            assert!(start.elapsed() < timeout, "no {text:?} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        tokend::signal::send(self.pid(), tokend::signal::Signal::Usr1).ok();
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
        let _ = self.child.wait();
    }
}

/// `schedule`: a cron line for every token, else the default (every 30 minutes).
fn write_config(files: &Files, server: &str, n: usize, schedule: Option<&str>) -> PathBuf {
    let dir = files.path();
    let d = dir.display();
    let schedule = schedule.map(|s| format!("schedule = \"{s}\"\n")).unwrap_or_default();
    let mut text = String::from("[daemon]\nmax_concurrent_requests = 16\n\n");
    for i in 0..n {
        let jwt = if i == 0 { DEFAULT_JWT.to_string() } else { format!("{DEFAULT_JWT}-{i}") };
        text.push_str(&format!(
            "[[token]]\nname = \"t{i}\"\nserver = \"{server}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = \"{DEFAULT_CLIENT_SECRET}\"\ngrant = \"jwt\"\njwt = \"{jwt}\"\nstate_file = \"{d}/state/t{i}.state.json\"\nrate_limit = 1000\n{schedule}[[token.sink]]\npath = \"{}\"\n\n",
            files.sink(i).display()
        ));
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Returns the notes to print below the table (the spread's histogram).
fn footprint_and_scale(bin: &Path, rt: &tokio::runtime::Runtime, a: &Args) -> String {
    let max_users = a.tokens.iter().copied().max().unwrap_or(1).max(1);
    let config = FakeConfig {
        users: (0..max_users).map(|n| User::numbered(DEFAULT_JWT, n)).collect(),
        ..FakeConfig::for_tests()
    };
    let rss_1 = if a.rounds_only { None } else { Some(footprint(bin, rt, &config, a)) };
    let largest = a.tokens.iter().copied().max().unwrap_or(0);
    let mut notes = String::new();
    // Each row's files are removed at the end, not before the next row: on ext4 without a
    // journal (this VM's root) every inode freed in the last minute or more is skipped, one
    // by one, by each new file's inode allocation, so tens of thousands freed just before a
    // bootstrap would make it pay for the row before.
    let mut dirs = Vec::new();
    for &n in &a.tokens {
        let server = rt.block_on(FakeServer::start(config.clone())).unwrap();
        let files = Files::new(None, a);
        scale(bin, &server, &files, n, a, rss_1);
        if n == largest && !a.rounds_only {
            notes = spread(bin, &server, &files, n);
        }
        rt.block_on(server.shutdown());
        dirs.push(files);
    }
    notes
}

/// One token's RSS and idle CPU rows; returns its idle RSS in kB.
fn footprint(bin: &Path, rt: &tokio::runtime::Runtime, config: &FakeConfig, a: &Args) -> u64 {
    let server = rt.block_on(FakeServer::start(config.clone())).unwrap();
    let files = Files::new(None, a);
    let cfg = write_config(&files, &server.url(), 1, None);
    let d = Daemon::start(bin, &cfg, files.path().join("d.log"));
    d.wait_log("tokend ready", Duration::from_secs(30));
    let rss_start = rss_kb(d.pid());
    for g in 2..=121 {
        tokend::signal::send(d.pid(), tokend::signal::Signal::Usr1).unwrap();
        wait_for(|| server.stats().refreshes >= g - 1, Duration::from_secs(30));
    }
    let rss_after = rss_kb(d.pid());
    let idle_pct = idle_cpu_pct(d.pid(), a.idle_secs);
    let rss_1 = rss_kb(d.pid());
    d.stop();
    row(
        "RSS, 1 token, after start",
        format!("{:.1} MB", rss_start as f64 / 1024.0),
        "-".into(),
        "-".into(),
        "< 10 MB",
    );
    row(
        "RSS, 1 token, after 120 refreshes",
        format!("{:.1} MB", rss_after as f64 / 1024.0),
        "-".into(),
        "-".into(),
        "< 10 MB",
    );
    row(
        &format!("idle CPU, 1 token, {}s", a.idle_secs),
        format!("{idle_pct:.3}%"),
        "-".into(),
        "-".into(),
        "< 0.1%",
    );
    rt.block_on(server.shutdown());
    rss_1
}

/// Bootstrap, one SIGUSR1 round, RSS and idle CPU of `n` tokens, each beside its floor.
/// `rss_1`: one idle token's RSS, for the memory per token (not measured with `--only rounds`).
fn scale(bin: &Path, server: &FakeServer, files: &Files, n: usize, a: &Args, rss_1: Option<u64>) {
    let dir = files.path();
    let cfg = write_config(files, &server.url(), n, None);
    let (t, fake_cpu) = (Instant::now(), fake_cpu_secs());
    let d = Daemon::start(bin, &cfg, dir.join("d.log"));
    d.wait_log("tokend ready", Duration::from_secs(600));
    let bootstrap = t.elapsed();
    let boot_cpu = (cpu_secs(d.pid()), fake_cpu_secs() - fake_cpu);
    let rss = rss_kb(d.pid());
    let (tokend_cpu, fake_cpu) = (cpu_secs(d.pid()), fake_cpu_secs());
    let (t, wall) = (Instant::now(), std::time::SystemTime::now());
    tokend::signal::send(d.pid(), tokend::signal::Signal::Usr1).unwrap();
    wait_round(dir, n, wall);
    let round = t.elapsed();
    let round_cpu = (cpu_secs(d.pid()) - tokend_cpu, fake_cpu_secs() - fake_cpu);
    let pending: Vec<usize> = (0..n)
        .filter(|i| {
            tokend::watch::read_sink(&files.sink(*i)).map_or(true, |t| t.generation < Some(2))
        })
        .collect();
    assert!(pending.is_empty(), "{} sinks not refreshed by the round", pending.len());
    let peak = server.stats().max_concurrent_token_requests;
    let idle = rss_1.map(|_| idle_cpu_pct(d.pid(), a.idle_secs.min(20)));
    d.stop();
    // The floor: the same durable writes, of the same sizes, 64 at once, by a minimal program.
    let written = TokenFiles::of(files);
    let floor = Files::new(dir.parent(), a);
    settle(floor.path(), Duration::from_secs(a.settle_secs));
    let me = std::process::id();
    let cpu = cpu_secs(me);
    let boot_floor = floor_writes(&floor, n, &written.bootstrap());
    let (boot_floor_cpu, cpu) = (cpu_secs(me) - cpu, cpu_secs(me));
    let round_floor = floor_writes(&floor, n, &written.round());
    let round_floor_cpu = cpu_secs(me) - cpu;
    let writes = |steps: &[Step]| steps.len() * n;
    scale_rows(
        n,
        (bootstrap, boot_floor, writes(&written.bootstrap())),
        (round, round_floor, writes(&written.round())),
    );
    // What the daemon's threads ran (user+system), beside the floor program's; the fake
    // server's own CPU apart (it is not tokend's, though it shares the machine).
    for (what, (ours, fake), floor) in
        [("bootstrap", boot_cpu, boot_floor_cpu), ("round", round_cpu, round_floor_cpu)]
    {
        row(
            &format!("{n} tokens: CPU in the {what} (fake server {fake:.2} s)"),
            format!("{ours}"),
            format!("{floor}"),
            format!("{:.2}x", (ours.0 + ours.1) / (floor.0 + floor.1)),
            "",
        );
    }
    row(
        &format!("{n} tokens: peak concurrent token requests"),
        format!("{peak}"),
        "16 (config)".into(),
        "-".into(),
        "bounded by config",
    );
    row(
        &format!("{n} tokens: RSS"),
        format!("{:.1} MB", rss as f64 / 1024.0),
        "-".into(),
        "-".into(),
        if n >= 10_000 { "< 64 MB" } else { "< 50 MB" },
    );
    let (Some(rss_1), Some(idle)) = (rss_1, idle) else { return };
    row(
        &format!("{n} tokens: memory per token"),
        format!("{:.1} kB", (rss.saturating_sub(rss_1)) as f64 / (n - 1).max(1) as f64),
        "-".into(),
        "-".into(),
        "",
    );
    row(&format!("{n} tokens: idle CPU"), format!("{idle:.3}%"), "-".into(), "-".into(), "");
}

/// Lets the inodes the daemon's round freed (40,000 at 10,000 tokens) stop counting as recently
/// deleted before the floor runs, so that the floor does not pay for them. ext4 without a
/// journal (this VM's root) makes each new inode's allocation skip, one buffer lookup each,
/// every free inode deleted less than 60 s ago, or 360 s while its inode table block is
/// still dirty: the sync writes those blocks, then the pause passes the 60 s. Without it the
/// floor ran right after the round and was the slower side (0.65x in one run).
fn settle(dir: &Path, pause: Duration) {
    let synced = Command::new("sync").arg("-f").arg(dir).status();
    assert!(synced.is_ok_and(|s| s.success()), "sync -f {} failed", dir.display());
    std::thread::sleep(pause); // the allocator's clock is the point, not a condition
}

/// Waits for the round started at `wall` to end: every token's status file written after it,
/// the last of a refresh's writes (the server's count alone would end it before the last
/// writes). Told by inotify, not by polling: a scan of 10,000 files every few milliseconds
/// would take a core of this 2-core machine from the daemon it measures. A scan is the
/// fallback when the event queue overflows.
fn wait_round(dir: &Path, n: usize, wall: std::time::SystemTime) {
    use inotify::{EventMask, Inotify, WatchMask};
    let fresh = |i: &usize| {
        let status = dir.join(format!("state/t{i}.state.json.status"));
        std::fs::metadata(status).and_then(|m| m.modified()).is_ok_and(|m| m >= wall)
    };
    let mut ino = Inotify::init().unwrap();
    ino.watches().add(dir.join("state"), WatchMask::MOVED_TO).unwrap();
    // Those written before the watch began.
    let mut pending: std::collections::HashSet<usize> = (0..n).filter(|i| !fresh(i)).collect();
    let mut buf = vec![0u8; 1 << 16];
    while !pending.is_empty() {
        let events = ino.read_events_blocking(&mut buf).unwrap();
        for e in events {
            if e.mask.contains(EventMask::Q_OVERFLOW) {
                wait_for(|| pending.iter().all(&fresh), Duration::from_secs(600));
                return;
            }
            let index = e.name.and_then(|name| {
                name.to_str()?.strip_prefix('t')?.strip_suffix(".state.json.status")?.parse().ok()
            });
            if let Some(i) = index {
                pending.remove(&i);
            }
        }
    }
}

/// CPU time (user, system) of process `pid` so far, its ended threads included.
fn cpu_secs(pid: u32) -> Cpu {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(") ").map_or("", |(_, f)| f).split(' ').collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Cpu(ticks(14) / 100.0, ticks(15) / 100.0) // USER_HZ is 100 on Linux
}

/// User and system CPU seconds.
#[derive(Clone, Copy)]
struct Cpu(f64, f64);

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu(self.0 - o.0, self.1 - o.1)
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}+{:.2} s", self.0, self.1)
    }
}

/// CPU time of this process's tokio workers (`tokio-rt-worker`): the fake server's (the bench's own thread only
/// waits).
fn fake_cpu_secs() -> f64 {
    let mut ns = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("tokio-r") {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

fn scale_rows(n: usize, boot: (Duration, Duration, usize), round: (Duration, Duration, usize)) {
    for (what, (ours, floor, writes)) in
        [("bootstrap (logins, all published)", boot), ("one refresh round (SIGUSR1)", round)]
    {
        row(
            &format!("{n} tokens: {what}"),
            format!("{:.2} s", ours.as_secs_f64()),
            format!("{:.2} s ({writes} writes)", floor.as_secs_f64()),
            format!("{:.2}x", ours.as_secs_f64() / floor.as_secs_f64()),
            "< 1.5x, < 10 s",
        );
    }
}

/// One step of a token's writes, as tokend makes them (`strace -f -e fsync,rename,unlink`):
/// a durable write-and-rename of a file (its suffix after `t{i}`).
enum Step {
    Write(&'static str, Vec<u8>),
}

/// The contents of token 0's files after a run: the sizes the floor writes.
struct TokenFiles {
    intent: Vec<u8>,
    state: Vec<u8>,
    status: Vec<u8>,
    sink: Vec<u8>,
}

impl TokenFiles {
    fn of(files: &Files) -> Self {
        let read = |p: &str| std::fs::read(files.path().join(p)).unwrap();
        Self {
            intent: read("state/t0.state.json.intent"),
            state: read("state/t0.state.json"),
            status: read("state/t0.state.json.status"),
            sink: std::fs::read(files.sink(0)).unwrap(),
        }
    }

    /// A first start: after the login, the state, the sink and the status.
    fn bootstrap(&self) -> Vec<Step> {
        vec![
            Step::Write(".state.json", self.state.clone()),
            Step::Write(".json", self.sink.clone()),
            Step::Write(".state.json.status", self.status.clone()),
        ]
    }

    /// A first refresh: the intent marker (created: a later refresh rewrites it in place,
    /// `store::intent`), the state, the sink, the status.
    fn round(&self) -> Vec<Step> {
        vec![
            Step::Write(".state.json.intent", self.intent.clone()),
            Step::Write(".state.json", self.state.clone()),
            Step::Write(".json", self.sink.clone()),
            Step::Write(".state.json.status", self.status.clone()),
        ]
    }
}

/// `n` tokens' `steps`, `MAX_WRITES` tokens at once (tokend's bound), each token's steps in
/// order; state files under `state/`, sinks where the daemon's went (a tmpfs or `run/`).
fn floor_writes(files: &Files, n: usize, steps: &[Step]) -> Duration {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..tokend::store::MAX_WRITES {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    for step in steps {
                        let Step::Write(suffix, bytes) = step;
                        let path = match *suffix {
                            ".json" => files.sink(i),
                            _ => files.path().join(format!("state/t{i}{suffix}")),
                        };
                        durable_floor(&path, bytes);
                    }
                }
            });
        }
    });
    t.elapsed()
}

/// The requests after one cron tick: with the default jitter (2 minutes), `n` tokens'
/// requests should spread evenly over it, never burst at the tick. The tokens get a daily
/// schedule whose one tick falls during the run: its jitter is the default schedule's
/// (the default 2 minutes is below a tenth of both intervals).
fn spread(bin: &Path, server: &FakeServer, files: &Files, n: usize) -> String {
    let dir = files.path();
    let jitter = 120.0;
    let mut margin = Duration::from_secs(60);
    let samples = loop {
        let tick = chrono::Utc::now() + margin;
        let tick = tick - Duration::from_nanos(u64::from(chrono::Timelike::nanosecond(&tick)));
        let cron = tick.format("%-S %-M %-H * * *").to_string();
        let cfg = write_config(files, &server.url(), n, Some(&cron));
        let d = Daemon::start(bin, &cfg, dir.join("spread.log"));
        d.wait_log("tokend ready", Duration::from_secs(600));
        if chrono::Utc::now() + Duration::from_secs(2) >= tick {
            d.stop(); // started too late for this tick: try again with more time
            margin *= 2;
            continue;
        }
        let samples = sample_requests(server, tick, n, Duration::from_secs_f64(jitter + 60.0));
        d.stop();
        break samples;
    };
    let per_second = per_second(&samples);
    let total: u64 = per_second.iter().sum();
    let peak = per_second.iter().copied().max().unwrap_or(0);
    let first = per_second.first().copied().unwrap_or(0);
    let even = n as f64 / jitter;
    row(
        &format!("{n} tokens: token requests after a tick, peak"),
        format!("{peak}/s ({total} in all)"),
        format!("{even:.0}/s (even)"),
        format!("{:.2}x", peak as f64 / even),
        "< 2x even",
    );
    row(
        &format!("{n} tokens: token requests in the tick's second"),
        format!("{first}"),
        format!("{even:.0}"),
        format!("{:.2}x", first as f64 / even),
        "no burst at the tick",
    );
    histogram(&per_second)
}

/// (seconds since the tick, the server's token requests so far), every 100 ms from just
/// before the tick until `n` requests came or `within` passed.
fn sample_requests(
    server: &FakeServer,
    tick: chrono::DateTime<chrono::Utc>,
    n: usize,
    within: Duration,
) -> Vec<(f64, u64)> {
    let base = server.stats().token_requests;
    let mut samples = Vec::new();
    loop {
        let since = (chrono::Utc::now() - tick).as_seconds_f64();
        let count = server.stats().token_requests - base;
        samples.push((since, count));
        if count >= n as u64 || since > within.as_secs_f64() {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(100)); // a sampling period, not a wait
    }
}

/// Requests in each whole second after the tick (those before it in second 0).
fn per_second(samples: &[(f64, u64)]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut last = 0;
    for &(since, count) in samples {
        let s = since.max(0.0) as usize;
        if out.len() <= s {
            out.resize(s + 1, 0);
        }
        out[s] += count - last;
        last = count;
    }
    out
}

/// Requests per 10 s after the tick, one bar each, below the table.
fn histogram(per_second: &[u64]) -> String {
    let mut out =
        String::from("token requests after a tick, per 10 s (the busiest second in brackets):\n");
    for (i, chunk) in per_second.chunks(10).enumerate() {
        let sum: u64 = chunk.iter().sum();
        let peak = chunk.iter().max().unwrap_or(&0);
        let bar = "#".repeat((sum / 20) as usize);
        out.push_str(&format!(
            "  {:>4}-{:<4} s {sum:>6} [{peak:>4}/s] {bar}\n",
            i * 10,
            i * 10 + 10
        ));
    }
    out
}

fn main() {
    let a = args();
    // Beside this example's own directory (target/release/examples/bench), whatever the
    // target directory is (CARGO_TARGET_DIR).
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("tokend");
    assert!(bin.exists(), "build it first: cargo build --release");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    println!("tokend bench: {ROTATIONS} rotations per propagation figure; medians unless noted");
    match &a.sinks_tmpfs {
        Some(t) => println!(
            "state files on disk ({}), sinks on the tmpfs {} (as /run/tokend when installed)\n",
            std::env::temp_dir().display(),
            t.display()
        ),
        None => println!(
            "state files and sinks on disk ({}): --sinks disk\n",
            std::env::temp_dir().display()
        ),
    }
    println!(
        "| {:<44} | {:>22} | {:>22} | {:>7} | {:<22} |",
        "what", "tokend", "floor", "ratio", "target"
    );
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(46),
        "-".repeat(24),
        "-".repeat(24),
        "-".repeat(9),
        "-".repeat(24)
    );
    if a.rounds_only {
        footprint_and_scale(&bin, &rt, &a);
        return;
    }
    let floor = stats(propagation_floor(dir.path()));
    let lib = stats(propagation_library(dir.path()));
    let cli = stats(propagation_cli(dir.path(), &bin));
    let f = |s: (f64, f64, f64)| format!("{:.0}/{:.0}/{:.0} us", s.0, s.1, s.2);
    row(
        "propagation to library watcher p50/p99/max",
        f(lib),
        f(floor),
        format!("{:.2}x", lib.0 / floor.0),
        "p50 < 2x, p99 < 5 ms",
    );
    row(
        "propagation to `tokend watch` p50/p99/max",
        f(cli),
        f(floor),
        format!("{:.2}x", cli.0 / floor.0),
        "",
    );
    let (ours, floor) = publish(dir.path());
    row(
        "publish: state + 2 sinks, durable",
        format!("{:.2} ms", ours.as_secs_f64() * 1e3),
        format!("{:.2} ms", floor.as_secs_f64() * 1e3),
        format!("{:.2}x", ours.as_secs_f64() / floor.as_secs_f64()),
        "< 1.5x",
    );
    let sink = dir.path().join("cur.json");
    std::fs::write(&sink, sink_json(1)).unwrap();
    let token = median_process(
        || {
            let mut c = Command::new(&bin);
            c.arg("token").arg(&sink);
            c
        },
        200,
    );
    let cat = median_process(
        || {
            let mut c = Command::new("cat");
            c.arg(&sink);
            c
        },
        200,
    );
    row(
        "`tokend token` process vs `cat`",
        format!("{:.2} ms", token.as_secs_f64() * 1e3),
        format!("{:.2} ms", cat.as_secs_f64() * 1e3),
        format!("{:.2}x", token.as_secs_f64() / cat.as_secs_f64()),
        "",
    );
    row(
        "library current()",
        format!("{:.0} ns", current_ns(dir.path())),
        "-".into(),
        "-".into(),
        "no file read per call",
    );
    let notes = footprint_and_scale(&bin, &rt, &a);
    println!("\n{notes}");
}
