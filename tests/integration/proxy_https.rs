//! The proxy in front of an HTTPS upstream (a TLS server of the test's own on 127.0.0.1, its
//! certificate signed by a throwaway CA (`TestTls`) the daemon trusts through `SSL_CERT_FILE`): the token is
//! set, HTTP/2 is used where the upstream offers it, and bodies stream both ways.

use crate::harness::{TokenSpec, World};
use crate::proxy::{assert_no_token_in, client, unix_proxy, write_proxy_config};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokend::fake::TestTls;
use tokio::sync::Notify;

const T: Duration = Duration::from_secs(30);

/// Bytes of the first part of a streamed body; the rest follows once the other side saw it.
const FIRST: usize = 64 * 1024;

/// What the test and the upstream tell each other about the streamed bodies.
#[derive(Default)]
struct Signals {
    /// The upstream has the first part of an upload (the rest is still with the caller).
    upload_started: Notify,
    /// The caller has the first part of a download: the upstream may send the rest.
    download_seen: Notify,
}

type UpBody = http_body_util::Either<
    http_body_util::Full<Bytes>,
    http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
>;

/// An HTTPS upstream offering HTTP/2 and HTTP/1.1 (ALPN). `/echo` answers the protocol
/// version and the `Authorization` it got; `/upload` counts a body; `/download` sends `FIRST`
/// bytes, waits for the caller to see them, then `FIRST` more.
async fn tls_upstream(cert: &Path, key: &Path, signals: Arc<Signals>) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, signals) = (acceptor.clone(), signals.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req| answer(req, signals.clone()));
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
            });
        }
    });
    url
}

async fn answer(
    req: Request<Incoming>,
    signals: Arc<Signals>,
) -> Result<Response<UpBody>, hyper::Error> {
    let version = format!("{:?}", req.version());
    let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
    let reply = |json: serde_json::Value| {
        Response::new(http_body_util::Either::Left(http_body_util::Full::new(Bytes::from(
            json.to_string(),
        ))))
    };
    match req.uri().path() {
        "/upload" => {
            let mut body = req.into_body();
            let mut bytes = 0;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else { continue };
                let before = bytes;
                bytes += data.len();
                if before < FIRST && bytes >= FIRST {
                    signals.upload_started.notify_one();
                }
            }
            Ok(reply(
                serde_json::json!({"version": version, "authorization": auth, "bytes": bytes}),
            ))
        }
        "/download" => {
            let stream = futures_util::stream::unfold(0, move |part| {
                let signals = signals.clone();
                async move {
                    match part {
                        0 => {}
                        1 => signals.download_seen.notified().await,
                        _ => return None,
                    }
                    let frame = Frame::data(Bytes::from(vec![b'd'; FIRST]));
                    Some((Ok::<_, std::convert::Infallible>(frame), part + 1))
                }
            });
            Ok(Response::new(http_body_util::Either::Right(StreamBody::new(stream).boxed())))
        }
        _ => Ok(reply(serde_json::json!({"version": version, "authorization": auth}))),
    }
}

#[tokio::test]
async fn an_https_upstream_gets_the_token_over_http2_and_bodies_stream_both_ways() {
    let w = World::new().await;
    let tls = TestTls::generate(w.dir.path());
    let signals = Arc::new(Signals::default());
    let up = tls_upstream(&tls.cert, &tls.key, signals.clone()).await;
    // Uploads over 1 KiB are not held for a replay: they stream.
    let proxy = format!("{}\nupstream = \"{up}\"\nreplay_body_limit = 1024", unix_proxy(&w));
    write_proxy_config(&w, &TokenSpec::new("main"), "", &proxy);
    let d = w.daemon_with(&[("SSL_CERT_FILE", tls.ca.to_str().unwrap())], "");
    d.wait_ready().await;
    let c = client(&w.path("main.sock"));
    let token = w.sink("main").unwrap().access_token;

    let resp = c.get("http://proxy/echo").header("authorization", "Bearer mine").send().await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200, "the upstream's certificate is trusted (SSL_CERT_FILE)");
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["authorization"], format!("Bearer {token}"), "the proxy's token");
    assert_eq!(seen["version"], "HTTP/2.0", "HTTP/2 to an upstream that offers it");

    // An upload whose second half is sent only once the upstream has the first.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_of(rx));
    let upload = tokio::spawn(c.post("http://proxy/upload").body(body).send());
    tx.send(Ok(Bytes::from(vec![b'u'; FIRST]))).await.unwrap();
    tokio::time::timeout(T, signals.upload_started.notified())
        .await
        .expect("the upstream got the upload's first part while the rest was still unsent");
    tx.send(Ok(Bytes::from(vec![b'u'; FIRST]))).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(T, upload).await.expect("bounded").unwrap().unwrap();
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["bytes"], 2 * FIRST);
    assert_eq!(seen["authorization"], format!("Bearer {token}"));

    // A download whose second half is sent only once the caller has the first.
    let mut resp = c.get("http://proxy/download").send().await.unwrap();
    let mut got = 0;
    while got < FIRST {
        let chunk = tokio::time::timeout(T, resp.chunk()).await;
        got += chunk.expect("the download's first part reached the caller").unwrap().unwrap().len();
    }
    signals.download_seen.notify_one();
    while let Some(chunk) = tokio::time::timeout(T, resp.chunk()).await.expect("bounded").unwrap() {
        got += chunk.len();
    }
    assert_eq!(got, 2 * FIRST);
    assert_no_token_in(&w, &d.output());
}

/// The receiving end of a channel as a stream (reqwest's streamed request body).
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}
