//! The fake RingCentral server over real HTTP: every behaviour of RINGCENTRAL.md it claims.

use crate::harness::{BIN, CLIENT_ID, CLIENT_SECRET, JWT};
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use std::time::Duration;
use tokend::fake::{App, FakeConfig, FakeServer, GrantKind, RateLimit};

const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

fn http() -> Client {
    Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn token(s: &FakeServer, form: &[(&str, &str)]) -> Response {
    http()
        .post(format!("{}/restapi/oauth/token", s.url()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn login(s: &FakeServer) -> Value {
    let r = token(s, &[("grant_type", JWT_GRANT), ("assertion", JWT)]).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn refresh(s: &FakeServer, rt: &str) -> Response {
    token(s, &[("grant_type", "refresh_token"), ("refresh_token", rt)]).await
}

async fn api(s: &FakeServer, auth: Option<&str>) -> Response {
    let mut req = http().get(format!("{}/restapi/v1.0/account/~/extension/~", s.url()));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap()
}

/// Status, the first `errors[].errorCode`, and the whole body.
async fn error_of(r: Response) -> (u16, String, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (status, body["errors"][0]["errorCode"].as_str().unwrap_or_default().to_string(), body)
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap().to_string()
}

#[tokio::test]
async fn token_endpoint_accepts_only_forms_and_authenticated_clients() {
    let srv = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let url = format!("{}/restapi/oauth/token", srv.url());
    let r = http()
        .post(&url)
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .json(&serde_json::json!({"grant_type": JWT_GRANT}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let form = [("grant_type", JWT_GRANT), ("assertion", JWT)];
    let r = http().post(&url).form(&form).send().await.unwrap();
    let (st, code, body) = error_of(r).await;
    assert_eq!(
        (st, code.as_str(), body["error"].as_str()),
        (401, "OAU-123", Some("invalid_client"))
    );
    assert_eq!(body["error_description"], "Client authentication is required");
    let r = http()
        .post(&url)
        .form(&[("grant_type", JWT_GRANT), ("assertion", JWT), ("client_id", CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "OAU-123", "a confidential app must authenticate");
    let r =
        http().post(&url).basic_auth(CLIENT_ID, Some("wrong")).form(&form).send().await.unwrap();
    assert_eq!(error_of(r).await.1, "OAU-146");
    let r = http()
        .post(&url)
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", JWT_GRANT), ("assertion", JWT), ("client_id", CLIENT_ID)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "Basic plus client_id in the body is fine");
    let r = token(&srv, &[("grant_type", JWT_GRANT), ("assertion", "not-the-jwt")]).await;
    let (st, _, body) = error_of(r).await;
    assert_eq!((st, body["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test]
async fn public_apps_use_body_client_id_and_pkce() {
    let mut config = FakeConfig::for_tests();
    config.apps.push(App {
        client_id: "public-app".into(),
        client_secret: None,
        grants: vec![GrantKind::AuthorizationCode, GrantKind::RefreshToken],
    });
    let srv = FakeServer::start(config).await.unwrap();
    let verifier = "0123456789abcdef0123456789abcdef0123456789abc";
    let challenge = {
        use base64::Engine;
        use sha2::Digest;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
    };
    let redirect = "http://127.0.0.1:1/callback";
    let r = http()
        .get(format!("{}/restapi/oauth/authorize", srv.url()))
        .query(&[
            ("response_type", "code"),
            ("client_id", "public-app"),
            ("redirect_uri", redirect),
            ("state", "xyz"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(redirect));
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["state"], "xyz");
    let base = srv.url();
    let exchange = |v: &'static str, code: String| {
        let base = base.clone();
        async move {
            http()
                .post(format!("{base}/restapi/oauth/token"))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("code_verifier", v),
                    ("client_id", "public-app"),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    let r = exchange("wrong-verifier", q["code"].clone()).await;
    assert_eq!(r.status(), 400, "wrong PKCE verifier");
    // The code was single-use; get another.
    let r = http()
        .get(format!("{}/restapi/oauth/authorize", srv.url()))
        .query(&[
            ("response_type", "code"),
            ("client_id", "public-app"),
            ("redirect_uri", redirect),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    let location = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let code = location.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let r = exchange(verifier, code).await;
    assert_eq!(r.status(), 200);
    assert_eq!(srv.stats().logins_by_grant["authorization_code"], 1);
}

#[tokio::test]
async fn refresh_rotates_kills_old_access_token_and_replays_in_grace() {
    let config = FakeConfig {
        corrupted_window: Duration::from_millis(300),
        grace_after_use: Duration::from_millis(300),
        ..FakeConfig::for_tests()
    };
    let srv = FakeServer::start(config).await.unwrap();
    let first = login(&srv).await;
    assert_eq!(first["token_type"], "bearer");
    assert_eq!(first["expires_in"], 3599);
    assert_eq!(first["refresh_token_expires_in"], 604_799);
    assert_eq!(first["owner_id"], "100000");
    let at1 = format!("Bearer {}", s(&first, "access_token"));
    assert_eq!(api(&srv, Some(&at1)).await.status(), 200);
    let second: Value = refresh(&srv, &s(&first, "refresh_token")).await.json().await.unwrap();
    let r = api(&srv, Some(&at1)).await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"RingCentral REST API\"");
    assert!(r.headers().contains_key("rcrequestid"));
    let (st, code, body) = error_of(r).await;
    assert_eq!(
        (st, code.as_str(), body["message"].as_str()),
        (401, "OAU-129", Some("Access token corrupted"))
    );
    assert_eq!(body["errorCode"], "TokenInvalid");
    // Replay: identical pair.
    let replay: Value = refresh(&srv, &s(&first, "refresh_token")).await.json().await.unwrap();
    assert_eq!(replay["access_token"], second["access_token"]);
    assert_eq!(replay["refresh_token"], second["refresh_token"]);
    // First use of the new token starts the grace countdown; afterwards OAU-213.
    assert_eq!(
        api(&srv, Some(&format!("Bearer {}", s(&second, "access_token")))).await.status(),
        200
    );
    let rt1 = s(&first, "refresh_token");
    let mut last = (0, String::new());
    for _ in 0..500 {
        let (st, code, _) = error_of_or_ok(refresh(&srv, &rt1).await).await;
        last = (st, code);
        if last.0 == 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, (400, "OAU-213".to_string()));
    let (st, code, body) = error_of(api(&srv, Some(&at1)).await).await;
    assert_eq!(
        (st, code.as_str(), body["message"].as_str()),
        (401, "OAU-213", Some("Token not found"))
    );
    let stats = srv.stats();
    assert_eq!((stats.refreshes, stats.logins), (1, 1));
    assert!(stats.grace_replays >= 1);
    assert_eq!(stats.rejected["OAU-213"], 1);
}

async fn error_of_or_ok(r: Response) -> (u16, String, Value) {
    if r.status() == 200 { (200, String::new(), Value::Null) } else { error_of(r).await }
}

#[tokio::test]
async fn api_errors_for_missing_malformed_and_expired_tokens() {
    let srv = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    assert_eq!(error_of(api(&srv, None).await).await.1, "AGW-401");
    assert_eq!(error_of(api(&srv, Some("Basic abc")).await).await.1, "AGW-402");
    let r =
        token(&srv, &[("grant_type", JWT_GRANT), ("assertion", JWT), ("access_token_ttl", "1")])
            .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 0, "ttl 1 s: remaining whole seconds");
    let at = format!("Bearer {}", s(&v, "access_token"));
    let mut code = String::new();
    for _ in 0..300 {
        let r = api(&srv, Some(&at)).await;
        if r.status() != 200 {
            code = error_of(r).await.1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(code, "OAU-128");
    let account = http().get(format!("{}/restapi/v1.0/account/~", srv.url())).send().await.unwrap();
    assert_eq!(account.status(), 401);
}

#[tokio::test]
async fn ttls_are_clamped_and_zero_refresh_ttl_issues_no_refresh_token() {
    let srv = FakeServer::start(FakeConfig::default()).await.unwrap();
    let v: Value = token(
        &srv,
        &[
            ("grant_type", JWT_GRANT),
            ("assertion", JWT),
            ("access_token_ttl", "5"),
            ("refresh_token_ttl", "0"),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["expires_in"], 599, "clamped up to 600");
    assert!(v.get("refresh_token").is_none());
    let v: Value = token(
        &srv,
        &[
            ("grant_type", JWT_GRANT),
            ("assertion", JWT),
            ("access_token_ttl", "99999"),
            ("refresh_token_ttl", "999999999"),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        (v["expires_in"].as_u64(), v["refresh_token_expires_in"].as_u64()),
        (Some(3599), Some(2_591_999))
    );
}

#[tokio::test]
async fn revoke_ends_the_session_and_sessions_are_capped() {
    let srv = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let first = login(&srv).await;
    let r = http()
        .post(format!("{}/restapi/oauth/revoke", srv.url()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("token", s(&first, "access_token"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(error_of(refresh(&srv, &s(&first, "refresh_token")).await).await.1, "OAU-211");
    assert_eq!(
        error_of(api(&srv, Some(&format!("Bearer {}", s(&first, "access_token")))).await).await.1,
        "OAU-213"
    );
    for _ in 0..7 {
        login(&srv).await;
    }
    let stats = srv.stats();
    assert_eq!(stats.live_sessions["100000"], 5);
    assert_eq!(stats.sessions_dropped, 2);
    assert_eq!(stats.revocations, 1);
}

#[tokio::test]
async fn grants_not_enabled_and_the_legacy_password_grant() {
    let srv = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let pw = [("grant_type", "password"), ("username", "user0"), ("password", "password0")];
    let (st, _, body) = error_of(token(&srv, &pw).await).await;
    assert_eq!(
        (st, body["error"].as_str(), body["error_description"].as_str()),
        (400, Some("unauthorized_client"), Some("Unauthorized for this grant type"))
    );
    let mut config = FakeConfig::for_tests();
    config.apps[0].grants.push(GrantKind::Password);
    let srv = FakeServer::start(config).await.unwrap();
    assert_eq!(token(&srv, &pw).await.status(), 200);
}

#[tokio::test]
async fn rate_limit_answers_429_and_requests_during_the_penalty_restart_it() {
    let limit = RateLimit {
        requests: 5,
        window: Duration::from_secs(60),
        penalty: Duration::from_secs(60),
    };
    let srv = FakeServer::start(FakeConfig { rate_limit: Some(limit), ..FakeConfig::for_tests() })
        .await
        .unwrap();
    for left in (0..5).rev() {
        let r = token(&srv, &[("grant_type", JWT_GRANT), ("assertion", JWT)]).await;
        assert_eq!(r.headers()["x-rate-limit-remaining"], left.to_string().as_str());
        assert_eq!(r.headers()["x-rate-limit-group"], "auth");
        assert_eq!(r.headers()["x-rate-limit-limit"], "5");
        assert_eq!(r.headers()["x-rate-limit-window"], "60");
    }
    let r = token(&srv, &[("grant_type", JWT_GRANT), ("assertion", JWT)]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    assert_eq!(error_of(r).await.1, "CMN-301");
    assert_eq!(srv.stats().rate_limited, 1);
}

#[tokio::test]
async fn several_users_and_admin_faults() {
    let config = FakeConfig {
        users: (0..3).map(|n| tokend::fake::User::numbered(JWT, n)).collect(),
        ..FakeConfig::for_tests()
    };
    let srv = FakeServer::start(config).await.unwrap();
    let v: Value = token(&srv, &[("grant_type", JWT_GRANT), ("assertion", &format!("{JWT}-2"))])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["owner_id"], "100002");
    let admin = format!("{}/__admin/faults", srv.url());
    let faults = serde_json::json!([{"kind": "status503", "retry_after": 7}, {"kind": "html"}, {"kind": "malformed"}, {"kind": "truncated"}, {"kind": "missing_access_token"}, {"kind": "oversized", "bytes": 300_000}, {"kind": "status500", "count": 1}, {"kind": "reset"}]);
    assert_eq!(http().post(&admin).json(&faults).send().await.unwrap().status(), 204);
    let pending: Value = http().get(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(pending.as_array().unwrap().len(), 8);
    let form = [("grant_type", JWT_GRANT), ("assertion", JWT)];
    let r = token(&srv, &form).await;
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()), (503, "7"));
    let r = token(&srv, &form).await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["content-type"].to_str().unwrap()),
        (502, "text/html")
    );
    assert!(token(&srv, &form).await.json::<Value>().await.is_err(), "malformed");
    assert!(token(&srv, &form).await.json::<Value>().await.is_err(), "truncated");
    let v: Value = token(&srv, &form).await.json().await.unwrap();
    assert!(v.get("access_token").is_none() && v.get("refresh_token").is_some());
    assert!(token(&srv, &form).await.bytes().await.unwrap().len() >= 300_000);
    assert_eq!(token(&srv, &form).await.status(), 500);
    let err = http()
        .post(format!("{}/restapi/oauth/token", srv.url()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&form)
        .send()
        .await;
    assert!(err.is_err(), "reset: no reply at all");
    assert_eq!(token(&srv, &form).await.status(), 200, "faults are used up");
    let stats: Value = http()
        .get(format!("{}/__admin/stats", srv.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["faults_injected"], 8);
    assert_eq!(stats["logins"], 2);
}

#[tokio::test]
async fn commit_then_drop_loses_the_reply_but_the_same_refresh_token_replays_it() {
    let srv = FakeServer::start(FakeConfig::for_tests()).await.unwrap();
    let first = login(&srv).await;
    srv.inject("commit_then_drop".parse().unwrap());
    let rt = s(&first, "refresh_token");
    let lost = http()
        .post(format!("{}/restapi/oauth/token", srv.url()))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt.as_str())])
        .send()
        .await;
    assert!(lost.is_err());
    assert_eq!(srv.stats().refreshes, 1, "the server did rotate");
    let r = refresh(&srv, &rt).await;
    assert_eq!(r.status(), 200);
    assert_eq!(srv.stats().grace_replays, 1);
}

#[tokio::test]
async fn the_binary_prints_its_address_and_takes_app_user_and_faults_from_flags() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(BIN)
        .args([
            "fake-server",
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "my-app",
            "--client-secret",
            "my-secret",
            "--jwt",
            "my-jwt",
            "--fault",
            "status500",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let send = || {
        http()
            .post(format!("{url}/restapi/oauth/token"))
            .basic_auth("my-app", Some("my-secret"))
            .form(&[("grant_type", JWT_GRANT), ("assertion", "my-jwt")])
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 500);
    assert_eq!(send().await.unwrap().status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}
