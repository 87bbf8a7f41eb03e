//! The refresh intent marker: written durably before a refresh token goes out, and read at
//! start to learn whether a refresh was in flight when the daemon stopped (its reply lost).
//!
//! The marker names the generation of the state it refreshes from. It is rewritten in place
//! and never removed after a refresh: the next state file, one generation newer, makes it
//! stale. A rename or an unlink would cost a new inode and free one per refresh, which on
//! ext4 without a journal makes every later file creation in the directory scan the freed
//! inodes (README, Performance); rewriting one block of an existing file costs neither.

use super::atomic::write_atomic;
use chrono::{DateTime, SecondsFormat, Utc};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

const PREFIX: &str = "refresh in flight from generation ";

/// The marker's text: always the same length (the generation in 16 digits, the time to the
/// second), so that a rewrite in place never changes the file's size, and a rewrite for the
/// same generation (a retry) changes only the time's digits.
fn render(generation: u64, since: DateTime<Utc>) -> String {
    let since = since.to_rfc3339_opts(SecondsFormat::Secs, true);
    format!("{PREFIX}{generation:016} since {since}\n")
}

/// The generation and time a marker names; `None` for any other text (an older tokend's
/// marker, or one whose write a crash cut short).
fn parse(text: &str) -> Option<(u64, DateTime<Utc>)> {
    let (generation, since) = text.strip_prefix(PREFIX)?.trim_end().split_once(" since ")?;
    let generation = generation.parse().ok()?;
    Some((generation, DateTime::parse_from_rfc3339(since).ok()?.with_timezone(&Utc)))
}

/// Durably marks a refresh from the state of `generation` (0: no state yet) as in flight.
/// Rewrites the marker in place when it is a regular file of ours (mode 0600, one link);
/// creates or replaces it atomically otherwise (the first refresh, or anything planted there).
pub fn write(path: &Path, generation: u64, now: DateTime<Utc>) -> io::Result<()> {
    let text = render(generation, now);
    match open_in_place(path) {
        Some((file, len)) => {
            file.write_all_at(text.as_bytes(), 0)?;
            if len != text.len() as u64 {
                file.set_len(text.len() as u64)?;
            }
            // The text has one length, so a rewrite leaves the size alone and only the times
            // change in the inode: `fdatasync` writes the data block and not the inode (on
            // ext4, one block write less per refresh); the size is synced whenever it changed.
            file.sync_data()
        }
        None => write_atomic(path, text.as_bytes(), 0o600),
    }
}

/// The marker opened for writing, and its length, if it can be rewritten in place. `O_NOFOLLOW` refuses a
/// symlink and `O_NONBLOCK` a FIFO without a reader; those, and anything not a plain file of
/// ours, are replaced instead.
fn open_in_place(path: &Path) -> Option<(File, u64)> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let ours = meta.is_file() && meta.mode() & 0o7777 == 0o600 && meta.nlink() == 1;
    ours.then_some((file, meta.len()))
}

/// How long ago the refresh in flight when the daemon stopped went out, if one was: the
/// marker names the generation of `state` (`None`: no state file; only a marker of
/// generation 0, a first login from a configured refresh token, counts then) or a newer one.
/// A marker whose text is not ours counts as in flight, aged by its modification time: it is
/// an older tokend's (which removed its marker after each refresh), or was cut short by a
/// crash before its request went out, when a refresh with that token is safe to send again.
pub fn in_flight(path: &Path, state: Option<u64>, now: DateTime<Utc>) -> Option<Duration> {
    let bytes = super::read::read_regular(path, 4096).ok()?;
    let Some((generation, since)) = parse(&String::from_utf8_lossy(&bytes)) else {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        return Some(modified.and_then(|m| m.elapsed().ok()).unwrap_or_default());
    };
    let current = match state {
        Some(g) => generation >= g,
        None => generation == 0,
    };
    // A marker from the future (the clock went back) counts as just written.
    current.then(|| (now - since).to_std().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_text_has_one_length_and_reads_back() {
        let t = at("2026-11-23T04:30:00Z");
        let (a, b) = (render(7, t), render(super::super::MAX_GENERATION, t));
        assert_eq!(a.len(), b.len());
        assert_eq!(parse(&a), Some((7, t)));
        assert_eq!(parse("refresh in flight since 2026-11-23T04:30:00+00:00\n"), None);
        assert_eq!(parse(&a[..40]), None);
    }

    /// Which markers say a refresh was in flight, by the state's generation.
    #[test]
    fn a_marker_counts_only_for_the_state_it_was_written_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.intent");
        let now = at("2026-11-23T04:30:10Z");
        assert_eq!(in_flight(&path, Some(3), now), None, "no marker");
        write(&path, 3, at("2026-11-23T04:30:00Z")).unwrap();
        let ten = Some(Duration::from_secs(10));
        for (state, expect) in [(Some(3), ten), (Some(2), ten), (Some(4), None), (None, None)] {
            assert_eq!(in_flight(&path, state, now), expect, "state {state:?}");
        }
        write(&path, 0, at("2026-11-23T04:30:00Z")).unwrap();
        assert_eq!(in_flight(&path, None, now), ten, "a first login in flight");
        assert_eq!(in_flight(&path, Some(1), now), None, "the first login was saved");
        write(&path, 3, at("2026-11-23T04:31:00Z")).unwrap();
        assert_eq!(in_flight(&path, Some(3), now), Some(Duration::ZERO), "from the future");
        std::fs::write(&path, "refresh in flight since 2026-11-23T04:30:00+00:00\n").unwrap();
        assert!(in_flight(&path, Some(9), now).is_some(), "an older tokend's marker");
    }

    /// A marker of ours with another length (an older tokend's text) is rewritten in place to
    /// exactly the new text: the size is set (and synced) when it differs.
    #[test]
    fn a_rewrite_in_place_leaves_no_tail_of_a_longer_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.intent");
        std::fs::write(&path, "x".repeat(200)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        let t = at("2026-11-23T04:30:00Z");
        write(&path, 5, t).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "rewritten in place");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), render(5, t));
        assert_eq!(in_flight(&path, Some(5), t), Some(Duration::ZERO));
    }

    /// The point of the module: a refresh after the first reuses the marker's inode.
    #[test]
    fn a_rewrite_keeps_the_inode_and_replaces_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.intent");
        let ino = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
        write(&path, 1, Utc::now()).unwrap();
        let first = ino(&path);
        write(&path, 2, Utc::now()).unwrap();
        assert_eq!(ino(&path), first, "rewritten in place");
        assert!(in_flight(&path, Some(2), Utc::now()).is_some());
        // A symlink planted there is replaced, not followed; so is a file with another mode.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write(&path, 3, Utc::now()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let before = ino(&path);
        write(&path, 4, Utc::now()).unwrap();
        assert_ne!(ino(&path), before, "a marker with another mode is replaced");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }
}
