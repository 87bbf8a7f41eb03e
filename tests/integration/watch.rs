//! The reader side: the library watcher and `tokend token` / `tokend watch` as processes.

use crate::harness::{BIN, TokenSpec, World, tokend, wait_until};
use chrono::Utc;
use std::path::Path;
use std::time::Duration;
use tokend::store::write_atomic;
use tokend::watch::{Mode, TokenWatcher};

const T: Duration = Duration::from_secs(20);

fn sink_json(generation: u64, token: &str, expires_in_secs: i64) -> Vec<u8> {
    let exp = Utc::now() + chrono::Duration::seconds(expires_in_secs);
    serde_json::to_vec(&serde_json::json!({
        "name": "t", "access_token": token, "token_type": "bearer",
        "expires_at": exp.to_rfc3339(), "expire_time": exp.timestamp_millis(), "expires_in": expires_in_secs,
        "generation": generation, "refreshed_at": Utc::now().to_rfc3339(),
    }))
    .unwrap()
}

fn publish(path: &Path, generation: u64) {
    write_atomic(path, &sink_json(generation, &format!("token-{generation}"), 3600), 0o640)
        .unwrap();
}

#[tokio::test]
async fn thousand_rapid_renames_end_on_the_final_generation_never_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    publish(&path, 0);
    let mut w = TokenWatcher::open(&path).unwrap();
    assert_eq!(w.current().unwrap().generation, Some(0));
    let writer_path = path.clone();
    let writer = std::thread::spawn(move || (1..=1000).for_each(|g| publish(&writer_path, g)));
    let mut seen = Vec::new();
    let reached = tokio::time::timeout(T, async {
        loop {
            let t = w.changed().await.expect("watcher alive");
            let g = t.generation.expect("json");
            assert_eq!(t.access_token.expose(), format!("token-{g}"), "torn or mixed token");
            seen.push(g);
            if g == 1000 {
                break;
            }
        }
    })
    .await;
    writer.join().unwrap();
    assert!(reached.is_ok(), "never saw generation 1000; last {:?}", seen.last());
    assert!(seen.windows(2).all(|p| p[0] < p[1]), "generations went backwards");
    assert!(w.last_error().is_none());
    eprintln!("watcher saw {} of 1000 rewrites and ended on 1000", seen.len());
}

#[tokio::test]
async fn bad_files_never_drop_the_last_good_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    publish(&path, 1);
    let w = TokenWatcher::with_mode(&path, Mode::Poll(Duration::from_secs(3600))).unwrap();
    for bad in [&b""[..], b"   \n", b"{\"access_token\": \"half", b"two words"] {
        write_atomic(&path, bad, 0o640).unwrap();
        assert!(!w.reload_now());
        assert_eq!(w.current().unwrap().generation, Some(1));
        assert!(w.last_error().is_some());
    }
    std::fs::remove_file(&path).unwrap();
    assert!(!w.reload_now());
    assert_eq!(w.current().unwrap().generation, Some(1));
    publish(&path, 2);
    assert!(w.reload_now(), "the 401 helper sees the change");
    assert!(!w.reload_now(), "and no change the second time");
    assert_eq!(w.current().unwrap().generation, Some(2));
}

#[tokio::test]
async fn file_missing_at_start_then_created_and_directory_removed_and_recreated() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("main.json");
    let w = TokenWatcher::open(&path).unwrap();
    assert!(w.current().is_none());
    publish(&path, 1);
    wait_until("the new file", T, || w.current().is_some_and(|t| t.generation == Some(1))).await;
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    // The directory watch must be back before the file appears; a write a little later must
    // also be seen, so publish twice.
    publish(&path, 2);
    wait_until("generation 2 after the directory came back", T, || {
        w.current().is_some_and(|t| t.generation == Some(2))
    })
    .await;
    publish(&path, 3);
    wait_until("generation 3 in the recreated directory", T, || {
        w.current().is_some_and(|t| t.generation == Some(3))
    })
    .await;
}

#[tokio::test]
async fn polling_mode_follows_renames_without_inotify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.raw");
    let w = TokenWatcher::with_mode(&path, Mode::Poll(Duration::from_millis(20))).unwrap();
    for g in 1..=3 {
        write_atomic(&path, format!("raw-token-{g}").as_bytes(), 0o644).unwrap();
        wait_until("poll to see the token", T, || {
            w.current().is_some_and(|t| t.access_token.expose() == format!("raw-token-{g}"))
        })
        .await;
    }
    assert_eq!(w.changes(), 3);
    assert_eq!(w.current().unwrap().generation, None, "raw sinks carry no generation");
}

/// How many inotify instances a process holds (its fds that link to `anon_inode:inotify`).
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.ends_with("anon_inode:inotify")))
        .count()
}

#[tokio::test]
async fn tokend_watch_poll_mode_uses_no_inotify_at_all() {
    // In-process tests share one process with other watchers, so this one is a process:
    // `tokend watch --poll-ms` must follow renames with no inotify instance open, as on a
    // network filesystem where inotify says nothing. The default mode is the control.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    publish(&path, 1);
    let spawn = |args: &[&str]| {
        tokio::process::Command::new(BIN)
            .arg("watch")
            .args(args)
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut poll = spawn(&["--poll-ms", "20"]);
    let mut notify = spawn(&[]);
    let mut poll_out = tokio::io::BufReader::new(poll.stdout.take().unwrap());
    let mut notify_out = tokio::io::BufReader::new(notify.stdout.take().unwrap());
    let mut line = String::new();
    for g in 1..=3u64 {
        if g > 1 {
            publish(&path, g);
        }
        for out in [&mut poll_out, &mut notify_out] {
            line.clear();
            tokio::time::timeout(T, tokio::io::AsyncBufReadExt::read_line(out, &mut line))
                .await
                .expect("a line per change")
                .unwrap();
            assert!(line.contains(&format!("generation={g}")), "{line}");
        }
    }
    assert_eq!(inotify_fds(poll.id().unwrap()), 0, "poll mode opened an inotify instance");
    assert!(inotify_fds(notify.id().unwrap()) >= 1, "the control: the default mode uses inotify");
}

#[tokio::test]
async fn blocking_wait_for_programs_without_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    publish(&path, 1);
    let w = TokenWatcher::open(&path).unwrap();
    let seen = w.changes();
    assert!(w.wait_blocking(seen, Duration::from_millis(50)).is_none(), "no change: times out");
    let p = path.clone();
    let writer = std::thread::spawn(move || publish(&p, 2));
    let (n, token) = tokio::task::spawn_blocking(move || {
        w.wait_blocking(seen, T).map(|(n, t)| (n, t.generation))
    })
    .await
    .unwrap()
    .unwrap();
    writer.join().unwrap();
    assert_eq!((n, token), (seen + 1, Some(2)));
}

#[tokio::test]
async fn watcher_against_the_real_daemon_always_holds_a_token_the_server_accepts() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main").schedule("* * * * * *")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let mut watcher = TokenWatcher::open(w.path("main.json")).unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/restapi/v1.0/account/~/extension/~", w.server.url());
    let mut generations = vec![watcher.current().unwrap().generation.unwrap()];
    while generations.len() < 4 {
        let t = tokio::time::timeout(T, watcher.changed())
            .await
            .expect("a refresh within 20 s")
            .unwrap();
        generations.push(t.generation.unwrap());
        let r = http.get(&url).bearer_auth(t.access_token.expose()).send().await.unwrap();
        assert_eq!(r.status(), 200, "the watcher's token is the live one");
    }
    assert!(generations.windows(2).all(|p| p[0] < p[1]), "{generations:?}");
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn tokend_token_prints_the_token_or_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    let p = path.to_str().unwrap();
    let out = tokend(&["token", p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
    write_atomic(&path, &sink_json(7, "live-token", 3600), 0o640).unwrap();
    let out = tokend(&["token", p]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "live-token");
    let out = tokend(&["token", "--json", p]);
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["generation"], 7);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("live-token"),
        "--json never prints the token"
    );
    write_atomic(&path, &sink_json(8, "old-token", -5), 0o640).unwrap();
    let out = tokend(&["token", p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired"), "{out:?}");
    write_atomic(&path, b"{ nope", 0o640).unwrap();
    let out = tokend(&["token", p]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a tokend sink"));
}

#[tokio::test]
async fn tokend_watch_prints_lines_and_runs_commands_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.json");
    publish(&path, 1);
    let log = dir.path().join("runs.log");
    let script = format!(
        "echo \"start $TOKEND_GENERATION\" >> {0}; sleep 0.2; echo \"end $TOKEND_GENERATION\" >> {0}",
        log.display()
    );
    let mut cmd_watch = tokio::process::Command::new(BIN)
        .args(["watch", "--count", "3", path.to_str().unwrap(), "--", "sh", "-c", &script])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line_watch = tokio::process::Command::new(BIN)
        .args(["watch", "--count", "2", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the first command run", T, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("end 1"))
    })
    .await;
    // The line watcher must have read generation 1 before anything changes.
    let mut lines_out = tokio::io::BufReader::new(line_watch.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(T, tokio::io::AsyncBufReadExt::read_line(&mut lines_out, &mut first))
        .await
        .unwrap()
        .unwrap();
    publish(&path, 2);
    wait_until("the second run to start", T, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("start 2"))
    })
    .await;
    // These arrive while run 2 is going: they must wait for it, then collapse into one run.
    for g in 3..=6 {
        publish(&path, g);
    }
    tokio::time::timeout(T, cmd_watch.wait()).await.unwrap().unwrap();
    let runs = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = runs.lines().collect();
    assert_eq!(lines.len(), 6, "three runs:\n{runs}");
    assert!(
        lines.chunks(2).all(|c| c[0].replace("start", "end") == c[1]),
        "overlapping runs:\n{runs}"
    );
    let gens: Vec<u64> = lines.iter().step_by(2).map(|l| l[6..].parse().unwrap()).collect();
    assert!(gens[0] == 1 && gens[1] == 2 && gens[2] > 2, "{gens:?}");
    let mut rest = String::new();
    tokio::time::timeout(T, tokio::io::AsyncReadExt::read_to_string(&mut lines_out, &mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(line_watch.wait().await.unwrap().success());
    let text = format!("{first}{rest}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.starts_with("generation=1 ") && text.contains("fingerprint="), "{text}");
    assert!(!text.contains("token-"), "lines never show the token");
}
