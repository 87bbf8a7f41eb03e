//! Request bodies: kept whole up to the replay limit (so a 401 can be sent again), streamed
//! beyond it (an upload is never held in memory whole).

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::body::Incoming;

/// A client's request body, as far as the proxy has read it.
pub enum RequestBody {
    /// The whole body, no longer than the limit: replayable.
    Whole(Bytes),
    /// Longer than the limit: the part read so far and the rest still on the wire.
    Streaming { head: Vec<Bytes>, rest: Incoming },
}

impl RequestBody {
    /// Reads up to `limit` bytes; stops there if the body goes on.
    pub async fn read(mut body: Incoming, limit: usize) -> Result<Self, hyper::Error> {
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
    pub fn take(self) -> (reqwest::Body, Option<Bytes>) {
        match self {
            Self::Whole(b) => (reqwest::Body::from(b.clone()), Some(b)),
            Self::Streaming { head, rest } => {
                let head = futures_util::stream::iter(head.into_iter().map(Ok::<_, hyper::Error>));
                let stream = futures_util::StreamExt::chain(head, rest.into_data_stream());
                (reqwest::Body::wrap_stream(stream), None)
            }
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
