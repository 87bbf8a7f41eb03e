//! A disk whose fsync takes a second (tests/slowfs.py, a pass-through FUSE filesystem): the
//! systemd watchdog pings and SIGTERM keep their timing while the durable writes crawl, because
//! the writes run in the store's bounded blocking pool, not on the runtime's worker threads.

use crate::harness::{JWT, TokenSpec, World, wait_until};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokend::fake::{FakeConfig, User};

/// Tokens refreshing at once: more than the runtime's worker threads (2 here), so that
/// writes on the worker threads would block every one of them.
const TOKENS: usize = 4;

/// The slowed fsync.
const FSYNC_MS: u64 = 2000;

/// A mounted slowfs; unmounted (lazily, so a stuck reader cannot hold it) on drop.
struct SlowFs {
    mountpoint: PathBuf,
    delay_file: PathBuf,
    child: Child,
}

impl SlowFs {
    fn mount(dir: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slowfs.py");
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the slow-disk test needs FUSE"
        );
        let probe = Command::new("/usr/bin/python3").args(["-c", "import fusepy"]).output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "python3-fusepy is missing (scripts/deps installs it)"
        );
        let (backing, mountpoint) = (dir.join("backing"), dir.join("slow"));
        let delay_file = dir.join("fsync-delay-ms");
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mountpoint).unwrap();
        std::fs::write(&delay_file, "0").unwrap();
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .args([&backing, &mountpoint, &delay_file])
            .spawn()
            .expect("start slowfs");
        let fs = Self { mountpoint, delay_file, child };
        let start = Instant::now();
        while !is_mounted(&fs.mountpoint) {
            assert!(start.elapsed() < Duration::from_secs(20), "slowfs did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs
    }

    fn set_delay(&self, ms: u64) {
        std::fs::write(&self.delay_file, ms.to_string()).unwrap();
    }

    /// The generation in the json sink of `name` on this volume (0 while there is none).
    fn generation(&self, name: &str) -> u64 {
        let Ok(bytes) = std::fs::read(self.mountpoint.join(format!("{name}.json"))) else {
            return 0;
        };
        let doc: serde_json::Value = serde_json::from_slice(&bytes).expect("a sink parses");
        doc["generation"].as_u64().expect("a generation")
    }

    /// Each open of an existing file (a read) takes `ms`; fsync is not slowed.
    fn set_open_delay(&self, ms: u64) {
        std::fs::write(&self.delay_file, format!("0 {ms}")).unwrap();
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&*p))
}

/// The notify socket's messages, each with when it arrived.
type Log = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(socket: UnixDatagram, done: Arc<std::sync::atomic::AtomicBool>) -> Log {
    let log: Log = Arc::default();
    let l = log.clone();
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                l.lock().unwrap().push((Instant::now(), text));
            }
        }
    });
    log
}

/// The longest gap between two watchdog pings after `from` (and up to now).
fn longest_ping_gap(log: &Log, from: Instant) -> Duration {
    let msgs = log.lock().unwrap();
    crate::harness::longest_gap(
        from,
        msgs.iter().filter(|m| m.1.contains("WATCHDOG=1")).map(|m| m.0),
    )
}

/// The daemon with `TOKENS` tokens whose files are all on `fs`, and the notify socket's log
/// (pings every 100 ms); `done` stops the socket's reader.
async fn start_on(
    w: &World,
    fs: &SlowFs,
    done: &Arc<std::sync::atomic::AtomicBool>,
    prelude: &str,
) -> (crate::harness::Daemon, Log) {
    let tokens: String = (0..TOKENS)
        .map(|i| {
            let jwt = if i == 0 { JWT.to_string() } else { format!("{JWT}-{i}") };
            TokenSpec::new(&format!("t{i}"))
                .grant(&format!("grant = \"jwt\"\njwt = \"{jwt}\""))
                .toml(&w.server.url(), &fs.mountpoint)
        })
        .collect();
    std::fs::write(w.config_path(), format!("{prelude}\n{tokens}")).unwrap();
    let socket_path = w.path("notify.sock");
    let log = listen(UnixDatagram::bind(&socket_path).unwrap(), done.clone());
    let d = w.daemon_with(
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")],
        "",
    );
    d.wait_ready().await;
    (d, log)
}

async fn slow_world() -> World {
    let users = (0..TOKENS).map(|n| User::numbered(JWT, n)).collect();
    World::with(FakeConfig { users, ..FakeConfig::for_tests() }).await
}

#[tokio::test]
async fn slow_fsync_stalls_neither_the_watchdog_nor_sigterm() {
    let w = slow_world().await;
    let fs = SlowFs::mount(w.dir.path());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (d, log) = start_on(&w, &fs, &done, "").await;
    crawl_then_stop(&fs, d, &log).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    fs.set_delay(0);
    for i in 0..TOKENS {
        let state = tokend::store::State::load(&fs.mountpoint.join(format!("t{i}.state.json")))
            .unwrap()
            .expect("state exists");
        assert_eq!(state.generation, 2, "t{i}'s refreshed pair was not persisted on stop");
    }
}

/// The same in multi-host mode (one host, a real etcd): the leader's and the mirror's writes
/// of the state, sinks and status file go through the same blocking pool.
#[cfg(feature = "etcd")]
#[tokio::test]
async fn slow_fsync_in_cluster_mode_stalls_neither_the_watchdog_nor_sigterm() {
    let w = slow_world().await;
    let etcd = tokend::cluster::LocalEtcd::start(w.dir.path()).await;
    let fs = SlowFs::mount(w.dir.path());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cluster = format!(
        "[cluster]\nendpoints = [\"{}\"]\nnode = \"solo\"\nlease_ttl = \"5s\"\n",
        etcd.url()
    );
    let (d, log) = start_on(&w, &fs, &done, &cluster).await;
    let published = || (0..TOKENS).all(|i| fs.generation(&format!("t{i}")) >= 1);
    wait_until("every token published", Duration::from_secs(30), published).await;
    crawl_then_stop(&fs, d, &log).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    fs.set_delay(0);
}

/// Slows fsync, refreshes every token (SIGUSR1) and watches the pings while the writes crawl,
/// then stops the daemon (SIGTERM) and times STOPPING=1; waits for the graceful exit.
async fn crawl_then_stop(fs: &SlowFs, mut d: crate::harness::Daemon, log: &Log) {
    fs.set_delay(FSYNC_MS);
    let crawl = Instant::now();
    d.signal(libc::SIGUSR1);
    // Every token now writes its intent, state, sinks and status through fsyncs of two
    // seconds each: many seconds of writes per token. Watch the pings meanwhile. A ping
    // blocked by an fsync would be 2 s late; scheduling on a loaded 2-core machine has made
    // one 0.7 s late (a 600 ms bound with 1 s fsyncs failed once), so the bound is 1.2 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let gap = longest_ping_gap(log, crawl);
    assert!(
        gap < Duration::from_millis(1200),
        "a watchdog ping was {gap:?} late while fsyncs took {FSYNC_MS} ms (interval 100 ms)"
    );
    let pending = (0..TOKENS).filter(|i| fs.generation(&format!("t{i}")) < 2).count();
    assert!(pending > 0, "the writes did not crawl: the test shows nothing");
    let term = Instant::now();
    d.signal(libc::SIGTERM);
    let stopping = || log.lock().unwrap().iter().any(|(_, m)| m.contains("STOPPING=1"));
    wait_until("STOPPING=1", Duration::from_secs(30), stopping).await;
    let answered = term.elapsed();
    assert!(
        answered < Duration::from_millis(1200),
        "SIGTERM was answered after {answered:?} while fsyncs took {FSYNC_MS} ms"
    );
    // The graceful stop still finishes the in-flight writes.
    assert!(d.wait_exit(Duration::from_secs(120)).await.success());
}

/// `systemctl status`'s line (STATUS=, sent at start, every 30 s and after a reload) comes from
/// what the daemon holds, not from each token's files: it is built on the loop that pings the
/// watchdog, where reading three files per token on a disk whose reads crawl made the pings
/// seconds late (and took seconds of a core at 10,000 tokens).
#[tokio::test]
async fn slow_reads_stall_neither_the_watchdog_nor_the_status_line() {
    const OPEN_MS: u64 = 1000;
    let w = slow_world().await;
    let fs = SlowFs::mount(w.dir.path());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut d, log) = start_on(&w, &fs, &done, "").await;
    fs.set_open_delay(OPEN_MS);
    let reload = Instant::now();
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", 1, Duration::from_secs(60)).await;
    let status = || {
        log.lock().unwrap().iter().any(|(t, m)| *t >= reload && m.contains("STATUS=t0 ok gen 1"))
    };
    wait_until("a STATUS= line after the reload", Duration::from_secs(30), status).await;
    // Watch the pings for as long as reading each token's files would take.
    tokio::time::sleep(Duration::from_millis(OPEN_MS * 2)).await;
    let gap = longest_ping_gap(&log, reload);
    assert!(
        gap < Duration::from_millis(1200),
        "a watchdog ping was {gap:?} late while each open took {OPEN_MS} ms (interval 100 ms)"
    );
    fs.set_delay(0);
    assert!(d.stop().await.success());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}
