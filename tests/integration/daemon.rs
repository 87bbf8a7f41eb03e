//! `tokend run` end to end: bootstrap, schedule, restart, early refresh, faults, signals.

use crate::harness::{TokenSpec, World, wait_until};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokend::fake::{FakeConfig, Fault};

const T: Duration = Duration::from_secs(20);

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn jwt_bootstrap_writes_state_and_sinks_with_exact_modes_under_any_umask() {
    for umask in ["umask 077;", "umask 000;"] {
        let w = World::new().await;
        w.write_config(&[TokenSpec::new("main")]);
        let mut d = w.daemon_with(&[], umask);
        d.wait_ready().await;
        assert_eq!(mode(&w.path("main.state.json")), 0o600, "{umask}");
        assert_eq!(mode(&w.path("main.json")), 0o640, "{umask}");
        assert_eq!(mode(&w.path("main.raw")), 0o644, "{umask}");
        let doc = w.sink("main").unwrap();
        assert_eq!(doc.generation, 1);
        assert_eq!(doc.token_type, "bearer");
        assert_eq!(doc.expire_time, doc.expires_at.timestamp_millis());
        assert_eq!(doc.owner_id.as_deref(), Some("100000"));
        assert!(doc.refresh_token.is_none(), "no refresh token in a sink by default");
        let raw = std::fs::read_to_string(w.path("main.raw")).unwrap();
        assert_eq!(raw, doc.access_token, "raw sink: the token alone, no newline");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.path("main.json")).unwrap()).unwrap();
        for field in [
            "access_token",
            "token_type",
            "expires_at",
            "expire_time",
            "generation",
            "refreshed_at",
        ] {
            assert!(json.get(field).is_some(), "json sink lacks {field}");
        }
        let state = w.state("main");
        assert!(state.refresh_token.is_some());
        assert_eq!(w.stats().logins, 1);
        assert!(d.stop().await.success());
    }
}

#[tokio::test]
async fn scheduled_refreshes_grow_generation_by_one() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main").schedule("* * * * * *")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let mut seen = vec![w.generation("main")];
    wait_until("generation 4", T, || {
        let g = w.generation("main");
        if seen.last() != Some(&g) {
            seen.push(g);
        }
        g >= 4
    })
    .await;
    // Polling the sink may miss a generation, so it only shows that none goes back; the
    // log below lists every one and shows each is exactly one more.
    assert!(seen.windows(2).all(|p| p[1] > p[0]), "{seen:?}");
    let stats = w.stats();
    assert_eq!(stats.logins, 1);
    assert!(stats.refreshes >= 3);
    let lines: Vec<u64> = d
        .output()
        .lines()
        .filter(|l| l.contains("refreshed"))
        .filter_map(|l| l.split("generation=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(lines.windows(2).all(|p| p[1] == p[0] + 1), "log generations {lines:?}");
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn restart_reuses_state_without_a_new_login_and_republishes_sinks() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    assert!(d.stop().await.success());
    // A reboot empties /run: the sinks must come back from the state alone.
    std::fs::remove_file(w.path("main.json")).unwrap();
    std::fs::remove_file(w.path("main.raw")).unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    assert_eq!(w.generation("main"), 1);
    assert!(w.path("main.raw").exists());
    let stats = w.stats();
    assert_eq!((stats.logins, stats.live_sessions["100000"]), (1, 1));
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn short_access_ttl_refreshes_early_and_sinks_never_hold_an_expired_token() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main").extra("access_token_ttl = 3")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let mut checked = 0;
    wait_until("generation 4 via deadline refreshes", T, || {
        if let Some(doc) = w.sink("main") {
            let now = chrono::Utc::now();
            assert!(doc.expires_at > now, "sink holds an expired token: {doc:?} at {now}");
            checked += 1;
        }
        w.generation("main") >= 4
    })
    .await;
    assert!(checked > 10);
    assert_eq!(w.stats().logins, 1);
    assert!(d.stop().await.success());
}

/// A refresh token that the server says dies long before the access token (here 10 s against
/// an hour; RingCentral's `refresh_token_ttl` can be set below an hour) is refreshed before it
/// dies, so the chain lives on without a new login (a session) at each tick.
#[tokio::test]
async fn a_refresh_token_shorter_lived_than_the_access_token_is_kept_alive() {
    let (w, mut d) = started(TokenSpec::new("main").extra("refresh_token_ttl = 10")).await;
    let start = std::time::Instant::now();
    let refreshed = || w.generation("main") >= 4;
    wait_until("generation 4 via refresh-token deadlines", Duration::from_secs(90), refreshed)
        .await;
    // Each refresh token lives 9 s (the fake says a second less than asked): refreshed 4.5 s
    // after it came, less at most a tenth of that in jitter, which leaves 4.5 s of slack on a
    // loaded machine; not at once, in a loop.
    let took = start.elapsed();
    assert!(took > Duration::from_secs(9), "3 refreshes in {took:?}: faster than the margin");
    let stats = w.stats();
    assert_eq!((stats.logins, stats.rejected.len()), (1, 0), "{stats:?}");
    assert!(d.stop().await.success());
}

async fn started(spec: TokenSpec) -> (World, crate::harness::Daemon) {
    let w = World::new().await;
    w.write_config(&[spec]);
    let d = w.daemon();
    d.wait_ready().await;
    (w, d)
}

#[tokio::test]
async fn transient_faults_are_retried_with_backoff_and_no_new_session() {
    let (w, mut d) = started(TokenSpec::new("main").extra("request_timeout = \"1s\"")).await;
    for f in crate::harness::TRANSIENT_FAULTS {
        w.server.inject(f.parse::<Fault>().unwrap());
    }
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, Duration::from_secs(40)).await;
    let stats = w.stats();
    assert_eq!(stats.faults_injected, 10);
    assert_eq!(stats.logins, 1, "no new session");
    assert_eq!(d.count("retrying"), 10, "{}", d.output());
    for n in 1..=10 {
        assert!(d.output().contains(&format!("attempt={n} ")), "attempt {n} not logged");
    }
    assert!(d.output().contains("code=CMN-301"));
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (w, mut d) = started(TokenSpec::new("main")).await;
    w.server.inject("status503,retry_after=2".parse().unwrap());
    let t0 = std::time::Instant::now();
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, T).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "retried before Retry-After: {:?}",
        t0.elapsed()
    );
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn lost_response_is_recovered_by_replaying_the_same_refresh_token() {
    let (w, mut d) = started(TokenSpec::new("main")).await;
    let before = w.state("main").refresh_token;
    w.server.inject("commit_then_drop".parse().unwrap());
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, T).await;
    let stats = w.stats();
    assert_eq!(stats.grace_replays, 1, "{stats:?}");
    assert_eq!(stats.refreshes, 1, "the server rotated once");
    assert_eq!(stats.logins, 1);
    assert_ne!(w.state("main").refresh_token, before);
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn invalid_grant_leads_to_a_jwt_relogin() {
    let (w, mut d) = started(TokenSpec::new("main")).await;
    w.revoke(w.state("main").refresh_token.unwrap().expose()).await;
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, T).await;
    let stats = w.stats();
    assert_eq!(stats.logins, 2);
    assert_eq!(stats.rejected["OAU-211"], 1);
    assert!(d.output().contains("logging in again (new session)"), "{}", d.output());
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn dead_chain_without_a_login_grant_needs_login_and_keeps_sinks() {
    let w = World::new().await;
    // Bootstrap from a refresh token obtained elsewhere (here: a JWT login by the test).
    let rt = w.refresh_token_from_elsewhere().await;
    w.write_config(&[TokenSpec::new("main")
        .grant(&format!("grant = \"refresh_token\"\nrefresh_token = \"{rt}\""))]);
    let mut d = w.daemon();
    d.wait_ready().await;
    assert_eq!(w.generation("main"), 1);
    let sink_before = std::fs::read(w.path("main.json")).unwrap();
    w.revoke(w.state("main").refresh_token.unwrap().expose()).await;
    d.signal(libc::SIGUSR1);
    d.wait_log("needs login", 1, T).await;
    let out = d.output();
    assert!(out.contains("ERROR") && out.contains("code=OAU-211"), "{out}");
    assert_eq!(std::fs::read(w.path("main.json")).unwrap(), sink_before, "sinks untouched");
    assert_eq!(w.stats().logins, 1, "no login possible without a login grant");
    assert!(d.stop().await.success());
}

/// Each token's task takes its own lock as it starts up (issue 15): one whose lock another
/// tokend holds sends nothing, and the daemon exits naming it.
#[tokio::test]
async fn second_daemon_on_the_same_state_exits_naming_the_holder() {
    use std::os::unix::fs::MetadataExt;
    let (w, mut d) = started(TokenSpec::new("main")).await;
    let inode = |f: &str| std::fs::metadata(w.path(f)).unwrap().ino();
    let files = ["main.json", "main.state.json.status"];
    let before = files.map(inode);
    let mut second = w.daemon();
    let status = second.wait_exit(T).await;
    assert_eq!(status.code(), Some(75));
    let out = second.output();
    assert!(
        out.contains(&format!("pid {}", d.pid())) && out.contains("locked by another tokend"),
        "{out}"
    );
    assert_eq!(w.stats().logins, 1, "the second daemon logged in: {out}");
    assert_eq!(files.map(inode), before, "the second daemon wrote the token's files: {out}");
    // A config that shares one of its tokens' state with the running daemon: refused too,
    // naming that token's lock file.
    w.write_config(&[TokenSpec::new("other"), TokenSpec::new("main")]);
    let mut third = w.daemon();
    assert_eq!(third.wait_exit(T).await.code(), Some(75));
    let out = third.output();
    assert!(out.contains("main.state.json.lock is locked by another tokend"), "{out}");
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn sighup_adds_a_token_and_a_broken_config_keeps_the_old_one() {
    let (w, mut d) = started(TokenSpec::new("main")).await;
    w.write_config(&[TokenSpec::new("main"), TokenSpec::new("second")]);
    d.signal(libc::SIGHUP);
    w.wait_generation("second", 1, T).await;
    assert_eq!(w.generation("main"), 1, "unchanged token not restarted");
    std::fs::write(w.config_path(), "this is = = not toml").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("config reload failed", 1, T).await;
    assert!(d.output().contains("config.toml:1"), "{}", d.output());
    d.signal(libc::SIGUSR1);
    w.wait_generation("second", 2, T).await;
    w.wait_generation("main", 2, T).await;
    assert!(d.stop().await.success());
}

/// The tokens a reload adds start together, as at start: each new token's login hangs for a
/// while at the server, and the server sees them in flight at once. Awaited one by one, one
/// slow bootstrap held back every token after it (and the server saw one at a time).
#[tokio::test]
async fn sighup_starts_the_added_tokens_together() {
    let (w, mut d) = started(TokenSpec::new("main")).await;
    let added = ["second", "third", "fourth"];
    for _ in added {
        w.server.inject("hang,ms=1500".parse().unwrap());
    }
    let mut specs = vec![TokenSpec::new("main")];
    specs.extend(added.iter().map(|n| TokenSpec::new(n)));
    w.write_config(&specs);
    d.signal(libc::SIGHUP);
    for name in added {
        w.wait_generation(name, 1, T).await;
    }
    d.wait_log("config reloaded", 1, T).await;
    let stats = w.stats();
    assert_eq!(stats.faults_injected, 3, "each added token's login hung once");
    assert!(
        stats.max_concurrent_token_requests >= 2,
        "the added tokens' logins overlapped: at most {} in flight",
        stats.max_concurrent_token_requests
    );
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn sigterm_during_a_slow_refresh_finishes_and_persists_it() {
    let (w, mut d) = started(TokenSpec::new("main").extra("request_timeout = \"10s\"")).await;
    w.server.inject("hang,ms=1500".parse().unwrap());
    d.signal(libc::SIGUSR1);
    wait_until("the slow request to reach the server", T, || w.stats().faults_injected == 1).await;
    let status = d.stop().await;
    assert!(status.success());
    assert_eq!(w.state("main").generation, 2, "in-flight refresh persisted");
    assert_eq!(w.generation("main"), 2, "and published");
    assert_eq!(w.stats().refreshes, 1);
}

#[tokio::test]
async fn run_refuses_a_bad_config_with_exit_78() {
    let w = World::new().await;
    std::fs::write(w.config_path(), "[[token]]\nname = \"main\"\nsurprise = 1\n").unwrap();
    let mut d = w.daemon();
    let status = d.wait_exit(T).await;
    assert_eq!(status.code(), Some(78));
    let out = d.output();
    assert!(out.contains("config.toml:3") && out.contains("surprise"), "{out}");
}

#[tokio::test]
async fn unwritable_sink_directory_stops_start_with_exit_73() {
    let w = World::new().await;
    let spec = TokenSpec::new("main");
    w.write_config(&[spec]);
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    let bad =
        text.replace(&format!("{}/main.raw", w.dir.path().display()), "/proc/no-such-dir/main.raw");
    std::fs::write(w.config_path(), bad).unwrap();
    let mut d = w.daemon();
    assert_eq!(d.wait_exit(T).await.code(), Some(73));
    assert!(d.output().contains("/proc/no-such-dir"), "{}", d.output());
}

#[tokio::test]
async fn trace_output_never_contains_a_secret() {
    let w = World::with(FakeConfig::for_tests()).await;
    w.write_config(&[TokenSpec::new("main")
        .extra("access_token_ttl = 2")
        .extra("request_timeout = \"1s\"")]);
    let mut d = w.daemon_with(&[("RUST_LOG", "trace")], "");
    d.wait_ready().await;
    // After the first login: a login that fails this way waits minutes (the session budget).
    for f in
        ["status500", "commit_then_drop", "malformed", "truncated", "missing_access_token", "reset"]
    {
        w.server.inject(f.parse::<Fault>().unwrap());
    }
    w.wait_generation("main", 4, Duration::from_secs(40)).await;
    d.stop().await;
    let out = d.output();
    assert!(out.len() > 10_000, "trace output is substantial: {} bytes", out.len());
    let mut secrets = w.server.issued_tokens();
    secrets.extend([crate::harness::JWT.to_string(), crate::harness::CLIENT_SECRET.to_string()]);
    assert!(secrets.len() > 6);
    for s in &secrets {
        assert!(!out.contains(s.as_str()), "a secret leaked into the log");
    }
}

#[tokio::test]
async fn demo_runs_the_whole_job_and_stops_after_its_cycles() {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(crate::harness::BIN)
            .args(["demo", "--cycles", "3", "--every", "1"])
            .output(),
    )
    .await
    .expect("demo stops by itself")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.matches("-> API 200").count(), 3, "{stdout}");
    assert!(stdout.contains("1 login(s)") && stdout.contains("0 refused"), "{stdout}");
    let last = stdout.lines().rfind(|l| l.contains("proxied caller:")).unwrap();
    assert!(last.ends_with(" 0 failed") && !last.contains("proxied caller: 0 calls"), "{stdout}");
}

#[tokio::test]
async fn logs_for_journald_and_json() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut d = w.daemon_with(&[("JOURNAL_STREAM", "8:12345")], "");
    d.wait_ready().await;
    assert!(d.stop().await.success());
    let out = d.output();
    let line = out.lines().find(|l| l.contains("refreshed")).unwrap();
    assert!(
        line.starts_with(" INFO") || line.starts_with("INFO"),
        "no timestamp under journald: {line}"
    );
    assert!(!out.contains('\u{1b}'), "no colour codes off a terminal");
    assert!(line.contains("token=main") && line.contains("generation=1"), "{line}");
    // JSON on request: one object per line with the fields as keys.
    let text = std::fs::read_to_string(w.config_path()).unwrap();
    std::fs::write(w.config_path(), format!("[log]\nformat = \"json\"\n{text}")).unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, T).await;
    assert!(d.stop().await.success());
    let out = d.output();
    let refreshed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|v| v["message"] == "refreshed")
        .collect();
    assert_eq!(refreshed.len(), 1, "{out}");
    assert_eq!(refreshed[0]["token"], "main");
    assert_eq!(refreshed[0]["generation"], 2);
    assert!(refreshed[0]["fingerprint"].as_str().unwrap().len() == 8);
}

#[tokio::test]
async fn on_refresh_hook_gets_facts_not_the_token_and_its_failures_do_not_matter() {
    let w = World::new().await;
    let out = w.path("hook.out");
    let script = format!(
        "echo \"$TOKEND_TOKEN_NAME $TOKEND_GENERATION $TOKEND_EXPIRES_AT $TOKEND_SINKS ${{TOKEND_ACCESS_TOKEN:-none}}\" >> {}; exit 3",
        out.display()
    );
    let hook = format!("on_refresh = [\"/bin/sh\", \"-c\", {script:?}]");
    w.write_config(&[TokenSpec::new("main").extra(&hook)]);
    let mut d = w.daemon();
    d.wait_ready().await;
    d.wait_log("on_refresh hook failed", 1, T).await;
    d.signal(libc::SIGUSR1);
    d.wait_log("on_refresh hook failed", 2, T).await;
    let lines = std::fs::read_to_string(&out).unwrap();
    let first: Vec<&str> = lines.lines().next().unwrap().split(' ').collect();
    assert_eq!(first[0], "main");
    assert_eq!(first[1], "1");
    assert!(first[2].ends_with('Z'));
    assert!(first[3].contains("main.json") && first[3].contains("main.raw"));
    assert_eq!(first[4], "none", "the token is never given to the hook");
    assert_eq!(w.generation("main"), 2, "a failing hook does not affect refreshing");
    // A hook that hangs is killed at its timeout.
    let text = std::fs::read_to_string(w.config_path())
        .unwrap()
        .replace(&hook, "on_refresh = [\"/bin/sleep\", \"30\"]\non_refresh_timeout = \"200ms\"");
    std::fs::write(w.config_path(), text).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("config reloaded", 1, T).await;
    d.signal(libc::SIGUSR1);
    d.wait_log("timed out and was killed", 1, T).await;
    assert!(d.stop().await.success());
}

/// SIGTERM during a reload that added many tokens, whose logins hang: the daemon stops without
/// waiting for the reload, and the added tokens still waiting for their turn never log in
/// (before, the SIGTERM waited in line until every added token had made its first login).
#[tokio::test]
async fn sigterm_during_a_reload_stops_without_the_added_tokens_logins() {
    const ADDED: usize = 300;
    // The start-ups allowed at once (the default 16 requests, and those beyond them).
    const AT_ONCE: u64 = 16 + 2 * tokend::store::MAX_WRITES as u64; // task::START_UPS_BEYOND_REQUESTS
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let (before, requests) = (w.stats().logins, w.stats().token_requests);
    w.server.inject(format!("hang,ms=500,count={ADDED}").parse().unwrap());
    let mut tokens = vec![TokenSpec::new("main")];
    tokens.extend((0..ADDED).map(|i| TokenSpec::new(&format!("added{i}"))));
    w.write_config(&tokens);
    d.signal(libc::SIGHUP);
    wait_until(
        "the added tokens' first logins to reach the server",
        Duration::from_secs(30),
        || w.stats().token_requests > requests,
    )
    .await;
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(60)).await.success(), "{}", d.output());
    assert_eq!(d.count("stop asked during a reload"), 1, "{}", d.output());
    assert_eq!(d.count("config reloaded"), 0, "the reload ended before the stop");
    // Those that had their turn finish their login (a session the server made is kept): at
    // most the start-ups allowed at once, plus those whose turn came as the first logins
    // ended before the SIGTERM was handled (a number that depends on the machine's speed);
    // every other added token never began one.
    let logins = w.stats().logins - before;
    let never = d.count("refresher stopped before its start-up") as u64;
    assert_eq!(logins + never, ADDED as u64, "every added token logged in or never began");
    assert!(
        never > 0 && logins < ADDED as u64,
        "{logins} of {ADDED} added tokens logged in (the start-ups allowed at once: {AT_ONCE})"
    );
}
