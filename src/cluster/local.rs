//! A throwaway etcd (one member, or a cluster of several) on free loopback ports, for tests and
//! benchmarks (tokend's own and yours): it needs the `etcd` binary on PATH (Debian
//! `etcd-server`). Killed on drop.

use crate::fake::TestTls;
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
    /// Client TLS (https, client certificates required), when started with it.
    tls: Option<TestTls>,
    /// Root's credentials once `enable_auth` has run: `client` then logs in as root.
    root: Option<(String, String)>,
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

    /// A one-member etcd that speaks https only and requires a client certificate signed by
    /// `tls.ca`.
    pub async fn start_tls(dir: &Path, tls: &TestTls) -> Self {
        Self::start_members(dir, 1, Some(tls)).await.pop().expect("one member")
    }

    /// Starts an `n`-member cluster (data and logs in `dir/etcd-m<i>`), and waits until every
    /// member answers a linearizable read, which needs the quorum.
    pub async fn start_cluster(dir: &Path, n: usize) -> Vec<Self> {
        Self::start_members(dir, n, None).await
    }

    async fn start_members(dir: &Path, n: usize, tls: Option<&TestTls>) -> Vec<Self> {
        // A free port is only free until someone else binds it: tests run in parallel, so a
        // member that finds its port taken is started again on new ports (a few times).
        for attempt in 1.. {
            let mut members = Self::members(dir, n, tls);
            for m in &mut members {
                m.spawn();
            }
            let mut taken = false;
            for m in &mut members {
                taken |= !m.wait_healthy().await;
            }
            if !taken {
                return members;
            }
            drop(members);
            assert!(attempt < 5, "etcd found its ports taken {attempt} times");
            for i in 0..n {
                let _ = std::fs::remove_dir_all(dir.join(format!("etcd-m{i}")));
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn members(dir: &Path, n: usize, tls: Option<&TestTls>) -> Vec<Self> {
        let mut members: Vec<Self> = (0..n)
            .map(|i| Self {
                child: None,
                name: format!("m{i}"),
                data: dir.join(format!("etcd-m{i}")),
                log: dir.join(format!("etcd-m{i}.log")),
                client_port: free_port(),
                peer_port: free_port(),
                initial_cluster: String::new(),
                tls: tls.cloned(),
                root: None,
            })
            .collect();
        let cluster: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        for m in &mut members {
            m.initial_cluster = cluster.join(",");
        }
        members
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(binary());
        if let Some(t) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
        }
        let child = cmd
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Connect options with this request timeout, TLS and root's login as the member needs.
    fn options(&self, timeout: Duration) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new().with_timeout(timeout);
        if let Some(t) = &self.tls {
            let pem = |p: &Path| std::fs::read(p).unwrap();
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem(&t.ca)))
                    .identity(etcd_client::Identity::from_pem(pem(&t.cert), pem(&t.key))),
            );
        }
        if let Some((user, password)) = &self.root {
            o = o.with_user(user, password);
        }
        o
    }

    /// A client with a 2 s request timeout.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], Some(self.options(Duration::from_secs(2))))
            .await
            .expect("etcd client")
    }

    /// Turns on etcd's authentication, with `user`/`password` allowed to read and write only
    /// the keys under `prefix` (what a production tokend user should get), and a root user
    /// that this handle's own `client` uses from now on.
    pub async fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) {
        use etcd_client::Permission;
        let mut c = self.client().await;
        let root_pw = format!("root-{}", std::process::id());
        c.user_add("root", root_pw.as_str(), None).await.expect("add root");
        c.user_grant_role("root", "root").await.expect("root role");
        c.role_add("tokend").await.expect("add role");
        c.role_grant_permission("tokend", Permission::read_write(prefix).with_prefix())
            .await
            .expect("grant");
        c.user_add(user, password, None).await.expect("add user");
        c.user_grant_role(user, "tokend").await.expect("user role");
        c.auth_enable().await.expect("enable auth");
        self.root = Some(("root".into(), root_pw));
    }

    /// Waits until the member answers; false when it exited because its port was taken
    /// (the caller starts it again on new ports). Panics on any other failure to start.
    async fn wait_healthy(&mut self) -> bool {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = etcd_client::Client::connect(
                [self.url()],
                Some(self.options(Duration::from_millis(500))),
            )
            .await
                && c.get("health", None).await.is_ok()
            {
                return true;
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let exited =
                self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()));
            if exited && log.contains("address already in use") {
                let _ = std::fs::remove_file(&self.log);
                return false;
            }
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
        assert!(self.wait_healthy().await, "etcd's port was taken while it was stopped");
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
