//! Durable, atomic files: the private state file (which holds the refresh token), the
//! reader-facing sinks, and the lock that makes one daemon the only writer of a token.

mod atomic;
pub mod dir_sync;
pub mod intent;
mod lock;
mod pool;
mod read;
mod sink;
mod state;

pub use atomic::{check_dir_writable, remove_stale_temps, write_atomic};
pub use lock::{LockError, StateLock};
pub use pool::{MAX_WRITES, blocking};
pub use read::{MAX_FILE, read_regular};
pub use sink::{SinkDoc, render_sink, write_stale_sinks};
pub use state::{
    ClusterStatus, ErrorRecord, MAX_GENERATION, STATE_VERSION, State, StateError, Status,
    TaskFailure, next_generation, next_state,
};

/// This process's id as text: in each lock it takes and each temp file's name. `getpid` is a
/// system call each time; a first start of 10,000 tokens needs it 40,000 times.
fn pid() -> &'static str {
    static PID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PID.get_or_init(|| std::process::id().to_string())
}
