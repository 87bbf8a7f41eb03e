//! Each OAuth 2.0 provider's refresh rules as data (PROVIDERS.md): the token URL, client
//! authentication, rotation, whether a lost reply may be replayed, the lifetime of a reply
//! without `expires_in`, idle expiry and grants. The config picks a profile; `oauth` and the
//! refresh policy read it. No provider is a branch in the code.

use std::time::Duration;

/// How the client proves who it is (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(client_id:client_secret)`.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}

impl ClientAuth {
    pub fn name(self) -> &'static str {
        match self {
            Self::Basic => "basic",
            Self::Body => "body",
        }
    }
}

/// Whether a refresh whose reply was lost may be sent again with the same refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// The old refresh token keeps working (no rotation, or the old one is not revoked).
    Always,
    /// A grace (RingCentral, Xero) or leeway (Okta) this long after the lost refresh.
    Within(Duration),
    /// Reuse is refused or revokes the whole family (Salesforce, Auth0, Zoom): never replay;
    /// log in again with a non-interactive grant, or wait for a person.
    Never,
}

impl Replay {
    /// Whether a replay `since` after the lost refresh is still safe.
    pub fn allows(self, since: Duration) -> bool {
        match self {
            Self::Always => true,
            Self::Within(w) => since < w,
            Self::Never => false,
        }
    }
}

/// The grants a profile can name (`grant = ...` in the config).
pub const ALL_GRANTS: &[&str] =
    &["jwt", "authorization_code", "refresh_token", "password", "client_credentials"];

/// One provider's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    /// The token endpoint: an absolute URL, or a path on `server` (RingCentral); None: the
    /// URL is tenant-specific and `token_url` is required.
    pub token_url: Option<&'static str>,
    pub client_auth: ClientAuth,
    /// A refresh issues a new refresh token.
    pub rotates: bool,
    pub replay: Replay,
    /// The access token's lifetime when a reply has no `expires_in`.
    pub lifetime: Option<Duration>,
    /// The refresh token dies after this long unused: the schedule must stay well inside it.
    pub idle_expiry: Option<Duration>,
    pub grants: &'static [&'static str],
    /// Where `tokend login` sends the browser, and the extra query pairs the provider needs
    /// to hand out a refresh token. A path is on `server` (RingCentral); None: the token
    /// URL with its last segment `token` replaced by `authorize` (Microsoft, Salesforce,
    /// Zoom, Okta, Auth0, generic).
    pub authorize: Option<(&'static str, &'static [(&'static str, &'static str)])>,
}

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

const CODE_REFRESH: &[&str] = &["authorization_code", "refresh_token"];

/// Every profile; the first is the default.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "ringcentral",
        token_url: Some("/restapi/oauth/token"),
        client_auth: ClientAuth::Basic,
        rotates: true,
        // The grace window: up to 60 min while the new access token is unused (tokend never
        // used the one it lost), 10 s after its first use.
        replay: Replay::Within(Duration::from_secs(3600)),
        lifetime: None,
        idle_expiry: Some(days(7)),
        grants: &["jwt", "authorization_code", "refresh_token", "password"],
        authorize: Some(("/restapi/oauth/authorize", &[])),
    },
    Profile {
        name: "google",
        token_url: Some("https://oauth2.googleapis.com/token"),
        client_auth: ClientAuth::Body,
        rotates: false,
        replay: Replay::Always,
        lifetime: None,
        idle_expiry: Some(days(180)),
        grants: CODE_REFRESH,
        authorize: Some((
            "https://accounts.google.com/o/oauth2/v2/auth",
            &[("access_type", "offline"), ("prompt", "consent")],
        )),
    },
    Profile {
        name: "microsoft",
        token_url: Some("https://login.microsoftonline.com/common/oauth2/v2.0/token"),
        client_auth: ClientAuth::Body,
        rotates: true,
        // A new refresh token on every use, but the old one is not revoked.
        replay: Replay::Always,
        lifetime: None,
        idle_expiry: Some(days(90)),
        grants: &["authorization_code", "refresh_token", "client_credentials"],
        // The token URL with `authorize` for `token`: follows a tenant or My Domain.
        authorize: None,
    },
    Profile {
        name: "salesforce",
        token_url: Some("https://login.salesforce.com/services/oauth2/token"),
        client_auth: ClientAuth::Body,
        rotates: true,
        replay: Replay::Never,
        // No `expires_in`: the org's session timeout, 2 hours by default.
        lifetime: Some(Duration::from_secs(7200)),
        idle_expiry: Some(days(30)),
        grants: &["authorization_code", "refresh_token", "password", "client_credentials"],
        // The token URL with `authorize` for `token`: follows a tenant or My Domain.
        authorize: None,
    },
    Profile {
        name: "zoom",
        token_url: Some("https://zoom.us/oauth/token"),
        client_auth: ClientAuth::Basic,
        rotates: true,
        replay: Replay::Never,
        lifetime: None,
        idle_expiry: Some(days(90)),
        grants: CODE_REFRESH,
        // The token URL with `authorize` for `token`: follows a tenant or My Domain.
        authorize: None,
    },
    Profile {
        name: "okta",
        token_url: None,
        client_auth: ClientAuth::Basic,
        rotates: true,
        replay: Replay::Within(Duration::from_secs(30)),
        lifetime: None,
        idle_expiry: None,
        grants: &["authorization_code", "refresh_token", "password", "client_credentials"],
        authorize: None,
    },
    Profile {
        name: "auth0",
        token_url: None,
        client_auth: ClientAuth::Body,
        rotates: true,
        // The rotation overlap period defaults to 0.
        replay: Replay::Never,
        lifetime: None,
        idle_expiry: None,
        grants: &["authorization_code", "refresh_token", "password", "client_credentials"],
        authorize: None,
    },
    Profile {
        name: "dropbox",
        token_url: Some("https://api.dropboxapi.com/oauth2/token"),
        client_auth: ClientAuth::Basic,
        rotates: false,
        replay: Replay::Always,
        lifetime: None,
        idle_expiry: None,
        grants: CODE_REFRESH,
        authorize: Some((
            "https://www.dropbox.com/oauth2/authorize",
            &[("token_access_type", "offline")],
        )),
    },
    Profile {
        name: "xero",
        token_url: Some("https://identity.xero.com/connect/token"),
        client_auth: ClientAuth::Basic,
        rotates: true,
        replay: Replay::Within(Duration::from_secs(1800)),
        lifetime: None,
        idle_expiry: Some(days(60)),
        grants: &["authorization_code", "refresh_token", "client_credentials"],
        authorize: Some(("https://login.xero.com/identity/connect/authorize", &[])),
    },
    Profile {
        name: "quickbooks",
        token_url: Some("https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"),
        client_auth: ClientAuth::Basic,
        rotates: true,
        // Not documented: assume the worst.
        replay: Replay::Never,
        lifetime: None,
        idle_expiry: Some(days(100)),
        grants: CODE_REFRESH,
        authorize: Some(("https://appcenter.intuit.com/connect/oauth2", &[])),
    },
    Profile {
        name: "generic",
        token_url: None,
        client_auth: ClientAuth::Basic,
        rotates: true,
        // Unknown server: a replay might revoke the family (RFC 9700), so never.
        replay: Replay::Never,
        lifetime: None,
        idle_expiry: None,
        grants: ALL_GRANTS,
        authorize: None,
    },
];

impl Profile {
    /// The profile called `name`.
    pub fn named(name: &str) -> Option<&'static Profile> {
        PROFILES.iter().find(|p| p.name == name)
    }

    /// The default profile: RingCentral.
    pub fn default_profile() -> &'static Profile {
        &PROFILES[0]
    }

    /// The names of every profile, for error messages.
    pub fn names() -> String {
        PROFILES.iter().map(|p| format!("{:?}", p.name)).collect::<Vec<_>>().join(", ")
    }

    /// The authorize endpoint of `tokend login` for a token whose server and token URL are
    /// these, with the provider's extra query pairs.
    pub fn authorize_url(
        &self,
        server: &reqwest::Url,
        token_url: &reqwest::Url,
    ) -> (reqwest::Url, &'static [(&'static str, &'static str)]) {
        match self.authorize {
            Some((path, extra)) if path.starts_with('/') => {
                (server.join(path).expect("static path joins"), extra)
            }
            Some((url, extra)) => (reqwest::Url::parse(url).expect("profile URLs parse"), extra),
            None => {
                let mut url = token_url.clone();
                let path = url.path().to_string();
                let base = path.strip_suffix("token").unwrap_or(&path);
                url.set_path(&format!("{base}authorize"));
                (url, &[])
            }
        }
    }

    pub fn has_grant(&self, grant: &str) -> bool {
        self.grants.contains(&grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_consistent() {
        for p in PROFILES {
            assert!(p.grants.contains(&"refresh_token"), "{}", p.name);
            assert!(p.grants.iter().all(|g| ALL_GRANTS.contains(g)), "{}", p.name);
            // Without rotation the old token is the current one: a replay is always safe.
            assert!(p.rotates || p.replay == Replay::Always, "{}", p.name);
            assert_eq!(Profile::named(p.name), Some(p));
        }
        assert_eq!(Profile::default_profile().name, "ringcentral");
        assert!(Profile::named("hubspot").is_none());
    }

    #[test]
    fn authorize_urls() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let rc = Profile::named("ringcentral").unwrap();
        let (url, _) = rc.authorize_url(&u("https://platform.ringcentral.com"), &u("https://x/t"));
        assert_eq!(url.as_str(), "https://platform.ringcentral.com/restapi/oauth/authorize");
        let okta = Profile::named("okta").unwrap();
        let token = u("https://example.okta.com/oauth2/default/v1/token");
        let (url, _) = okta.authorize_url(&token, &token);
        assert_eq!(url.as_str(), "https://example.okta.com/oauth2/default/v1/authorize");
        let auth0 = Profile::named("auth0").unwrap();
        let token = u("https://example.eu.auth0.com/oauth/token");
        assert_eq!(auth0.authorize_url(&token, &token).0.path(), "/oauth/authorize");
        let google = Profile::named("google").unwrap();
        let (url, extra) = google.authorize_url(&token, &token);
        assert_eq!(url.host_str(), Some("accounts.google.com"));
        assert!(extra.contains(&("access_type", "offline")), "else no refresh token");
    }

    #[test]
    fn replay_windows() {
        let s = Duration::from_secs;
        assert!(Replay::Always.allows(s(86_400)));
        assert!(Replay::Within(s(30)).allows(s(29)) && !Replay::Within(s(30)).allows(s(30)));
        assert!(!Replay::Never.allows(Duration::ZERO));
    }
}
