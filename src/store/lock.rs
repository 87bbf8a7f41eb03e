//! One writer per token: an exclusive `flock` on `<state_file>.lock`, holding the owner's pid
//! so that a second daemon can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path} is locked by another tokend ({holder}); only one refresher per token may run")]
    Held { path: PathBuf, holder: String },
    #[error("cannot open lock file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Held for as long as this value lives; the kernel drops it if the process dies. Only the
/// open file: each token's task holds one, and its path is the state file's plus `.lock`.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// The lock file path for a state file.
    pub fn path_for(state_file: &Path) -> PathBuf {
        super::state::sibling(state_file, ".lock")
    }

    /// Takes the lock without waiting.
    pub fn acquire(state_file: &Path) -> Result<Self, LockError> {
        let path = Self::path_for(state_file);
        let io = |source| LockError::Io { path: path.clone(), source };
        let open = |create_new: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(!create_new)
                .create_new(create_new)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
        };
        // A first start creates every lock file: one that this call created is empty, so it
        // needs no truncation (two system calls fewer per token; 10,000 tokens' lock files are
        // taken one after another before any token starts).
        let (mut file, new) = match open(true) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                (open(false).map_err(io)?, false)
            }
            Err(e) => return Err(io(e)),
        };
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "holder unknown".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(LockError::Held { path, holder });
        }
        if !new {
            file.set_len(0).map_err(io)?;
        }
        file.write_all(super::pid().as_bytes()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock file left by an earlier daemon (a longer pid) holds exactly this one's pid
    /// once taken; a new one is created with it.
    #[test]
    fn the_lock_file_holds_exactly_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("main.state.json");
        let me = std::process::id().to_string();
        let new = StateLock::acquire(&state).unwrap();
        assert_eq!(std::fs::read_to_string(StateLock::path_for(&state)).unwrap(), me);
        drop(new);
        std::fs::write(StateLock::path_for(&state), "99999999999").unwrap();
        let _held = StateLock::acquire(&state).unwrap();
        assert_eq!(std::fs::read_to_string(StateLock::path_for(&state)).unwrap(), me);
    }

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("main.state.json");
        let held = StateLock::acquire(&state).unwrap();
        let err = StateLock::acquire(&state).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        // flock belongs to the open file description: a test of this process that forks a
        // child at this moment holds a copy of it until the child's exec closes it
        // (O_CLOEXEC), so the release is waited for, not raced (failed once in CI).
        let start = std::time::Instant::now();
        while StateLock::acquire(&state).is_err() {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "never released");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
