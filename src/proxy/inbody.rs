//! A client's request body, read off its connection as the proxy polls it: the connection's
//! read side moves into the body for the request and goes back to the connection once the body
//! has ended, so the next request can be read; a body dropped before its end takes the read
//! side with it, and the connection closes after the answer.

use super::conn::{Reader, fill};
use super::wire::{Chunked, Decoded, Framing};
use bytes::BytesMut;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

/// The connection's read side and what it has read beyond the head.
pub type ReadSide = (Box<dyn Reader>, BytesMut);

/// Where a body puts the read side back when it ends; the connection takes it from there.
pub type Slot = Arc<Mutex<Option<ReadSide>>>;

/// The request body handed to the proxy.
pub struct ClientBody(Option<Box<Reading>>);

struct Reading {
    side: Option<ReadSide>,
    decoder: Decoder,
    back: Slot,
}

enum Decoder {
    Length(u64),
    Chunked(Chunked),
}

impl ClientBody {
    /// A request without a body.
    pub fn empty() -> Self {
        Self(None)
    }

    /// A body framed by `framing`, read from `side`, which goes into `back` at its end.
    pub fn new(side: ReadSide, framing: Framing, back: Slot) -> Self {
        let decoder = match framing {
            Framing::Empty => return Self::empty(),
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunked::Size),
        };
        Self(Some(Box::new(Reading { side: Some(side), decoder, back })))
    }
}

impl Reading {
    /// The next piece of the body from what `buf` holds.
    fn decode(decoder: &mut Decoder, buf: &mut BytesMut) -> std::io::Result<Decoded> {
        match decoder {
            Decoder::Length(0) => Ok(Decoded::End),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Decoder::Chunked(state) => state
                .decode(buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.0)),
        }
    }

    /// Gives the read side back to the connection once the body has ended (a body of known
    /// length as soon as its last byte is read: its user may stop polling there).
    fn give_back_if_done(&mut self) {
        let done = match self.decoder {
            Decoder::Length(left) => left == 0,
            Decoder::Chunked(state) => state == Chunked::Done,
        };
        if done && let Some(side) = self.side.take() {
            *self.back.lock().expect("read side slot") = Some(side);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        loop {
            let Some((_, buf)) = self.side.as_mut() else { return Poll::Ready(None) };
            let decoded = match Self::decode(&mut self.decoder, buf) {
                Ok(d) => d,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            match decoded {
                Decoded::Data(d) => {
                    self.give_back_if_done();
                    return Poll::Ready(Some(Ok(d)));
                }
                Decoded::End => {
                    self.give_back_if_done();
                    return Poll::Ready(None);
                }
                Decoded::More => {}
            }
            let (io, buf) = self.side.as_mut().expect("checked above");
            if ready!(fill(&mut **io, buf, cx))? == 0 {
                let eof = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the client closed the connection inside the request body",
                );
                return Poll::Ready(Some(Err(eof)));
            }
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.0.as_mut() {
            None => Poll::Ready(None),
            Some(r) => r.poll_frame(cx).map(|d| d.map(|d| d.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|r| r.side.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.as_deref() {
            None => SizeHint::with_exact(0),
            Some(Reading { decoder: Decoder::Length(n), .. }) => SizeHint::with_exact(*n),
            Some(_) => SizeHint::default(),
        }
    }
}
