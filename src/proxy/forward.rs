//! One proxied request: read the body (kept for a replay up to the limit), pass the gate, set
//! the current token, send it upstream, and replay it once if the token was replaced under it.

use super::body::RequestBody;
use super::gate::{FORCED_REFRESH_EVERY, Gate};
use super::headers::strip_hop_by_hop;
use crate::config::ProxyConfig;
use crate::secret::AccessToken;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// How long a 401 waits for a newer token that may be on its way (a refresh made elsewhere,
/// a cluster follower's mirror) before the proxy asks for a refresh itself.
const NEWER_TOKEN_WAIT: Duration = Duration::from_secs(1);
/// How long a 401 waits for a refresh the proxy asked for.
const FORCED_REFRESH_WAIT: Duration = Duration::from_secs(15);
/// How long a request waits for a first (or unexpired) token before a 503.
const NO_TOKEN_WAIT: Duration = Duration::from_secs(5);

/// One `[[token.proxy]]` at run time.
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub gate: Arc<Gate>,
    pub client: reqwest::Client,
}

/// What happened to a request besides its status, for the access log and metrics.
#[derive(Default)]
struct Outcome {
    held: Option<Duration>,
    replayed: bool,
}

/// The hyper service: never fails, every problem is an HTTP answer.
pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut outcome = Outcome::default();
    let resp = match RequestBody::read(body, proxy.cfg.replay_body_limit).await {
        Ok(body) => proxy.forward(&parts, body, &mut outcome).await,
        Err(_) => local_error(StatusCode::BAD_REQUEST, "the request body could not be read"),
    };
    proxy.account(&parts, resp.status(), started, &outcome);
    Ok(resp)
}

impl Proxy {
    async fn forward(
        &self,
        parts: &Parts,
        body: RequestBody,
        outcome: &mut Outcome,
    ) -> Response<ProxyBody> {
        let (first, replay) = body.take();
        let (resp, used) = match self.send(parts, first, outcome).await {
            Ok(sent) => sent,
            Err(local) => return *local,
        };
        if resp.status() != StatusCode::UNAUTHORIZED {
            return pass(resp);
        }
        let Some(replay) = replay else {
            // Too large to send again; still make sure the next request has a live token.
            if self.gate.newer_than(used, Duration::ZERO).await.is_none() {
                self.gate.force_refresh();
            }
            return pass(resp);
        };
        if !self.wait_for_newer(used).await {
            return pass(resp);
        }
        outcome.replayed = true;
        self.gate.counters.replays.fetch_add(1, Ordering::Relaxed);
        match self.send(parts, reqwest::Body::from(replay), outcome).await {
            Ok((resp, _)) => pass(resp),
            Err(local) => *local,
        }
    }

    /// After a 401 on token `used`: true once a newer token is published. A refresh made
    /// elsewhere gets a moment to arrive; then the current token itself was refused
    /// (revoked, session cap), and the refresher is asked for a new one.
    async fn wait_for_newer(&self, used: u64) -> bool {
        if self.gate.newer_than(used, NEWER_TOKEN_WAIT).await.is_some() {
            return true;
        }
        let asked = self.gate.force_refresh() || self.gate.forced_within(FORCED_REFRESH_EVERY);
        asked && self.gate.newer_than(used, FORCED_REFRESH_WAIT).await.is_some()
    }

    /// Through the gate, with the current token. Returns the response and the generation of
    /// the token it carried, or a local error response.
    async fn send(
        &self,
        parts: &Parts,
        body: reqwest::Body,
        outcome: &mut Outcome,
    ) -> Result<(reqwest::Response, u64), Box<Response<ProxyBody>>> {
        let admitted = self.gate.admit().await;
        if let Some(h) = admitted.held {
            outcome.held = Some(outcome.held.unwrap_or_default() + h);
        }
        let Some(current) = self.gate.token(NO_TOKEN_WAIT).await else {
            return Err(Box::new(local_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "tokend has no valid access token for this token now; see `tokend status`",
            )));
        };
        let request = self.request(parts, body, &current.token)?;
        let result = self.client.execute(request).await;
        // The upstream has judged the token once the response head is here: a refresh may go.
        drop(admitted);
        match result {
            Ok(resp) => Ok((resp, current.generation)),
            Err(e) => Err(Box::new(upstream_error(&e))),
        }
    }

    fn request(
        &self,
        parts: &Parts,
        body: reqwest::Body,
        token: &AccessToken,
    ) -> Result<reqwest::Request, Box<Response<ProxyBody>>> {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let base = self.cfg.upstream.as_str().trim_end_matches('/');
        let Ok(url) = reqwest::Url::parse(&format!("{base}{target}")) else {
            return Err(Box::new(local_error(
                StatusCode::BAD_REQUEST,
                "the request target is not a valid path",
            )));
        };
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        let Ok(mut auth) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) else {
            return Err(Box::new(local_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the access token is not a valid header value",
            )));
        };
        auth.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, auth);
        let mut request = reqwest::Request::new(parts.method.clone(), url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body);
        Ok(request)
    }

    fn account(&self, parts: &Parts, status: StatusCode, started: Instant, outcome: &Outcome) {
        let c = &self.gate.counters;
        c.count_status(status.as_u16());
        if let Some(held) = outcome.held {
            c.held.fetch_add(1, Ordering::Relaxed);
            c.held_micros.fetch_add(held.as_micros() as u64, Ordering::Relaxed);
        }
        if self.cfg.access_log {
            tracing::info!(
                target: "tokend::proxy::access",
                token = %self.gate.name(),
                method = %parts.method,
                path = %parts.uri.path(),
                status = status.as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                held_ms = outcome.held.map_or(0.0, |h| h.as_secs_f64() * 1000.0),
                replayed = outcome.replayed,
                "proxied"
            );
        }
    }
}

/// The upstream's response as it came, minus its hop-by-hop headers; the body streams.
fn pass(resp: reqwest::Response) -> Response<ProxyBody> {
    let resp: Response<reqwest::Body> = resp.into();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = hyper::Version::HTTP_11;
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
}

/// An answer of the proxy's own, shaped like RingCentral's errors. Never carries the token.
fn local_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "errorCode": "TOKEND-PROXY",
        "message": format!("tokend proxy: {message}"),
    })
    .to_string();
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Why the upstream gave no response, without the URL (its query may be private).
fn upstream_error(e: &reqwest::Error) -> Response<ProxyBody> {
    if e.is_timeout() {
        return local_error(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time");
    }
    let why = if e.is_connect() {
        "cannot connect to the upstream"
    } else if e.is_body() || e.is_request() {
        "the request failed (the upstream closed or reset the connection, or the client's body broke off)"
    } else {
        "the upstream request failed"
    };
    tracing::warn!(error = %why, "proxied request failed");
    local_error(StatusCode::BAD_GATEWAY, why)
}
