//! One proxied request: read the body (kept for a replay up to the limit), pass the gate, set
//! the current token, send it upstream, and replay it once if the token was replaced under it.

use super::Upstream;
use super::body::{RequestBody, UpBody, whole};
use super::gate::{Current, FORCED_REFRESH_EVERY, Gate};
use super::headers::strip_hop_by_hop;
use super::inbody::ClientBody;
use super::plain::{self, PlainBody};
use super::upwire::Outgoing;
use crate::config::ProxyConfig;
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The upstream's answer body: from hyper's pooled client (HTTPS) or a plain-HTTP connection.
pub type UpstreamBody = Either<Incoming, PlainBody>;
/// What the proxy answers: the upstream's body as it streams in, or an answer of its own.
pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

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
    route: Route,
    /// The upstream URL taken apart once, so that a request's URI is put together from
    /// shared parts without parsing a string each time.
    scheme: Scheme,
    authority: Authority,
    /// The upstream's path without its trailing `/` (usually empty), put before each target.
    prefix: String,
}

/// How requests reach the upstream.
enum Route {
    /// HTTPS: the daemon's pooled client (HTTP/2 where the upstream offers it).
    Pooled(Box<Upstream>),
    /// Plain HTTP: HTTP/1.1 connections driven by the requests themselves; `host` is the
    /// `Host` header they carry.
    Plain { pool: Arc<plain::Pool>, host: HeaderValue },
}

/// What happened to a request besides its status, for the access log and metrics.
#[derive(Default)]
struct Outcome {
    held: Option<Duration>,
    replayed: bool,
}

/// One request: every problem is an HTTP answer.
pub async fn handle(proxy: Arc<Proxy>, req: Request<ClientBody>) -> Response<ProxyBody> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut outcome = Outcome::default();
    let resp = match RequestBody::read(body, proxy.cfg.replay_body_limit).await {
        Ok(body) => proxy.forward(&parts, body, &mut outcome).await,
        Err(_) => local_error(StatusCode::BAD_REQUEST, "the request body could not be read"),
    };
    proxy.account(&parts, resp.status(), started, &outcome);
    resp
}

impl Proxy {
    /// One `Proxy` per worker thread; to a plain-HTTP upstream each keeps its own idle
    /// connections, under one cap.
    pub fn per_worker(
        cfg: &ProxyConfig,
        gate: &Arc<Gate>,
        client: &Upstream,
        workers: usize,
    ) -> Vec<Arc<Self>> {
        let url = &cfg.upstream;
        let host = url.host_str().unwrap_or("localhost");
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let plain = (url.scheme() == "http").then(|| {
            let port = url.port_or_known_default().unwrap_or(80);
            let addr = format!("{host}:{port}");
            plain::Shared::new(addr, cfg.max_upstream_connections, plain::CONNECTION_WAIT, workers)
        });
        (0..workers)
            .map(|worker| {
                let route = match &plain {
                    Some(shared) => Route::Plain {
                        pool: plain::Pool::new(shared, worker),
                        host: HeaderValue::try_from(&authority)
                            .expect("a parsed URL's host and port"),
                    },
                    None => Route::Pooled(Box::new(client.clone())),
                };
                Arc::new(Self {
                    cfg: cfg.clone(),
                    gate: gate.clone(),
                    route,
                    scheme: Scheme::try_from(url.scheme()).unwrap_or(Scheme::HTTPS),
                    authority: Authority::try_from(authority.as_str())
                        .expect("a parsed URL's host and port"),
                    prefix: url.path().trim_end_matches('/').to_string(),
                })
            })
            .collect()
    }

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
        // Boxed: every request's future would otherwise carry a second `send` and the waits.
        Box::pin(self.replay(parts, resp, used, replay, outcome)).await
    }

    /// After a 401 on token `used`: sends the request again once a newer token is there.
    async fn replay(
        &self,
        parts: &Parts,
        resp: Response<UpstreamBody>,
        used: u64,
        body: Bytes,
        outcome: &mut Outcome,
    ) -> Response<ProxyBody> {
        if !self.wait_for_newer(used).await {
            return pass(resp);
        }
        outcome.replayed = true;
        self.gate.counters.replays.fetch_add(1, Ordering::Relaxed);
        match self.send(parts, whole(body), outcome).await {
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
        body: UpBody,
        outcome: &mut Outcome,
    ) -> Result<(Response<UpstreamBody>, u64), Box<Response<ProxyBody>>> {
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
        let result = match &self.route {
            Route::Pooled(client) => {
                let request = self.request(parts, body, &current)?;
                client.request(request).await.map(|r| r.map(Either::Left)).map_err(|e| {
                    if e.is_connect() {
                        plain::Error::Connect
                    } else {
                        plain::Error::Request("the upstream closed or reset the connection, or the client's body broke off")
                    }
                })
            }
            Route::Plain { pool, host } => {
                let target = self.target(&parts.uri)?;
                let auth = auth_of(&current)?;
                let req = Outgoing {
                    method: &parts.method,
                    target: target.as_str(),
                    headers: &parts.headers,
                    host,
                    auth: &auth,
                };
                pool.send(&req, body).await.map(|r| r.map(Either::Right))
            }
        };
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
        body: UpBody,
        current: &Current,
    ) -> Result<Request<UpBody>, Box<Response<ProxyBody>>> {
        let Some(uri) = self.uri(&parts.uri) else { return Err(bad_target()) };
        let auth = auth_of(current)?;
        // Kept for a replay, so copied: a handful of shared `Bytes`, no copy of their text,
        // into a map with room for the two the proxy sets (added to a clone, they made it
        // grow, a reallocation on most requests).
        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 2);
        for (name, value) in &parts.headers {
            if name != header::HOST && name != header::AUTHORIZATION {
                headers.append(name.clone(), value.clone());
            }
        }
        strip_hop_by_hop(&mut headers);
        // hyper's client sets the upstream's own `Host`.
        headers.insert(header::AUTHORIZATION, auth);
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// The upstream's path and query for a client's request target (an absolute form is
    /// reduced to its path and query: the proxy only ever talks to its upstream).
    fn path_and_query(&self, target: &Uri) -> Option<PathAndQuery> {
        let pq = target.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        if self.prefix.is_empty() {
            return Some(pq);
        }
        PathAndQuery::try_from(format!("{}{pq}", self.prefix)).ok()
    }

    /// The absolute upstream URI, by which the pooled client picks its connection.
    fn uri(&self, target: &Uri) -> Option<Uri> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.path_and_query(target)?)
            .build()
            .ok()
    }

    /// The origin-form target on a plain-HTTP connection.
    fn target(&self, target: &Uri) -> Result<PathAndQuery, Box<Response<ProxyBody>>> {
        self.path_and_query(target).ok_or_else(bad_target)
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

fn bad_target() -> Box<Response<ProxyBody>> {
    Box::new(local_error(StatusCode::BAD_REQUEST, "the request target is not a valid path"))
}

/// The `Authorization` value of the current token.
fn auth_of(current: &Current) -> Result<HeaderValue, Box<Response<ProxyBody>>> {
    current.auth.clone().ok_or_else(|| {
        Box::new(local_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the access token is not a valid header value",
        ))
    })
}

/// The upstream's response as it came; the body streams. Its hop-by-hop headers are left out
/// as its head is written (`wire::response_head`): removing them from the map cost about 6%
/// of a proxied request's instructions (callgrind), as most upstreams send `Connection`.
fn pass(resp: Response<UpstreamBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    parts.version = hyper::Version::HTTP_11;
    Response::from_parts(parts, Either::Left(body))
}

/// An answer of the proxy's own, shaped like RingCentral's errors. Never carries the token.
fn local_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "errorCode": "TOKEND-PROXY",
        "message": format!("tokend proxy: {message}"),
    })
    .to_string();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Why the upstream gave no response, without the URL (its query may be private).
fn upstream_error(e: &plain::Error) -> Response<ProxyBody> {
    let (status, why) = match e {
        plain::Error::Connect => {
            (StatusCode::BAD_GATEWAY, "cannot connect to the upstream".to_string())
        }
        plain::Error::Request(why) => {
            (StatusCode::BAD_GATEWAY, format!("the request failed: {why}"))
        }
        plain::Error::Answer(why) => {
            (StatusCode::BAD_GATEWAY, format!("the upstream's answer was refused: {why}"))
        }
        plain::Error::Busy { max, waited } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "all {max} connections to the upstream stayed busy for {} ms (max_upstream_connections)",
                waited.as_millis()
            ),
        ),
    };
    tracing::warn!(error = %why, "proxied request failed");
    local_error(status, &why)
}
