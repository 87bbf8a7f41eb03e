//! Request bodies: kept whole up to the replay limit (so a 401 can be sent again), streamed
//! beyond it (an upload is never held in memory whole).

use super::forward::BoxError;
use super::inbody::ClientBody;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A client's request body, as far as the proxy has read it.
pub enum RequestBody {
    /// The whole body, no longer than the limit: replayable.
    Whole(Bytes),
    /// Longer than the limit: the part read so far and the rest still on the wire.
    Streaming { head: Vec<Bytes>, rest: ClientBody },
}

impl RequestBody {
    /// Reads up to `limit` bytes; stops there if the body goes on.
    pub async fn read(mut body: ClientBody, limit: usize) -> std::io::Result<Self> {
        if hyper::body::Body::is_end_stream(&body) {
            // A GET: no frame to wait for, nothing to allocate.
            return Ok(Self::Whole(Bytes::new()));
        }
        let mut head = Vec::new();
        let mut len = 0;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            len += data.len();
            head.push(data);
            if len > limit {
                return Ok(Self::Streaming { head, rest: body });
            }
        }
        Ok(Self::Whole(concat(head, len)))
    }

    /// The body to send now, and what remains for a replay (`None`: not replayable).
    pub fn take(self) -> (UpBody, Option<Bytes>) {
        match self {
            Self::Whole(b) => (whole(b.clone()), Some(b)),
            Self::Streaming { head, rest } => {
                let head =
                    futures_util::stream::iter(head.into_iter().map(Ok::<_, std::io::Error>));
                let stream = futures_util::StreamExt::chain(head, rest.into_data_stream());
                let frames = futures_util::StreamExt::map(stream, |d| {
                    d.map(Frame::data).map_err(|e| Box::new(e) as BoxError)
                });
                (UpBody::Streaming(StreamBody::new(frames).boxed()), None)
            }
        }
    }
}

/// A body held whole (the usual small request, or a replay).
pub fn whole(b: Bytes) -> UpBody {
    UpBody::Whole(b)
}

/// What the proxy sends upstream: a body held whole (replayable; a plain-HTTP connection
/// writes it with the head, and again on a fresh connection if need be), or one too large to
/// hold that streams through.
pub enum UpBody {
    /// Empty once sent.
    Whole(Bytes),
    Streaming(BoxBody<Bytes, BoxError>),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            Self::Whole(b) if b.is_empty() => Poll::Ready(None),
            Self::Whole(b) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(b))))),
            Self::Streaming(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(b) => b.is_empty(),
            Self::Streaming(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(b) => SizeHint::with_exact(b.len() as u64),
            Self::Streaming(s) => s.size_hint(),
        }
    }
}

fn concat(parts: Vec<Bytes>, len: usize) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.into_iter().next().expect("one part"),
        _ => {
            let mut all = Vec::with_capacity(len);
            for p in parts {
                all.extend_from_slice(&p);
            }
            all.into()
        }
    }
}
