//! What `check`, `run` and a reload verify on disk before promising anything: every file
//! tokend writes is a different file (canonical directory plus name, and device+inode where
//! it exists), across all tokens, their proxies' sockets and the metrics file; every directory exists and is
//! writable; and the open-file limit fits the tokens.

use super::Config;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the files of a config cannot be written as it says.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    /// Two keys name one file: one write would replace the other (a refresh token lost).
    #[error("{config}: key `{key}`: {message}")]
    Alias { config: PathBuf, key: String, message: String },
    /// A directory is missing, not a directory, or not writable by this user.
    #[error("{config}: key `{key}`: directory {}: {source}", crate::text::path(.dir))]
    Dir { config: PathBuf, key: String, dir: PathBuf, source: std::io::Error },
    /// The open-file limit is below what the tokens need (one lock per token and more).
    #[error("{0}")]
    Limit(String),
}

/// One file tokend writes, and the key that names it.
struct Written {
    key: String,
    path: PathBuf,
}

/// Open files the daemon needs besides the tokens' locks (sockets, the runtime, logs).
pub const BASE_FILES: u64 = 256;

impl Config {
    /// Every file this config makes tokend write, with its key.
    fn written(&self) -> Vec<Written> {
        use crate::store::{State, StateLock, Status};
        let mut out = Vec::new();
        for t in &self.tokens {
            let key = |k: &str| format!("token \"{}\".{k}", t.name);
            let f = &t.state_file;
            out.push(Written { key: key("state_file"), path: f.clone() });
            for (what, path) in [
                (".lock", StateLock::path_for(f)),
                (".status", Status::path_for(f)),
                (".intent", State::intent_path(f)),
                (".login", State::handoff_path(f)),
            ] {
                out.push(Written { key: format!("{} (its {what} file)", key("state_file")), path });
            }
            for s in &t.sinks {
                out.push(Written { key: key("sink.path"), path: s.path.clone() });
            }
            for p in &t.proxies {
                if let super::Listen::Unix { path, .. } = &p.listen {
                    out.push(Written { key: key("proxy.listen"), path: path.clone() });
                }
            }
        }
        if let Some(p) = &self.metrics.textfile {
            out.push(Written { key: "metrics.textfile".into(), path: p.clone() });
        }
        out
    }

    /// Checks that no two written files are one, and that every directory is writable.
    pub fn check_files(&self) -> Result<(), FileProblem> {
        let mut by_path: HashMap<PathBuf, &Written> = HashMap::new();
        let mut by_inode: HashMap<(u64, u64), &Written> = HashMap::new();
        let mut dirs: BTreeMap<PathBuf, &Written> = BTreeMap::new();
        // Each directory is resolved once, not once per file: 10,000 tokens write 60,000
        // files in a few directories, and each `realpath` is a `readlink` per path component
        // (240,000 system calls on the daemon's start-up, before any token started).
        let mut canonical: HashMap<&Path, PathBuf> = HashMap::new();
        let written = self.written();
        for w in &written {
            let dir = parent(&w.path);
            let canon = if let Some(canon) = canonical.get(dir) {
                canon.clone()
            } else {
                let canon = std::fs::canonicalize(dir).map_err(|source| FileProblem::Dir {
                    config: self.path.clone(),
                    key: w.key.clone(),
                    dir: dir.to_path_buf(),
                    source,
                })?;
                canonical.entry(dir).or_insert(canon).clone()
            };
            let id = canon.join(w.path.file_name().unwrap_or_default());
            if let Some(first) = by_path.insert(id.clone(), w) {
                return Err(self.alias(w, first, &id));
            }
            // lstat: a symlink at a written path is replaced, never followed, so it is the
            // link's own inode that counts; a hard link to another written file is caught.
            if let Ok(m) = std::fs::symlink_metadata(&w.path)
                && let Some(first) = by_inode.insert((m.dev(), m.ino()), w)
            {
                return Err(self.alias(w, first, &id));
            }
            dirs.entry(canon).or_insert(w);
        }
        for (dir, w) in dirs {
            crate::store::check_dir_writable(&dir).map_err(|source| FileProblem::Dir {
                config: self.path.clone(),
                key: w.key.clone(),
                dir,
                source,
            })?;
        }
        self.check_file_limit()
    }

    fn alias(&self, w: &Written, first: &Written, id: &Path) -> FileProblem {
        FileProblem::Alias {
            config: self.path.clone(),
            key: w.key.clone(),
            message: format!(
                "{} is the same file as `{}` ({}): one would overwrite the other",
                crate::text::path(&w.path),
                first.key,
                crate::text::path(id)
            ),
        }
    }

    /// Open files needed: one lock per token plus a base. Checked against the hard limit
    /// (the daemon raises its soft limit to the hard one at start).
    fn check_file_limit(&self) -> Result<(), FileProblem> {
        let need = self.tokens.len() as u64 + BASE_FILES;
        let Some((_, hard)) = crate::limits::open_files() else { return Ok(()) };
        if need > hard {
            return Err(FileProblem::Limit(format!(
                "{} tokens need about {need} open files, and the hard limit is {hard}; raise it \
                 (systemd: LimitNOFILE={need} or more; a shell: ulimit -Hn)",
                self.tokens.len()
            )));
        }
        Ok(())
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}
