//! A TCP relay between one tokend host and etcd (127.0.0.1 only) that can lose the reply to
//! one request: armed with what the request carries, it forwards it, swallows etcd's answer
//! and resets the host's connection once the answer comes (so etcd has acted), as a network
//! that drops the reply to an applied write does.
//!
//! It follows the HTTP/2 frames on both sides (gRPC runs over HTTP/2, uncompressed here) so
//! that it matches one request's message whole and knows when the answer to it has started.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The request to lose: its message holds every byte string of `all` and none of `none`.
#[derive(Clone, Debug)]
pub struct Trigger {
    all: Vec<Vec<u8>>,
    none: Vec<Vec<u8>>,
}

impl Trigger {
    pub fn new(all: &[&str], none: &[&str]) -> Self {
        let bytes = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
        Self { all: bytes(all), none: bytes(none) }
    }

    fn matches(&self, message: &[u8]) -> bool {
        let has = |needle: &Vec<u8>| message.windows(needle.len()).any(|w| w == needle.as_slice());
        self.all.iter().all(has) && !self.none.iter().any(has)
    }
}

#[derive(Default)]
struct Shared {
    armed: Option<Trigger>,
    /// Replies swallowed (their connection reset).
    lost: usize,
    /// GOAWAY frames etcd sent: it is closing the connection (e.g. "too_many_pings").
    goaways: usize,
}

/// One relay, listening on its own loopback port; stops when dropped.
pub struct Relay {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays to etcd at `upstream` (its client URL, `http://127.0.0.1:P`).
    pub async fn start(upstream: &str) -> Self {
        let addr: SocketAddr = upstream.trim_start_matches("http://").parse().expect("loopback");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = tokio::spawn(accept(listener, addr, shared.clone()));
        Self { port, shared, task }
    }

    /// For `[cluster] endpoints`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Loses the reply to the next request that `trigger` matches, on whichever connection.
    pub fn arm(&self, trigger: Trigger) {
        self.shared.lock().unwrap().armed = Some(trigger);
    }

    /// Replies lost so far.
    pub fn lost(&self) -> usize {
        self.shared.lock().unwrap().lost
    }

    /// GOAWAY frames etcd sent so far, on any connection.
    pub fn goaways(&self) -> usize {
        self.shared.lock().unwrap().goaways
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The connections live in the accept task's JoinSet: they end with it.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, shared: Arc<Mutex<Shared>>) {
    let mut conns = JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        conns.spawn(relay(client, upstream, shared.clone()));
        // Reap the ended ones, so that a long test does not keep them all.
        while conns.try_join_next().is_some() {}
    }
}

/// One connection. The frames of each side are followed so that a request is matched whole
/// and the answer to it recognised by its stream.
async fn relay(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Mutex<Shared>>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    // The client opens with the 24-byte HTTP/2 preface; the server with a frame.
    let (mut up, mut down) = (Frames::after(24), Frames::after(0));
    let (mut cbuf, mut sbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // The stream whose answer is being swallowed.
    let mut losing: Option<u32> = None;
    loop {
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let Ok(n @ 1..) = n else { return };
                for f in up.feed(&cbuf[..n]) {
                    if f.kind == DATA && losing.is_none() && take_if_armed(&shared, &f.payload) {
                        losing = Some(f.stream);
                    }
                }
                if server.write_all(&cbuf[..n]).await.is_err() { return }
            }
            n = server.read(&mut sbuf) => {
                let Ok(n @ 1..) = n else { return };
                let frames = down.feed(&sbuf[..n]);
                shared.lock().unwrap().goaways += frames.iter().filter(|f| f.kind == GOAWAY).count();
                let Some(stream) = losing else {
                    if client.write_all(&sbuf[..n]).await.is_err() { return }
                    continue;
                };
                // etcd answers once the request is applied: the answer's headers prove it.
                if frames.iter().any(|f| f.kind == HEADERS && f.stream == stream) {
                    shared.lock().unwrap().lost += 1;
                    // A reset, not a clean close: what the host sees when the path breaks.
                    let _ = client.set_zero_linger();
                    return;
                }
            }
        }
    }
}

/// Disarms and returns true when the armed trigger matches this request message.
fn take_if_armed(shared: &Mutex<Shared>, message: &[u8]) -> bool {
    let mut s = shared.lock().unwrap();
    let hit = s.armed.as_ref().is_some_and(|t| t.matches(message));
    if hit {
        s.armed = None;
    }
    hit
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const GOAWAY: u8 = 7;

struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Splits one direction's bytes into HTTP/2 frames (9-byte header, then the payload).
struct Frames {
    /// Bytes of the connection preface still to pass unparsed.
    skip: usize,
    buf: Vec<u8>,
}

impl Frames {
    fn after(preface: usize) -> Self {
        Self { skip: preface, buf: Vec::new() }
    }

    /// The frames completed by `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let skipped = self.skip.min(bytes.len());
        self.skip -= skipped;
        self.buf.extend_from_slice(&bytes[skipped..]);
        let mut frames = Vec::new();
        while self.buf.len() >= 9 {
            let b = &self.buf;
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            if b.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
            let frame = Frame { kind: b[3], stream, payload: b[9..9 + len].to_vec() };
            self.buf.drain(..9 + len);
            frames.push(frame);
        }
        frames
    }
}
