//! Multi-host mode: several real `tokend run` processes, a real etcd (one member, or three),
//! the fake server.
//! Each host has its own directory (state file, sinks, status), as separate machines would.

use crate::etcd_relay::{Relay, Trigger};
use crate::harness::{Daemon, TokenSpec, World, wait_for, wait_until};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokend::cluster::{LocalEtcd as Etcd, TestTls};
use tokend::fake::{FakeConfig, GrantKind};
use tokend::store::{State, Status};

const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Host {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    daemon: Option<Daemon>,
    /// `[metrics] listen` port: `/metrics` and `/healthz`.
    metrics: u16,
}

impl Host {
    /// `/healthz`: the status code and the body (the problems, one a line).
    async fn health(&self) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}/healthz", self.metrics);
        let Ok(r) = reqwest::get(url).await else { return (0, String::new()) };
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// Waits until `tokend_needs_login` says `yes`.
    async fn wait_needs_login(&self, yes: bool) {
        let want = f64::from(u8::from(yes));
        let series = "tokend_needs_login{token=\"main\"}";
        wait_for(&format!("{} needs login: {yes}", self.name), Duration::from_secs(10), || async {
            self.metric(series).await == Some(want)
        })
        .await;
    }

    /// One series of `/metrics`, e.g. `tokend_needs_login{token="main"}`.
    async fn metric(&self, series: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
    }

    fn status(&self) -> Option<Status> {
        Status::load(&self.dir.join("main.state.json"))
    }

    fn role(&self) -> String {
        self.status().and_then(|s| s.cluster).map(|c| c.role).unwrap_or_default()
    }

    fn etcd_reachable(&self) -> Option<bool> {
        self.status().and_then(|s| s.cluster).map(|c| c.etcd_reachable)
    }

    fn sink(&self) -> Option<tokend::store::SinkDoc> {
        let bytes = std::fs::read(self.dir.join("main.json")).ok()?;
        Some(serde_json::from_slice(&bytes).expect("json sink always parses"))
    }

    fn generation(&self) -> u64 {
        self.sink().map_or(0, |s| s.generation)
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    fn alive(&self) -> bool {
        self.daemon.is_some()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Fleet {
    w: World,
    /// The etcd members; `etcd[0]` is the only one unless started with several.
    etcd: Vec<Etcd>,
    /// Host `i` reaches etcd through `relays[i]`, when the fleet was started `relayed`.
    relays: Vec<Relay>,
    hosts: Vec<Host>,
}

impl Fleet {
    /// `n` hosts sharing token "main" through a one-member etcd with this lease TTL and schedule.
    async fn start(n: usize, ttl_secs: u64, schedule: &str, cluster_extra: &str) -> Self {
        Self::start_on(1, n, ttl_secs, schedule, cluster_extra).await
    }

    /// The same on an etcd of `members` members. Host `i` lists every member, starting with
    /// member `i`: each host prefers its own, as a host with a local member would.
    async fn start_on(
        members: usize,
        n: usize,
        ttl_secs: u64,
        schedule: &str,
        cluster_extra: &str,
    ) -> Self {
        let w = World::new().await;
        let etcd = Etcd::start_cluster(w.dir.path(), members).await;
        Self::on(w, etcd, n, ttl_secs, TokenSpec::new("main").schedule(schedule), cluster_extra)
            .await
    }

    /// `n` hosts on this world and these etcd members (host `i` prefers member `i`), sharing
    /// the token `spec` (named "main").
    async fn on(
        w: World,
        etcd: Vec<Etcd>,
        n: usize,
        ttl_secs: u64,
        spec: TokenSpec,
        cluster_extra: &str,
    ) -> Self {
        Self::build(w, etcd, Vec::new(), n, ttl_secs, spec, cluster_extra).await
    }

    /// `n` hosts on a one-member etcd, each through its own relay (which can lose a reply).
    async fn relayed(n: usize, ttl_secs: u64, schedule: &str) -> Self {
        Self::relayed_with(n, ttl_secs, TokenSpec::new("main").schedule(schedule)).await
    }

    /// The same, sharing the token `spec` (named "main").
    async fn relayed_with(n: usize, ttl_secs: u64, spec: TokenSpec) -> Self {
        let w = World::new().await;
        let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
        let mut relays = Vec::new();
        for _ in 0..n {
            relays.push(Relay::start(&etcd[0].url()).await);
        }
        Self::build(w, etcd, relays, n, ttl_secs, spec, "").await
    }

    async fn build(
        w: World,
        etcd: Vec<Etcd>,
        relays: Vec<Relay>,
        n: usize,
        ttl_secs: u64,
        spec: TokenSpec,
        cluster_extra: &str,
    ) -> Self {
        let members = etcd.len();
        let mut hosts = Vec::new();
        for i in 0..n {
            let name = format!("h{i}");
            let dir = w.path(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let spec = spec.clone().extra("jitter = \"0s\"");
            let endpoints: Vec<String> = match relays.get(i) {
                Some(relay) => vec![format!("\"{}\"", relay.url())],
                None => {
                    (0..members).map(|m| format!("\"{}\"", etcd[(i + m) % members].url())).collect()
                }
            };
            let cluster = format!(
                "[cluster]\nendpoints = [{}]\nprefix = \"/t\"\nlease_ttl = \"{ttl_secs}s\"\nnode = \"{name}\"\n{cluster_extra}\n",
                endpoints.join(", ")
            );
            let config = dir.join("config.toml");
            let metrics = free_port();
            let prelude = format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n{cluster}");
            std::fs::write(&config, format!("{prelude}\n{}", spec.toml(&w.server.url(), &dir)))
                .unwrap();
            hosts.push(Host { name, dir, config, daemon: None, metrics });
        }
        let mut fleet = Self { w, etcd, relays, hosts };
        for i in 0..n {
            fleet.start_host(i).await;
        }
        fleet
    }

    async fn start_host(&mut self, i: usize) {
        let d = self.w.daemon_on(&self.hosts[i].config, &[], "");
        d.wait_ready().await;
        self.hosts[i].daemon = Some(d);
    }

    fn live(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.alive())
    }

    /// Waits until exactly one live host says it leads; returns its index.
    async fn leader(&self, timeout: Duration) -> usize {
        wait_until("exactly one leader", timeout, || {
            self.live().filter(|h| h.role() == "leader").count() == 1
        })
        .await;
        self.hosts.iter().position(|h| h.alive() && h.role() == "leader").unwrap()
    }

    /// Waits until every live host's sink carries generation `g` or later, all the same.
    async fn converged(&self, g: u64, timeout: Duration) -> u64 {
        wait_until(&format!("every host at generation >= {g}"), timeout, || {
            let gens: Vec<u64> = self.live().map(Host::generation).collect();
            gens.iter().all(|&x| x >= g && x == gens[0])
        })
        .await;
        self.live().next().unwrap().generation()
    }

    fn logs(&self, needle: &str) -> usize {
        self.hosts.iter().filter_map(|h| h.daemon.as_ref()).map(|d| d.count(needle)).sum()
    }

    fn dump(&self) -> String {
        self.hosts
            .iter()
            .filter_map(|h| h.daemon.as_ref().map(|d| format!("--- {}\n{}", h.name, d.output())))
            .collect()
    }

    /// The token the host publishes is live at the fake server. A refresh (ticks may be
    /// running) kills the previous token at once, so a refused token only fails the check
    /// if the host does not move on to a newer generation within a few seconds. The token and
    /// its generation come from one file (the json sink): the raw sink is written just after
    /// the json one, so reading the generation from one and the token from the other saw a
    /// new generation with the previous token.
    async fn api_accepts(&self, h: &Host) -> bool {
        let api = format!("{}/restapi/v1.0/account/~/extension/~", self.w.server.url());
        for _ in 0..5 {
            let Some(sink) = h.sink() else { return false };
            let r = reqwest::Client::new().get(&api).bearer_auth(&sink.access_token).send().await;
            let r = r.unwrap();
            if r.status() == 200 {
                return true;
            }
            eprintln!(
                "{}: generation {} token {} refused: {} {}",
                h.name,
                sink.generation,
                tokend::secret::fingerprint(&sink.access_token),
                r.status(),
                r.text().await.unwrap_or_default()
            );
            let start = Instant::now();
            while h.generation() == sink.generation {
                if start.elapsed() > Duration::from_secs(5) {
                    self.diagnose();
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.diagnose();
        false
    }

    /// What each host holds, by fingerprint, and the server's counts: for a failed check.
    fn diagnose(&self) {
        let fp = |t: &str| tokend::secret::fingerprint(t.trim());
        for h in self.live() {
            let sink = h.sink().map(|s| (s.generation, fp(&s.access_token)));
            let raw = std::fs::read_to_string(h.dir.join("main.raw")).map(|t| fp(&t)).ok();
            let state = State::load(&h.dir.join("main.state.json")).ok().flatten();
            let state = state.map(|s| (s.generation, s.access_token.fingerprint()));
            eprintln!("{}: json {sink:?} raw {raw:?} state {state:?}", h.name);
        }
        eprintln!("{:?}", self.w.stats());
    }

    /// No login beyond the first, no refresh refused, across everything.
    fn assert_clean(&self) {
        let stats = self.w.stats();
        assert_eq!(stats.sessions_created, 1, "an extra login: {stats:?}\n{}", self.dump());
        assert!(stats.rejected.is_empty(), "a refresh was refused: {stats:?}\n{}", self.dump());
    }
}

#[tokio::test]
async fn three_hosts_one_refresher_same_token_everywhere() {
    // Ticks every 2 s; the stored values are sealed with a key.
    let f = Fleet::start(3, 2, "*/2 * * * * *", &format!("encryption_key = \"{KEY_B64}\"")).await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let start_gen = f.converged(1, Duration::from_secs(10)).await;
    // Ten periods: every tick is one refresh by one host, mirrored everywhere.
    let g = f.converged(start_gen + 10, Duration::from_secs(40)).await;
    let stats = f.w.stats();
    // Each generation after the first is exactly one rotation: nobody refreshed twice.
    assert!(stats.refreshes >= g - 1 && stats.refreshes <= g, "{stats:?} at generation {g}");
    assert_eq!(stats.grace_replays, 0);
    let published = f.logs("refreshed and published to etcd");
    let by_leader = f.hosts[leader].daemon().count("refreshed and published to etcd");
    assert_eq!(published, by_leader, "a follower refreshed:\n{}", f.dump());
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused", h.name);
        let state = State::load(&h.dir.join("main.state.json")).unwrap().unwrap();
        assert!(state.generation >= g);
    }
    // Sealed in etcd: no token in the stored bytes.
    let raw = f.etcd[0].get("/t/main/pair").await.expect("pair stored");
    let token = std::fs::read_to_string(f.hosts[0].dir.join("main.raw")).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("A256GCM") && !text.contains(token.trim()), "pair is not sealed");
    f.assert_clean();
}

#[tokio::test]
async fn kill_9_of_the_leader_fails_over_within_the_ttl_without_a_login() {
    let ttl = 2;
    let mut f = Fleet::start(3, ttl, "0 0 0 1 1 *", "").await;
    let old = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    f.hosts[old].daemon().signal(libc::SIGKILL);
    let killed = Instant::now();
    f.hosts[old].daemon = None;
    let new = f.leader(Duration::from_secs(ttl + 5)).await;
    let took = killed.elapsed();
    eprintln!("failover after kill -9: {} ms (lease TTL {ttl} s)", took.as_millis());
    assert_ne!(new, old);
    assert!(took < Duration::from_secs(ttl + 1), "failover took {took:?}\n{}", f.dump());
    // The new leader refreshes from the stored refresh token: no login.
    f.hosts[new].daemon().signal(libc::SIGUSR1);
    f.converged(g + 1, Duration::from_secs(10)).await;
    f.assert_clean();
    // The killed host comes back as a follower and catches up.
    f.start_host(old).await;
    f.converged(g + 1, Duration::from_secs(10)).await;
    assert_eq!(f.leader(Duration::from_secs(5)).await, new);
    f.assert_clean();
}

#[tokio::test]
async fn a_paused_leaders_late_write_is_rejected_by_the_fence() {
    let ttl = 2;
    let mut f = Fleet::start(3, ttl, "0 0 0 1 1 *", "").await;
    let old = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    // The server rotates the pair, then holds the reply while the leader is frozen.
    f.w.server.inject("commit_then_hang,ms=4000".parse().unwrap());
    f.hosts[old].daemon().signal(libc::SIGUSR1);
    let asked = Instant::now();
    while f.etcd[0].get("/t/main/intent").await.is_none() {
        assert!(asked.elapsed() < Duration::from_secs(10), "no intent record:\n{}", f.dump());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until("the request to reach the server", Duration::from_secs(10), || {
        f.w.stats().faults_injected == 1
    })
    .await;
    f.hosts[old].daemon().signal(libc::SIGSTOP);
    // The next leader's replay is held too, so when the old leader wakes the pair in etcd is
    // still the one it read: only the fence (its election key is gone) can stop its write.
    f.w.server.inject("hang,ms=8000".parse().unwrap());
    wait_until("a new leader replaying the intent", Duration::from_secs(ttl + 10), || {
        f.w.stats().faults_injected == 2
    })
    .await;
    // (The frozen host's status file still says "leader": it cannot write.)
    let new = (0..f.hosts.len()).find(|&i| i != old && f.hosts[i].role() == "leader");
    assert!(new.is_some(), "the replay came from no leader:\n{}", f.dump());
    assert_eq!(f.hosts[new.unwrap()].generation(), g, "the replay is still held");
    let published = f.hosts[old].daemon().count("refreshed and published");
    f.hosts[old].daemon().signal(libc::SIGCONT);
    f.hosts[old]
        .daemon()
        .wait_log("the fence rejected publishing", 1, Duration::from_secs(15))
        .await;
    assert_eq!(f.hosts[old].daemon().count("refreshed and published"), published, "{}", f.dump());
    // The new leader's replay returns the same pair from the grace window and lands.
    let g2 = f.converged(g + 1, Duration::from_secs(20)).await;
    assert_eq!(g2, g + 1, "{}", f.dump());
    assert_eq!(f.w.stats().grace_replays, 1, "{:?}", f.w.stats());
    assert_ne!(f.leader(Duration::from_secs(10)).await, old);
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    f.assert_clean();
    f.hosts[old].daemon = None;
}

/// etcd applies the leader's publishing transaction but its reply is lost (the leader's relay
/// swallows it and resets the connection). The retry's comparison then fails on the leader's
/// own write: the leader used to take that for another writer, give up leading and campaign
/// again, its policy and status never told of the refresh. It reads the pair back, finds the
/// one it wrote, and goes on leading. Only the publishing transaction carries the pair and the
/// intent keys without the budget's (the intent's own write and every read carry it too).
#[tokio::test]
async fn a_lost_reply_to_the_leaders_publish_is_not_taken_for_another_writer() {
    let f = Fleet::relayed(3, 2, "0 0 0 1 1 *").await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    let d = f.hosts[leader].daemon();
    let success_before = f.hosts[leader].status().and_then(|s| s.last_success_at);
    f.relays[leader].arm(Trigger::new(&["/t/main/pair", "/t/main/intent"], &["/t/main/budget"]));
    d.signal(libc::SIGUSR1);
    wait_until("etcd's reply to the publish to be lost", Duration::from_secs(15), || {
        f.relays[leader].lost() == 1
    })
    .await;
    wait_until("the leader to settle the publish", Duration::from_secs(15), || {
        d.count("refreshed and published to etcd") == 2 || d.count("changed under this leader") > 0
    })
    .await;
    assert_eq!(d.count("changed under this leader"), 0, "its own write:\n{}", f.dump());
    assert!(d.count("cannot write to etcd") > 0, "no reply was lost:\n{}", f.dump());
    assert_eq!(d.count("but etcd holds it"), 1, "{}", f.dump());
    assert_eq!(f.converged(g + 1, Duration::from_secs(10)).await, g + 1, "{}", f.dump());
    assert_eq!(f.leader(Duration::from_secs(5)).await, leader);
    assert_eq!(d.count("no longer the leader"), 0, "{}", f.dump());
    assert!(f.etcd[0].get("/t/main/intent").await.is_none(), "the intent outlived its publish");
    // The status file is written (durably) just after the log line.
    wait_until("the leader's status to show the refresh", Duration::from_secs(10), || {
        f.hosts[leader].status().and_then(|s| s.last_success_at) > success_before
    })
    .await;
    let stats = f.w.stats();
    assert_eq!((stats.refreshes, stats.grace_replays), (1, 0), "{stats:?}\n{}", f.dump());
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    f.assert_clean();
}

/// The leader adopts a `tokend login` forwarded through etcd, and etcd applies the write (the
/// pair, and the hand-off key deleted) but its reply is lost. The leader used to count it as not
/// written: no hand-off came again, so it went on needing a login that was in etcd, and never
/// refreshed it (an access token lives an hour). It reads the pair back and finds its write.
/// Only that write carries the pair and hand-off keys without the budget's.
#[tokio::test]
async fn a_lost_reply_to_adopting_a_forwarded_login_does_not_leave_the_leader_waiting() {
    let spec =
        TokenSpec::new("main").schedule("0 0 0 1 1 *").grant("grant = \"authorization_code\"");
    let f = Fleet::relayed_with(2, 2, spec).await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let follower = 1 - leader;
    let d = f.hosts[leader].daemon();
    d.wait_log("needs login", 1, Duration::from_secs(10)).await;
    f.relays[leader].arm(Trigger::new(&["/t/main/pair", "/t/main/handoff"], &["/t/main/budget"]));
    let (child, url) = crate::login::start_login_on(&f.hosts[follower].config, "main", &[]).await;
    reqwest::get(&url).await.unwrap();
    crate::login::finish(child).await;
    let wait = Duration::from_secs(15);
    wait_until("the adopting write's reply to be lost", wait, || f.relays[leader].lost() == 1)
        .await;
    let g = f.converged(1, wait).await;
    let series = "tokend_needs_login{token=\"main\"}";
    let cleared = tokio::time::timeout(wait, async {
        while f.hosts[leader].metric(series).await != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(cleared.await.is_ok(), "the leader waits for a stored login:\n{}", f.dump());
    assert_eq!(d.count("etcd holds it"), 1, "{}", f.dump());
    d.signal(libc::SIGUSR1);
    f.converged(g + 1, wait).await;
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    assert_eq!(f.leader(Duration::from_secs(5)).await, leader, "{}", f.dump());
    f.assert_clean();
}

/// etcd closes a connection (GOAWAY "too_many_pings", at the third offence) on which the
/// client pings more often than `--grpc-keepalive-min-time` (5 s by default) or pings with no
/// request open. tokend pinged every 2 s, idle or not: etcd closed its request connection about
/// 8 s after each use (a request sent just then failed, perhaps applied with its reply lost,
/// as above) and, with a lease TTL of 20 s or more, the keep-alive and watch connection too
/// ("etcd is unreachable" every 8 s). An idle host now gets no GOAWAY. The window is an
/// observation, twice the 8 s after which it came; no ping at all goes out on an idle request
/// connection now, so the pass does not depend on the machine's speed.
#[tokio::test]
async fn etcd_does_not_close_an_idle_hosts_connections_for_its_pings() {
    let f = Fleet::relayed(1, 60, "0 0 0 1 1 *").await;
    f.leader(Duration::from_secs(10)).await;
    f.converged(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(f.relays[0].goaways(), 0, "etcd closed a connection:\n{}", f.dump());
    assert_eq!(f.logs("etcd is unreachable"), 0, "{}", f.dump());
}

/// Issue 14: the leader follows the provider's replay rule as one host does. Auth0 revokes
/// the whole family when a rotated-away refresh token is presented again; the leader dies
/// while the server holds a refresh it has already committed, so the intent's refresh token
/// is spent. The next leader must not send it: it logs in again (password grant, a new
/// session). It used to replay it regardless of provider: the family revoked, a refused token.
#[tokio::test]
async fn a_crashed_leaders_refresh_is_not_replayed_where_reuse_revokes_the_family() {
    let mut fake = FakeConfig::for_tests().with_provider("auth0").expect("auth0");
    fake.apps[0].grants.push(GrantKind::Password);
    let w = World::with(fake).await;
    let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
    let spec = TokenSpec::new("main")
        .grant("grant = \"password\"\nusername = \"user0\"\npassword = \"password0\"")
        .extra("provider = \"auth0\"")
        .extra(&format!("token_url = \"{}/restapi/oauth/token\"", w.server.url()));
    let ttl = 2;
    let mut f = Fleet::on(w, etcd, 2, ttl, spec, "").await;
    let old = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    f.w.server.inject("commit_then_hang,ms=8000".parse().unwrap());
    f.hosts[old].daemon().signal(libc::SIGUSR1);
    wait_until("the refresh to reach the server", Duration::from_secs(10), || {
        f.w.stats().faults_injected == 1
    })
    .await;
    assert!(f.etcd[0].get("/t/main/intent").await.is_some(), "no intent:\n{}", f.dump());
    f.hosts[old].daemon().signal(libc::SIGKILL);
    f.hosts[old].daemon = None;
    let new = f.leader(Duration::from_secs(ttl + 5)).await;
    f.converged(g + 1, Duration::from_secs(15)).await;
    let stats = f.w.stats();
    assert_eq!(
        stats.family_revocations,
        0,
        "the spent token was replayed: {stats:?}\n{}",
        f.dump()
    );
    assert_eq!(stats.reuses, 0, "{stats:?}");
    assert!(stats.rejected.is_empty(), "a token was refused: {stats:?}");
    assert_eq!(stats.sessions_created, 2, "the first login and the new leader's: {stats:?}");
    assert!(f.hosts[new].daemon().count("does not allow replaying it now; logging in") > 0);
    assert!(f.api_accepts(&f.hosts[new]).await, "{}", f.dump());
}

#[tokio::test]
async fn etcd_down_hosts_keep_serving_then_resume() {
    let mut f = Fleet::start(2, 2, "0 0 0 1 1 *", "").await;
    f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    let refreshes = f.w.stats().refreshes;
    f.etcd[0].stop();
    wait_until("both hosts to notice etcd is gone", Duration::from_secs(20), || {
        f.hosts.iter().all(|h| h.etcd_reachable() == Some(false))
    })
    .await;
    wait_until("nobody to lead", Duration::from_secs(10), || {
        f.hosts.iter().all(|h| h.role() != "leader")
    })
    .await;
    for h in &f.hosts {
        h.daemon().signal(libc::SIGUSR1);
        assert!(f.api_accepts(h).await, "{} stopped serving", h.name);
        assert_eq!(h.generation(), g);
        let out = crate::harness::tokend(&["status", "--config", h.config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("etcd unreachable"), "status does not say so:\n{text}");
    }
    assert_eq!(f.w.stats().refreshes, refreshes, "someone refreshed without etcd");
    f.etcd[0].restart().await;
    let leader = f.leader(Duration::from_secs(20)).await;
    wait_until("both hosts to see etcd again", Duration::from_secs(20), || {
        f.hosts.iter().all(|h| h.etcd_reachable() == Some(true))
    })
    .await;
    f.hosts[leader].daemon().signal(libc::SIGUSR1);
    f.converged(g + 1, Duration::from_secs(15)).await;
    f.assert_clean();
}

#[tokio::test]
async fn a_frozen_etcd_member_is_left_for_a_live_one() {
    // Three etcd members, two hosts, each preferring a different member; ticks every 2 s.
    let f = Fleet::start_on(3, 2, 2, "*/2 * * * * *", "").await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    // Freeze the leader's member: it keeps its connections open and answers nothing, so the
    // client library would wait on it forever. Two members still make a quorum.
    f.etcd[leader].freeze();
    let frozen = Instant::now();
    f.hosts[leader].daemon().wait_log("trying the next endpoint", 1, Duration::from_secs(20)).await;
    // Refreshing goes on, and every host (the one that was on the frozen member too) follows.
    f.converged(g + 1, Duration::from_secs(40)).await;
    eprintln!(
        "frozen member: every host at a new generation {} ms later",
        frozen.elapsed().as_millis()
    );
    let g2 = f.converged(g + 3, Duration::from_secs(40)).await;
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    f.etcd[leader].thaw();
    f.converged(g2 + 1, Duration::from_secs(20)).await;
    f.assert_clean();
}

#[tokio::test]
async fn tls_and_auth_with_a_role_limited_to_the_prefix() {
    // etcd as production should run it: https only, client certificates required, and
    // authentication on, with tokend's user allowed nothing outside its prefix.
    let w = World::new().await;
    let tls = TestTls::generate(w.dir.path());
    let mut etcd = Etcd::start_tls(w.dir.path(), &tls).await;
    let password = "etcd-pw-7d1c0f3e";
    etcd.enable_auth("tokend", password, "/t/").await;
    let pw_file = w.path("etcd_password");
    std::fs::write(&pw_file, password).unwrap();
    let files = format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nusername = \"tokend\"\n",
        tls.ca, tls.cert, tls.key
    );
    let extra = format!("{files}password = {{ file = {pw_file:?} }}\n");
    let spec = TokenSpec::new("main").schedule("0 0 0 1 1 *");
    let mut f = Fleet::on(w, vec![etcd], 2, 2, spec, &extra).await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    f.hosts[leader].daemon().signal(libc::SIGUSR1);
    f.converged(g + 1, Duration::from_secs(10)).await;
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused", h.name);
    }
    f.assert_clean();
    // A host with the wrong password is refused by etcd and says why.
    let dir = f.w.path("h2");
    let metrics = free_port();
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(&f.hosts[0].config).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(pw_file.with_extension("wrong"), "not-the-password").unwrap();
    let text = text
        .replace(pw_file.to_str().unwrap(), pw_file.with_extension("wrong").to_str().unwrap())
        .replace(f.hosts[0].dir.to_str().unwrap(), dir.to_str().unwrap())
        .replace("node = \"h0\"", "node = \"h2\"")
        .replace(&format!("127.0.0.1:{}\"", f.hosts[0].metrics), &format!("127.0.0.1:{metrics}\""));
    std::fs::write(&config, text).unwrap();
    let d = f.w.daemon_on(&config, &[], "");
    // Said once etcd answers, even where a first try timed out (a loaded machine) and the
    // outage was logged before the reason was known.
    let refuses = "etcd is unreachable: it refuses tokend's login";
    d.wait_log(refuses, 1, Duration::from_secs(20)).await;
    let line = d.output().lines().find(|l| l.contains(refuses)).unwrap().to_string();
    assert!(line.contains("authentication failed"), "the reason is not named: {line}");
    assert!(line.contains("check [cluster] username and password"), "no hint: {line}");
    // No password, right or wrong, appears in any host's output.
    for out in f.hosts.iter().map(|h| h.daemon().output()).chain([d.output()]) {
        assert!(!out.contains(password) && !out.contains("not-the-password"), "{out}");
    }
    f.hosts.push(Host { name: "h2".into(), dir, config, daemon: Some(d), metrics });
    assert_eq!(f.leader(Duration::from_secs(5)).await, leader);
    f.assert_clean();
}

#[tokio::test]
async fn a_new_leader_honours_the_last_leaders_retry_after() {
    // RingCentral restarts a 429's penalty on every request made during it, so a new leader
    // must not replay at once when the last one was told to wait.
    let ttl = 2;
    let wait = 8;
    let mut f = Fleet::start(2, ttl, "0 0 0 1 1 *", "").await;
    let old = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    f.w.server.inject(format!("status429,retry_after={wait}").parse().unwrap());
    f.hosts[old].daemon().signal(libc::SIGUSR1);
    wait_until("the 429", Duration::from_secs(10), || f.w.stats().faults_injected == 1).await;
    let told = Instant::now();
    let requests = f.w.stats().token_requests;
    // The leader stores the Retry-After in etcd; then it dies before it may retry.
    let stored = Instant::now();
    loop {
        let raw = f.etcd[0].get("/t/main/budget").await.unwrap_or_default();
        let budget: Option<tokend::cluster::Budget> = serde_json::from_slice(&raw).ok();
        if budget.is_some_and(|b| b.not_before.is_some()) {
            break;
        }
        assert!(stored.elapsed() < Duration::from_secs(5), "no Retry-After stored:\n{}", f.dump());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f.hosts[old].daemon().signal(libc::SIGKILL);
    f.hosts[old].daemon = None;
    let new = f.leader(Duration::from_secs(ttl + 5)).await;
    f.hosts[new]
        .daemon()
        .wait_log("the server told the last leader to wait", 1, Duration::from_secs(5))
        .await;
    // The intent the dead leader left is replayed, but only once the Retry-After is over.
    wait_until("the replay", Duration::from_secs(wait + 10), || {
        f.w.stats().token_requests > requests
    })
    .await;
    let after = told.elapsed();
    eprintln!(
        "new leader's first request {} ms after the 429 (Retry-After {wait} s)",
        after.as_millis()
    );
    assert!(after >= Duration::from_millis(wait * 1000 - 500), "sent {after:?} after the 429");
    f.converged(g + 1, Duration::from_secs(10)).await;
    f.assert_clean();
}

#[tokio::test]
async fn tokend_login_on_a_follower_reaches_the_leader() {
    // An authorization_code token cannot log in by itself: the operator runs `tokend login`
    // on whichever host they are on, here one that does not lead.
    let w = World::new().await;
    let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
    let spec =
        TokenSpec::new("main").schedule("0 0 0 1 1 *").grant("grant = \"authorization_code\"");
    let mut f = Fleet::on(w, etcd, 2, 2, spec, "").await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let follower = 1 - leader;
    f.hosts[leader].daemon().wait_log("needs login", 1, Duration::from_secs(10)).await;
    let (child, url) = crate::login::start_login_on(&f.hosts[follower].config, "main", &[]).await;
    let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(page.contains("authorized"), "{page}");
    let out = crate::login::finish(child).await;
    assert!(out.contains("handed to the running tokend"), "{out}");
    let wait = Duration::from_secs(10);
    f.hosts[follower].daemon().wait_log("handed the new login to the leader", 1, wait).await;
    f.hosts[leader]
        .daemon()
        .wait_log("adopted a new login from `tokend login` on another", 1, wait)
        .await;
    let g = f.converged(1, wait).await;
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    // From there it refreshes like any token, and the hand-off is gone everywhere.
    f.hosts[leader].daemon().signal(libc::SIGUSR1);
    f.converged(g + 1, wait).await;
    assert!(f.etcd[0].get("/t/main/handoff").await.is_none(), "the hand-off key is left over");
    let file = tokend::store::State::handoff_path(&f.hosts[follower].dir.join("main.state.json"));
    assert!(!file.exists(), "the hand-off file is left over");
    f.assert_clean();

    // The session is revoked: the leader finds the chain dead and the token needs login again.
    let state = State::load(&f.hosts[leader].dir.join("main.state.json")).unwrap().unwrap();
    f.w.revoke(state.refresh_token.unwrap().expose()).await;
    f.hosts[leader].daemon().signal(libc::SIGUSR1);
    f.hosts[leader].daemon().wait_log("permanent failure: needs login", 1, wait).await;
    // A login on a host whose daemon is stopped waits in the hand-off file (the state file is
    // etcd's mirror there), and the daemon passes it on when it starts: nothing is lost.
    let mut stopped = f.hosts[follower].daemon.take().unwrap();
    assert!(stopped.stop().await.success());
    let (child, url) = crate::login::start_login_on(&f.hosts[follower].config, "main", &[]).await;
    reqwest::get(&url).await.unwrap();
    let out = crate::login::finish(child).await;
    assert!(out.contains("passes it to the cluster's leader when it starts"), "{out}");
    f.start_host(follower).await;
    f.hosts[leader]
        .daemon()
        .wait_log("adopted a new login from `tokend login` on another", 2, wait)
        .await;
    f.converged(g + 2, wait).await;
    for h in &f.hosts {
        assert!(f.api_accepts(h).await, "{}'s token is refused\n{}", h.name, f.dump());
    }
    assert_eq!(f.w.stats().sessions_created, 2, "the two logins, nothing else");
}

#[tokio::test]
async fn sigterm_on_the_leader_hands_over_at_once() {
    // A long lease: only resigning and revoking can make the handover fast.
    let mut f = Fleet::start(2, 30, "0 0 0 1 1 *", "").await;
    let old = f.leader(Duration::from_secs(10)).await;
    let g = f.converged(1, Duration::from_secs(10)).await;
    let stopping = Instant::now();
    let mut d = f.hosts[old].daemon.take().unwrap();
    assert!(d.stop().await.success());
    let new = f.leader(Duration::from_secs(10)).await;
    let took = stopping.elapsed();
    eprintln!("handover after SIGTERM: {} ms (lease TTL 30 s)", took.as_millis());
    assert!(took < Duration::from_secs(5), "handover took {took:?}");
    assert_ne!(new, old);
    f.hosts[new].daemon().signal(libc::SIGUSR1);
    f.converged(g + 1, Duration::from_secs(10)).await;
    f.assert_clean();
}

#[tokio::test]
async fn a_single_host_state_is_imported_without_a_login() {
    // A host that ran alone has a state file; joining the cluster must not burn a session.
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut solo = w.daemon();
    solo.wait_ready().await;
    assert!(solo.stop().await.success());
    let before = w.state("main");
    let etcd = Etcd::start(w.dir.path()).await;
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    let cluster = format!(
        "[cluster]\nendpoints = [\"{}\"]\nnode = \"solo\"\nlease_ttl = \"2s\"\n",
        etcd.url()
    );
    std::fs::write(w.config_path(), format!("{cluster}{text}")).unwrap();
    let d = w.daemon();
    d.wait_ready().await;
    d.wait_log("imported the local state into etcd", 1, Duration::from_secs(10)).await;
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", before.generation + 1, Duration::from_secs(10)).await;
    let stats = w.stats();
    assert_eq!(stats.sessions_created, 1, "{stats:?}");
    assert!(stats.rejected.is_empty(), "{stats:?}");
}

/// A follower's proxy: the leader's refresh kills the token the follower's proxy holds, so a
/// call in flight there gets a 401, waits for the new pair to be mirrored, and is replayed.
/// Callers through the follower see no failure while the leader rotates over a 100 ms WAN.
#[tokio::test]
async fn a_followers_proxy_replays_once_the_new_pair_is_mirrored() {
    use crate::rotation::{Caller, spawn_callers, wan_fake};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = World::with(wan_fake()).await;
    let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
    let spec = TokenSpec::new("main").tail(
        "[[token.proxy]]\nlisten = \"unix:{dir}/main.sock\"\nmode = \"0600\"\naccess_log = true",
    );
    let f = Fleet::on(w, etcd, 2, 2, spec, "").await;
    let leader = f.leader(Duration::from_secs(10)).await;
    let follower = 1 - leader;
    let mut g = f.converged(1, Duration::from_secs(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let caller = Caller::Proxy { socket: f.hosts[follower].dir.join("main.sock") };
    let (tally, tasks) = spawn_callers(8, &caller, &stop);
    for _ in 0..5 {
        f.hosts[leader].daemon().signal(libc::SIGUSR1);
        g = f.converged(g + 1, Duration::from_secs(20)).await;
        let before = tally.get().0;
        wait_until("calls on the new token", Duration::from_secs(20), || {
            tally.get().0 >= before + 8
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = tally.get();
    let replayed = f.hosts[follower].daemon().count("replayed=true");
    eprintln!(
        "follower's proxy, 8 callers, 5 leader rotations: {failed} of {} failed, {replayed} replayed",
        ok + failed
    );
    assert_eq!(failed, 0, "a call through the follower's proxy failed:\n{}", f.dump());
    assert!(replayed > 0, "no call hit the rotation window: the test proves nothing");
}

/// The leader of a one-host fleet is refused once for good (a rotated client secret, here
/// injected) on SIGUSR1: the token needs login, in the metrics and in `/healthz`.
async fn refused_for_good(f: &Fleet) -> &Host {
    let h = &f.hosts[f.leader(Duration::from_secs(10)).await];
    f.converged(1, Duration::from_secs(10)).await;
    f.w.server.inject("invalid_client".parse().unwrap());
    h.daemon().signal(libc::SIGUSR1);
    h.wait_needs_login(true).await;
    let (code, body) = h.health().await;
    assert_eq!(code, 503);
    assert!(body.contains("main: needs login"), "{body}");
    h
}

#[tokio::test]
async fn a_permanent_failure_of_a_grant_that_cannot_log_in_is_retried_on_the_next_signal() {
    // refresh_token grant: the daemon can refresh but never start a session. After a permanent
    // refusal the log promises a retry on the next tick or signal; the leader must keep that
    // promise, as one host does (it used to send nothing until a restart).
    let w = World::new().await;
    let rt = w.refresh_token_from_elsewhere().await;
    let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
    let spec = TokenSpec::new("main")
        .grant(&format!("grant = \"refresh_token\"\nrefresh_token = \"{rt}\""));
    let f = Fleet::on(w, etcd, 1, 2, spec, "").await;
    let h = refused_for_good(&f).await;
    h.daemon().signal(libc::SIGUSR1);
    f.converged(2, Duration::from_secs(10)).await;
    h.wait_needs_login(false).await;
    let stats = f.w.stats();
    assert_eq!(stats.sessions_created, 1, "the test's login and nothing else: {stats:?}");
}

#[tokio::test]
async fn needs_login_is_cleared_in_the_metrics_once_a_new_login_succeeds() {
    // jwt: after a permanent refusal the next attempt logs in again. Once it succeeds,
    // `tokend_needs_login` must return to 0 and `/healthz` to 200 (they stayed at 1 and 503
    // until a restart in cluster mode).
    let f = Fleet::start(1, 2, "0 0 0 1 1 *", "").await;
    let h = refused_for_good(&f).await;
    h.daemon().signal(libc::SIGUSR1);
    f.converged(2, Duration::from_secs(10)).await;
    h.wait_needs_login(false).await;
    let (code, body) = h.health().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(h.status().map(|s| s.needs_login), Some(false));
}

#[tokio::test]
async fn a_follower_says_the_token_needs_login_while_the_leader_does() {
    // An operator reading any host's `/healthz` or `tokend status` learns that the token
    // needs login, not only on the leader (a follower said "ok" until the token expired).
    let f = Fleet::start(2, 2, "0 0 0 1 1 *", "").await;
    let leader = refused_for_good(&f).await;
    let follower = f.hosts.iter().find(|h| h.name != leader.name).unwrap();
    follower.wait_needs_login(true).await;
    let (code, body) = follower.health().await;
    assert_eq!(code, 503);
    assert!(body.contains("main: needs login"), "{body}");
    assert_eq!(follower.status().map(|s| s.needs_login), Some(true));
    // The next attempt logs in again (jwt): every host clears it.
    leader.daemon().signal(libc::SIGUSR1);
    f.converged(2, Duration::from_secs(10)).await;
    follower.wait_needs_login(false).await;
    assert_eq!(follower.health().await.0, 200);
    assert!(f.etcd[0].get("/t/main/needs_login").await.is_none(), "the key is left over");
}

#[tokio::test]
async fn healthz_warns_before_the_token_expires_when_the_leader_cannot_refresh() {
    // A 20 s token is refreshed 10 s before expiry; with every request failing, `/healthz`
    // must complain while the token still has seconds left (half the margin), not only once
    // it has expired, as one host does.
    let w = World::new().await;
    let etcd = Etcd::start_cluster(w.dir.path(), 1).await;
    let spec = TokenSpec::new("main").extra("access_token_ttl = 20");
    let f = Fleet::on(w, etcd, 1, 2, spec, "").await;
    let h = &f.hosts[f.leader(Duration::from_secs(10)).await];
    f.converged(1, Duration::from_secs(10)).await;
    assert_eq!(h.health().await.0, 200);
    f.w.server.inject("status500,count=1000".parse().unwrap());
    wait_for("/healthz to warn of the expiry", Duration::from_secs(30), move || async move {
        h.health().await.1.contains("access token expires in")
    })
    .await;
    let body = h.health().await.1;
    let left: i64 = body
        .split("expires in ")
        .nth(1)
        .and_then(|s| s.trim_end().trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no seconds in {body:?}"));
    assert!(left > 0, "warned only after expiry: {body:?}");
}

#[tokio::test]
async fn a_cluster_token_task_that_dies_is_reported_and_restarted() {
    // The candidate (and with it the mirror) of a leader panics at a wake-up (a test-only
    // fault, debug builds only, see hostile.rs): the supervisor reports it and starts both
    // again; the host leads again from etcd, without a login.
    let mut f = Fleet::start(1, 2, "0 0 0 1 1 *", "").await;
    f.converged(1, Duration::from_secs(10)).await;
    let mut d = f.hosts[0].daemon.take().unwrap();
    assert!(d.stop().await.success());
    let env = [("TOKEND_TEST_TASK_FAULT", "panic:main")];
    let d = f.w.daemon_on(&f.hosts[0].config, &env, "");
    d.wait_ready().await;
    f.hosts[0].daemon = Some(d);
    f.leader(Duration::from_secs(10)).await;
    let h = &f.hosts[0];
    h.daemon().signal(libc::SIGUSR1);
    let t = Duration::from_secs(20);
    h.daemon().wait_log("the token's task died", 1, t).await;
    h.daemon().wait_log("restarting the token's task", 1, t).await;
    let out = crate::harness::tokend(&["status", "--config", h.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("TASK FAILED") && text.contains("panicked: TOKEND_TEST"), "{text}");
    assert_eq!(h.metric("tokend_task_restarts_total{token=\"main\"}").await, Some(1.0));
    f.leader(Duration::from_secs(10)).await;
    f.hosts[0].daemon().signal(libc::SIGUSR1);
    f.converged(2, Duration::from_secs(10)).await;
    f.assert_clean();
}
