//! What `check`, `run` and a reload verify on disk before promising anything: every file
//! tokend writes is a different file (canonical directory plus name, and device+inode where
//! it exists), across all tokens, their proxies' sockets and the metrics file; every directory exists and is
//! writable; and the open-file limit fits the tokens.

use super::Config;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
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
struct Written<'a> {
    key: Key<'a>,
    path: PathBuf,
}

/// The config key that names a written file, formatted only for an error message (10,000
/// tokens write 60,000 files, checked at every start).
#[derive(Clone, Copy)]
enum Key<'a> {
    /// `token "NAME".WHAT`
    Token(&'a str, &'static str),
    Metrics,
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Token(name, what) => write!(f, "token \"{name}\".{what}"),
            Key::Metrics => f.write_str("metrics.textfile"),
        }
    }
}

/// Open files the daemon needs besides the tokens' locks (sockets, the runtime, logs).
pub const BASE_FILES: u64 = 256;

impl Config {
    /// Every file this config makes tokend write, with its key.
    fn written(&self) -> Vec<Written<'_>> {
        use crate::store::{State, StateLock, Status};
        let mut out = Vec::new();
        for t in &self.tokens {
            let key = |what| Key::Token(&t.name, what);
            let f = &t.state_file;
            out.push(Written { key: key("state_file"), path: f.clone() });
            for (what, path) in [
                ("state_file (its .lock file)", StateLock::path_for(f)),
                ("state_file (its .status file)", Status::path_for(f)),
                ("state_file (its .intent file)", State::intent_path(f)),
                ("state_file (its .login file)", State::handoff_path(f)),
            ] {
                out.push(Written { key: key(what), path });
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
            out.push(Written { key: Key::Metrics, path: p.clone() });
        }
        out
    }

    /// Checks that no two written files are one, and that every directory is writable.
    pub fn check_files(&self) -> Result<(), FileProblem> {
        let written = self.written();
        let mut dirs = Dirs::default();
        let mut by_path: HashMap<(usize, &OsStr), &Written> = HashMap::new();
        let mut by_inode: HashMap<(u64, u64), &Written> = HashMap::new();
        for (i, w) in written.iter().enumerate() {
            let dir = parent(&w.path);
            let d = dirs.of(dir, i).map_err(|source| FileProblem::Dir {
                config: self.path.clone(),
                key: w.key.to_string(),
                dir: dir.to_path_buf(),
                source,
            })?;
            let name = w.path.file_name().unwrap_or_default();
            let id = || dirs.resolved[d].canon.join(name);
            if let Some(first) = by_path.insert((d, name), w) {
                return Err(self.alias(w, first, &id()));
            }
            // lstat: a symlink at a written path is replaced, never followed, so it is the
            // link's own inode that counts; a hard link to another written file is caught.
            if dirs.resolved[d].may_hold(name)
                && let Ok(m) = std::fs::symlink_metadata(&w.path)
                && let Some(first) = by_inode.insert((m.dev(), m.ino()), w)
            {
                return Err(self.alias(w, first, &id()));
            }
        }
        for r in dirs.resolved {
            crate::store::check_dir_writable(&r.canon).map_err(|source| FileProblem::Dir {
                config: self.path.clone(),
                key: written[r.first].key.to_string(),
                dir: r.canon,
                source,
            })?;
        }
        self.check_file_limit()
    }

    fn alias(&self, w: &Written, first: &Written, id: &Path) -> FileProblem {
        FileProblem::Alias {
            config: self.path.clone(),
            key: w.key.to_string(),
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

/// The directories of the written files, each resolved and listed once: 10,000 tokens write
/// 60,000 files in a few directories. A `realpath` per file was a `readlink` per path
/// component (240,000 system calls before any token started), and an `lstat` per file is
/// one per file that does not exist yet at a first start (issue 15).
#[derive(Default)]
struct Dirs<'a> {
    /// Each directory as the config writes it: its index in `resolved`.
    seen: HashMap<&'a Path, usize>,
    /// Each canonical directory once (two spellings of one share it).
    by_canon: HashMap<PathBuf, usize>,
    resolved: Vec<Resolved>,
}

struct Resolved {
    canon: PathBuf,
    /// The names in the directory when it was listed (`None`: it cannot be listed).
    names: Option<HashSet<OsString>>,
    /// The first written file in it (whose key an error names).
    first: usize,
}

impl<'a> Dirs<'a> {
    /// The index of `dir` (where written file `first` is), resolving and listing it the
    /// first time.
    fn of(&mut self, dir: &'a Path, first: usize) -> std::io::Result<usize> {
        if let Some(&d) = self.seen.get(dir) {
            return Ok(d);
        }
        let canon = std::fs::canonicalize(dir)?;
        let d = if let Some(&d) = self.by_canon.get(&canon) {
            d
        } else {
            let names = std::fs::read_dir(&canon)
                .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
                .ok();
            self.resolved.push(Resolved { canon: canon.clone(), names, first });
            self.by_canon.insert(canon, self.resolved.len() - 1);
            self.resolved.len() - 1
        };
        self.seen.insert(dir, d);
        Ok(d)
    }
}

impl Resolved {
    /// Whether `name` may exist in the directory (it was listed there, or the directory
    /// could not be listed).
    fn may_hold(&self, name: &OsStr) -> bool {
        self.names.as_ref().is_none_or(|names| names.contains(name))
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}
