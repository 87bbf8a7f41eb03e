//! tokend: one dedicated refresher per OAuth token, publishing it to files that every other
//! program on the machine reads.

#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fake;
pub mod hook;
pub mod limits;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod policy;
pub mod proxy;
pub mod publish;
pub mod reader_cli;
pub mod refresher;
pub mod secret;
pub mod shutdown;
pub mod signal;
pub mod status;
pub mod store;
pub mod task;
pub mod text;
pub mod time;
pub mod watch;
