//! The private per-token state file (refresh token, expiries, generation, session facts),
//! and the non-secret status file beside it that `tokend status` reads.

use super::atomic::write_atomic;
use crate::oauth::TokenSet;
use crate::secret::{AccessToken, RefreshToken};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped when the layout changes incompatibly.
pub const STATE_VERSION: u32 = 1;

/// The highest generation: 2^53 - 1, the largest integer every JSON reader (JavaScript's
/// `Number`) holds exactly. A state file beyond it is corrupt; a refresh at it keeps it
/// (saturates, with an ERROR) rather than wrap to 0, so the generation never goes back.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Everything needed to resume a token without a new login. Mode 0600.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub name: String,
    /// Grows by one with every new access token; never goes back.
    pub generation: u64,
    pub access_token: AccessToken,
    pub token_type: String,
    #[serde(with = "crate::time::rfc3339")]
    pub access_expires_at: DateTime<Utc>,
    pub refresh_token: Option<RefreshToken>,
    #[serde(with = "crate::time::rfc3339_opt", default)]
    pub refresh_expires_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339")]
    pub refreshed_at: DateTime<Utc>,
    #[serde(with = "crate::time::rfc3339")]
    pub session_started_at: DateTime<Utc>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub owner_id: Option<String>,
    #[serde(default)]
    pub endpoint_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
}

/// `<dir>/<name><suffix>` beside `path`: the lock, status, intent and hand-off files.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

impl State {
    /// Whether it holds a refresh token that has not expired at `now`.
    pub fn can_refresh(&self, now: DateTime<Utc>) -> bool {
        self.refresh_token.is_some() && self.refresh_expires_at.is_none_or(|t| t > now)
    }

    /// Reads a state file; `Ok(None)` when there is none yet. Only a regular file of at most
    /// `MAX_FILE` bytes is read (a FIFO put in its place must not block the daemon); one
    /// that is not regular is an I/O error (kept, never logged in over), one too large or
    /// with values no writer of ours produces is corrupt.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let bytes = match super::read::read_regular(path, super::read::MAX_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(StateError::Corrupt { path: path.into(), message: e.to_string() });
            }
            Err(source) => return Err(StateError::Io { path: path.into(), source }),
        };
        let corrupt = |message: String| StateError::Corrupt { path: path.into(), message };
        // serde_json's messages quote no input values, only positions and field names.
        let state: Self = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        state.validate().map_err(corrupt)?;
        Ok(Some(state))
    }

    /// Reads the state file of token `name`: a state written for another token (a file
    /// copied over this one) is corrupt, so that two tokens never refresh one chain.
    pub fn load_for(path: &Path, name: &str) -> Result<Option<Self>, StateError> {
        let state = Self::load(path)?;
        match &state {
            Some(s) if s.name != name => Err(StateError::Corrupt {
                path: path.into(),
                message: format!(
                    "it belongs to token {:?}, not {name:?}",
                    crate::text::escape_controls(&s.name)
                ),
            }),
            _ => Ok(state),
        }
    }

    /// What no writer of ours produces: another version, a generation past
    /// `MAX_GENERATION`, a token that is not visible ASCII (it would be published).
    fn validate(&self) -> Result<(), String> {
        if self.version != STATE_VERSION {
            return Err(format!("version {} is not {STATE_VERSION}", self.version));
        }
        if self.generation > MAX_GENERATION {
            return Err(format!("generation {} is beyond {MAX_GENERATION}", self.generation));
        }
        if !crate::text::is_token(self.access_token.expose()) {
            return Err("access_token holds characters outside visible ASCII".into());
        }
        if self.refresh_token.as_ref().is_some_and(|t| !crate::text::is_token(t.expose())) {
            return Err("refresh_token holds characters outside visible ASCII".into());
        }
        Ok(())
    }

    /// Durably replaces the state file (mode 0600).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        write_atomic(path, &bytes, 0o600)
    }

    /// Marks a refresh in flight (no secret inside). Found at start, it means the server may
    /// have rotated the pair without our knowing: refresh again at once with the same refresh
    /// token, which the server answers from its grace-window cache.
    pub fn intent_path(state_file: &Path) -> PathBuf {
        sibling(state_file, ".intent")
    }

    /// Where `tokend login` leaves a new state for a running daemon to adopt.
    pub fn handoff_path(state_file: &Path) -> PathBuf {
        sibling(state_file, ".login")
    }

    /// Moves a corrupt state file aside so it is kept, not silently overwritten: as
    /// `.corrupt-<time>`, or `.corrupt-<time>-<n>` when that name is taken (two in one
    /// second). A hard link never replaces an existing name, unlike a rename.
    pub fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
        let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
        for n in 0..1000 {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".corrupt-{stamp}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let aside = path.with_file_name(name);
            match std::fs::hard_link(path, &aside) {
                Ok(()) => {
                    std::fs::remove_file(path)?;
                    return Ok(aside);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "1,000 files were moved aside in this second; keeping this one in place",
        ))
    }
}

/// The last failure, as `tokend status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    /// RingCentral's errorCode, the OAuth error, an HTTP status or "network".
    pub code: String,
    pub message: String,
    pub permanent: bool,
}

/// The state after a successful token request: the generation grows by one; the session start
/// carries over unless this was a new login.
pub fn next_state(
    name: &str,
    tokens: TokenSet,
    previous: Option<&State>,
    new_session: bool,
    now: DateTime<Utc>,
) -> State {
    let secs = |s: u64| chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
    // A refresh whose reply had no new refresh token kept the old one (`oauth::
    // keep_refresh_token`): its expiry, unless the reply gave one, is still the one we knew.
    let same_chain = previous.filter(|_| !new_session);
    let kept_rt =
        same_chain.filter(|p| p.refresh_token.is_some() && p.refresh_token == tokens.refresh_token);
    let refresh_expires_at = match tokens.refresh_token_expires_in {
        Some(s) => Some(now + secs(s)),
        None => kept_rt.and_then(|p| p.refresh_expires_at),
    };
    // RFC 6749 section 5.1: a reply without `scope` was granted the scope asked for, which a
    // refresh does not change.
    let scope = tokens.scope.or_else(|| same_chain.and_then(|p| p.scope.clone()));
    State {
        version: STATE_VERSION,
        name: name.to_string(),
        generation: previous.map_or(1, |p| next_generation(name, p.generation)),
        token_type: tokens.token_type,
        access_expires_at: now + secs(tokens.expires_in),
        refresh_expires_at,
        refreshed_at: now,
        session_started_at: match previous {
            Some(p) if !new_session => p.session_started_at,
            _ => now,
        },
        scope,
        owner_id: tokens.owner_id,
        endpoint_id: tokens.endpoint_id,
        session_id: tokens.session_id,
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
    }
}

/// The generation after `g`: one more, but never past `MAX_GENERATION` (never a wrap to 0,
/// which would send it back); reaching the top is an ERROR, as nothing can grow any more.
pub fn next_generation(name: &str, g: u64) -> u64 {
    if g >= MAX_GENERATION {
        tracing::error!(token = %name, generation = g, "the generation is at its maximum and stays there; readers that compare generations will not see new tokens (move the state file aside to start again at 1)");
        return MAX_GENERATION;
    }
    g + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's report holds one (issue 15): its mostly absent parts are boxed.
    #[test]
    fn a_status_is_small() {
        let size = std::mem::size_of::<Status>();
        assert!(size <= 112, "Status is {size} bytes");
    }

    fn sample() -> State {
        let now = Utc::now();
        State {
            version: STATE_VERSION,
            name: "main".into(),
            generation: 3,
            access_token: AccessToken::new("at"),
            token_type: "bearer".into(),
            access_expires_at: now,
            refresh_token: Some(RefreshToken::new("rt")),
            refresh_expires_at: Some(now),
            refreshed_at: now,
            session_started_at: now,
            scope: None,
            owner_id: Some("1".into()),
            endpoint_id: None,
            session_id: None,
        }
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert!(State::load(&path).unwrap().is_none());
        let s = sample();
        s.save(&path).unwrap();
        let back = State::load(&path).unwrap().unwrap();
        assert_eq!(back.generation, 3);
        assert_eq!(back.refresh_token, s.refresh_token);
        std::fs::write(&path, b"{\"version\":1,").unwrap();
        let err = State::load(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("s.json"), "{err}");
        let aside = State::quarantine(&path).unwrap();
        assert!(aside.exists() && !path.exists());
    }

    #[test]
    fn quarantines_in_one_second_never_overwrite_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut kept = Vec::new();
        for i in 0..5 {
            std::fs::write(&path, format!("bad {i}")).unwrap();
            kept.push(State::quarantine(&path).unwrap());
        }
        for (i, aside) in kept.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(aside).unwrap(), format!("bad {i}"), "{aside:?}");
        }
    }

    type Break = fn(&mut State);

    #[test]
    fn refuses_what_no_writer_of_ours_produces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let cases: [(&str, Break); 4] = [
            ("beyond", |s| s.generation = MAX_GENERATION + 1),
            ("access_token", |s| s.access_token = AccessToken::new("AT1\r\nX-Evil: 1")),
            ("refresh_token", |s| s.refresh_token = Some(RefreshToken::new("r t"))),
            ("version", |s| s.version = 7),
        ];
        for (want, break_it) in cases {
            let mut s = sample();
            break_it(&mut s);
            s.save(&path).unwrap();
            let err = State::load(&path).unwrap_err().to_string();
            assert!(err.contains("corrupt") && err.contains(want), "{want}: {err}");
        }
        let mut s = sample();
        s.generation = MAX_GENERATION;
        s.save(&path).unwrap();
        assert!(State::load(&path).is_ok());
    }

    #[test]
    fn a_state_of_another_token_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.state.json");
        sample().save(&path).unwrap();
        assert!(State::load_for(&path, "main").unwrap().is_some());
        let err = State::load_for(&path, "b").unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("belongs to token \"main\""), "{err}");
    }
}

/// Non-secret facts for `tokend status`, beside the state file as `<state>.status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub needs_login: bool,
    /// Boxed, as are `task` and `cluster`: each token's report holds a `Status`, and these
    /// are mostly absent (272 -> 104 bytes per token; issue 15).
    pub last_error: Option<Box<ErrorRecord>>,
    #[serde(with = "crate::time::rfc3339_opt", default)]
    pub last_attempt_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339_opt", default)]
    pub last_success_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::time::rfc3339_opt", default)]
    pub next_refresh_at: Option<DateTime<Utc>>,
    /// The logins of the last hour (the session budget), so a restart does not start it afresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logins: Vec<DateTime<Utc>>,
    /// The session budget is spent: no login goes out before this.
    #[serde(with = "crate::time::rfc3339_opt", default, skip_serializing_if = "Option::is_none")]
    pub logins_held_until: Option<DateTime<Utc>>,
    /// The token's task died (a panic, an unexpected end) while this daemon ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Box<TaskFailure>>,
    /// The daemon that wrote this.
    pub pid: u32,
    /// Multi-host mode: this node's part in the token's election.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Box<ClusterStatus>>,
}

/// The last death of a token's task, kept by the daemon across the task's restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// Deaths since the daemon started.
    pub restarts: u64,
    #[serde(with = "crate::time::rfc3339")]
    pub at: DateTime<Utc>,
    /// The panic's message (control characters escaped) or "returned unexpectedly".
    pub reason: String,
    /// When the task starts again (past once it has).
    #[serde(with = "crate::time::rfc3339")]
    pub restart_at: DateTime<Utc>,
}

/// A node's view of the cluster, for `tokend status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    /// leader | follower (campaigning, mirroring) | offline (no lease: etcd unreachable)
    pub role: String,
    pub etcd_reachable: bool,
    #[serde(with = "crate::time::rfc3339_opt", default)]
    pub etcd_unreachable_since: Option<DateTime<Utc>>,
    /// The pair revision this node's files were last written from.
    pub revision: i64,
}

impl Status {
    pub fn path_for(state_file: &Path) -> PathBuf {
        sibling(state_file, ".status")
    }

    pub fn load(state_file: &Path) -> Option<Self> {
        let bytes =
            super::read::read_regular(&Self::path_for(state_file), super::read::MAX_FILE).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self, state_file: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("status serializes");
        write_atomic(&Self::path_for(state_file), &bytes, 0o644)
    }
}
