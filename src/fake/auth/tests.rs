//! Table-style tests of the state machine with a driven clock.

use super::*;
use crate::fake::config::{DEFAULT_CLIENT_ID, DEFAULT_JWT, FakeConfig, RateLimit};

fn req(pairs: &[(&str, &str)]) -> TokenRequest {
    let form: HashMap<String, String> =
        pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
    let grant = form.get("grant_type").and_then(|g| GrantKind::from_form(g));
    TokenRequest { client_id: DEFAULT_CLIENT_ID.into(), grant, form }
}

fn jwt() -> TokenRequest {
    req(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", DEFAULT_JWT),
    ])
}

fn refresh_req(rt: &str) -> TokenRequest {
    req(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
}

fn bearer(at: &str) -> String {
    format!("Bearer {at}")
}

#[test]
fn refresh_kills_old_access_token_then_reports_not_found() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let first = a.token(&jwt(), t0).unwrap();
    assert_eq!(first.expires_in, Some(3599));
    assert!(a.api_call(Some(&bearer(&first.access_token)), t0).is_ok());
    let second = a.token(&refresh_req(first.refresh_token.as_ref().unwrap()), t0).unwrap();
    assert_eq!(a.api_call(Some(&bearer(&first.access_token)), t0), Err(AT_CORRUPTED));
    let later = t0 + Duration::from_secs(11);
    assert_eq!(a.api_call(Some(&bearer(&first.access_token)), later), Err(AT_NOT_FOUND));
    assert!(a.api_call(Some(&bearer(&second.access_token)), later).is_ok());
}

#[test]
fn old_refresh_token_replays_identical_pair_until_grace_ends() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let rt1 = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
    let second = a.token(&refresh_req(&rt1), t0).unwrap();
    let replay = a.token(&refresh_req(&rt1), t0 + Duration::from_secs(5)).unwrap();
    assert_eq!(replay.access_token, second.access_token);
    assert_eq!(replay.refresh_token, second.refresh_token);
    assert_eq!(a.stats.grace_replays, 1);
    assert_eq!(a.stats.refreshes, 1);
    // First use of the new access token starts the 10 s countdown.
    let used = t0 + Duration::from_secs(20);
    a.api_call(Some(&bearer(&second.access_token)), used).unwrap();
    assert!(a.token(&refresh_req(&rt1), used + Duration::from_secs(9)).is_ok());
    assert_eq!(
        a.token(&refresh_req(&rt1), used + Duration::from_secs(10)).unwrap_err(),
        TOKEN_NOT_FOUND
    );
}

#[test]
fn unused_grace_window_ends_after_grace_unused() {
    let mut a =
        Auth::new(FakeConfig { grace_unused: Duration::from_secs(60), ..FakeConfig::for_tests() });
    let t0 = Instant::now();
    let rt1 = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
    a.token(&refresh_req(&rt1), t0).unwrap();
    assert!(a.token(&refresh_req(&rt1), t0 + Duration::from_secs(59)).is_ok());
    assert_eq!(
        a.token(&refresh_req(&rt1), t0 + Duration::from_secs(60)).unwrap_err(),
        TOKEN_NOT_FOUND
    );
}

#[test]
fn second_rotation_kills_the_token_two_back() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let rt1 = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
    let rt2 = a.token(&refresh_req(&rt1), t0).unwrap().refresh_token.unwrap();
    a.token(&refresh_req(&rt2), t0).unwrap();
    assert_eq!(a.token(&refresh_req(&rt1), t0).unwrap_err(), TOKEN_NOT_FOUND);
    assert!(a.token(&refresh_req(&rt2), t0).is_ok(), "rt2 is now the replayable one");
}

#[test]
fn expired_and_revoked_refresh_tokens() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let short = req(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", DEFAULT_JWT),
        ("refresh_token_ttl", "5"),
    ]);
    let rt = a.token(&short, t0).unwrap().refresh_token.unwrap();
    assert_eq!(a.token(&refresh_req(&rt), t0 + Duration::from_secs(5)).unwrap_err(), TOKEN_EXPIRED);
    let rt = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
    a.revoke(&rt);
    assert_eq!(a.token(&refresh_req(&rt), t0).unwrap_err(), TOKEN_REVOKED);
    assert_eq!(a.stats.rejected["OAU-210"], 1);
    assert_eq!(a.stats.rejected["OAU-211"], 1);
}

#[test]
fn sixth_session_drops_the_oldest() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let first = a.token(&jwt(), t0).unwrap();
    for i in 1..=5 {
        a.token(&jwt(), t0 + Duration::from_millis(i)).unwrap();
    }
    assert_eq!(a.live_sessions()["100000"], 5);
    assert_eq!(a.stats.sessions_dropped, 1);
    let rt = first.refresh_token.unwrap();
    assert_eq!(a.token(&refresh_req(&rt), t0).unwrap_err(), TOKEN_REVOKED);
    assert_eq!(a.api_call(Some(&bearer(&first.access_token)), t0), Err(AT_NOT_FOUND));
}

#[test]
fn access_token_expiry_and_header_errors() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let r = req(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", DEFAULT_JWT),
        ("access_token_ttl", "2"),
    ]);
    let at = a.token(&r, t0).unwrap().access_token;
    assert_eq!(a.api_call(Some(&bearer(&at)), t0 + Duration::from_secs(2)), Err(AT_EXPIRED));
    assert_eq!(a.api_call(None, t0), Err(AT_MISSING));
    assert_eq!(a.api_call(Some("Token abc"), t0), Err(AT_MALFORMED));
    assert_eq!(a.api_call(Some("Bearer "), t0), Err(AT_MALFORMED));
    assert_eq!(
        a.api_call(Some("bearer unknown-token"), t0),
        Err(AT_NOT_FOUND),
        "scheme is case-insensitive"
    );
    assert_eq!(a.stats.api_rejected.values().sum::<u64>(), 5);
}

#[test]
fn refresh_token_ttl_zero_issues_none() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let r = req(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", DEFAULT_JWT),
        ("refresh_token_ttl", "0"),
    ]);
    let reply = a.token(&r, Instant::now()).unwrap();
    assert!(reply.refresh_token.is_none() && reply.refresh_token_expires_in.is_none());
}

#[test]
fn grants_not_enabled_are_unauthorized() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let r = req(&[("grant_type", "password"), ("username", "user0"), ("password", "password0")]);
    assert_eq!(a.token(&r, Instant::now()).unwrap_err(), UNAUTHORIZED_GRANT);
    let mut config = FakeConfig::for_tests();
    config.apps[0].grants.push(GrantKind::Password);
    let mut a = Auth::new(config);
    assert!(a.token(&r, Instant::now()).is_ok());
    let wrong = req(&[("grant_type", "password"), ("username", "user0"), ("password", "nope")]);
    assert_eq!(a.token(&wrong, Instant::now()).unwrap_err(), BAD_CREDENTIALS);
}

#[test]
fn client_authentication_rules() {
    let mut config = FakeConfig::for_tests();
    config.apps.push(crate::fake::App {
        client_id: "public".into(),
        client_secret: None,
        grants: vec![GrantKind::AuthorizationCode],
    });
    let a = Auth::new(config);
    let basic = |id: &str, s: &str| Some((id.to_string(), s.to_string()));
    let secret = crate::fake::DEFAULT_CLIENT_SECRET;
    assert!(a.authenticate(basic(DEFAULT_CLIENT_ID, secret), None, None).is_ok());
    assert!(
        a.authenticate(basic(DEFAULT_CLIENT_ID, secret), Some(DEFAULT_CLIENT_ID), None).is_ok()
    );
    assert_eq!(a.authenticate(basic(DEFAULT_CLIENT_ID, "x"), None, None), Err(BAD_CLIENT));
    assert_eq!(a.authenticate(None, Some(DEFAULT_CLIENT_ID), None), Err(NO_CLIENT_AUTH));
    assert_eq!(a.authenticate(None, None, None), Err(NO_CLIENT_AUTH));
    assert!(a.authenticate(None, Some("public"), None).is_ok());
}

#[test]
fn authorization_code_with_pkce() {
    let mut a = Auth::new(FakeConfig::for_tests());
    let t0 = Instant::now();
    let verifier = "a-verifier-that-is-long-enough-to-be-valid-0123456789";
    let challenge = {
        use sha2::{Digest, Sha256};
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier))
    };
    let code = a
        .authorize(
            DEFAULT_CLIENT_ID,
            "http://127.0.0.1:9/cb",
            Some((challenge, "S256".into())),
            None,
            t0,
        )
        .unwrap();
    let exchange = |code: &str, v: &str| {
        req(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", "http://127.0.0.1:9/cb"),
            ("code_verifier", v),
        ])
    };
    assert!(a.token(&exchange(&code, verifier), t0).is_ok());
    assert_eq!(a.token(&exchange(&code, verifier), t0).unwrap_err(), TOKEN_NOT_FOUND, "single use");
    let code = a
        .authorize(
            DEFAULT_CLIENT_ID,
            "http://127.0.0.1:9/cb",
            Some(("plain-v".into(), "plain".into())),
            None,
            t0,
        )
        .unwrap();
    assert_eq!(a.token(&exchange(&code, "wrong"), t0).unwrap_err(), BAD_CREDENTIALS);
}

#[test]
fn rate_limit_penalty_restarts_on_each_request() {
    let limit = RateLimit {
        requests: 5,
        window: Duration::from_secs(60),
        penalty: Duration::from_secs(60),
    };
    let mut a = Auth::new(FakeConfig { rate_limit: Some(limit), ..FakeConfig::for_tests() });
    let t0 = Instant::now();
    for i in 0..5 {
        assert_eq!(a.rate_check("u", t0).unwrap(), Some(4 - i));
    }
    assert_eq!(a.rate_check("u", t0).unwrap_err().retry_after, Some(60));
    // 59 s later the penalty would nearly be over, but this request restarts it.
    assert!(a.rate_check("u", t0 + Duration::from_secs(59)).is_err());
    assert!(a.rate_check("u", t0 + Duration::from_secs(118)).is_err());
    assert!(a.rate_check("u", t0 + Duration::from_secs(178)).is_ok());
    assert!(a.rate_check("other", t0).is_ok(), "limits are per user");
}

/// Issue 14: each provider's rule for a rotated-away refresh token presented again, driven
/// by the clock: (provider, reuse after s, ok, family revoked).
#[test]
fn each_provider_treats_a_reused_refresh_token_its_own_way() {
    let cases = [
        ("ringcentral", 5, true, false),
        ("microsoft", 86_400, true, false),
        ("okta", 29, true, false),
        ("okta", 31, false, true),
        ("xero", 1799, true, false),
        ("salesforce", 0, false, true),
        ("auth0", 0, false, true),
        ("zoom", 0, false, false),
    ];
    for (name, after, ok, revoked) in cases {
        let mut a = Auth::new(FakeConfig::for_tests().with_provider(name).unwrap());
        let t0 = Instant::now();
        let rt1 = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
        let second = a.token(&refresh_req(&rt1), t0).unwrap();
        let reuse = a.token(&refresh_req(&rt1), t0 + Duration::from_secs(after));
        assert_eq!(reuse.is_ok(), ok, "{name} after {after} s: {reuse:?}");
        assert_eq!(a.stats.family_revocations, u64::from(revoked), "{name}");
        // A revoked family takes the newest refresh token and its access token with it.
        let newest = a.token(&refresh_req(second.refresh_token.as_ref().unwrap()), t0);
        assert_eq!(newest.is_err(), revoked, "{name}: {newest:?}");
        assert_eq!(a.stats.reuses, 1, "{name}");
    }
}

#[test]
fn providers_without_rotation_keep_the_refresh_token_and_omit_it() {
    for name in ["google", "dropbox"] {
        let mut a = Auth::new(FakeConfig::for_tests().with_provider(name).unwrap());
        let t0 = Instant::now();
        let rt = a.token(&jwt(), t0).unwrap().refresh_token.unwrap();
        for i in 0..3 {
            let r = a.token(&refresh_req(&rt), t0 + Duration::from_secs(i)).unwrap();
            assert!(r.refresh_token.is_none(), "{name}: no refresh_token on refresh");
            assert_eq!(r.token_type, "Bearer");
        }
        assert_eq!((a.stats.refreshes, a.stats.reuses), (3, 0), "{name}");
    }
}

#[test]
fn salesforce_sends_no_expires_in_and_client_credentials_no_refresh_token() {
    let mut a = Auth::new(FakeConfig::for_tests().with_provider("salesforce").unwrap());
    let r = a.token(&jwt(), Instant::now()).unwrap();
    assert!(r.expires_in.is_none() && r.issued_at.is_some());
    let cc = a.token(&req(&[("grant_type", "client_credentials")]), Instant::now()).unwrap();
    assert!(cc.refresh_token.is_none());
    // RingCentral has no client_credentials grant, and takes no secret in the body.
    let mut rc = Auth::new(FakeConfig::for_tests());
    let e = rc.token(&req(&[("grant_type", "client_credentials")]), Instant::now());
    assert_eq!(e.unwrap_err(), UNAUTHORIZED_GRANT);
    let secret = crate::fake::DEFAULT_CLIENT_SECRET;
    assert_eq!(rc.authenticate(None, Some(DEFAULT_CLIENT_ID), Some(secret)), Err(NO_CLIENT_AUTH));
    assert!(a.authenticate(None, Some(DEFAULT_CLIENT_ID), Some(secret)).is_ok());
    assert_eq!(a.authenticate(None, Some(DEFAULT_CLIENT_ID), Some("bad")), Err(BAD_CLIENT));
}
