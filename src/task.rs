//! What the daemon gives each token's task, in either mode (a `Refresher` on one host, the
//! cluster's candidate and mirror with `--features etcd`): commands, the resources all tokens
//! share, and a `CancellationToken` to stop it — the one way anything in tokend is stopped.

use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use tokio::sync::Notify;

pub use tokio_util::sync::CancellationToken;

/// What the daemon tells a token's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A cron tick: refresh after this token's jitter.
    Tick,
    /// SIGUSR1: refresh now.
    RefreshNow,
    /// The wall clock jumped: recompute the wall-clock deadline.
    Recheck,
}

impl Command {
    const ALL: [Self; 3] = [Self::RefreshNow, Self::Tick, Self::Recheck];

    /// Its bit in `Mailbox::pending`; a lower bit is handled first.
    fn bit(self) -> u8 {
        match self {
            Self::RefreshNow => 1,
            Self::Tick => 2,
            Self::Recheck => 4,
        }
    }
}

/// A token's commands: the set of those pending, not a queue (a second tick that comes before
/// the first is handled is the same tick). Per token this is one allocation of 64 bytes; the
/// `mpsc` channel it replaces, cache-padded, held about 600 (issue 15).
struct Mailbox {
    pending: AtomicU8,
    wake: Notify,
}

/// Sends commands to a token's task; cloned for the scheduler, the daemon and the proxies.
#[derive(Clone)]
pub struct CommandSender(Arc<Mailbox>);

/// The token's task's end of its commands.
pub struct Commands(Arc<Mailbox>);

/// A token's command mailbox: its senders' end and its task's.
pub fn commands() -> (CommandSender, Commands) {
    let mailbox = Arc::new(Mailbox { pending: AtomicU8::new(0), wake: Notify::new() });
    (CommandSender(mailbox.clone()), Commands(mailbox))
}

impl CommandSender {
    /// Marks `command` pending and wakes the task; never waits.
    pub fn send(&self, command: Command) {
        self.0.pending.fetch_or(command.bit(), Ordering::AcqRel);
        // A permit is kept when the task is not waiting: no wake-up is lost.
        self.0.wake.notify_one();
    }
}

impl Commands {
    /// The next command, once one is pending. Cancel-safe: a command is taken only when
    /// returned.
    pub async fn recv(&mut self) -> Command {
        loop {
            if let Some(command) = self.try_recv() {
                return command;
            }
            self.0.wake.notified().await;
        }
    }

    /// Takes a pending command, if there is one.
    pub fn try_recv(&mut self) -> Option<Command> {
        let lowest = |p: u8| p & p.wrapping_neg();
        let before = self
            .0
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| (p != 0).then(|| p & !lowest(p)))
            .ok()?;
        Command::ALL.into_iter().find(|c| c.bit() == lowest(before))
    }
}

/// What all token tasks of a daemon share.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Bounds token requests in flight across all tokens.
    pub requests: Arc<tokio::sync::Semaphore>,
    /// Bounds the refreshers starting up at once (`start_ups`).
    pub start_ups: Arc<tokio::sync::Semaphore>,
    /// One HTTP client (connection pool, TLS config) for every token.
    pub client: OAuthClient,
    /// This token's proxy gate, when it has `[[token.proxy]]`s (set per token by the daemon).
    pub gate: Option<Arc<crate::proxy::Gate>>,
}

/// Refreshers starting up at once beyond the token requests' bound. A start-up's future
/// (loading the state, the login, the writes) is about 3 kB; 10,000 of them allocated at once,
/// each beside its token's long-lived data, left 10,000 holes of 3 kB behind (28 MB of the
/// 101 MB heap at 10,000 tokens, in glibc's `malloc_info`) that no trim can hand back. A
/// few hundred at a time reuse each other's memory, and still keep the requests' bound and
/// the write pool (`store::MAX_WRITES`) busy.
pub const START_UPS_BEYOND_REQUESTS: usize = 2 * crate::store::MAX_WRITES;

/// A fault for tests, set by `TOKEND_TEST_TASK_FAULT=panic:NAME[:COUNT]` or `exit:NAME[:COUNT]`
/// (debug builds only; release builds ignore it): the task of token NAME panics, or returns as
/// if it had nothing left to do, at its next COUNT wake-ups (default 1). Since the overflow
/// panics of issue 17 are fixed no input makes a task die, yet the supervisor that catches one
/// (`supervise.rs`) must be tested through the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(debug_assertions), allow(dead_code, reason = "release builds have no test faults"))]
pub enum TestFault {
    Exit,
}

/// Applies the test fault of token `name`, if one is set and left: panics, or returns
/// `Some(TestFault::Exit)` when the task must return.
#[cfg(debug_assertions)]
pub fn test_fault(name: &str) -> Option<TestFault> {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static FAULT: LazyLock<Option<(bool, String, AtomicU32)>> = LazyLock::new(|| {
        let v = std::env::var("TOKEND_TEST_TASK_FAULT").ok()?;
        let mut parts = v.split(':');
        let panic = match parts.next()? {
            "panic" => true,
            "exit" => false,
            _ => return None,
        };
        let name = parts.next()?.to_string();
        let count = parts.next().map_or(Some(1), |c| c.parse().ok())?;
        Some((panic, name, AtomicU32::new(count)))
    });
    let (panic, token, left) = FAULT.as_ref()?;
    if token != name
        || left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1)).is_err()
    {
        return None;
    }
    assert!(!panic, "TOKEND_TEST_TASK_FAULT: token {name}'s task panics here (a test-only fault)");
    Some(TestFault::Exit)
}

/// Release builds have no test faults.
#[cfg(not(debug_assertions))]
pub fn test_fault(_name: &str) -> Option<TestFault> {
    None
}

/// One jwt token's config and the shared resources, for the unit tests that measure a token's
/// task (`supervise.rs`, `refresher.rs`).
#[cfg(test)]
pub fn test_token() -> (Arc<crate::config::TokenConfig>, Shared) {
    let text = "[[token]]\nname = \"t\"\nserver = \"https://platform.ringcentral.com\"\n\
                client_id = \"id\"\nclient_secret = \"s\"\ngrant = \"jwt\"\njwt = \"j\"\n\
                state_file = \"/var/lib/tokend/t.state.json\"\n";
    let mut config =
        crate::config::Config::parse(std::path::Path::new("/etc/tokend/c.toml"), text).unwrap();
    let shared = Shared {
        metrics: Arc::default(),
        requests: Arc::new(tokio::sync::Semaphore::new(1)),
        start_ups: Arc::new(tokio::sync::Semaphore::new(1)),
        client: OAuthClient::new(std::time::Duration::from_secs(1)).unwrap(),
        gate: None,
    };
    (Arc::new(config.tokens.remove(0)), shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pending_commands_are_a_set_handled_refresh_first() {
        let (tx, mut rx) = commands();
        assert_eq!(rx.try_recv(), None);
        for c in [Command::Recheck, Command::Tick, Command::Tick, Command::RefreshNow] {
            tx.send(c);
        }
        assert_eq!(rx.recv().await, Command::RefreshNow);
        assert_eq!(rx.recv().await, Command::Tick);
        assert_eq!(rx.recv().await, Command::Recheck);
        assert_eq!(rx.try_recv(), None);
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.send(Command::Tick);
        assert_eq!(waiting.await.unwrap(), Command::Tick);
    }

    /// Each token has one: the `mpsc` channel before it held about 600 bytes per token.
    #[test]
    fn a_mailbox_is_small() {
        assert!(std::mem::size_of::<Mailbox>() <= 48, "{}", std::mem::size_of::<Mailbox>());
    }
}
