//! The local API proxy beside nginx (a reverse proxy adding a fixed header to the same upstream):
//! added latency p50/p99 at 1 and 64 connections, throughput, memory per 1,000 idle connections
//! (opened and not used yet, and idle after one request).
//!
//!   scripts/bench-proxy            # installs nginx (Debian package) when missing, then runs this
//!
//! The upstream is a minimal HTTP server in this process answering 200 at once, so what is
//! measured is the proxies. The load is raw HTTP/1.1 keep-alive connections (a fixed request
//! written, the reply read to its Content-Length), cheap enough that the proxies, not the
//! client, set the pace on a 2-core machine; each row also gives the target's CPU time per
//! request (its processes' user and system time from /proc, all threads). Each round runs every target once per
//! connection count, in the reverse order of the round before (A B, B A: no target is always
//! measured first, or right after the same other); the table gives the median over the rounds,
//! ratios to nginx from the same run, and each round's throughput ratio.
//! `TOKEND_BEFORE_BIN=path` adds a second tokend (an older build) to compare in one run.
//! `BENCH_ROUNDS` (default 6) and `BENCH_SECS` (seconds per row, default 1.5) set the length:
//! on a shared machine many short rounds gave steadier medians than a few long ones (the
//! README's "Performance" section).
#![allow(clippy::too_many_lines, clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokend::fake::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, FakeServer};

const IDLE: usize = 1000;
const PATH: &str = "/restapi/v1.0/account/~/extension/~";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run());
}

struct Target {
    name: &'static str,
    port: u16,
    pids: Vec<u32>,
}

async fn run() {
    let rounds = env_num("BENCH_ROUNDS", 6).max(1) as usize;
    let secs = Duration::from_secs_f64(
        std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(1.5f64).max(0.5),
    );
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_upstream().await;
    let fake = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let mut children = Vec::new();
    let mut targets =
        vec![Target { name: "direct (floor)", port: port_of(&upstream), pids: vec![] }];
    let nginx_port = free_port();
    let nginx = start_nginx(dir.path(), &upstream, nginx_port).await;
    targets.push(Target { name: "nginx", port: nginx_port, pids: nginx_pids(nginx.id()) });
    children.push(nginx);
    let bins = [
        ("tokend", Some(tokend_bin())),
        ("tokend (before)", std::env::var("TOKEND_BEFORE_BIN").ok().map(Into::into)),
    ];
    for (name, bin) in bins {
        let Some(bin) = bin else { continue };
        let port = free_port();
        let sub = dir.path().join(name.replace([' ', '(', ')'], ""));
        std::fs::create_dir_all(&sub).unwrap();
        let child = start_tokend(&bin, &sub, &fake.url(), &upstream, port).await;
        targets.push(Target { name, port, pids: vec![child.id()] });
        children.push(child);
    }
    // First, on fresh processes: the heap left by the load rows would absorb part of it.
    // Unused first: it leaves little behind to absorb the other.
    for (used, what) in [(false, "opened, no request yet"), (true, "idle after one request")] {
        let mut n_mem = 0;
        for t in targets.iter().filter(|t| !t.pids.is_empty()) {
            let mem = idle_memory(t.port, &t.pids, used).await;
            if t.name == "nginx" {
                n_mem = mem;
            }
            println!(
                "memory per {IDLE} client connections {what}: {} {mem} KiB ({:.2}x nginx)",
                t.name,
                mem as f64 / n_mem.max(1) as f64
            );
        }
    }
    println!(
        "proxy benchmark: GET with a small reply, {secs:?} per row, {rounds} rounds, loopback, this machine (load {})",
        load_average()
    );
    println!(
        "{:<16} {:>6} {:>10} {:>10} {:>12} {:>12}",
        "target", "conns", "p50 us", "p99 us", "req/s", "CPU us/req"
    );
    let mut rows: Vec<(&str, usize, usize, Load)> = Vec::new();
    for round in 0..rounds {
        for (conns, t) in round_order(&targets, round) {
            // The previous row's connections close and its target settles before this one.
            tokio::time::sleep(SETTLE).await;
            let cpu = cpu_ticks(&t.pids);
            let mut r = load(t.port, conns, secs).await;
            let requests = r.rps * secs.as_secs_f64();
            r.cpu_us = (cpu_ticks(&t.pids) - cpu) as f64 * 1e6 / USER_HZ / requests;
            println!(
                "{:<16} {conns:>6} {:>10} {:>10} {:>12.0} {:>12.1}   round {}",
                t.name,
                r.p50,
                r.p99,
                r.rps,
                r.cpu_us,
                round + 1
            );
            rows.push((t.name, conns, round, r));
        }
    }
    println!(
        "\nmedians over {rounds} rounds (order reversed every other round; load {} at the end); added latency over direct, and ratios to nginx:",
        load_average()
    );
    for conns in [1usize, 64] {
        let med = |n: &str| {
            median_load(rows.iter().filter(|(name, c, ..)| *name == n && *c == conns).map(|r| &r.3))
        };
        let (d, n) = (med("direct (floor)"), med("nginx"));
        let added = |x: &Load| (x.p50.saturating_sub(d.p50), x.p99.saturating_sub(d.p99));
        let (n50, n99) = added(&n);
        println!(
            "{conns:>3} conns: direct p50 {} us p99 {} us {:.0} req/s; nginx added p50 {n50} us, p99 {n99} us, {:.0} req/s",
            d.p50, d.p99, d.rps, n.rps
        );
        for t in targets.iter().filter(|t| t.name.starts_with("tokend")) {
            let x = med(t.name);
            let (t50, t99) = added(&x);
            println!(
                "    {:<16} added p50 {t50} us ({:.2}x nginx), added p99 {t99} us ({:.2}x), {:.0} req/s, throughput {:.2}x nginx, CPU {:.1} us per request ({:.2}x nginx's {:.1})",
                t.name,
                ratio(t50, n50),
                ratio(t99, n99),
                x.rps,
                x.rps / n.rps,
                x.cpu_us,
                x.cpu_us / n.cpu_us,
                n.cpu_us
            );
            let by_round: Vec<String> = (0..rounds)
                .filter_map(|round| {
                    let rps = |n: &str| {
                        rows.iter()
                            .find(|(name, c, r, _)| *name == n && *c == conns && *r == round)
                            .map(|r| r.3.rps)
                    };
                    Some(format!("{:.2}x", rps(t.name)? / rps("nginx")?))
                })
                .collect();
            println!("        throughput round by round: {}", by_round.join(" "));
        }
    }
    for mut c in children {
        stop(&mut c);
    }
}

/// The one-minute load average: the machine's other work, beside the figures.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().unwrap_or("?").to_string()
}

/// A pause before each row, so that the connections of the row before have closed.
const SETTLE: Duration = Duration::from_millis(300);

/// The rows of round `round`: every target at 1, then at 64 connections, and the whole
/// sequence reversed every other round (A B, B A, A B, ...), so that no target is always
/// measured first or right after the same other (a warm cache, a CPU's clock, the load
/// client's state): an even number of rounds gives each order equally often.
fn round_order(targets: &[Target], round: usize) -> Vec<(usize, &Target)> {
    let mut order: Vec<(usize, &Target)> =
        [1usize, 64].into_iter().flat_map(|c| targets.iter().map(move |t| (c, t))).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

fn tokend_bin() -> std::path::PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tokend");
    std::env::var_os("TOKEND_BIN").map_or(bin, Into::into)
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

#[derive(Clone, Copy)]
struct Load {
    p50: u64,
    p99: u64,
    rps: f64,
    /// The target's CPU time per request (its processes, user and system).
    cpu_us: f64,
}

fn median_load<'a>(loads: impl Iterator<Item = &'a Load>) -> Load {
    let loads: Vec<&Load> = loads.collect();
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Load {
        p50: mid(loads.iter().map(|l| l.p50 as f64).collect()) as u64,
        p99: mid(loads.iter().map(|l| l.p99 as f64).collect()) as u64,
        rps: mid(loads.iter().map(|l| l.rps).collect()),
        cpu_us: mid(loads.iter().map(|l| l.cpu_us).collect()),
    }
}

/// `conns` keep-alive connections, each sending requests back to back for `secs`.
async fn load(port: u16, conns: usize, secs: Duration) -> Load {
    let deadline = Instant::now() + secs;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut buf = Vec::with_capacity(4096);
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    exchange(&mut s, &mut buf).await;
                    lat.push(t.elapsed().as_micros() as u64);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    let rps = all.len() as f64 / secs.as_secs_f64();
    Load { p50: pct(0.50), p99: pct(0.99), rps, cpu_us: 0.0 }
}

/// One request on a keep-alive connection; the reply must be a 200 with a Content-Length.
async fn exchange(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET {PATH} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    buf.clear();
    loop {
        if let Some(len) = reply_len(buf)
            && buf.len() >= len
        {
            assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(buf));
            return;
        }
        let n = s.read_buf(buf).await.unwrap();
        assert!(n > 0, "connection closed before the reply");
    }
}

/// The whole reply's length once its head is in.
fn reply_len(reply: &[u8]) -> Option<usize> {
    let end = reply.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&reply[..end]).ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    Some(end + len)
}

/// Resident memory of `pids` before and after opening `IDLE` connections that stay open,
/// idle: after one request each (`used`, a keep-alive client between calls), or before any
/// (a client's pool opened ahead of use).
async fn idle_memory(port: u16, pids: &[u32], used: bool) -> i64 {
    let before: i64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let mut conns = Vec::new();
    for _ in 0..IDLE {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        if used {
            exchange(&mut s, &mut Vec::new()).await;
        }
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: i64 = pids.iter().map(|p| rss_kib(*p)).sum();
    drop(conns);
    after - before
}

/// Clock ticks per second in /proc (the kernel's USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU time (user and system, every thread's, in clock ticks) of `pids`: steadier than the
/// throughput on a shared machine, since a process is only charged while it runs.
fn cpu_ticks(pids: &[u32]) -> u64 {
    let ticks = |pid: &u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command's closing parenthesis: state first, utime and stime 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let field = |n| rest.split_whitespace().nth(n).and_then(|v| v.parse::<u64>().ok());
        field(11).unwrap_or(0) + field(12).unwrap_or(0)
    };
    pids.iter().map(ticks).sum()
}

fn rss_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn nginx_pids(master: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    std::iter::once(master)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The upstream: answers every request with 200 and a small JSON body.
async fn start_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app =
        axum::Router::new().fallback(|| async { axum::Json(serde_json::json!({"id": "100000"})) });
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a URL with a port")
}

async fn start_tokend(bin: &Path, dir: &Path, server: &str, upstream: &str, port: u16) -> Child {
    let d = dir.display();
    let config = format!(
        "[[token]]\nname = \"bench\"\nserver = \"{server}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = \"{DEFAULT_CLIENT_SECRET}\"\ngrant = \"jwt\"\njwt = \"{DEFAULT_JWT}\"\nstate_file = \"{d}/bench.state.json\"\n\n[[token.proxy]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n"
    );
    let path = dir.join("tokend.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    wait_port(port).await;
    child
}

async fn start_nginx(dir: &Path, upstream: &str, port: u16) -> Child {
    let d = dir.display();
    let up = upstream.trim_start_matches("http://");
    let conf = format!(
        "daemon off;\nworker_processes auto;\nworker_rlimit_nofile 8192;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n  upstream u {{ server {up}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://u;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Authorization \"Bearer fixed-token-for-the-benchmark\";\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .args(["-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian package nginx; scripts/bench-proxy installs it)");
    wait_port(port).await;
    child
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}
