//! The fake server's pure state machine: sessions, token rotation, grace replays, rate
//! limits. No I/O; every method takes `now` so tests can drive time.

use super::config::{FakeConfig, GrantKind, Reuse, User};
use super::stats::Stats;
use base64::Engine;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A RingCentral-shaped error: HTTP status, OAuth `error`, `errorCode` and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub error: &'static str,
    pub code: &'static str,
    pub message: &'static str,
    pub retry_after: Option<u64>,
}

impl ApiError {
    const fn new(status: u16, error: &'static str, code: &'static str, msg: &'static str) -> Self {
        Self { status, error, code, message: msg, retry_after: None }
    }
}

pub const NO_CLIENT_AUTH: ApiError =
    ApiError::new(401, "invalid_client", "OAU-123", "Client authentication is required");
pub const BAD_CLIENT: ApiError = ApiError::new(401, "invalid_client", "OAU-146", "Invalid client");
pub const UNAUTHORIZED_GRANT: ApiError =
    ApiError::new(400, "unauthorized_client", "OAU-251", "Unauthorized for this grant type");
pub const TOKEN_EXPIRED: ApiError = ApiError::new(400, "invalid_grant", "OAU-210", "Token expired");
pub const TOKEN_REVOKED: ApiError = ApiError::new(400, "invalid_grant", "OAU-211", "Token revoked");
pub const TOKEN_NOT_FOUND: ApiError =
    ApiError::new(400, "invalid_grant", "OAU-213", "Token not found");
pub const BAD_CREDENTIALS: ApiError =
    ApiError::new(400, "invalid_grant", "OAU-140", "Invalid resource owner credentials");
pub const BAD_REQUEST: ApiError = ApiError::new(400, "invalid_request", "OAU-101", "Bad request");
pub const RATE_LIMITED: ApiError =
    ApiError::new(429, "rate_limited", "CMN-301", "Request rate exceeded");

/// API-call refusals (the `/restapi/v1.0` side).
pub const AT_MISSING: ApiError =
    ApiError::new(401, "", "AGW-401", "Authorization header is not specified");
pub const AT_MALFORMED: ApiError =
    ApiError::new(401, "", "AGW-402", "Invalid Authorization header");
pub const AT_EXPIRED: ApiError =
    ApiError::new(401, "TokenExpired", "OAU-128", "Access token expired.");
pub const AT_CORRUPTED: ApiError =
    ApiError::new(401, "TokenInvalid", "OAU-129", "Access token corrupted");
pub const AT_NOT_FOUND: ApiError = ApiError::new(401, "TokenInvalid", "OAU-213", "Token not found");

/// The body of a successful token response (RingCentral field names).
#[derive(Clone, Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    /// None where the provider sends none (Salesforce): then `issued_at` instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_in: Option<u64>,
    pub scope: String,
    pub owner_id: String,
    pub endpoint_id: String,
    pub session_id: String,
}

/// What a token request carries once the HTTP layer has decoded it.
#[derive(Debug, Default)]
pub struct TokenRequest {
    pub client_id: String,
    pub grant: Option<GrantKind>,
    pub form: HashMap<String, String>,
}

struct Session {
    user: usize,
    client_id: String,
    created: Instant,
    live: bool,
    current_access: Option<String>,
    /// The refresh token rotated away most recently: the only one that may still replay.
    previous_refresh: Option<String>,
    scope: String,
    endpoint_id: String,
}

struct AccessRec {
    session: u64,
    expires: Instant,
    replaced_at: Option<Instant>,
    first_used: Option<Instant>,
}

enum RtStatus {
    Current,
    /// Rotated at `at` into `next`, whose reply is cached for replays.
    Rotated {
        at: Instant,
        next: Box<(TokenResponse, Instant, Option<Instant>)>,
    },
    Dead,
}

struct RefreshRec {
    session: u64,
    expires: Instant,
    status: RtStatus,
}

struct Code {
    user: usize,
    client_id: String,
    redirect_uri: String,
    challenge: Option<(String, String)>,
    expires: Instant,
}

#[derive(Default)]
struct Bucket {
    recent: VecDeque<Instant>,
    penalty_until: Option<Instant>,
}

/// All server-side auth state.
pub struct Auth {
    pub config: FakeConfig,
    pub stats: Stats,
    sessions: HashMap<u64, Session>,
    next_session: u64,
    access: HashMap<String, AccessRec>,
    refresh: HashMap<String, RefreshRec>,
    codes: HashMap<String, Code>,
    buckets: HashMap<String, Bucket>,
    jwt_index: HashMap<String, usize>,
}

/// A fresh opaque token value.
pub fn random_token() -> String {
    let bytes: [u8; 36] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn secs_left(until: Instant, now: Instant) -> u64 {
    until.saturating_duration_since(now).as_secs()
}

impl Auth {
    pub fn new(config: FakeConfig) -> Self {
        let jwt_index = config.users.iter().enumerate().map(|(i, u)| (u.jwt.clone(), i)).collect();
        Self {
            config,
            stats: Stats::default(),
            sessions: HashMap::new(),
            next_session: 1,
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: HashMap::new(),
            buckets: HashMap::new(),
            jwt_index,
        }
    }

    /// Client authentication: HTTP Basic (optionally with `client_id` repeated in the body),
    /// `client_id` and `client_secret` in the body where the provider takes that, or
    /// body-only `client_id` for public apps.
    pub fn authenticate(
        &self,
        basic: Option<(String, String)>,
        body_client: Option<&str>,
        body_secret: Option<&str>,
    ) -> Result<String, ApiError> {
        if let (None, Some(id), Some(secret)) = (&basic, body_client, body_secret) {
            if !self.config.provider.body_secret {
                return Err(NO_CLIENT_AUTH);
            }
            return self.authenticate(Some((id.to_string(), secret.to_string())), None, None);
        }
        match (basic, body_client) {
            (Some((id, secret)), body) => {
                let app = self.app(&id).ok_or(BAD_CLIENT)?;
                let secret_ok = app.client_secret.as_deref() == Some(secret.as_str());
                if !secret_ok || body.is_some_and(|b| b != id) {
                    return Err(BAD_CLIENT);
                }
                Ok(id)
            }
            (None, Some(id)) => match self.app(id) {
                Some(app) if app.client_secret.is_none() => Ok(id.to_string()),
                Some(_) => Err(NO_CLIENT_AUTH),
                None => Err(BAD_CLIENT),
            },
            (None, None) => Err(NO_CLIENT_AUTH),
        }
    }

    fn app(&self, client_id: &str) -> Option<&super::config::App> {
        self.config.apps.iter().find(|a| a.client_id == client_id)
    }

    /// The rate-limit key for a request: the user it acts for where that is knowable.
    pub fn rate_key(&self, req: &TokenRequest) -> String {
        let user = match req.grant {
            Some(GrantKind::Jwt) => {
                req.form.get("assertion").and_then(|a| self.jwt_index.get(a).copied())
            }
            Some(GrantKind::RefreshToken) => req
                .form
                .get("refresh_token")
                .and_then(|t| self.refresh.get(t))
                .and_then(|r| self.sessions.get(&r.session))
                .map(|s| s.user),
            Some(GrantKind::AuthorizationCode) => {
                req.form.get("code").and_then(|c| self.codes.get(c)).map(|c| c.user)
            }
            Some(GrantKind::Password) => {
                req.form.get("username").and_then(|n| self.user_by_name(n))
            }
            Some(GrantKind::ClientCredentials) | None => None,
        };
        match user {
            Some(u) => format!("user:{}", self.config.users[u].id),
            None => format!("client:{}", req.client_id),
        }
    }

    fn user_by_name(&self, name: &str) -> Option<usize> {
        self.config.users.iter().position(|u| u.username == name)
    }

    /// Counts a token request against its key's budget. `Err` carries `Retry-After`.
    pub fn rate_check(&mut self, key: &str, now: Instant) -> Result<Option<usize>, ApiError> {
        let Some(limit) = self.config.rate_limit else {
            return Ok(None);
        };
        let bucket = self.buckets.entry(key.to_string()).or_default();
        let penalized = bucket.penalty_until.is_some_and(|until| until > now);
        while bucket.recent.front().is_some_and(|t| now.duration_since(*t) >= limit.window) {
            bucket.recent.pop_front();
        }
        if penalized || bucket.recent.len() >= limit.requests {
            bucket.penalty_until = Some(now + limit.penalty);
            self.stats.rate_limited += 1;
            return Err(ApiError {
                retry_after: Some(limit.penalty.as_secs().max(1)),
                ..RATE_LIMITED
            });
        }
        bucket.recent.push_back(now);
        Ok(Some(limit.requests - bucket.recent.len()))
    }

    /// Handles an authenticated token request.
    pub fn token(&mut self, req: &TokenRequest, now: Instant) -> Result<TokenResponse, ApiError> {
        self.stats.token_requests += 1;
        let grant = req.grant.ok_or(BAD_REQUEST)?;
        let allowed = self.app(&req.client_id).is_some_and(|a| a.grants.contains(&grant));
        if !allowed {
            return Err(self.reject(UNAUTHORIZED_GRANT));
        }
        let result = match grant {
            GrantKind::Jwt => self.jwt_login(req, now),
            GrantKind::Password => self.password_login(req, now),
            GrantKind::AuthorizationCode => self.code_login(req, now),
            GrantKind::RefreshToken => self.refresh(req, now),
            // Machine to machine: the app's own token, no user's session, no refresh token.
            GrantKind::ClientCredentials => Ok(self.login(0, req, "client_credentials", now)),
        };
        result.map_err(|e| self.reject(e))
    }

    fn reject(&mut self, e: ApiError) -> ApiError {
        *self.stats.rejected.entry(e.code.to_string()).or_default() += 1;
        e
    }

    fn jwt_login(&mut self, req: &TokenRequest, now: Instant) -> Result<TokenResponse, ApiError> {
        let assertion = req.form.get("assertion").ok_or(BAD_REQUEST)?;
        let user = *self.jwt_index.get(assertion).ok_or(BAD_CREDENTIALS)?;
        Ok(self.login(user, req, "jwt", now))
    }

    fn password_login(
        &mut self,
        req: &TokenRequest,
        now: Instant,
    ) -> Result<TokenResponse, ApiError> {
        let name = req.form.get("username").ok_or(BAD_REQUEST)?;
        let user = self.user_by_name(name).ok_or(BAD_CREDENTIALS)?;
        let User { password, .. } = &self.config.users[user];
        if req.form.get("password") != Some(password) {
            return Err(BAD_CREDENTIALS);
        }
        Ok(self.login(user, req, "password", now))
    }

    fn code_login(&mut self, req: &TokenRequest, now: Instant) -> Result<TokenResponse, ApiError> {
        let value = req.form.get("code").ok_or(BAD_REQUEST)?;
        // Codes are single use: removed whether or not the exchange succeeds.
        let code = self.codes.remove(value).ok_or(TOKEN_NOT_FOUND)?;
        if code.expires <= now {
            return Err(TOKEN_EXPIRED);
        }
        let redirect_ok = req.form.get("redirect_uri") == Some(&code.redirect_uri);
        if !redirect_ok || code.client_id != req.client_id {
            return Err(BAD_CREDENTIALS);
        }
        if let Some((challenge, method)) = &code.challenge {
            let verifier = req.form.get("code_verifier").ok_or(BAD_CREDENTIALS)?;
            if !pkce_matches(verifier, challenge, method) {
                return Err(BAD_CREDENTIALS);
            }
        }
        Ok(self.login(code.user, req, "authorization_code", now))
    }

    /// Starts a new session (dropping the oldest past `max_sessions`) and issues its first pair.
    fn login(
        &mut self,
        user: usize,
        req: &TokenRequest,
        grant: &str,
        now: Instant,
    ) -> TokenResponse {
        self.drop_excess_sessions(user, &req.client_id);
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                user,
                client_id: req.client_id.clone(),
                created: now,
                live: true,
                current_access: None,
                previous_refresh: None,
                scope: req.form.get("scope").cloned().unwrap_or_else(|| "ReadAccounts".into()),
                endpoint_id: req.form.get("endpoint_id").cloned().unwrap_or_else(random_token),
            },
        );
        self.stats.logins += 1;
        *self.stats.logins_by_grant.entry(grant.to_string()).or_default() += 1;
        self.stats.sessions_created += 1;
        self.issue(id, req, now)
    }

    fn drop_excess_sessions(&mut self, user: usize, client_id: &str) {
        let mut live: Vec<(Instant, u64)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.live && s.user == user && s.client_id == client_id)
            .map(|(id, s)| (s.created, *id))
            .collect();
        live.sort();
        let max = self.config.max_sessions.max(1);
        for (_, id) in live.iter().take((live.len() + 1).saturating_sub(max)) {
            self.sessions.get_mut(id).expect("listed above").live = false;
            self.stats.sessions_dropped += 1;
        }
    }

    /// Issues a new pair in `session`, killing its current access token at once.
    fn issue(&mut self, session: u64, req: &TokenRequest, now: Instant) -> TokenResponse {
        let ttl = self.config.clamp_access_ttl(num(req, "access_token_ttl"));
        let rt_ttl = self
            .config
            .clamp_refresh_ttl(num(req, "refresh_token_ttl"))
            .filter(|_| req.grant != Some(GrantKind::ClientCredentials));
        let at = random_token();
        let s = self.sessions.get_mut(&session).expect("caller made it");
        if let Some(old) = s.current_access.replace(at.clone())
            && let Some(rec) = self.access.get_mut(&old)
        {
            rec.replaced_at = Some(now);
        }
        let (scope, endpoint_id, owner) = (s.scope.clone(), s.endpoint_id.clone(), s.user);
        let at_expires = now + Duration::from_secs(ttl);
        self.access.insert(
            at.clone(),
            AccessRec { session, expires: at_expires, replaced_at: None, first_used: None },
        );
        let rt = rt_ttl.map(|t| (random_token(), now + Duration::from_secs(t)));
        if let Some((value, expires)) = &rt {
            self.refresh.insert(
                value.clone(),
                RefreshRec { session, expires: *expires, status: RtStatus::Current },
            );
        }
        let p = self.config.provider;
        TokenResponse {
            access_token: at,
            token_type: p.token_type,
            expires_in: p.expires_in.then_some(ttl.saturating_sub(1)),
            issued_at: (!p.expires_in).then(|| chrono::Utc::now().timestamp_millis().to_string()),
            refresh_token_expires_in: rt_ttl.map(|t| t.saturating_sub(1)),
            refresh_token: rt.map(|(v, _)| v),
            scope,
            owner_id: self.config.users[owner].id.clone(),
            endpoint_id,
            session_id: session.to_string(),
        }
    }

    fn refresh(&mut self, req: &TokenRequest, now: Instant) -> Result<TokenResponse, ApiError> {
        let value = req.form.get("refresh_token").ok_or(BAD_REQUEST)?.clone();
        let rec = self.refresh.get(&value).ok_or(TOKEN_NOT_FOUND)?;
        let session = &self.sessions[&rec.session];
        if !session.live {
            return Err(TOKEN_REVOKED);
        }
        if session.client_id != req.client_id {
            return Err(TOKEN_NOT_FOUND);
        }
        if matches!(rec.status, RtStatus::Rotated { .. } | RtStatus::Dead) {
            self.stats.reuses += 1;
        }
        match &rec.status {
            RtStatus::Dead | RtStatus::Rotated { .. } => self.reuse(&value, now, req),
            RtStatus::Current if rec.expires <= now => Err(TOKEN_EXPIRED),
            RtStatus::Current if !self.config.provider.rotate => {
                Ok(self.refresh_in_place(&value, now, req))
            }
            RtStatus::Current => Ok(self.rotate(&value, now, req)),
        }
    }

    /// A refresh token rotated away comes back: each provider's rule (`Reuse`).
    fn reuse(
        &mut self,
        value: &str,
        now: Instant,
        req: &TokenRequest,
    ) -> Result<TokenResponse, ApiError> {
        let rec = &self.refresh[value];
        let rotated_at = match &rec.status {
            RtStatus::Rotated { at, .. } => Some(*at),
            _ => None,
        };
        match self.config.provider.reuse {
            Reuse::Grace => self.replay_cached(value, now),
            Reuse::Accept => Ok(self.rotate(value, now, req)),
            Reuse::Leeway(w) if rotated_at.is_some_and(|at| now.duration_since(at) < w) => {
                self.replay_cached(value, now)
            }
            Reuse::Leeway(_) | Reuse::RevokeFamily => {
                let session = rec.session;
                self.revoke_family(session);
                Err(TOKEN_REVOKED)
            }
            Reuse::Refuse => Err(TOKEN_NOT_FOUND),
        }
    }

    fn replay_cached(&mut self, value: &str, now: Instant) -> Result<TokenResponse, ApiError> {
        let RtStatus::Rotated { at, next } = &self.refresh[value].status else {
            return Err(TOKEN_NOT_FOUND);
        };
        let reply = self.replay(*at, next, now);
        self.stats.grace_replays += u64::from(reply.is_ok());
        reply
    }

    /// RFC 9700 reuse detection: the session and every token of it end.
    fn revoke_family(&mut self, session: u64) {
        if let Some(s) = self.sessions.get_mut(&session)
            && s.live
        {
            s.live = false;
            self.stats.family_revocations += 1;
        }
    }

    /// No rotation (Google, Dropbox): a new access token; the refresh token stays current
    /// and the reply carries none.
    fn refresh_in_place(&mut self, value: &str, now: Instant, req: &TokenRequest) -> TokenResponse {
        let session = self.refresh[value].session;
        let mut reply = self.issue(session, req, now);
        if let Some(minted) = reply.refresh_token.take() {
            self.refresh.remove(&minted);
        }
        reply.refresh_token_expires_in = None;
        self.stats.refreshes += 1;
        reply
    }

    /// The grace window: a rotated refresh token returns the identical cached pair.
    fn replay(
        &self,
        rotated_at: Instant,
        next: &(TokenResponse, Instant, Option<Instant>),
        now: Instant,
    ) -> Result<TokenResponse, ApiError> {
        let (cached, at_expires, rt_expires) = next;
        let first_used = self.access.get(&cached.access_token).and_then(|a| a.first_used);
        let window_end = match first_used {
            Some(used) => used + self.config.grace_after_use,
            None => rotated_at + self.config.grace_unused,
        };
        if now >= window_end {
            return Err(TOKEN_NOT_FOUND);
        }
        let mut reply = cached.clone();
        reply.expires_in = reply.expires_in.map(|_| secs_left(*at_expires, now));
        reply.refresh_token_expires_in = rt_expires.map(|e| secs_left(e, now));
        Ok(reply)
    }

    fn rotate(&mut self, old_rt: &str, now: Instant, req: &TokenRequest) -> TokenResponse {
        let session = self.refresh[old_rt].session;
        let reply = self.issue(session, req, now);
        let ttl = self.config.clamp_access_ttl(num(req, "access_token_ttl"));
        let at_expires = now + Duration::from_secs(ttl);
        let rt_expires = reply.refresh_token_expires_in.map(|s| now + Duration::from_secs(s + 1));
        let s = self.sessions.get_mut(&session).expect("live session");
        if let Some(older) = s.previous_refresh.replace(old_rt.to_string())
            && let Some(rec) = self.refresh.get_mut(&older)
        {
            rec.status = RtStatus::Dead;
        }
        self.refresh.get_mut(old_rt).expect("looked up").status =
            RtStatus::Rotated { at: now, next: Box::new((reply.clone(), at_expires, rt_expires)) };
        self.stats.refreshes += 1;
        reply
    }

    /// Validates `Authorization` for an API call; marks the token as used.
    pub fn api_call(&mut self, header: Option<&str>, now: Instant) -> Result<String, ApiError> {
        let result = self.check_bearer(header, now);
        match &result {
            Ok(_) => self.stats.api_accepted += 1,
            Err(e) => *self.stats.api_rejected.entry(e.code.to_string()).or_default() += 1,
        }
        result
    }

    fn check_bearer(&mut self, header: Option<&str>, now: Instant) -> Result<String, ApiError> {
        let header = header.ok_or(AT_MISSING)?;
        // The scheme is case-insensitive (RFC 7235); the Python SDK sends "bearer" as given
        // in `token_type`.
        let token = header
            .split_once(' ')
            .filter(|(scheme, t)| {
                scheme.eq_ignore_ascii_case("bearer") && !t.is_empty() && !t.contains(' ')
            })
            .map(|(_, t)| t)
            .ok_or(AT_MALFORMED)?;
        let rec = self.access.get_mut(token).ok_or(AT_NOT_FOUND)?;
        let session = &self.sessions[&rec.session];
        if let Some(replaced) = rec.replaced_at {
            let corrupted = now.duration_since(replaced) < self.config.corrupted_window;
            return Err(if corrupted { AT_CORRUPTED } else { AT_NOT_FOUND });
        }
        if !session.live {
            return Err(AT_NOT_FOUND);
        }
        if rec.expires <= now {
            return Err(AT_EXPIRED);
        }
        rec.first_used.get_or_insert(now);
        Ok(self.config.users[session.user].id.clone())
    }

    /// Ends the session a token belongs to (revoke endpoint). Unknown tokens are ignored.
    pub fn revoke(&mut self, token: &str) {
        let session = self
            .access
            .get(token)
            .map(|a| a.session)
            .or_else(|| self.refresh.get(token).map(|r| r.session));
        if let Some(s) = session.and_then(|id| self.sessions.get_mut(&id))
            && s.live
        {
            s.live = false;
            self.stats.revocations += 1;
        }
    }

    /// Authorize endpoint: approves at once for `login_hint` (user id or name) or the first user.
    pub fn authorize(
        &mut self,
        client_id: &str,
        redirect_uri: &str,
        challenge: Option<(String, String)>,
        login_hint: Option<&str>,
        now: Instant,
    ) -> Result<String, ApiError> {
        if self.app(client_id).is_none() {
            return Err(BAD_CLIENT);
        }
        let user = match login_hint {
            Some(h) => self
                .config
                .users
                .iter()
                .position(|u| u.id == h || u.username == h)
                .ok_or(BAD_CREDENTIALS)?,
            None => 0,
        };
        let code = random_token();
        self.codes.insert(
            code.clone(),
            Code {
                user,
                client_id: client_id.into(),
                redirect_uri: redirect_uri.into(),
                challenge,
                expires: now + self.config.code_ttl,
            },
        );
        Ok(code)
    }

    /// Live sessions per user id, for the stats endpoint.
    pub fn live_sessions(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.sessions.values().filter(|s| s.live) {
            *out.entry(self.config.users[s.user].id.clone()).or_default() += 1;
        }
        out
    }

    /// Every token ever issued (for tests that grep output for leaks).
    pub fn all_tokens(&self) -> Vec<String> {
        self.access.keys().chain(self.refresh.keys()).cloned().collect()
    }
}

fn num(req: &TokenRequest, key: &str) -> Option<u64> {
    req.form.get(key).and_then(|v| v.parse().ok())
}

/// PKCE check for `S256` and `plain` (RFC 7636).
pub fn pkce_matches(verifier: &str, challenge: &str, method: &str) -> bool {
    use sha2::{Digest, Sha256};
    match method {
        "plain" => verifier == challenge,
        "S256" => {
            let digest = Sha256::digest(verifier.as_bytes());
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == challenge
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
