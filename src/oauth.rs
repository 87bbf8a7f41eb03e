//! The token endpoint client: builds grant requests, parses replies, and classifies every
//! failure as transient (retry) or permanent (re-login or stop). It knows how to talk, never when.

use crate::config::{Grant, TokenConfig};
use crate::provider::ClientAuth;
use crate::secret::{AccessToken, RefreshToken};
use serde::Deserialize;
use std::time::Duration;

/// Replies larger than this are refused (a token reply is under 2 KiB).
pub const MAX_BODY: usize = 256 * 1024;

/// The longest lifetime taken from a reply (`expires_in`, `refresh_token_expires_in`): ten
/// years. Longer values are clamped here, where they enter, so that no date arithmetic
/// downstream can overflow (a reply of 10^13 s used to panic the token's task).
pub const MAX_LIFETIME_SECS: u64 = 10 * 366 * 86_400;

/// The longest `Retry-After` honoured: an hour (RingCentral's penalty is 60 s). Longer
/// values are clamped so that a hostile header cannot park a token for years or overflow
/// the monotonic clock.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A successful token reply.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: AccessToken,
    pub token_type: String,
    pub expires_in: u64,
    pub refresh_token: Option<RefreshToken>,
    pub refresh_token_expires_in: Option<u64>,
    pub scope: Option<String>,
    pub owner_id: Option<String>,
    pub endpoint_id: Option<String>,
    pub session_id: Option<String>,
}

/// A failed token request, split the way the caller decides.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// Connect, TLS, timeout, reset: the server may or may not have acted.
    #[error("network error: {message}")]
    Transport { message: String, timeout: bool, connect: bool },
    /// The server answered with an error status.
    #[error("server said {status}{}{}", .error.as_deref().map(|e| format!(" {e}")).unwrap_or_default(), .code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Server {
        status: u16,
        error: Option<String>,
        code: Option<String>,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    /// A reply we could not use (not JSON, truncated, missing fields, too large).
    /// The body itself is never kept: it might hold a token.
    #[error("unusable reply (HTTP {status}, {len} bytes): {reason}")]
    Body { status: u16, len: usize, reason: String },
    /// A well-formed token reply that this token's config cannot use (no `expires_in` and no
    /// known lifetime, a token type other than bearer). The server sends it the same way
    /// again, so a retry cannot help: the config must change.
    #[error("unusable token reply: {reason}")]
    Refused { reason: String },
}

impl OAuthError {
    /// Worth retrying with the same request (and the same refresh token).
    ///
    /// An unusable 200 is transient: the server may have rotated the pair, and a replay of the
    /// same refresh token inside the grace window returns it again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Body { .. } => true,
            Self::Server { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Refused { .. } => false,
        }
    }

    /// The server may have acted on the request before it failed: the reply was lost (network),
    /// unusable (a 200 we could not read), or a server error after processing. A login that
    /// failed this way may have started a session.
    pub fn may_have_acted(&self) -> bool {
        match self {
            // A well-formed reply we refuse: the server did act (a login started a session).
            Self::Transport { .. } | Self::Body { .. } | Self::Refused { .. } => true,
            Self::Server { status, .. } => (500..=599).contains(status) && *status != 503,
        }
    }

    /// The refresh chain or the credentials are dead: only a new login helps.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(self, Self::Server { error: Some(e), .. } if e == "invalid_grant")
    }

    /// The reply to a request the server may have acted on never reached us: a refresh may
    /// have rotated the refresh token (a timeout or reset after sending, an unusable 200). A
    /// connection never made, or an error status, means the server did not hand out a new pair
    /// (a 500 after processing is possible but rare, and is retried as a plain transient error).
    pub fn reply_may_be_lost(&self) -> bool {
        match self {
            Self::Transport { connect, .. } => !connect,
            Self::Body { status, .. } => (200..300).contains(status),
            Self::Server { .. } | Self::Refused { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short code for logs, status and metrics: errorCode, else OAuth error, else status.
    pub fn code(&self) -> String {
        match self {
            Self::Transport { timeout: true, .. } => "timeout".into(),
            Self::Transport { .. } => "network".into(),
            Self::Server { code: Some(c), .. } => c.clone(),
            Self::Server { error: Some(e), .. } => e.clone(),
            Self::Server { status, .. } => format!("http-{status}"),
            Self::Body { .. } => "bad-reply".into(),
            Self::Refused { .. } => "unusable-reply".into(),
        }
    }
}

/// Talks to one token endpoint.
/// The HTTPS client could not be built: on Linux, no CA certificate was found in the system's
/// store (a minimal container, a stripped image).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot set up TLS for the token endpoint: {0}; install the system's CA certificates (Debian: apt install ca-certificates)"
)]
pub struct TlsSetupError(String);

#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
}

impl OAuthClient {
    /// One client serves every token (one connection pool, one TLS config: a client per
    /// token cost ~150 kB each). `request_timeout` bounds each request unless the token's
    /// config sets its own.
    pub fn new(request_timeout: Duration) -> Result<Self, TlsSetupError> {
        let http = reqwest::Client::builder()
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .timeout(request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TlsSetupError(with_root_cause(&e)))?;
        Ok(Self { http })
    }

    /// Logs in with the token's configured grant (a new session).
    pub async fn login(&self, cfg: &TokenConfig) -> Result<TokenSet, OAuthError> {
        let mut form: Vec<(&str, String)> = match &cfg.grant {
            Grant::Jwt { assertion } => vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                ("assertion", assertion.get().expose().into()),
            ],
            Grant::Password { username, password, extension } => {
                let mut f = vec![
                    ("grant_type", "password".into()),
                    ("username", username.clone()),
                    ("password", password.get().expose().into()),
                ];
                if let Some(ext) = extension {
                    f.push(("extension", ext.clone()));
                }
                f
            }
            Grant::RefreshToken { refresh_token } => {
                vec![
                    ("grant_type", "refresh_token".into()),
                    ("refresh_token", refresh_token.get().expose().into()),
                ]
            }
            Grant::ClientCredentials => vec![("grant_type", "client_credentials".into())],
            Grant::AuthorizationCode { .. } => {
                return Err(OAuthError::Body {
                    status: 0,
                    len: 0,
                    reason: "authorization_code needs `tokend login`".into(),
                });
            }
        };
        add_options(cfg, &mut form);
        let tokens = self.post(cfg, &form).await?;
        // Bootstrapping from a configured refresh token is a refresh: a reply without a new
        // one leaves the configured one current (RFC 6749 section 6).
        let sent = match &cfg.grant {
            Grant::RefreshToken { refresh_token } => {
                Some(RefreshToken::new(refresh_token.get().expose()))
            }
            _ => None,
        };
        Ok(keep_refresh_token(tokens, sent.as_ref()))
    }

    /// Refreshes with `refresh_token`.
    pub async fn refresh(
        &self,
        cfg: &TokenConfig,
        refresh_token: &RefreshToken,
    ) -> Result<TokenSet, OAuthError> {
        let mut form = vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", refresh_token.expose().into()),
        ];
        add_options(cfg, &mut form);
        let tokens = self.post(cfg, &form).await?;
        Ok(keep_refresh_token(tokens, Some(refresh_token)))
    }

    /// Exchanges an authorization code (with its PKCE verifier).
    pub async fn exchange_code(
        &self,
        cfg: &TokenConfig,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<TokenSet, OAuthError> {
        let mut form = vec![
            ("grant_type", "authorization_code".into()),
            ("code", code.into()),
            ("redirect_uri", redirect_uri.into()),
            ("code_verifier", verifier.into()),
        ];
        add_options(cfg, &mut form);
        self.post(cfg, &form).await
    }

    async fn post(
        &self,
        cfg: &TokenConfig,
        form: &[(&str, String)],
    ) -> Result<TokenSet, OAuthError> {
        let mut form = form.to_vec();
        let basic = cfg.client_secret.as_ref().filter(|_| cfg.client_auth == ClientAuth::Basic);
        if basic.is_none() {
            // A public (PKCE) app, or a provider that wants the client in the body.
            form.push(("client_id", cfg.client_id.clone()));
            if let Some(secret) = &cfg.client_secret {
                form.push(("client_secret", secret.get().expose().into()));
            }
        }
        let mut req =
            self.http.post(cfg.token_url.clone()).timeout(cfg.request_timeout).form(&form);
        if let Some(secret) = basic {
            req = req.basic_auth(&cfg.client_id, Some(secret.get().expose()));
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = read_capped(resp).await?;
        parse_reply_for(status, &body, retry_after, cfg.access_token_lifetime)
    }
}

/// RFC 6749 section 6: "the authorization server MAY issue a new refresh token"; when it does
/// not (Google, Dropbox), the one sent stays current and must be kept, not dropped.
pub fn keep_refresh_token(mut tokens: TokenSet, sent: Option<&RefreshToken>) -> TokenSet {
    if tokens.refresh_token.is_none() {
        tokens.refresh_token = sent.cloned();
    }
    tokens
}

fn add_options(cfg: &TokenConfig, form: &mut Vec<(&str, String)>) {
    if let Some(ttl) = cfg.access_token_ttl {
        form.push(("access_token_ttl", ttl.to_string()));
    }
    if let Some(ttl) = cfg.refresh_token_ttl {
        form.push(("refresh_token_ttl", ttl.to_string()));
    }
    if let Some(scope) = &cfg.scope {
        form.push(("scope", scope.clone()));
    }
    if let Some(audience) = &cfg.audience {
        form.push(("audience", audience.clone()));
    }
}

fn transport(e: reqwest::Error) -> OAuthError {
    // reqwest's Display never includes the form body; drop the URL too and add the root cause.
    let (timeout, connect) = (e.is_timeout(), e.is_connect());
    let message = with_root_cause(&e.without_url());
    OAuthError::Transport { message, timeout, connect }
}

/// `e`, then the last error in its chain of sources (where the real reason is).
fn with_root_cause(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if s.source().is_none() {
            message = format!("{message}: {s}");
        }
        source = s.source();
    }
    message
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, OAuthError> {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(OAuthError::Body {
                status,
                len: body.len() + chunk.len(),
                reason: format!("larger than {MAX_BODY} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in seconds (HTTP dates are not used by RingCentral).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

#[derive(Deserialize)]
struct RawReply {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    refresh_token_expires_in: Option<u64>,
    scope: Option<String>,
    owner_id: Option<serde_json::Value>,
    endpoint_id: Option<String>,
    session_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    message: Option<String>,
    #[serde(default)]
    errors: Vec<RawErrorItem>,
}

#[derive(Deserialize)]
struct RawErrorItem {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
}

/// `parse_reply_for` with no known lifetime: a reply without `expires_in` is refused.
pub fn parse_reply(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<TokenSet, OAuthError> {
    parse_reply_for(status, body, retry_after, None)
}

/// Turns a status and body into a token set or a classified error. Pure; property-tested.
/// `lifetime`: the access token's lifetime when the reply has no `expires_in` (RFC 6749
/// section 5.1 makes it only RECOMMENDED; Salesforce never sends it).
pub fn parse_reply_for(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    lifetime: Option<Duration>,
) -> Result<TokenSet, OAuthError> {
    let bad = |reason: String| OAuthError::Body { status, len: body.len(), reason };
    if !(200..300).contains(&status) {
        let parsed: Option<RawError> = serde_json::from_slice(body).ok();
        let (error, code, description) = parsed.map_or((None, None, None), |e| {
            let code = e.errors.into_iter().find_map(|i| i.error_code).or(e.error_code);
            (e.error, code, e.error_description.or(e.message))
        });
        // Whatever the server wrote is logged and shown: no control character may forge a
        // log line or reach a terminal.
        let clean = |s: Option<String>| s.map(|s| crate::text::server_text(&s));
        let (error, code, description) = (clean(error), clean(code), clean(description));
        // RingCentral: without Retry-After on 429/503, wait at least 30 s.
        let retry_after =
            retry_after
                .map(|d| d.min(MAX_RETRY_AFTER))
                .or(matches!(status, 429 | 503).then_some(Duration::from_secs(30)));
        return Err(OAuthError::Server { status, error, code, description, retry_after });
    }
    let raw: RawReply = serde_json::from_slice(body)
        .map_err(|e| bad(format!("not a JSON token reply: {}", e.classify_str())))?;
    let access_token =
        raw.access_token.filter(|t| !t.is_empty()).ok_or_else(|| bad("no access_token".into()))?;
    // A token goes into HTTP headers and shell substitutions: CR, LF or an escape sequence
    // in it would inject a header. Refused as unusable (transient: a replay may fix it).
    if !crate::text::is_token(&access_token) {
        return Err(bad("access_token holds characters outside visible ASCII".into()));
    }
    let refresh_token = raw.refresh_token.filter(|t| !t.is_empty());
    if refresh_token.as_deref().is_some_and(|t| !crate::text::is_token(t)) {
        return Err(bad("refresh_token holds characters outside visible ASCII".into()));
    }
    let expires_in =
        raw.expires_in.or(lifetime.map(|d| d.as_secs())).ok_or_else(|| OAuthError::Refused {
            reason: "no expires_in, and no lifetime is known for this token; set \
                     access_token_lifetime (e.g. \"2h\") or the provider"
                .into(),
        })?;
    let token_type = bearer(raw.token_type)?;
    let clean = |s: String| crate::text::escape_controls(&s).into_owned();
    Ok(TokenSet {
        access_token: AccessToken::new(access_token),
        token_type,
        expires_in: expires_in.min(MAX_LIFETIME_SECS),
        refresh_token: refresh_token.map(RefreshToken::new),
        refresh_token_expires_in: raw.refresh_token_expires_in.map(|s| s.min(MAX_LIFETIME_SECS)),
        scope: raw.scope.map(clean),
        owner_id: raw.owner_id.map(value_string).map(clean),
        endpoint_id: raw.endpoint_id.map(clean),
        session_id: raw.session_id.map(value_string).map(clean),
    })
}

/// The token type, compared case-insensitively (RFC 6749 section 5.1): "Bearer" (Microsoft,
/// Salesforce) is RingCentral's "bearer". Any other type is refused: RFC 6749 section 7.1
/// forbids using a token whose type the client does not understand, and tokend's readers and
/// proxy send it as a bearer token. Missing: bearer, as every provider here means.
fn bearer(token_type: Option<String>) -> Result<String, OAuthError> {
    match token_type {
        None => Ok("bearer".into()),
        Some(t) if t.eq_ignore_ascii_case("bearer") => Ok("bearer".into()),
        // Not quoted: the parser never repeats what the server sent in a token reply.
        Some(t) => Err(OAuthError::Refused {
            reason: format!(
                "token_type ({} bytes) is not bearer; tokend hands out bearer tokens only",
                t.len()
            ),
        }),
    }
}

fn value_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    /// serde_json's messages can quote input; name only the kind of failure.
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong field types",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ringcentral_errors() {
        let body = br#"{"error":"invalid_grant","error_description":"Token not found","errors":[{"errorCode":"OAU-213","message":"Token not found"}]}"#;
        let e = parse_reply(400, body, None).unwrap_err();
        assert!(e.is_invalid_grant() && !e.is_transient());
        assert_eq!(e.code(), "OAU-213");
        let e = parse_reply(429, br#"{"errorCode":"CMN-301"}"#, Some(Duration::from_secs(60)))
            .unwrap_err();
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(60)));
        assert_eq!(e.code(), "CMN-301");
        let e = parse_reply(503, b"<html>", None).unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
        assert!(parse_reply(502, b"<html></html>", None).unwrap_err().is_transient());
        let e = parse_reply(401, br#"{"error":"invalid_client"}"#, None).unwrap_err();
        assert!(!e.is_transient() && e.code() == "invalid_client");
    }

    #[test]
    fn bad_bodies_never_quote_the_body() {
        for body in [
            &b"this is { not json"[..],
            br#"{"access_token":"SECRET-AT","#,
            br#"{"expires_in":5,"refresh_token":"SECRET-RT"}"#,
        ] {
            let e = parse_reply(200, body, None).unwrap_err();
            assert!(e.is_transient());
            let text = format!("{e} {e:?}");
            assert!(!text.contains("SECRET"), "{text}");
        }
    }

    #[test]
    fn numbers_from_the_server_are_clamped_where_they_enter() {
        let body = br#"{"access_token":"a","expires_in":10000000000000,"refresh_token":"r","refresh_token_expires_in":18446744073709551615}"#;
        let t = parse_reply(200, body, None).unwrap();
        assert_eq!(t.expires_in, MAX_LIFETIME_SECS);
        assert_eq!(t.refresh_token_expires_in, Some(MAX_LIFETIME_SECS));
        let e = parse_reply(429, b"{}", Some(Duration::from_secs(u64::MAX))).unwrap_err();
        assert_eq!(e.retry_after(), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999999999"), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn tokens_outside_visible_ascii_are_unusable() {
        // JSON escapes: the reply is valid JSON whose strings hold CR, LF, ESC, a space.
        for (at, rt) in
            [(r"AT1\r\nX-Evil: 1", "r"), ("a b", "r"), ("ok", r"R\u001b[31m"), ("ok", r"r\n")]
        {
            let body =
                format!(r#"{{"access_token":"{at}","expires_in":60,"refresh_token":"{rt}"}}"#);
            let e = parse_reply(200, body.as_bytes(), None).unwrap_err();
            assert!(matches!(e, OAuthError::Body { .. }) && e.is_transient(), "{at:?} {rt:?}: {e}");
        }
    }

    #[test]
    fn server_text_cannot_forge_a_log_line() {
        let body = br#"{"error":"x\n2026-01-01T00:00:00Z INFO tokend::refresher: refreshed token=main generation=99","errorCode":"\u001b[31mOAU-1","error_description":"a\rb"}"#;
        let e = parse_reply(400, body, None).unwrap_err();
        let text = format!("{e} {} {e:?}", e.code());
        assert!(!text.contains(['\n', '\r', '\u{1b}']), "{text}");
        assert!(e.code().starts_with(r"\u{1b}[31mOAU-1"), "{text}");
        assert!(e.to_string().contains(r"x\n2026"), "{e}");
    }

    #[test]
    fn a_reply_without_expires_in_needs_a_known_lifetime() {
        // Salesforce: `issued_at`, no `expires_in`.
        let body = br#"{"access_token":"a","token_type":"Bearer","issued_at":"1700000000000","scope":"api refresh_token"}"#;
        let e = parse_reply(200, body, None).unwrap_err();
        assert!(!e.is_transient() && !e.is_invalid_grant(), "a retry gets the same reply: {e}");
        assert_eq!(e.code(), "unusable-reply");
        assert!(e.to_string().contains("access_token_lifetime"), "{e}");
        let t = parse_reply_for(200, body, None, Some(Duration::from_secs(7200))).unwrap();
        assert_eq!((t.expires_in, t.scope.as_deref()), (7200, Some("api refresh_token")));
        // The reply's own expires_in wins over the configured lifetime.
        let body = br#"{"access_token":"a","expires_in":60}"#;
        let t = parse_reply_for(200, body, None, Some(Duration::from_secs(7200))).unwrap();
        assert_eq!(t.expires_in, 60);
    }

    #[test]
    fn token_type_is_case_insensitive_and_only_bearer() {
        for tt in ["bearer", "Bearer", "BEARER", "bEaReR"] {
            let body = format!(r#"{{"access_token":"a","expires_in":60,"token_type":"{tt}"}}"#);
            assert_eq!(parse_reply(200, body.as_bytes(), None).unwrap().token_type, "bearer");
        }
        let body = br#"{"access_token":"a","expires_in":60,"token_type":"DPoP-SECRET"}"#;
        let e = parse_reply(200, body, None).unwrap_err();
        assert!(!e.is_transient() && !format!("{e} {e:?}").contains("SECRET"), "{e}");
    }

    #[test]
    fn a_refresh_reply_without_a_refresh_token_keeps_the_one_sent() {
        // Google, Dropbox: no rotation, so no refresh_token in the reply (RFC 6749 section 6).
        let body = br#"{"access_token":"a2","expires_in":3599,"token_type":"Bearer"}"#;
        let held = RefreshToken::new("rt-held");
        let t = keep_refresh_token(parse_reply(200, body, None).unwrap(), Some(&held));
        assert_eq!(t.refresh_token.as_ref().map(RefreshToken::expose), Some("rt-held"));
        // A rotated one replaces it.
        let body = br#"{"access_token":"a2","expires_in":3599,"refresh_token":"rt-new"}"#;
        let t = keep_refresh_token(parse_reply(200, body, None).unwrap(), Some(&held));
        assert_eq!(t.refresh_token.as_ref().map(RefreshToken::expose), Some("rt-new"));
    }

    #[test]
    fn tolerates_unknown_fields() {
        let body = br#"{"access_token":"a","token_type":"bearer","expires_in":3599,"refresh_token":"r","refresh_token_expires_in":604799,"owner_id":"1","session_idle_timeout":5,"id_token":"x"}"#;
        let t = parse_reply(200, body, None).unwrap();
        assert_eq!((t.expires_in, t.owner_id.as_deref()), (3599, Some("1")));
    }
}
