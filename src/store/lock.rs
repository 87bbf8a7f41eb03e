//! One writer per token: an exclusive `flock` on `<state_file>.lock`, holding the owner's pid
//! so that a second daemon can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
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
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "holder unknown".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(LockError::Held { path, holder });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
