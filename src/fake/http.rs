//! The fake server's HTTP face: routes, RingCentral-shaped replies, and a connection loop
//! that can reset a connection on purpose (fault injection).

use super::Shared;
use super::auth::{ApiError, BAD_CLIENT, BAD_REQUEST, TokenRequest, TokenResponse};
use super::config::GrantKind;
use super::faults::{Fault, FaultKind};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// Per-connection context: who is calling, and a trigger that resets the connection.
#[derive(Clone)]
struct ConnCtx {
    peer: SocketAddr,
    kill: Arc<Notify>,
}

pub(super) fn router(shared: Arc<Shared>, latency: Duration) -> Router {
    Router::new()
        .route("/restapi/oauth/token", post(token))
        .route("/restapi/oauth/revoke", post(revoke))
        .route("/restapi/oauth/authorize", get(authorize))
        // Okta's tenant paths (`https://{org}.okta.com/oauth2/{server}/v1/token`), so that a
        // token URL shaped like a tenant's, and the authorize URL tokend derives from it, work.
        .route("/oauth2/{server}/v1/token", post(token))
        .route("/oauth2/{server}/v1/authorize", get(authorize))
        .route("/restapi/v1.0/account/~", get(account))
        .route("/restapi/v1.0/account/~/extension/~", get(extension))
        .route("/restapi/v1.0/account/~/extension/~/sms", post(sms))
        .route("/restapi/v1.0/account/~/recording/{bytes}/content", get(recording))
        .route("/__admin/stats", get(admin_stats))
        .route(
            "/__admin/faults",
            get(admin_faults).post(admin_add_faults).delete(admin_clear_faults),
        )
        .route("/__admin/tokens", get(admin_tokens))
        .layer(axum::middleware::from_fn_with_state(latency, add_latency))
        .layer(axum::middleware::map_response(add_request_id))
        .with_state(shared)
}

/// Accepts connections until `shutdown` turns true; each connection can be reset by its handler.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let Ok((stream, peer)) = accepted else { continue };
        let kill = Arc::new(Notify::new());
        let svc = router.clone().layer(Extension(ConnCtx { peer, kill: kill.clone() }));
        let fd = stream.as_raw_fd();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            tokio::select! {
                _ = conn => {}
                () = kill.notified() => reset(fd),
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

/// SO_LINGER 0 so that dropping the socket sends RST, as a crashed peer or middlebox would.
fn reset(fd: std::os::fd::RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    #[allow(unsafe_code)]
    // SAFETY: fd is the still-open socket owned by the connection being dropped right after;
    // the pointer and length describe a valid `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Half the configured round trip before the handler sees the request, half after it answered
/// (admin calls are the test's own, not RingCentral's, and stay fast).
async fn add_latency(
    State(latency): State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if latency.is_zero() || req.uri().path().starts_with("/__admin/") {
        return next.run(req).await;
    }
    tokio::time::sleep(latency / 2).await;
    let resp = next.run(req).await;
    tokio::time::sleep(latency / 2).await;
    resp
}

async fn drop_connection(ctx: &ConnCtx) -> Response {
    ctx.kill.notify_one();
    std::future::pending().await
}

async fn add_request_id(mut resp: Response) -> Response {
    let id = format!("{:032x}", rand::random::<u128>());
    resp.headers_mut().insert("RCRequestId", HeaderValue::from_str(&id).expect("hex"));
    resp
}

fn oauth_error(e: &ApiError) -> Response {
    let body = json!({
        "error": e.error,
        "error_description": e.message,
        "errors": [{"errorCode": e.code, "message": e.message}],
    });
    with_retry_after(e, (status(e.status), Json(body)).into_response())
}

fn api_error(e: &ApiError) -> Response {
    let top = if e.error.is_empty() { e.code } else { e.error };
    let body = json!({
        "errorCode": top,
        "message": e.message,
        "errors": [{"errorCode": e.code, "message": e.message}],
    });
    let mut resp = with_retry_after(e, (status(e.status), Json(body)).into_response());
    if e.status == 401 {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"RingCentral REST API\""),
        );
    }
    resp
}

fn with_retry_after(e: &ApiError, mut resp: Response) -> Response {
    if let Some(secs) = e.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    resp
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn parse_form(body: &[u8]) -> Option<HashMap<String, String>> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()
        .map(|pairs| pairs.into_iter().collect())
}

fn unsupported_media() -> Response {
    let e = ApiError {
        status: 415,
        error: "invalid_request",
        code: "CMN-415",
        message: "Unsupported Media Type",
        retry_after: None,
    };
    oauth_error(&e)
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = shared.enter();
    let fault = shared.next_fault();
    match &fault {
        Some(FaultKind::Hang { ms }) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        Some(FaultKind::Reset) => return drop_connection(&ctx).await,
        Some(
            FaultKind::CommitThenDrop
            | FaultKind::CommitThenHang { .. }
            | FaultKind::CommitThenPatch { .. },
        )
        | None => {}
        Some(other) => return fault_response(other),
    }
    let reply = handle_token(&shared, &headers, &body);
    match fault {
        Some(FaultKind::CommitThenDrop) => return drop_connection(&ctx).await,
        Some(FaultKind::CommitThenPatch { fields }) => return patch_reply(reply, &fields).await,
        Some(FaultKind::CommitThenHang { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        _ => {}
    }
    reply
}

/// Overwrites fields of a 200 reply; other replies pass unchanged.
async fn patch_reply(reply: Response, fields: &str) -> Response {
    if reply.status() != StatusCode::OK {
        return reply;
    }
    let bytes = axum::body::to_bytes(reply.into_body(), 1 << 20).await.unwrap_or_default();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if let (Some(obj), Ok(serde_json::Value::Object(patch))) =
        (v.as_object_mut(), serde_json::from_str::<serde_json::Value>(fields))
    {
        obj.extend(patch);
    }
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn handle_token(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    if !is_form(headers) {
        return unsupported_media();
    }
    let Some(mut form) = parse_form(body) else {
        return oauth_error(&BAD_REQUEST);
    };
    let mut auth = shared.auth.lock().expect("auth lock");
    let body_client = form.remove("client_id");
    let body_secret = form.remove("client_secret");
    let client_id = match auth.authenticate(
        basic_auth(headers),
        body_client.as_deref(),
        body_secret.as_deref(),
    ) {
        Ok(id) => id,
        Err(e) => return oauth_error(&e),
    };
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let req = TokenRequest { client_id, grant: GrantKind::from_form(&grant_type), form };
    let key = auth.rate_key(&req);
    let now = Instant::now();
    let remaining = match auth.rate_check(&key, now) {
        Ok(r) => r,
        Err(e) => return rate_headers(&auth, Some(0), api_error(&e)),
    };
    let result = auth.token(&req, now);
    tracing::debug!(
        client_id = %req.client_id,
        grant = %grant_type,
        outcome = result.as_ref().map_or_else(|e| e.code, |_| "ok"),
        "fake-server token request"
    );
    let resp = match result {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => oauth_error(&e),
    };
    rate_headers(&auth, remaining, resp)
}

fn rate_headers(
    auth: &super::auth::Auth,
    remaining: Option<usize>,
    mut resp: Response,
) -> Response {
    if let (Some(limit), Some(left)) = (auth.config.rate_limit, remaining) {
        let h = resp.headers_mut();
        h.insert("X-Rate-Limit-Group", HeaderValue::from_static("auth"));
        h.insert("X-Rate-Limit-Limit", limit.requests.into());
        h.insert("X-Rate-Limit-Remaining", left.into());
        h.insert("X-Rate-Limit-Window", limit.window.as_secs().into());
    }
    resp
}

fn fault_response(kind: &FaultKind) -> Response {
    let ok = |body: String| ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    let sample = || TokenResponse {
        access_token: "fault-injected-not-a-token".into(),
        token_type: "bearer",
        expires_in: Some(3599),
        issued_at: None,
        refresh_token: Some("fault-injected-not-a-token".into()),
        refresh_token_expires_in: Some(604_799),
        scope: String::new(),
        owner_id: String::new(),
        endpoint_id: String::new(),
        session_id: String::new(),
    };
    match kind {
        FaultKind::Status500 => {
            api_error(&fault_error(500, "CMN-102", "Internal Server Error", None))
        }
        FaultKind::Status503 { retry_after } => {
            api_error(&fault_error(503, "CMN-211", "Service Temporary Unavailable", *retry_after))
        }
        FaultKind::Status429 { retry_after } => {
            api_error(&fault_error(429, "CMN-301", "Request rate exceeded", *retry_after))
        }
        FaultKind::InvalidClient => api_error(&BAD_CLIENT),
        FaultKind::Malformed => ok("this is { not json".into()),
        FaultKind::Truncated => {
            let full = serde_json::to_string(&sample()).expect("serializable");
            ok(full[..full.len() / 2].to_string())
        }
        FaultKind::Html => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response(),
        FaultKind::MissingAccessToken => {
            let mut v = serde_json::to_value(sample()).expect("serializable");
            v.as_object_mut().expect("object").remove("access_token");
            ok(v.to_string())
        }
        FaultKind::Oversized { bytes } => {
            let n = bytes.unwrap_or(4 << 20);
            ok(format!("{{\"padding\":\"{}\"}}", "x".repeat(n.saturating_sub(14))))
        }
        FaultKind::Reply { status, body } => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            body.clone(),
        )
            .into_response(),
        FaultKind::Hang { .. }
        | FaultKind::Reset
        | FaultKind::CommitThenDrop
        | FaultKind::CommitThenHang { .. }
        | FaultKind::CommitThenPatch { .. } => {
            unreachable!("handled by the caller")
        }
    }
}

fn fault_error(status: u16, code: &'static str, msg: &'static str, retry: Option<u64>) -> ApiError {
    ApiError { status, error: "", code, message: msg, retry_after: retry }
}

#[derive(serde::Deserialize)]
struct RevokeQuery {
    token: Option<String>,
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<RevokeQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut form = if body.is_empty() {
        HashMap::new()
    } else if is_form(&headers) {
        parse_form(&body).unwrap_or_default()
    } else {
        return unsupported_media();
    };
    let mut auth = shared.auth.lock().expect("auth lock");
    let body_client = form.remove("client_id");
    let body_secret = form.remove("client_secret");
    let basic = basic_auth(&headers);
    if let Err(e) = auth.authenticate(basic, body_client.as_deref(), body_secret.as_deref()) {
        return oauth_error(&e);
    }
    match form.remove("token").or(query.token) {
        Some(token) => {
            auth.revoke(&token);
            StatusCode::OK.into_response()
        }
        None => oauth_error(&BAD_REQUEST),
    }
}

async fn authorize(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (Some(client_id), Some(redirect)) = (q.get("client_id"), q.get("redirect_uri")) else {
        return oauth_error(&BAD_REQUEST);
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return oauth_error(&BAD_REQUEST);
    }
    let challenge = q.get("code_challenge").map(|c| {
        let method = q.get("code_challenge_method").cloned().unwrap_or_else(|| "plain".into());
        (c.clone(), method)
    });
    let hint = q.get("login_hint").map(String::as_str);
    let result = shared.auth.lock().expect("auth lock").authorize(
        client_id,
        redirect,
        challenge,
        hint,
        Instant::now(),
    );
    let code = match result {
        Ok(code) => code,
        Err(e) => return oauth_error(&e),
    };
    let mut params = vec![("code", code.as_str())];
    if let Some(state) = q.get("state") {
        params.push(("state", state));
    }
    let sep = if redirect.contains('?') { '&' } else { '?' };
    let query = serde_urlencoded::to_string(params).expect("strings encode");
    let location = format!("{redirect}{sep}{query}");
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""))
}

async fn extension(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let result = shared.auth.lock().expect("auth lock").api_call(bearer(&headers), Instant::now());
    match result {
        Ok(owner) => Json(json!({
            "id": owner,
            "extensionNumber": "101",
            "name": format!("Fake User {owner}"),
            "type": "User",
            "status": "Enabled",
            "account": {"id": "400000000"},
        }))
        .into_response(),
        Err(e) => api_error(&e),
    }
}

async fn account(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let result = shared.auth.lock().expect("auth lock").api_call(bearer(&headers), Instant::now());
    match result {
        Ok(_) => Json(json!({"id": "400000000", "status": "Confirmed"})).into_response(),
        Err(e) => api_error(&e),
    }
}

/// Stands for any API call with a body: answers with the body's size and SHA-256, so that a
/// client can tell its body arrived whole (a proxy's replay included).
async fn sms(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    use sha2::Digest;
    let result = shared.auth.lock().expect("auth lock").api_call(bearer(&headers), Instant::now());
    match result {
        Ok(_) => {
            let digest = sha2::Sha256::digest(&body);
            let hex = digest.iter().fold(String::new(), |mut out, b| {
                let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
                out
            });
            Json(json!({"bytes": body.len(), "sha256": hex})).into_response()
        }
        Err(e) => api_error(&e),
    }
}

/// A recording download of `bytes` bytes, generated as it streams (never held whole), so a
/// test can tell a proxy that streams from one that buffers.
async fn recording(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(bytes): axum::extract::Path<u64>,
    headers: HeaderMap,
) -> Response {
    const CHUNK: u64 = 64 * 1024;
    let result = shared.auth.lock().expect("auth lock").api_call(bearer(&headers), Instant::now());
    if let Err(e) = result {
        return api_error(&e);
    }
    let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
        (sent < bytes).then(|| {
            let n = CHUNK.min(bytes - sent);
            (Ok::<_, std::io::Error>(Bytes::from(vec![b'r'; n as usize])), sent + n)
        })
    });
    let mut resp = axum::body::Body::from_stream(chunks).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/mpeg"));
    resp.headers_mut().insert(header::CONTENT_LENGTH, bytes.into());
    resp
}

fn loopback_only(ctx: &ConnCtx) -> Option<Response> {
    (!ctx.peer.ip().is_loopback()).then(|| StatusCode::FORBIDDEN.into_response())
}

async fn admin_stats(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
) -> Response {
    loopback_only(&ctx).unwrap_or_else(|| Json(shared.stats()).into_response())
}

async fn admin_tokens(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
) -> Response {
    loopback_only(&ctx).unwrap_or_else(|| Json(shared.issued_tokens()).into_response())
}

async fn admin_faults(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
) -> Response {
    loopback_only(&ctx).unwrap_or_else(|| {
        Json(shared.faults.lock().expect("faults lock").pending()).into_response()
    })
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Fault),
    Many(Vec<Fault>),
}

async fn admin_add_faults(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
    Json(faults): Json<OneOrMany>,
) -> Response {
    if let Some(denied) = loopback_only(&ctx) {
        return denied;
    }
    let list = match faults {
        OneOrMany::One(f) => vec![f],
        OneOrMany::Many(v) => v,
    };
    for f in list {
        shared.inject(f);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_clear_faults(
    State(shared): State<Arc<Shared>>,
    Extension(ctx): Extension<ConnCtx>,
) -> Response {
    loopback_only(&ctx).unwrap_or_else(|| {
        shared.faults.lock().expect("faults lock").clear();
        StatusCode::NO_CONTENT.into_response()
    })
}
