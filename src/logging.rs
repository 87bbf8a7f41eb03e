//! Log setup: text on stderr by default (no colours off a terminal, no timestamps under
//! journald, which adds its own), JSON on request; level from `RUST_LOG`, default info.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The two output formats of `[log] format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. A second call (SIGHUP changing the format) is ignored.
pub fn init(format: LogFormat) {
    // tokio-cron-scheduler logs its own plumbing at info (and a spurious error on shutdown).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_cron_scheduler=off"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    drop(result);
}
