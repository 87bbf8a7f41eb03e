//! Counters the fake server exposes at `GET /__admin/stats`, for tests to assert on.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything the fake server has counted since it started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Token requests that passed client authentication and the rate limit.
    pub token_requests: u64,
    /// New sessions from any login grant.
    pub logins: u64,
    pub logins_by_grant: BTreeMap<String, u64>,
    /// Refreshes that rotated a pair (grace replays are counted apart).
    pub refreshes: u64,
    /// Refreshes answered from the grace-window cache.
    pub grace_replays: u64,
    /// Token requests refused, by errorCode (OAU-213, OAU-210, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Requests answered 429 by the rate limit.
    pub rate_limited: u64,
    pub sessions_created: u64,
    /// Sessions dropped because the user went past `max_sessions`.
    pub sessions_dropped: u64,
    pub revocations: u64,
    /// Sessions (token families) revoked because a rotated-away refresh token was reused.
    #[serde(default)]
    pub family_revocations: u64,
    /// Rotated-away refresh tokens presented again, whatever the provider did about it.
    #[serde(default)]
    pub reuses: u64,
    /// Live sessions per user id (filled in when served).
    pub live_sessions: BTreeMap<String, u64>,
    pub api_accepted: u64,
    pub api_rejected: BTreeMap<String, u64>,
    /// Faults injected on token requests.
    pub faults_injected: u64,
    /// The most token requests the server was handling at once.
    pub max_concurrent_token_requests: u64,
}
