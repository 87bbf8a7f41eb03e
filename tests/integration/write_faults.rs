//! Local write failures and hostile files: a clear ERROR naming the path, previous files
//! intact, the new token kept in memory and written as soon as writing works again.

use crate::harness::{TokenSpec, World, tokend, wait_until};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// A config whose state lives in `state/` and sinks in `run/`.
fn split_dirs(w: &World) {
    w.write_config(&[TokenSpec::new("main")]);
    let d = w.dir.path().display().to_string();
    let text = std::fs::read_to_string(w.config_path())
        .unwrap()
        .replace(&format!("{d}/main.state.json"), &format!("{d}/state/main.state.json"))
        .replace(&format!("{d}/main.json"), &format!("{d}/run/main.json"))
        .replace(&format!("{d}/main.raw"), &format!("{d}/run/main.raw"));
    std::fs::write(w.config_path(), text).unwrap();
    std::fs::create_dir(w.path("state")).unwrap();
    std::fs::create_dir(w.path("run")).unwrap();
}

fn sink_gen(w: &World) -> u64 {
    std::fs::read(w.path("run/main.json")).ok().map_or(0, |b| {
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["generation"].as_u64().unwrap()
    })
}

#[tokio::test]
async fn disk_full_keeps_the_token_in_memory_and_writes_it_when_space_returns() {
    let w = World::new().await;
    split_dirs(&w);
    let mut d = w.daemon();
    d.wait_ready().await;
    let before = std::fs::read(w.path("run/main.json")).unwrap();
    let prlimit = |size: &str| {
        let ok = std::process::Command::new("prlimit")
            .args(["--pid", &d.pid().to_string(), &format!("--fsize={size}")])
            .status()
            .unwrap()
            .success();
        assert!(ok, "prlimit failed");
    };
    prlimit("0:unlimited");
    d.signal(libc::SIGUSR1);
    d.wait_log("cannot write state", 1, T).await;
    let out = d.output();
    assert!(out.contains("state/main.state.json") && out.contains("ERROR"), "{out}");
    assert_eq!(
        std::fs::read(w.path("run/main.json")).unwrap(),
        before,
        "sinks untouched while the state cannot be saved"
    );
    assert_eq!(w.stats().refreshes, 1, "the server did rotate");
    prlimit("unlimited:unlimited");
    wait_until("the kept token to be written", T, || sink_gen(&w) == 2).await;
    assert_eq!(w.stats().refreshes, 1, "written from memory, not refreshed again");
    assert_eq!(w.stats().sessions_created, 1);
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn read_only_sink_directory_keeps_the_old_files_then_catches_up() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new().await;
    split_dirs(&w);
    // Root (CI runs as root) writes through directory modes: the daemon runs without that
    // power (dropping it needs root too; anyone else is bound by the mode anyway).
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let wrap =
        if root { "WRAP='setpriv --bounding-set=-dac_override,-dac_read_search --';" } else { "" };
    let mut d = w.daemon_with(&[], wrap);
    d.wait_ready().await;
    let json = std::fs::read(w.path("run/main.json")).unwrap();
    let raw = std::fs::read(w.path("run/main.raw")).unwrap();
    let mode = |m| std::fs::set_permissions(w.path("run"), std::fs::Permissions::from_mode(m));
    mode(0o555).unwrap();
    d.signal(libc::SIGUSR1);
    d.wait_log("cannot write sink", 1, T).await;
    let out = d.output();
    assert!(out.contains("run/main.json") && out.contains("ERROR"), "{out}");
    assert!(out.contains("Permission denied"), "the reason is not named: {out}");
    assert_eq!(std::fs::read(w.path("run/main.json")).unwrap(), json, "old json sink intact");
    assert_eq!(std::fs::read(w.path("run/main.raw")).unwrap(), raw, "old raw sink intact");
    let state = tokend::store::State::load(&w.path("state/main.state.json")).unwrap().unwrap();
    assert_eq!(state.generation, 2, "the new token is saved in the state");
    mode(0o755).unwrap();
    wait_until("both sinks at generation 2", T, || {
        sink_gen(&w) == 2 && std::fs::read(w.path("run/main.raw")).unwrap() != raw
    })
    .await;
    assert_eq!(w.stats().refreshes, 1, "written from memory, not refreshed again");
    assert_eq!(w.stats().sessions_created, 1);
    let left: Vec<_> =
        std::fs::read_dir(w.path("run")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "no temp files left: {left:?}");
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn vanished_state_directory_then_returned() {
    let w = World::new().await;
    split_dirs(&w);
    let mut d = w.daemon();
    d.wait_ready().await;
    std::fs::rename(w.path("state"), w.path("state.gone")).unwrap();
    d.signal(libc::SIGUSR1);
    d.wait_log("cannot write state", 1, T).await;
    assert_eq!(sink_gen(&w), 1);
    std::fs::rename(w.path("state.gone"), w.path("state")).unwrap();
    wait_until("generation 2 published", T, || sink_gen(&w) == 2).await;
    assert_eq!(
        tokend::store::State::load(&w.path("state/main.state.json")).unwrap().unwrap().generation,
        2
    );
    assert_eq!(w.stats().refreshes, 1);
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn vanished_sink_directory_is_written_when_it_returns() {
    let w = World::new().await;
    split_dirs(&w);
    let mut d = w.daemon();
    d.wait_ready().await;
    std::fs::remove_dir_all(w.path("run")).unwrap();
    d.signal(libc::SIGUSR1);
    d.wait_log("cannot write sink", 1, T).await;
    assert!(d.output().contains("run/main.json"), "{}", d.output());
    std::fs::create_dir(w.path("run")).unwrap();
    // Sinks are written one after the other: wait for both.
    wait_until("generation 2 in the recreated sink dir", T, || {
        sink_gen(&w) == 2 && w.path("run/main.raw").exists()
    })
    .await;
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn corrupt_state_at_start_is_kept_aside_with_a_clear_error() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    assert!(d.stop().await.success());
    std::fs::write(w.path("main.state.json"), b"{\"version\": 1, \"generation\": ").unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    let out = d.output();
    assert!(
        out.contains("state file is corrupt; moved aside") && out.contains("main.state.json"),
        "{out}"
    );
    let aside: Vec<_> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .filter_map(std::result::Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"version\": 1, \"generation\": ",
        "kept as it was"
    );
    assert_eq!(w.stats().logins, 2, "a JWT token logs in again");
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn planted_symlinks_do_not_redirect_writes() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let victim = w.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, w.path("main.json")).unwrap();
    std::os::unix::fs::symlink(&victim, w.path("main.state.json.status")).unwrap();
    let mut d = w.daemon();
    d.wait_ready().await;
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!std::fs::symlink_metadata(w.path("main.json")).unwrap().file_type().is_symlink());
    assert_eq!(w.generation("main"), 1);
    assert!(d.stop().await.success());
}

#[tokio::test]
async fn a_literal_secret_in_a_world_readable_config_warns() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let cfg = w.config_path();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tokend(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("literal secret and is readable by every user")
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = tokend(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
