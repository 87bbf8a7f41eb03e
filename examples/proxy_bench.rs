//! The local API proxy beside nginx (a reverse proxy adding a fixed header to the same upstream):
//! added latency p50/p99 at 1 and 64 connections, throughput, memory per 1,000 idle connections.
//!
//!   scripts/bench-proxy            # installs nginx (Debian package) when missing, then runs this
//!
//! The upstream is a minimal HTTP server in this process answering 200 at once, so what is
//! measured is the proxies. Prints one table with ratios to nginx; the README quotes the last run.
#![allow(clippy::too_many_lines, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokend::fake::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWT, FakeConfig, FakeServer};

const RUN: Duration = Duration::from_secs(5);
const IDLE: usize = 1000;

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_upstream().await;
    let fake = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let tokend_port = free_port();
    let nginx_port = free_port();
    let mut tokend = start_tokend(dir.path(), &fake.url(), &upstream, tokend_port).await;
    let mut nginx = start_nginx(dir.path(), &upstream, nginx_port).await;
    let targets = [
        ("direct (floor)", upstream.clone()),
        ("nginx", format!("http://127.0.0.1:{nginx_port}")),
        ("tokend", format!("http://127.0.0.1:{tokend_port}")),
    ];
    println!("proxy benchmark: GET with a small reply, {RUN:?} per row, loopback, this machine");
    println!("{:<16} {:>6} {:>10} {:>10} {:>12}", "target", "conns", "p50 us", "p99 us", "req/s");
    let mut rows = Vec::new();
    for conns in [1usize, 64] {
        for (name, url) in &targets {
            let r = load(url, conns).await;
            println!("{name:<16} {conns:>6} {:>10} {:>10} {:>12.0}", r.p50, r.p99, r.rps);
            rows.push((*name, conns, r));
        }
    }
    println!("\nadded latency over direct, and ratios tokend/nginx:");
    for conns in [1usize, 64] {
        let get = |n: &str| &rows.iter().find(|(name, c, _)| *name == n && *c == conns).unwrap().2;
        let (d, n, t) = (get("direct (floor)"), get("nginx"), get("tokend"));
        let added = |x: &Load| (x.p50.saturating_sub(d.p50), x.p99.saturating_sub(d.p99));
        let (n50, n99) = added(n);
        let (t50, t99) = added(t);
        println!(
            "{conns:>3} conns: added p50 nginx {n50} us, tokend {t50} us ({:.2}x); added p99 nginx {n99} us, tokend {t99} us ({:.2}x); throughput tokend/nginx {:.2}x",
            ratio(t50, n50),
            ratio(t99, n99),
            t.rps / n.rps
        );
    }
    let nginx_pids = nginx_pids(nginx.id());
    let t_mem = idle_memory(tokend_port, &[tokend.id()]).await;
    let n_mem = idle_memory(nginx_port, &nginx_pids).await;
    println!(
        "memory per {IDLE} idle client connections: nginx {n_mem} KiB, tokend {t_mem} KiB ({:.2}x)",
        t_mem as f64 / n_mem.max(1) as f64
    );
    stop(&mut tokend);
    stop(&mut nginx);
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

struct Load {
    p50: u64,
    p99: u64,
    rps: f64,
}

/// `conns` keep-alive connections, each sending requests back to back for `RUN`.
async fn load(url: &str, conns: usize) -> Load {
    let url = format!("{url}/restapi/v1.0/account/~/extension/~");
    let deadline = Instant::now() + RUN;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let resp = client.get(&url).send().await.expect("request");
                    assert!(resp.status().is_success(), "{}", resp.status());
                    resp.bytes().await.unwrap();
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
    Load { p50: pct(0.50), p99: pct(0.99), rps: all.len() as f64 / RUN.as_secs_f64() }
}

/// Resident memory of `pids` before and after opening `IDLE` connections that each made one
/// request and then stay open, idle.
async fn idle_memory(port: u16, pids: &[u32]) -> i64 {
    let before: i64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let mut conns = Vec::new();
    for _ in 0..IDLE {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        one_request(&mut s).await;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: i64 = pids.iter().map(|p| rss_kib(*p)).sum();
    drop(conns);
    after - before
}

async fn one_request(s: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /restapi/v1.0/account/~/extension/~ HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    // The upstream's reply is small and has a Content-Length: read until the body is in.
    while !complete(&got) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the reply");
        got.extend_from_slice(&buf[..n]);
    }
}

fn complete(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= len
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

async fn start_tokend(dir: &Path, server: &str, upstream: &str, port: u16) -> Child {
    let d = dir.display();
    let config = format!(
        "[[token]]\nname = \"bench\"\nserver = \"{server}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = \"{DEFAULT_CLIENT_SECRET}\"\ngrant = \"jwt\"\njwt = \"{DEFAULT_JWT}\"\nstate_file = \"{d}/bench.state.json\"\n\n[[token.proxy]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n"
    );
    let path = dir.join("tokend.toml");
    std::fs::write(&path, config).unwrap();
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tokend");
    let bin = std::env::var_os("TOKEND_BIN").map_or(bin, Into::into);
    let child = Command::new(&bin)
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
