//! tokend: one dedicated refresher per OAuth token, publishing it to files that every other
//! program on the machine reads.
//!
//! # Layout
//! One token's life, in the order data flows (one way: config → policy → request → store →
//! files; nothing flows back except through the state file):
//!
//! - `config`: the TOML file, parsed without I/O (`Config::parse`), then secrets resolved in a
//!   named second step (`Config::resolve_secrets`) by the commands that need them.
//! - `daemon`: all tokens of one config: locks, the cron scheduler, signals, reload, readiness.
//!   Each token runs as one task (`task`), a `refresher` on one host or the `cluster`'s
//!   campaign, leader and mirror with `--features etcd`, under a `supervise`or that reports
//!   and restarts a task that dies.
//! - `provider`: each OAuth provider's refresh rules as data (token URL, client auth, rotation,
//!   whether a lost refresh may be replayed), read by `config`, `oauth` and `policy`.
//! - `policy`: every refresh decision, pure (it takes `now`, the wall clock and the random
//!   draw): when, refresh or log in, retry and backoff, the request budget, needs-login. Both
//!   modes drive the same `Policy`; `ChainHome` is the one place they differ.
//! - `refresher` (one host) / `cluster::leader` (many): the I/O around the policy: the token
//!   request (`oauth`), the intent marker, the login hand-off.
//! - `publish`: what a token shows the machine, the same for the refresher and the cluster's
//!   mirror: the state file, the sinks, write retries, metrics (`metrics`), the `.status`
//!   file, the `on_refresh` hook (`hook`), the proxy's gate.
//! - `store`: durable, atomic files (state, sinks, locks), written in a bounded blocking pool.
//! - `proxy`: the local API proxy that holds requests across a rotation and replays a 401.
//! - Readers and operators: `watch` and `reader_cli` (`tokend token` / `watch`), `status`,
//!   `login`, `systemd` (sd_notify), `logging`, `limits` (open files), `malloc` (glibc arenas
//!   and trim), `signal`, `shutdown`.
//! - Safety everywhere: `secret` (redacted newtypes), `text` (control characters from outside
//!   made safe), `time` (RFC 3339 on disk).
//! - `fake`: a lifecycle-faithful fake RingCentral server (or another provider's rules, with
//!   `--provider`) for the tests and `tokend demo`.
//!
//! Modules other crates (the integration tests, the benchmarks, the fuzz targets) do not use
//! are `pub(crate)`.

#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fake;
pub(crate) mod hook;
pub(crate) mod limits;
pub mod logging;
pub mod login;
pub mod malloc;
pub(crate) mod metrics;
pub mod oauth;
pub mod policy;
pub mod provider;
pub(crate) mod proxy;
pub(crate) mod publish;
pub mod reader_cli;
pub(crate) mod refresher;
pub mod secret;
pub mod shutdown;
pub mod signal;
pub mod status;
pub mod store;
pub(crate) mod supervise;
pub(crate) mod systemd;
pub(crate) mod task;
pub mod text;
pub mod time;
pub mod watch;
