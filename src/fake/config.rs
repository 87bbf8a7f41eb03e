//! What the fake server accepts and how fast its clocks run: apps, users, TTLs and windows.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Defaults a user can point an unchanged config at (see README).
pub const DEFAULT_CLIENT_ID: &str = "tokend-demo-client";
pub const DEFAULT_CLIENT_SECRET: &str = "tokend-demo-secret";
pub const DEFAULT_JWT: &str = "tokend-demo-jwt";

/// The OAuth grants an app may be allowed to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Jwt,
    RefreshToken,
    AuthorizationCode,
    Password,
    ClientCredentials,
}

impl GrantKind {
    /// Maps the `grant_type` form value to a grant.
    pub fn from_form(value: &str) -> Option<Self> {
        match value {
            "urn:ietf:params:oauth:grant-type:jwt-bearer" => Some(Self::Jwt),
            "refresh_token" => Some(Self::RefreshToken),
            "authorization_code" => Some(Self::AuthorizationCode),
            "password" => Some(Self::Password),
            "client_credentials" => Some(Self::ClientCredentials),
            _ => None,
        }
    }
}

/// A registered application. `client_secret: None` makes it a public (PKCE) app.
#[derive(Clone, Debug)]
pub struct App {
    pub client_id: String,
    pub client_secret: Option<String>,
    pub grants: Vec<GrantKind>,
}

/// A RingCentral user (extension) with the credentials that log it in.
#[derive(Clone, Debug)]
pub struct User {
    /// Sent back as `owner_id`.
    pub id: String,
    /// The JWT credential accepted as `assertion`.
    pub jwt: String,
    /// Legacy password grant credentials.
    pub username: String,
    pub password: String,
}

/// Auth-group rate limit: `requests` per `window`, then a `penalty` that every request made
/// during it restarts.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    pub requests: usize,
    pub window: Duration,
    pub penalty: Duration,
}

/// What a provider does when a refresh token it rotated away is presented again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// RingCentral: the cached pair again, inside the grace window (`grace_*`).
    Grace,
    /// Microsoft: the old token is not revoked; it refreshes like the current one.
    Accept,
    /// Okta, Xero: the cached pair inside this leeway; after it, the whole family is revoked.
    Leeway(Duration),
    /// Salesforce, Auth0: reuse revokes the whole family (RFC 9700 reuse detection).
    RevokeFamily,
    /// Zoom: refused at once, nothing else happens.
    Refuse,
}

/// One provider's documented refresh rules (PROVIDERS.md), as the fake plays them.
/// Each flag is one independent documented rule, as in the PROVIDERS.md table.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProviderRules {
    pub name: &'static str,
    /// A refresh issues a new refresh token; without rotation the reply has none (Google).
    pub rotate: bool,
    pub reuse: Reuse,
    /// The reply carries `expires_in` (Salesforce's has only `issued_at`).
    pub expires_in: bool,
    pub token_type: &'static str,
    /// `client_secret` in the body is accepted besides HTTP Basic.
    pub body_secret: bool,
    /// The `client_credentials` grant exists.
    pub client_credentials: bool,
}

impl ProviderRules {
    const RINGCENTRAL: Self = Self {
        name: "ringcentral",
        rotate: true,
        reuse: Reuse::Grace,
        expires_in: true,
        token_type: "bearer",
        body_secret: false,
        client_credentials: false,
    };

    /// The rules of provider `name` (tokend's profile names).
    pub fn named(name: &str) -> Option<Self> {
        let base = Self { name: "", body_secret: true, token_type: "Bearer", ..Self::RINGCENTRAL };
        let s = Duration::from_secs;
        let (rotate, reuse, cc) = match name {
            "ringcentral" => return Some(Self::RINGCENTRAL),
            "google" | "dropbox" => (false, Reuse::Accept, false),
            "microsoft" => (true, Reuse::Accept, true),
            "salesforce" | "auth0" | "generic" => (true, Reuse::RevokeFamily, true),
            "zoom" | "quickbooks" => (true, Reuse::Refuse, false),
            "okta" => (true, Reuse::Leeway(s(30)), true),
            "xero" => (true, Reuse::Leeway(s(1800)), true),
            _ => return None,
        };
        let name = crate::provider::Profile::named(name)?.name;
        let expires_in = name != "salesforce";
        Some(Self { name, rotate, reuse, expires_in, client_credentials: cc, ..base })
    }
}

/// Everything configurable about the fake server. `Default` mirrors production RingCentral.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    pub apps: Vec<App>,
    pub users: Vec<User>,
    pub access_ttl_default: u64,
    pub access_ttl_min: u64,
    pub access_ttl_max: u64,
    pub refresh_ttl_default: u64,
    pub refresh_ttl_min: u64,
    pub refresh_ttl_max: u64,
    /// The old refresh token replays for this long after the new access token's first use.
    pub grace_after_use: Duration,
    /// ...or for this long after the refresh when the new access token is never used.
    pub grace_unused: Duration,
    /// A replaced access token answers "Access token corrupted" (OAU-129) this long, then OAU-213.
    pub corrupted_window: Duration,
    pub max_sessions: usize,
    pub rate_limit: Option<RateLimit>,
    /// How long an authorization code stays valid.
    pub code_ttl: Duration,
    /// Added round-trip time on API and token calls, half before handling and half after:
    /// the WAN between a client and RingCentral, which opens the window at each rotation in
    /// which a call still carries the token the refresh just killed.
    pub latency: Duration,
    /// Whose rules the server plays (`--provider`); RingCentral's by default.
    pub provider: ProviderRules,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            apps: vec![App {
                client_id: DEFAULT_CLIENT_ID.into(),
                client_secret: Some(DEFAULT_CLIENT_SECRET.into()),
                grants: vec![GrantKind::Jwt, GrantKind::RefreshToken, GrantKind::AuthorizationCode],
            }],
            users: vec![User::numbered(DEFAULT_JWT, 0)],
            access_ttl_default: 3600,
            access_ttl_min: 600,
            access_ttl_max: 3600,
            refresh_ttl_default: 604_800,
            refresh_ttl_min: 1,
            refresh_ttl_max: 2_592_000,
            grace_after_use: Duration::from_secs(10),
            grace_unused: Duration::from_secs(3600),
            corrupted_window: Duration::from_secs(10),
            max_sessions: 5,
            rate_limit: Some(RateLimit {
                requests: 5,
                window: Duration::from_secs(60),
                penalty: Duration::from_secs(60),
            }),
            code_ttl: Duration::from_secs(60),
            latency: Duration::ZERO,
            provider: ProviderRules::RINGCENTRAL,
        }
    }
}

impl User {
    /// User number `n` of a generated population: owner id `100000+n`, JWT `{jwt}` for 0
    /// and `{jwt}-{n}` otherwise, username `user{n}` with password `password{n}`.
    pub fn numbered(jwt: &str, n: usize) -> Self {
        Self {
            id: (100_000 + n).to_string(),
            jwt: if n == 0 { jwt.to_string() } else { format!("{jwt}-{n}") },
            username: format!("user{n}"),
            password: format!("password{n}"),
        }
    }
}

impl FakeConfig {
    /// A config for tests: short clamps allowed and no rate limit, other values as production.
    pub fn for_tests() -> Self {
        Self { access_ttl_min: 1, rate_limit: None, ..Self::default() }
    }

    /// Plays provider `name`'s rules; its grants added to the first app. None: no such provider.
    pub fn with_provider(mut self, name: &str) -> Option<Self> {
        self.provider = ProviderRules::named(name)?;
        if self.provider.client_credentials && !self.apps.is_empty() {
            self.apps[0].grants.push(GrantKind::ClientCredentials);
        }
        Some(self)
    }

    /// Clamps a requested access token TTL the way RingCentral does (never refuses).
    pub fn clamp_access_ttl(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.access_ttl_default)
            .clamp(self.access_ttl_min, self.access_ttl_max.max(self.access_ttl_min))
    }

    /// Clamps a requested refresh TTL; `Some(0)` means "issue no refresh token" (`None`).
    pub fn clamp_refresh_ttl(&self, requested: Option<u64>) -> Option<u64> {
        match requested {
            Some(0) => None,
            r => Some(
                r.unwrap_or(self.refresh_ttl_default)
                    .clamp(self.refresh_ttl_min, self.refresh_ttl_max.max(self.refresh_ttl_min)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_clamping_matches_ringcentral() {
        let c = FakeConfig::default();
        assert_eq!(c.clamp_access_ttl(None), 3600);
        assert_eq!(c.clamp_access_ttl(Some(10)), 600);
        assert_eq!(c.clamp_access_ttl(Some(99_999)), 3600);
        assert_eq!(c.clamp_refresh_ttl(None), Some(604_800));
        assert_eq!(c.clamp_refresh_ttl(Some(0)), None);
        assert_eq!(c.clamp_refresh_ttl(Some(99_999_999)), Some(2_592_000));
    }
}
