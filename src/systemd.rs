//! systemd notifications (`Type=notify`): READY=1, STATUS=, WATCHDOG=1, STOPPING=1. Each is a
//! no-op when `NOTIFY_SOCKET` is unset.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Whether a service manager is listening.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Startup is complete: every token's sinks are published or its failure reported.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line summary shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Sends WATCHDOG=1 at half the `WatchdogSec=` interval from the daemon's event loop, so a
/// hung loop stops the pings and systemd restarts the service.
pub struct Watchdog(Option<tokio::time::Interval>);

impl Watchdog {
    pub fn from_env() -> Self {
        Self(sd_notify::watchdog_enabled().map(|d| {
            let mut i = tokio::time::interval((d / 2).max(Duration::from_millis(10)));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        }))
    }

    /// Waits for the next ping time and sends it; pending forever when disabled.
    pub async fn tick(&mut self) {
        match &mut self.0 {
            Some(i) => {
                i.tick().await;
                send(&[NotifyState::Watchdog]);
            }
            None => std::future::pending().await,
        }
    }
}
