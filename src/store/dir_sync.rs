//! Directory fsyncs shared by the writers that renamed into one directory at about the same
//! time (a group commit): one fsync that starts after several renames makes all of them
//! durable, so a round of 10,000 tokens, 64 writes at once, needs far fewer than one per file.
//!
//! Each writer counts its rename once it is done, then waits until an fsync of the directory
//! that started after that count has finished, running one itself when none is running. So
//! every rename is durable before its writer returns, as if it had made its own fsync
//! (principle 3); the writers only share the wait. On this VM each fsync is a request to the
//! virtual disk and an interrupt back, which is where most of a round's system time went.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError, RwLock};

/// One directory's renames and fsyncs, counted.
#[derive(Default)]
struct Dir {
    counts: Mutex<Counts>,
    synced: Condvar,
}

#[derive(Default)]
struct Counts {
    /// Renames done in the directory so far.
    renamed: u64,
    /// The renames an fsync has made durable: every one counted when it started.
    durable: u64,
    /// An fsync is running.
    syncing: bool,
    /// Directory fsyncs made (the unit tests count them).
    fsyncs: u64,
}

/// Keyed by the directory's bytes as written (hashing a `Path` parses its components; two
/// spellings of one directory only share less). Read-locked on every write: the 64 writers of
/// a round looked it up under one mutex, allocating a copy of the path each time, and
/// queued on it (a fifth of the write pool's futex calls in a 10,000-token bootstrap, issue 15).
static DIRS: LazyLock<RwLock<HashMap<OsString, Arc<Dir>>>> = LazyLock::new(RwLock::default);

fn dir(path: &Path) -> Arc<Dir> {
    let key = path.as_os_str();
    if let Some(dir) = DIRS.read().unwrap_or_else(PoisonError::into_inner).get(key) {
        return dir.clone();
    }
    let mut dirs = DIRS.write().unwrap_or_else(PoisonError::into_inner);
    dirs.entry(key.to_os_string()).or_default().clone()
}

impl Dir {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Makes a rename into `path` that has returned durable: returns once an fsync of `path`
/// that began after it has succeeded. An error is the caller's own fsync's; a failed fsync
/// of another writer's makes the waiting writers try again themselves.
pub fn after_rename(path: &Path) -> io::Result<()> {
    let dir = dir(path);
    let mut counts = dir.lock();
    counts.renamed += 1;
    let mine = counts.renamed;
    while counts.durable < mine {
        if counts.syncing {
            counts = dir.synced.wait(counts).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        counts.syncing = true;
        let upto = counts.renamed;
        drop(counts);
        let result = File::open(path).and_then(|d| d.sync_all());
        counts = dir.lock();
        counts.syncing = false;
        counts.fsyncs += 1;
        dir.synced.notify_all();
        result?;
        counts.durable = counts.durable.max(upto);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers that renamed while another writer's fsync ran (here: one the test holds, which
    /// then fails) share one fsync that begins after all their renames; each returns only then.
    #[test]
    fn writers_waiting_on_one_fsync_share_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path();
        let d = dir(path);
        d.lock().syncing = true;
        let writers = 8;
        std::thread::scope(|s| {
            for t in 0..writers {
                s.spawn(move || {
                    let (file, tmp) = (path.join(format!("f{t}")), path.join(format!(".f{t}.tmp")));
                    std::fs::write(&tmp, b"x").unwrap();
                    std::fs::rename(&tmp, &file).unwrap();
                    after_rename(path).unwrap();
                });
            }
            // Bounded: the writers only rename one small file each before they count.
            for _ in 0..10_000 {
                if d.lock().renamed == writers {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(d.lock().renamed, writers, "the writers did not all rename");
            assert_eq!(d.lock().durable, 0, "a writer returned before any fsync");
            // The held fsync ends without making anything durable (as a failed one does).
            d.lock().syncing = false;
            d.synced.notify_all();
        });
        let counts = d.lock();
        assert_eq!((counts.fsyncs, counts.durable), (1, writers), "one fsync for all of them");
    }

    #[test]
    fn a_missing_directory_is_the_callers_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(after_rename(&dir.path().join("gone")).is_err());
        assert!(after_rename(dir.path()).is_ok(), "an error does not stick");
    }
}
