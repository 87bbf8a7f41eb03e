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
