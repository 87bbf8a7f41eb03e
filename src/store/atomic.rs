//! Whole-file replacement that readers can never see torn: temp file in the same directory,
//! created exclusively with an explicit mode, fsync, rename, fsync of the directory.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.tmp.{}.{n}", name.to_string_lossy(), super::pid());
    Ok(path.with_file_name(tmp))
}

/// Atomically replaces `path` with `contents`, mode `mode` exactly (umask ignored).
///
/// `O_EXCL|O_NOFOLLOW` on the temp file means a planted symlink cannot redirect the write;
/// `rename` replaces a symlink at `path` itself rather than following it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let result = write_temp(&tmp, contents, mode).and_then(|()| {
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_temp(tmp: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    // The create mode went through the umask; set it explicitly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The rename into `path`'s directory is durable once an fsync of the directory that began
/// after it is over: shared with the other writers there (`dir_sync`).
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    super::dir_sync::after_rename(dir)
}

/// Removes `.NAME.tmp.*` files a killed writer left in `dir` for any NAME in `names`. Call
/// only while holding the locks that make this process the only writer of those files. One
/// directory scan serves every file in it (10,000 tokens in one directory is a real layout).
pub fn remove_stale_temps(dir: &Path, names: &std::collections::BTreeSet<std::ffi::OsString>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let base = name.strip_prefix('.').and_then(|rest| rest.rfind(".tmp.").map(|i| &rest[..i]));
        if base.is_some_and(|b| names.contains(std::ffi::OsStr::new(b))) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Fails unless a file can be created in `dir` (checked at start, before anything is promised).
pub fn check_dir_writable(dir: &Path) -> io::Result<()> {
    let probe = temp_path(&dir.join(".tokend-probe"))?;
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(&probe)?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for mode in [0o600, 0o640, 0o644] {
            write_atomic(&path, b"x", mode).unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, mode);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp files left");
    }

    #[test]
    fn symlink_at_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("sink");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    }

    #[test]
    fn missing_directory_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("f");
        assert!(write_atomic(&path, b"x", 0o600).is_err());
        assert!(check_dir_writable(&dir.path().join("nope")).is_err());
        assert!(check_dir_writable(dir.path()).is_ok());
    }
}
