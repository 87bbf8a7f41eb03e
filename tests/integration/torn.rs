//! Principle 3: readers see the old whole file or the new whole file, never a torn or empty
//! one. Reader threads hammer the sinks while they are rewritten.

use crate::harness::{TokenSpec, World};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Daemon refreshes driven in the daemon test: each rewrites two sinks, 10,000 rewrites.
const ROUNDS: u64 = 5000;

/// A round fails only when a refresh makes no progress at all for this long.
const STALL: Duration = Duration::from_secs(30);

/// Reads every path in a tight loop until `stop`; returns (reads, bad reads).
fn readers(
    paths: &[PathBuf],
    threads: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, u64)>> {
    (0..threads)
        .map(|_| {
            let (paths, stop) = (paths.to_vec(), stop.clone());
            std::thread::spawn(move || {
                let (mut reads, mut bad) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    for p in &paths {
                        let Ok(bytes) = std::fs::read(p) else { continue };
                        reads += 1;
                        if tokend::watch::parse_sink(p, &bytes).is_err() {
                            bad += 1;
                        }
                    }
                }
                (reads, bad)
            })
        })
        .collect()
}

fn join(handles: Vec<std::thread::JoinHandle<(u64, u64)>>) -> (u64, u64) {
    handles.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[test]
fn ten_thousand_atomic_rewrites_are_never_torn() {
    let dir = tempfile::tempdir().unwrap();
    let (json, raw) = (dir.path().join("t.json"), dir.path().join("t.raw"));
    let stop = Arc::new(AtomicBool::new(false));
    tokend::store::write_atomic(&raw, b"seed", 0o644).unwrap();
    tokend::store::write_atomic(&json, br#"{"name":"t","access_token":"seed","token_type":"bearer","expires_at":"2030-01-01T00:00:00Z","expire_time":0,"expires_in":0,"generation":0,"refreshed_at":"2030-01-01T00:00:00Z"}"#, 0o644).unwrap();
    let handles = readers(&[json.clone(), raw.clone()], 3, &stop);
    for g in 1..=10_000u64 {
        // Sizes vary so a torn read would show as a parse error.
        let token = "x".repeat(20 + (g % 200) as usize);
        let doc = format!(
            r#"{{"name":"t","access_token":"{token}","token_type":"bearer","expires_at":"2030-01-01T00:00:00Z","expire_time":0,"expires_in":0,"generation":{g},"refreshed_at":"2030-01-01T00:00:00Z"}}"#
        );
        tokend::store::write_atomic(&json, doc.as_bytes(), 0o644).unwrap();
        tokend::store::write_atomic(&raw, token.as_bytes(), 0o644).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, bad) = join(handles);
    eprintln!("20,000 rewrites, {reads} reads, {bad} bad");
    assert_eq!(bad, 0);
    assert!(reads > 1000, "readers barely ran: {reads}");
}

#[tokio::test]
async fn daemon_rewrites_under_concurrent_readers_are_never_torn() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    // No rate budget in the way: this measures the write path, not the limiter.
    let text = std::fs::read_to_string(w.config_path())
        .unwrap()
        .replace("rate_limit = 1000", "rate_limit = 1000\nrate_window = \"1s\"");
    std::fs::write(w.config_path(), text).unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let handles = readers(&[w.path("main.json"), w.path("main.raw")], 3, &stop);
    let pid = u32::try_from(d.pid()).unwrap();
    let rounds = AtomicU64::new(0);
    // One refresh per round, driven by SIGUSR1, as fast as the daemon goes. This is not a
    // speed test (the machines are small and noisy): a round only fails when the daemon makes
    // no progress at all for STALL, and the whole loop is bounded by ROUNDS.
    let started = Instant::now();
    while rounds.load(Ordering::Relaxed) < ROUNDS {
        let before = w.generation("main");
        tokend::signal::send(pid, tokend::signal::Signal::Usr1).unwrap();
        let deadline = Instant::now() + STALL;
        while w.generation("main") == before {
            assert!(Instant::now() < deadline, "refresh stalled at generation {before}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, bad) = join(handles);
    let n = rounds.load(Ordering::Relaxed);
    eprintln!(
        "{n} daemon refreshes (x2 sinks) in {:.1} s, {reads} reads, {bad} bad",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(bad, 0);
    assert_eq!(n, ROUNDS);
    assert!(d.stop().await.success());
}
