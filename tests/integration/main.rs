//! All integration tests in one binary: the real `tokend` against the fake server on loopback.

mod check;
#[cfg(feature = "etcd")]
mod cluster;
mod crash;
mod daemon;
#[cfg(feature = "etcd")]
mod etcd_relay;
mod examples;
mod fake_server;
mod harness;
mod hostile;
mod interop;
mod login;
mod metrics;
mod providers;
mod proxy;
mod proxy_connections;
mod proxy_https;
mod proxy_lifecycle;
mod proxy_upstream;
mod proxy_upstream_wire;
mod proxy_wire;
mod rotation;
mod slow_disk;
mod soak;
mod status;
mod systemd;
mod torn;
mod watch;
mod write_faults;
