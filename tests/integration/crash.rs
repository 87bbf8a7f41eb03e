//! Principle 4, "nothing is lost": SIGKILL the daemon at random instants, including during
//! the refresh request and during writes, and restart it each time.

use crate::harness::{TokenSpec, World};
use std::time::Duration;

const KILLS: usize = 200;

fn parse_all(w: &World) -> (u64, u64) {
    let state = w.state("main");
    let sink = w.sink("main").map_or(0, |s| s.generation);
    let raw = std::fs::read_to_string(w.path("main.raw")).unwrap_or_default();
    assert!(!raw.contains(char::is_whitespace), "raw sink is one token");
    (state.generation, sink)
}

#[tokio::test]
async fn two_hundred_kills_lose_nothing_and_start_no_new_session() {
    let w = World::new().await;
    // A 2 s token with a 1 s tick: there is nearly always a refresh due or in flight.
    w.write_config(&[TokenSpec::new("main").schedule("* * * * * *").extra("access_token_ttl = 2")]);
    let mut first = w.daemon();
    first.wait_ready().await;
    assert!(first.stop().await.success());
    let http = reqwest::Client::new();
    let api = format!("{}/restapi/v1.0/account/~/extension/~", w.server.url());
    let mut last_state_gen = w.state("main").generation;
    let mut mid_request = 0;
    for i in 0..KILLS {
        let d = w.daemon();
        if i % 4 == 0 {
            // Kill while the server is holding the request: it commits the rotation after the
            // client is gone, the lost-response case.
            d.wait_ready().await;
            let injected = w.stats().faults_injected;
            w.server.inject("commit_then_hang,ms=5000".parse().unwrap());
            d.signal(libc::SIGUSR1);
            crate::harness::wait_until(
                "the request to reach the server",
                Duration::from_secs(20),
                || w.stats().faults_injected > injected,
            )
            .await;
            mid_request += 1;
        } else {
            if i % 4 == 1 {
                // Right after a lost refresh: the restart must replay it before publishing, so
                // readers never get the access token the server has already killed.
                d.wait_ready().await;
                let token = w.sink("main").unwrap().access_token;
                let status = http.get(&api).bearer_auth(&token).send().await.unwrap().status();
                assert_eq!(status, 200, "kill {i}: the restart published a dead token");
            }
            let delay = rand_ms(i, 250);
            tokio::time::sleep(Duration::from_millis(delay)).await; // the kill instant is the experiment
        }
        let mut d = d;
        d.signal(libc::SIGKILL);
        d.wait_exit(Duration::from_secs(20)).await;
        if i % 4 == 0 {
            assert!(
                w.refresh_in_flight("main"),
                "kill {i}: no intent marker for the lost refresh; log:\n{}",
                d.output()
            );
        }
        let (state_gen, sink_gen) = parse_all(&w);
        assert!(
            state_gen >= last_state_gen,
            "generation went back: {last_state_gen} -> {state_gen}"
        );
        assert!(
            sink_gen <= state_gen,
            "a sink ({sink_gen}) got ahead of the durable state ({state_gen})"
        );
        last_state_gen = state_gen;
        let stats = w.stats();
        assert_eq!(stats.sessions_created, 1, "kill {i}: a new session was started: {stats:?}");
        let leftovers = std::fs::read_dir(w.dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tmp."))
            .count();
        assert!(leftovers <= 3, "temp files pile up: {leftovers}");
    }
    // The last restart: recovered, published, and the published token is the live one.
    let mut d = w.daemon();
    d.wait_ready().await;
    // A tick every second may rotate the token between reading the sink and the call: a
    // refused token counts only if the daemon publishes no newer one within a few seconds.
    let mut status = reqwest::StatusCode::UNAUTHORIZED;
    for _ in 0..5 {
        let sink = w.sink("main").unwrap();
        status = http.get(&api).bearer_auth(&sink.access_token).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        let newer = || w.sink("main").is_some_and(|s| s.generation > sink.generation);
        let start = std::time::Instant::now();
        while !newer() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(status, 200, "the published token is live after {KILLS} kills");
    assert!(d.stop().await.success());
    let stats = w.stats();
    assert_eq!(stats.sessions_created, 1);
    // Every mid-request kill left the server rotated and the state behind: each restart must
    // have recovered the pair by replaying the same refresh token.
    assert!(
        stats.grace_replays >= mid_request as u64,
        "replays {} < mid-request kills {mid_request}: {stats:?}",
        stats.grace_replays
    );
    eprintln!("stats: {stats:?}");
    eprintln!(
        "{KILLS} kills ({mid_request} mid-request): generation {last_state_gen}, {} refreshes, {} grace replays, 1 session",
        stats.refreshes, stats.grace_replays
    );
}

/// A spread of kill instants without a random source: deterministic per run.
fn rand_ms(i: usize, max: u64) -> u64 {
    (i as u64).wrapping_mul(2_654_435_761) % max
}

/// A refresh after the first rewrites its intent marker in place: no file is created or
/// removed for it (on ext4 without a journal each would cost every later file creation in the
/// directory a scan of the freed inodes, README Performance). The marker left behind names
/// the generation before the new state's, so a restart finds nothing in flight: no replay.
#[tokio::test]
async fn a_refresh_rewrites_its_intent_marker_and_a_restart_replays_nothing() {
    use inotify::{EventMask, Inotify, WatchMask};
    use std::os::unix::fs::MetadataExt;
    let t = Duration::from_secs(20);
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    d.signal(libc::SIGUSR1);
    w.wait_generation("main", 2, t).await;
    let marker = w.path("main.state.json.intent");
    let ino = std::fs::metadata(&marker).expect("the first refresh writes the marker").ino();
    let mut events = Inotify::init().unwrap();
    events.watches().add(w.dir.path(), WatchMask::CREATE | WatchMask::DELETE).unwrap();
    d.signal(libc::SIGUSR1);
    // The marker is written before the request and, in the old way, removed before the sink.
    w.wait_generation("main", 3, t).await;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    for _ in 0..1000 {
        match events.read_events(&mut buf) {
            Ok(batch) => seen.extend(
                batch
                    .filter(|e| !e.mask.contains(EventMask::ISDIR))
                    .map(|e| e.name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("inotify: {e}"),
        }
    }
    let intent: Vec<_> = seen.iter().filter(|n| n.contains(".intent")).collect();
    assert!(intent.is_empty(), "files created or removed for the marker: {intent:?}");
    assert_eq!(std::fs::metadata(&marker).unwrap().ino(), ino, "the marker was replaced");
    assert!(!w.refresh_in_flight("main"), "the marker outlived its refresh");
    assert!(d.stop().await.success());
    let before = w.stats();
    let mut d = w.daemon();
    d.wait_ready().await;
    assert!(!d.output().contains("in flight"), "{}", d.output());
    assert!(d.stop().await.success());
    let after = w.stats();
    assert_eq!(after.token_requests, before.token_requests, "the restart sent a request");
}
