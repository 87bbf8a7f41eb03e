//! Multi-host benchmarks: failover after `kill -9` of the leader and after SIGTERM, for a
//! few lease TTLs, and host-to-host propagation (the pair's commit in etcd to every other
//! host's sink), each beside its floor. Three `tokend run` processes, one local etcd, the
//! fake server; all on loopback.
//!
//!   cargo build --release --features etcd
//!   cargo run --release --features etcd --example cluster_bench [-- --runs 5 --ttls 2,5,10 --rounds 100]
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tokend::cluster::LocalEtcd;
use tokend::fake::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, FakeServer};
use tokend::store::Status;

struct Args {
    runs: usize,
    ttls: Vec<u64>,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args { runs: 5, ttls: vec![2, 5], rounds: 100 };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--runs", Some(v)) => a.runs = v.parse().expect("--runs N"),
            ("--rounds", Some(v)) => a.rounds = v.parse().expect("--rounds N"),
            ("--ttls", Some(v)) => {
                a.ttls = v.split(',').map(|n| n.parse().expect("--ttls 2,5")).collect();
            }
            _ => panic!("usage: cluster_bench [--runs N] [--ttls 2,5,10] [--rounds N]"),
        }
    }
    a
}

struct Host {
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Host {
    fn new(root: &Path, i: usize, etcd: &str, server: &str, ttl: u64) -> Self {
        let dir = root.join(format!("h{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let text = format!(
            "[cluster]\nendpoints = [\"{etcd}\"]\nprefix = \"/bench{ttl}\"\nlease_ttl = \"{ttl}s\"\nnode = \"h{i}\"\n\n[[token]]\nname = \"main\"\nserver = \"{server}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = \"{DEFAULT_CLIENT_SECRET}\"\ngrant = \"jwt\"\njwt = \"{DEFAULT_JWT}\"\nstate_file = \"{d}/main.state.json\"\nschedule = \"0 0 0 1 1 *\"\nrate_limit = 1000\nrate_window = \"1s\"\n[[token.sink]]\npath = \"{d}/main.json\"\n"
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        Self { dir, config, child: None }
    }

    fn start(&mut self, bin: &Path) {
        let log = std::fs::File::create(self.dir.join("log")).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    }

    fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn role(&self) -> String {
        Status::load(&self.dir.join("main.state.json"))
            .and_then(|s| s.cluster)
            .map(|c| c.role)
            .unwrap_or_default()
    }

    fn generation(&self) -> u64 {
        std::fs::read(self.dir.join("main.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<tokend::store::SinkDoc>(&b).ok())
            .map_or(0, |d| d.generation)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Instant {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
    Instant::now()
}

fn leader(hosts: &[Host], except: Option<usize>) -> Option<usize> {
    (0..hosts.len())
        .find(|&i| Some(i) != except && hosts[i].child.is_some() && hosts[i].role() == "leader")
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn row(what: &str, ours: &str, floor: &str, ratio: &str) {
    println!("| {what:<46} | {ours:>24} | {floor:>22} | {ratio:>7} |");
}

/// Three hosts; kills (or stops) the leader `runs` times, timing until another host leads.
fn failover(
    bin: &Path,
    root: &Path,
    etcd: &str,
    server: &str,
    ttl: u64,
    runs: usize,
    sig: &str,
) -> Vec<Duration> {
    let mut hosts: Vec<Host> = (0..3)
        .map(|i| Host::new(&root.join(format!("{sig}{ttl}")), i, etcd, server, ttl))
        .collect();
    for h in &mut hosts {
        h.start(bin);
    }
    let mut times = Vec::new();
    for _ in 0..runs {
        wait_for("a leader", Duration::from_secs(ttl * 4 + 10), || leader(&hosts, None).is_some());
        let old = leader(&hosts, None).unwrap();
        wait_for("everyone mirrored", Duration::from_secs(10), || {
            hosts.iter().all(|h| h.generation() >= 1)
        });
        let t0 = Instant::now();
        hosts[old].signal(sig);
        hosts[old].reap();
        let t1 = wait_for("a new leader", Duration::from_secs(ttl * 4 + 10), || {
            leader(&hosts, Some(old)).is_some()
        });
        times.push(t1 - t0);
        // The old host rejoins as a follower (its status file still says leader until then).
        let _ = std::fs::remove_file(hosts[old].dir.join("main.state.json.status"));
        hosts[old].start(bin);
        wait_for("the old host to rejoin", Duration::from_secs(20), || {
            hosts[old].role() == "follower"
        });
    }
    times
}

fn main() {
    let a = args();
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/tokend");
    assert!(bin.exists(), "build it first: cargo build --release --features etcd");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = tempfile::tempdir().unwrap();
    let server = rt.block_on(FakeServer::start(FakeConfig::for_tests())).unwrap();
    let etcd = rt.block_on(LocalEtcd::start(root.path()));
    // The binary must have been built with the feature.
    let probe = Host::new(root.path(), 9, &etcd.url(), &server.url(), 2);
    let out = Command::new(&bin).args(["check", "--config"]).arg(&probe.config).output().unwrap();
    assert!(
        out.status.success(),
        "{} was built without --features etcd: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "tokend cluster bench: 3 hosts, etcd {}, {} runs per failover figure, {} rounds of propagation\n",
        etcd.url(),
        a.runs,
        a.rounds
    );
    println!("| {:<46} | {:>24} | {:>22} | {:>7} |", "what", "tokend p50 / max", "floor", "ratio");
    println!("|{}|{}|{}|{}|", "-".repeat(48), "-".repeat(26), "-".repeat(24), "-".repeat(9));
    for &ttl in &a.ttls {
        let t = failover(&bin, root.path(), &etcd.url(), &server.url(), ttl, a.runs, "KILL");
        let (p50, max) = (pct(t.clone(), 50), pct(t, 100));
        let floor = Duration::from_secs(ttl);
        row(
            &format!("failover after kill -9 of the leader, TTL {ttl} s"),
            &format!("{} / {}", ms(p50), ms(max)),
            &format!("lease TTL {ttl} s"),
            &format!("{:.2}x", p50.as_secs_f64() / floor.as_secs_f64()),
        );
    }
    let ttl = *a.ttls.iter().max().unwrap();
    let t = failover(&bin, root.path(), &etcd.url(), &server.url(), ttl, a.runs, "TERM");
    let p50 = pct(t.clone(), 50);
    row(
        &format!("handover after SIGTERM of the leader, TTL {ttl} s"),
        &format!("{} / {}", ms(p50), ms(pct(t, 100))),
        &format!("lease TTL {ttl} s"),
        &format!("{:.3}x", p50.as_secs_f64() / ttl as f64),
    );

    // Propagation: the bench watches the pair key itself; from that event to each follower's
    // sink holding the new generation.
    let mut hosts: Vec<Host> = (0..3)
        .map(|i| Host::new(&root.path().join("prop"), i, &etcd.url(), &server.url(), 5))
        .collect();
    for h in &mut hosts {
        h.start(&bin);
    }
    wait_for("a leader", Duration::from_secs(30), || leader(&hosts, None).is_some());
    let l = leader(&hosts, None).unwrap();
    wait_for("everyone mirrored", Duration::from_secs(10), || {
        hosts.iter().all(|h| h.generation() >= 1)
    });
    let mut watch = rt.block_on(async {
        let mut c = etcd.client().await;
        c.watch("/bench5/main/pair", None).await.unwrap()
    });
    let mut ours = Vec::new();
    for _ in 0..a.rounds {
        let g = hosts[l].generation();
        hosts[l].signal("USR1");
        rt.block_on(next_event(&mut watch));
        let t0 = Instant::now();
        for (i, h) in hosts.iter().enumerate() {
            if i != l {
                let t =
                    wait_for("a follower's sink", Duration::from_secs(10), || h.generation() > g);
                ours.push(t - t0);
            }
        }
        wait_for("the leader's sink", Duration::from_secs(10), || hosts[l].generation() > g);
    }
    // Floor: a second watcher gets the same put and durably writes a sink-sized file.
    let floor = rt.block_on(async {
        let mut c = etcd.client().await;
        let mut w1 = c.watch("/floor", None).await.unwrap();
        let mut w2 = c.watch("/floor", None).await.unwrap();
        let path = root.path().join("floor.json");
        let mut v = Vec::new();
        for i in 0..a.rounds {
            c.put("/floor", format!("{i:0600}"), None).await.unwrap();
            next_event(&mut w1).await;
            let t0 = Instant::now();
            let value = next_event(&mut w2).await;
            tokend::store::write_atomic(&path, &value, 0o644).unwrap();
            v.push(t0.elapsed());
        }
        v
    });
    let (o50, o99, f50) = (pct(ours.clone(), 50), pct(ours, 99), pct(floor, 50));
    row(
        "host-to-host propagation p50 / p99",
        &format!("{} / {}", ms(o50), ms(o99)),
        &format!("{} (p50)", ms(f50)),
        &format!("{:.2}x", o50.as_secs_f64() / f50.as_secs_f64()),
    );
    drop(watch);
}

/// The value of the next event (skipping the "created" reply of a new watch).
async fn next_event(w: &mut etcd_client::WatchStream) -> Vec<u8> {
    loop {
        let m = w.message().await.unwrap().expect("watch open");
        if let Some(kv) = m.events().first().and_then(etcd_client::Event::kv) {
            return kv.value().to_vec();
        }
    }
}
