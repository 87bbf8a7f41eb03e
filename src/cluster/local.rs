//! A throwaway etcd (one member, or a cluster of several) on free loopback ports, for tests and
//! benchmarks (tokend's own and yours): it needs the `etcd` binary on PATH (Debian
//! `etcd-server`). Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd member (a child process) with its data in a directory of the caller's.
pub struct LocalEtcd {
    child: Option<Child>,
    name: String,
    data: PathBuf,
    log: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .expect("etcd not found on PATH: install Debian etcd-server (scripts/test does)")
}

impl LocalEtcd {
    /// Starts a one-member etcd with its data in `dir` and waits until it answers.
    /// Panics when etcd is missing or does not start: tests must fail, not skip.
    pub async fn start(dir: &Path) -> Self {
        Self::start_cluster(dir, 1).await.pop().expect("one member")
    }

    /// Starts an `n`-member cluster (data and logs in `dir/etcd-m<i>`), and waits until every
    /// member answers a linearizable read, which needs the quorum.
    pub async fn start_cluster(dir: &Path, n: usize) -> Vec<Self> {
        let mut members: Vec<Self> = (0..n)
            .map(|i| Self {
                child: None,
                name: format!("m{i}"),
                data: dir.join(format!("etcd-m{i}")),
                log: dir.join(format!("etcd-m{i}.log")),
                client_port: free_port(),
                peer_port: free_port(),
                initial_cluster: String::new(),
            })
            .collect();
        let cluster: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        for m in &mut members {
            m.initial_cluster = cluster.join(",");
            m.spawn();
        }
        for m in &members {
            m.wait_healthy().await;
        }
        members
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(binary())
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    /// The client URL, for `[cluster] endpoints`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A client with a 2 s request timeout.
    pub async fn client(&self) -> etcd_client::Client {
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
        etcd_client::Client::connect([self.url()], Some(opts)).await.expect("etcd client")
    }

    async fn wait_healthy(&self) {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = etcd_client::Client::connect(
                [self.url()],
                Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500))),
            )
            .await
                && c.get("health", None).await.is_ok()
            {
                return;
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd did not start; its log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait: etcd is gone until `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the member keeps its sockets open and answers nothing (a hung host, a long GC
    /// pause, a stuck disk), which clients cannot tell from a slow member.
    pub fn freeze(&self) {
        self.kill("-STOP");
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self) {
        self.kill("-CONT");
    }

    fn kill(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// Starts again on the same ports and data.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_healthy().await;
    }

    /// The raw value of a key, if present.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut c = self.client().await;
        let r = c.get(key, None).await.expect("etcd get");
        r.kvs().first().map(|kv| kv.value().to_vec())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
