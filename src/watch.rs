//! The reader side: follow a sink file and always hold its latest token, without ever
//! refreshing. Rename-safe (watches the directory, not the file), survives the file or its
//! directory vanishing and coming back, re-reads on event-queue overflow, and can poll
//! instead for network filesystems where inotify says nothing.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use tokend::watch::TokenWatcher;
//! let mut watcher = TokenWatcher::open("/run/tokend/main.json")?;
//! if let Some(token) = watcher.current() {
//!     // use token.access_token.expose() in an Authorization header
//! }
//! // After a 401: re-read now; if the token did not change, the 401 is not ours to fix.
//! let changed = watcher.reload_now();
//! // Or wait for the next token:
//! let next = watcher.changed().await;
//! # Ok(()) }
//! ```

use crate::secret::AccessToken;
use chrono::{DateTime, Utc};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// One token as read from a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub access_token: AccessToken,
    /// From a json sink; `None` for a raw sink.
    pub generation: Option<u64>,
    pub expires_at: Option<DateTime<Utc>>,
    pub token_type: String,
}

impl Token {
    pub fn fingerprint(&self) -> String {
        self.access_token.fingerprint()
    }

    /// True when the sink says the token has expired.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// Why a sink could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: no such file")]
    Missing { path: PathBuf },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: empty file")]
    Empty { path: PathBuf },
    #[error("{path}: not a tokend sink ({message})")]
    Unparsable { path: PathBuf, message: String },
}

/// Parses a sink's bytes: json (starts with `{`) or raw (the token alone). A json sink needs
/// only `access_token` and an expiry (`expires_at` or `expire_time`); other fields are
/// optional and unknown ones ignored, so a reader works with a newer or older writer. The
/// token must be visible ASCII (it goes into headers); errors never quote it.
pub fn parse_sink(path: &Path, bytes: &[u8]) -> Result<Token, ReadError> {
    let bad = |message: String| ReadError::Unparsable { path: path.into(), message };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ReadError::Empty { path: path.into() });
    }
    if trimmed.starts_with('{') {
        return parse_json_sink(trimmed).map_err(bad);
    }
    if !crate::text::is_token(trimmed) {
        return Err(bad(
            "a raw sink holds one token of visible ASCII characters (no spaces or controls)".into(),
        ));
    }
    Ok(Token {
        access_token: AccessToken::new(trimmed),
        generation: None,
        expires_at: None,
        token_type: "bearer".into(),
    })
}

/// The fields a reader uses; everything else in the document is ignored.
fn parse_json_sink(text: &str) -> Result<Token, String> {
    use serde_json::Value;
    let doc: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| format!("json at line {} column {}", e.line(), e.column()))?;
    let access_token = match doc.get("access_token") {
        None => return Err("no access_token field".into()),
        Some(Value::String(t)) if crate::text::is_token(t) => t.clone(),
        Some(Value::String(t)) if t.is_empty() => return Err("empty access_token".into()),
        Some(Value::String(_)) => {
            return Err("access_token holds characters outside visible ASCII".into());
        }
        Some(_) => return Err("access_token is not a string".into()),
    };
    let expires_at = json_expiry(&doc)?;
    let generation = match doc.get("generation") {
        None | Some(Value::Null) => None,
        Some(g) => Some(g.as_u64().ok_or("generation is not a whole number")?),
    };
    let token_type = match doc.get("token_type") {
        Some(Value::String(t)) => crate::text::escape_controls(t).into_owned(),
        _ => "bearer".into(),
    };
    Ok(Token {
        access_token: AccessToken::new(access_token),
        generation,
        expires_at: Some(expires_at),
        token_type,
    })
}

/// `expires_at` (RFC 3339), else `expire_time` (ms since the epoch, the RingCentral JS SDK's).
fn json_expiry(doc: &serde_json::Map<String, serde_json::Value>) -> Result<DateTime<Utc>, String> {
    if let Some(v) = doc.get("expires_at") {
        return v
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| "expires_at is not an RFC 3339 time".into());
    }
    match doc.get("expire_time") {
        None => {
            Err("no expiry: needs expires_at (RFC 3339) or expire_time (ms since the epoch)".into())
        }
        Some(v) => v
            .as_i64()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| "expire_time is not a time in ms since the epoch".into()),
    }
}

/// Reads and parses a sink once: a regular file of at most `MAX_FILE` bytes (a FIFO, a
/// device or a huge file is refused with the reason, never read).
pub fn read_sink(path: &Path) -> Result<Token, ReadError> {
    let bytes =
        crate::store::read_regular(path, crate::store::MAX_FILE).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::Missing { path: path.into() },
            _ => ReadError::Io { path: path.into(), message: e.to_string() },
        })?;
    parse_sink(path, &bytes)
}

/// Shared between the watcher thread and the handles.
struct Inner {
    path: PathBuf,
    tx: watch::Sender<Option<Arc<Token>>>,
    /// Counts changes, for blocking waiters.
    changes: Mutex<u64>,
    cond: Condvar,
    last_error: Mutex<Option<ReadError>>,
}

impl Inner {
    /// Re-reads the file; publishes a new token if it differs. Returns whether it changed.
    fn reload(&self) -> bool {
        match read_sink(&self.path) {
            Ok(token) => {
                *self.last_error.lock().expect("lock") = None;
                let changed = self.tx.send_if_modified(|cur| {
                    let same = cur.as_deref().is_some_and(|c| {
                        c.access_token == token.access_token && c.generation == token.generation
                    });
                    if !same {
                        *cur = Some(Arc::new(token));
                    }
                    !same
                });
                if changed {
                    *self.changes.lock().expect("lock") += 1;
                    self.cond.notify_all();
                }
                changed
            }
            Err(e) => {
                // Keep the last good token: a reader must never drop to nothing because of a
                // bad or missing file.
                *self.last_error.lock().expect("lock") = Some(e);
                false
            }
        }
    }
}

/// How to follow the file.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// inotify (or the platform's equivalent) on the directory.
    Notify,
    /// Stat the file at this interval: for NFS and other filesystems without events.
    Poll(Duration),
}

/// Follows one sink file. Cheap to query; dropping it stops the watching.
pub struct TokenWatcher {
    inner: Arc<Inner>,
    rx: watch::Receiver<Option<Arc<Token>>>,
    _backend: Backend,
}

enum Backend {
    /// Held only to keep the watch alive.
    Notify {
        _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    },
    Poll(Arc<std::sync::atomic::AtomicBool>),
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Poll(stop) = self {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl TokenWatcher {
    /// Opens `path` with inotify. The file need not exist yet.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        Self::with_mode(path, Mode::Notify)
    }

    /// Opens `path`, following it as `mode` says.
    pub fn with_mode(path: impl AsRef<Path>, mode: Mode) -> std::io::Result<Self> {
        let path = std::path::absolute(path.as_ref())?;
        let (tx, rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            path,
            tx,
            changes: Mutex::new(0),
            cond: Condvar::new(),
            last_error: Mutex::new(None),
        });
        let backend = match mode {
            Mode::Notify => Backend::Notify { _watcher: start_notify(&inner)? },
            Mode::Poll(every) => Backend::Poll(start_poll(&inner, every)),
        };
        inner.reload();
        let mut rx = rx;
        // What `open` read is current, not a change: `changed()` waits for the next one.
        rx.borrow_and_update();
        Ok(Self { inner, rx, _backend: backend })
    }

    /// The latest good token, if one has been read. No file access.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.rx.borrow().clone()
    }

    /// Why the last read failed, if it did (the last good token is still served).
    pub fn last_error(&self) -> Option<ReadError> {
        self.inner.last_error.lock().expect("lock").clone()
    }

    /// "My API call got 401": re-read now. True when the token changed, so a retry may work.
    pub fn reload_now(&self) -> bool {
        self.inner.reload()
    }

    /// Waits for a token different from the last one this handle returned.
    pub async fn changed(&mut self) -> Option<Arc<Token>> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().clone()
    }

    /// Blocking wait (for programs without an async runtime): returns once a token newer
    /// than `seen` (a value of `changes()`) arrives, or `None` after `timeout`.
    pub fn wait_blocking(&self, seen: u64, timeout: Duration) -> Option<(u64, Arc<Token>)> {
        let guard = self.inner.changes.lock().expect("lock");
        let (guard, _) =
            self.inner.cond.wait_timeout_while(guard, timeout, |n| *n <= seen).expect("lock");
        (*guard > seen).then(|| (*guard, self.current().expect("a change means a token")))
    }

    /// How many changes have been seen so far (pair with `wait_blocking`).
    pub fn changes(&self) -> u64 {
        *self.inner.changes.lock().expect("lock")
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// What the re-watch thread is told.
enum Rewatch {
    /// The directory vanished: watch its parent to see it come back.
    DirGone,
    /// The directory is back: watch it again and stop watching the parent.
    DirBack,
}

/// Watches the file's directory; while the directory is missing, watches its parent instead
/// (a busy parent such as /tmp costs wake-ups, so only then).
fn start_notify(inner: &Arc<Inner>) -> std::io::Result<Arc<Mutex<notify::RecommendedWatcher>>> {
    let dir = parent(&inner.path);
    let grand = parent(&dir);
    let file_name: OsString = inner.path.file_name().unwrap_or_default().to_owned();
    let dir_name: OsString = dir.file_name().unwrap_or_default().to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<Rewatch>();
    let weak = Arc::downgrade(inner);
    let cb_dir = dir.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Some(inner) = weak.upgrade() else { return };
        let Ok(event) = res else {
            inner.reload();
            return;
        };
        let named = |n: &OsString| event.paths.iter().any(|p| p.file_name() == Some(n.as_os_str()));
        let ours = named(&file_name);
        let moved_or_removed = matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
        );
        if event.paths.contains(&cb_dir) && moved_or_removed && !cb_dir.exists() {
            let _ = tx.send(Rewatch::DirGone);
        } else if !ours && named(&dir_name) && cb_dir.is_dir() {
            let _ = tx.send(Rewatch::DirBack);
        }
        if ours || event.need_rescan() || matches!(event.kind, EventKind::Other) {
            inner.reload();
        }
    })
    .map_err(std::io::Error::other)?;
    let watcher = Arc::new(Mutex::new(watcher));
    {
        let mut w = watcher.lock().expect("lock");
        if w.watch(&dir, RecursiveMode::NonRecursive).is_err() {
            w.watch(&grand, RecursiveMode::NonRecursive).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "neither {} nor {} can be watched: {e}",
                        dir.display(),
                        grand.display()
                    ),
                )
            })?;
        }
    }
    // Changing watches happens on its own thread: notify's callback must not call into the
    // watcher. The thread ends when the callback (holding the sender) is dropped.
    let weak_watcher = Arc::downgrade(&watcher);
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new().name("tokend-rewatch".into()).spawn(move || {
        while let Ok(msg) = rx.recv() {
            let (Some(w), Some(inner)) = (weak_watcher.upgrade(), weak.upgrade()) else { return };
            let mut w = w.lock().expect("lock");
            if matches!(msg, Rewatch::DirGone) {
                let _ = w.watch(&grand, RecursiveMode::NonRecursive);
            }
            // Also after DirGone: the directory may already be back.
            if dir.is_dir() && w.watch(&dir, RecursiveMode::NonRecursive).is_ok() {
                let _ = w.unwatch(&grand);
            }
            drop(w);
            inner.reload();
        }
    })?;
    Ok(watcher)
}

/// The shortest poll interval: a zero interval would spin a core.
pub const MIN_POLL: Duration = Duration::from_millis(10);

fn start_poll(inner: &Arc<Inner>, every: Duration) -> Arc<std::sync::atomic::AtomicBool> {
    use std::os::unix::fs::MetadataExt;
    let every = every.max(MIN_POLL);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_thread = stop.clone();
    let weak = Arc::downgrade(inner);
    let path = inner.path.clone();
    std::thread::Builder::new()
        .name("tokend-poll".into())
        .spawn(move || {
            let mut last = None;
            while !stop_thread.load(std::sync::atomic::Ordering::Relaxed) {
                // Identity of the file: a rename gives a new inode; an in-place rewrite a new mtime.
                let id = std::fs::metadata(&path)
                    .ok()
                    .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()));
                if id != last {
                    let Some(inner) = weak.upgrade() else { return };
                    inner.reload();
                    last = id;
                }
                std::thread::sleep(every);
            }
        })
        .expect("spawn poll thread");
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Token, String> {
        parse_sink(Path::new("/s"), text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn json_needs_only_a_token_and_an_expiry() {
        let t = parse(r#"{"access_token":"a","expires_at":"2030-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!((t.generation, t.token_type.as_str()), (None, "bearer"));
        let t = parse(r#"{"access_token":"a","expire_time":1893456000000,"x":[1],"generation":4}"#)
            .unwrap();
        assert_eq!(t.expires_at.unwrap().to_rfc3339(), "2030-01-01T00:00:00+00:00");
        assert_eq!(t.generation, Some(4));
    }

    #[test]
    fn json_errors_name_the_field_and_never_the_token() {
        let table = [
            (r#"{"expires_at":"2030-01-01T00:00:00Z"}"#, "no access_token field"),
            (r#"{"access_token":"SECRET"}"#, "no expiry: needs expires_at"),
            (r#"{"access_token":"SECRET","expires_at":"soon"}"#, "expires_at is not"),
            (r#"{"access_token":"SECRET","expire_time":"x"}"#, "expire_time is not"),
            (r#"{"access_token":7,"expire_time":1}"#, "access_token is not a string"),
            (r#"{"access_token":"","expire_time":1}"#, "empty access_token"),
            (r#"{"access_token":"SECRET\r\nX: 1","expire_time":1}"#, "outside visible ASCII"),
            (r#"{"access_token":"SECRET","expire_time":1,"generation":-1}"#, "generation"),
        ];
        for (text, want) in table {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want) && !e.contains("SECRET"), "{text}: {e}");
        }
    }

    #[test]
    fn raw_is_one_visible_ascii_token() {
        assert_eq!(parse("abc.def\n").unwrap().access_token.expose(), "abc.def");
        for bad in ["AT1\r\nX-Evil: 1", "a\u{1b}[31m", "tok\u{0}en", "a b"] {
            assert!(parse(bad).unwrap_err().contains("visible ASCII"), "{bad:?}");
        }
        assert!(parse(&"\0".repeat(64)).is_err(), "NUL bytes are not a token");
    }

    #[test]
    fn read_sink_refuses_devices_and_huge_files() {
        let e = read_sink(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
        let e = read_sink(&big).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }
}
