//! HTTP/1.1 toward the proxy's clients, the pure part: a request head parsed (httparse) into
//! `http` types with its body's framing (RFC 9112 section 6), a chunked body decoded, and a
//! response head written with the framing its body needs.

use super::headers::ConnectionNamed;
use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri, Version};

/// The most header fields a request head may have (hyper's server allowed 100).
const MAX_HEADERS: usize = 100;

/// The longest chunk-size line or trailer line of a chunked body.
const MAX_LINE: usize = 4096;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, or zero, and no `Transfer-Encoding`).
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head.
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client may send another request on this connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` with a body: the client waits for a `100 Continue`.
    pub expect_continue: bool,
}

/// A request head the proxy refuses: answered with this status, then the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub why: &'static str,
}

const fn refused(status: StatusCode, why: &'static str) -> Refused {
    Refused { status, why }
}

/// Parses the request head at the start of `buf`, and removes it from `buf` (the body or the
/// next request stays). `Ok(None)`: the head is not complete yet. A head longer than `max`
/// bytes (or with too many fields) is refused with 431.
pub fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, Refused> {
    let too_large = refused(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "the request head is too large (at most 64 KiB and 100 header fields)",
    );
    // Uninitialised: filling 100 empty fields (3.2 KiB) for each request cost more than
    // parsing a usual head.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max => len,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(too_large);
        }
        Ok(httparse::Status::Partial) if buf.len() >= max => return Err(too_large),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(refused(StatusCode::BAD_REQUEST, "the request head is not HTTP/1.1")),
    };
    let head = head_of(&parsed)?;
    buf.advance(len);
    Ok(Some(head))
}

fn head_of(parsed: &httparse::Request<'_, '_>) -> Result<Head, Refused> {
    let bad = |why| refused(StatusCode::BAD_REQUEST, why);
    let method = parsed.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("invalid method"))?;
    let uri = Uri::try_from(parsed.path.unwrap_or_default())
        .map_err(|_| bad("the request target is not a valid URI"))?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut seen = Seen::default();
    for field in &*parsed.headers {
        seen.field(field.name, field.value)?;
        let name = HeaderName::from_bytes(field.name.as_bytes());
        let value = HeaderValue::from_bytes(field.value);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(bad("invalid header field"));
        };
        headers.append(name, value);
    }
    let (framing, ambiguous) = seen.framing(version)?;
    if ambiguous {
        // RFC 9112 section 6.3: an intermediary forwarding such a message MUST first remove
        // the Content-Length (the body goes on decoded from its chunks).
        headers.remove(header::CONTENT_LENGTH);
    } else if seen.lengths > 1 {
        // A length sent as a list or repeated ("3, 3"; RFC 9110 section 8.6 lets a recipient
        // take it as one) goes on as that one value: an upstream may refuse the list, or read
        // another length from it.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(seen.length.unwrap_or(0)));
    }
    // HTTP/1.0 keeps a connection only when asked to (RFC 9112 section 9.3).
    let asked = version == Version::HTTP_11 || seen.keep_alive;
    let keep_alive = asked && !ambiguous && !seen.close;
    let expect_continue = version == Version::HTTP_11 && framing != Framing::Empty && seen.expect;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Head { request, framing, keep_alive, expect_continue })
}

/// What the head's fields say about the connection and the body, gathered as they are parsed
/// (looking each up in the header map again cost a hash per lookup).
/// (Four independent facts of a head, not a state: bools read best.)
#[derive(Default)]
#[allow(clippy::struct_excessive_bools)]
struct Seen {
    length: Option<u64>,
    /// How many values the `Content-Length` fields held (one length, all of them equal).
    lengths: usize,
    /// `Transfer-Encoding` present: how many codings, and whether the last is chunked.
    codings: usize,
    chunked_last: bool,
    close: bool,
    /// `Connection: keep-alive`: an HTTP/1.0 client's way to keep its connection.
    keep_alive: bool,
    expect: bool,
}

impl Seen {
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), Refused> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            for n in value.split(|b| *b == b',') {
                // 1*DIGIT: `parse` alone would also take a sign ("+5").
                let n = Some(n.trim_ascii())
                    .filter(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
                    .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok());
                let Some(n) = n.filter(|n| self.length.is_none_or(|l| l == *n)) else {
                    return Err(refused(StatusCode::BAD_REQUEST, "an invalid Content-Length"));
                };
                self.length = Some(n);
                self.lengths += 1;
            }
        } else if is("transfer-encoding") {
            // A later field's codings come after this one's.
            for coding in value.split(|b| *b == b',') {
                self.codings += 1;
                self.chunked_last = coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if is("connection") {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is("expect") {
            self.expect = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }

    /// The body's framing (RFC 9112 section 6.3), and whether the head was ambiguous (both
    /// `Transfer-Encoding` and `Content-Length`: chunked wins, and the connection closes after).
    fn framing(&self, version: Version) -> Result<(Framing, bool), Refused> {
        let bad = |why| refused(StatusCode::BAD_REQUEST, why);
        match self.codings {
            1.. if version == Version::HTTP_10 => {
                Err(bad("Transfer-Encoding in an HTTP/1.0 request"))
            }
            1.. if !self.chunked_last => {
                Err(bad("a Transfer-Encoding that does not end with chunked"))
            }
            // Only chunked is decoded here: a body coded otherwise besides (gzip, chunked) would
            // go upstream without the header that says so (RFC 9112 section 6.1: 501).
            2.. => Err(refused(
                StatusCode::NOT_IMPLEMENTED,
                "a transfer coding other than chunked is not supported",
            )),
            1 => Ok((Framing::Chunked, self.length.is_some())),
            0 => {
                Ok((self.length.filter(|n| *n > 0).map_or(Framing::Empty, Framing::Length), false))
            }
        }
    }
}

/// The most a chunked body's trailer fields may take.
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines (dropped) up to an empty line; the bytes they took
    /// so far (at most `MAX_TRAILERS`, as hyper's server allowed: they are not bounded by
    /// anything else).
    Trailers(usize),
    Done,
}

/// One step of a body decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More bytes are needed.
    More,
    End,
}

/// A body that is not valid chunked encoding.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk(pub &'static str);

impl Chunked {
    /// Decodes what `buf` holds, removing what it used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BadChunk> {
        loop {
            match *self {
                Self::Size => {
                    let Some(line) = line(buf)? else { return Ok(Decoded::More) };
                    let size = chunk_size(&line)?;
                    *self = if size == 0 { Self::Trailers(0) } else { Self::Data(size) };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - n as u64;
                    *self = if left == 0 { Self::DataEnd } else { Self::Data(left) };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BadChunk("a chunk longer than its size"));
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers(taken) => {
                    let Some(line) = line(buf)? else { return Ok(Decoded::More) };
                    let taken = taken + line.len() + 2;
                    if taken > MAX_TRAILERS {
                        return Err(BadChunk("trailer fields over 16 KiB"));
                    }
                    *self = if line.is_empty() { Self::Done } else { Self::Trailers(taken) };
                }
                Self::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The next CRLF-ended line, removed from `buf` (without its CRLF); None if not all here.
fn line(buf: &mut BytesMut) -> Result<Option<BytesMut>, BadChunk> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let mut line = buf.split_to(end + 2);
            line.truncate(end);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(BadChunk("a chunk line over 4 KiB")),
        None => Ok(None),
    }
}

/// A chunk-size line's size (hex digits, then optional whitespace and `;extensions`).
fn chunk_size(line: &[u8]) -> Result<u64, BadChunk> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii_end();
    // 1*HEXDIG: `from_str_radix` alone would also take a sign ("+5").
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(BadChunk("an invalid chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| BadChunk("an invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| BadChunk("an invalid chunk size"))
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// No body is sent (HEAD, 1xx, 204, 304), whatever the headers say.
    None,
    Length(u64),
    Chunked,
    /// To an HTTP/1.0 client, a body of unknown length ends when the connection closes.
    UntilClose,
}

/// What the response head depends on besides the response.
pub struct Reply {
    /// The request was a HEAD.
    pub head_request: bool,
    pub http10: bool,
    /// The connection closes after this response.
    pub close: bool,
    /// The body's exact length, when known.
    pub length: Option<u64>,
}

/// Writes the status line and headers (the response's own, minus the hop-by-hop ones: the
/// framing and connection headers are this connection's to set) and returns how the body is to be sent; with `Out::UntilClose`
/// the connection must close after the body.
pub fn response_head(out: &mut Vec<u8>, parts: &hyper::http::response::Parts, r: &Reply) -> Out {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length: Option<u64> = None;
    let mut dated = false;
    // Usually none: no allocation unless the answer has a `Connection` header.
    let hop = ConnectionNamed::of(&parts.headers);
    // Transfer-Encoding beside a length: the body came as chunks, and the length is not its
    // length (RFC 9112 section 6.3: a proxy MUST remove it).
    let mut coded = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            // Written after the others, as one value: a list ("5, 5") is not parsed here, and
            // the body's own length is written in its place.
            length = std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.trim().parse().ok());
            continue;
        }
        if hop.drops(name) {
            // The connection's own (RFC 9110 section 7.6.1): the proxy sets its own.
            coded |= name == header::TRANSFER_ENCODING;
            continue;
        }
        dated |= name == header::DATE;
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if coded {
        length = None;
    }
    if let Some(n) = length
        && status != StatusCode::NO_CONTENT
        && !status.is_informational()
    {
        field(out, b"content-length", n.to_string().as_bytes());
    }
    if !dated {
        date(out);
    }
    let no_body = r.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let how = if no_body {
        Out::None
    } else if let Some(n) = length {
        Out::Length(n)
    } else if let Some(n) = r.length {
        field(out, b"content-length", n.to_string().as_bytes());
        Out::Length(n)
    } else if r.http10 {
        Out::UntilClose
    } else {
        field(out, b"transfer-encoding", b"chunked");
        Out::Chunked
    };
    if r.close || how == Out::UntilClose {
        field(out, b"connection", b"close");
    } else if r.http10 {
        field(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    how
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` header (RFC 9110 section 6.6.1: a proxy adds one where the response has none),
/// formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static NOW: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    NOW.with_borrow_mut(|(second, text)| {
        let now = chrono::Utc::now();
        if now.timestamp() != *second {
            *second = now.timestamp();
            *text = now.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        }
        field(out, b"date", text.as_bytes());
    });
}

/// A small answer of the proxy's own for a refused request head; the connection closes after.
pub fn refusal(r: &Refused) -> Vec<u8> {
    let body = serde_json::json!({
        "errorCode": "TOKEND-PROXY",
        "message": format!("tokend proxy: {}", r.why),
    })
    .to_string();
    let mut out = Vec::with_capacity(256 + body.len());
    let mut resp = hyper::Response::new(());
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let (parts, ()) = resp.into_parts();
    let reply =
        Reply { head_request: false, http10: false, close: true, length: Some(body.len() as u64) };
    response_head(&mut out, &parts, &reply);
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<Head>, Refused> {
        parse_head(&mut BytesMut::from(text), 64 * 1024)
    }

    fn framing_of(text: &str) -> Result<Framing, StatusCode> {
        match parse(text) {
            Ok(Some(h)) => Ok(h.framing),
            Ok(None) => panic!("incomplete: {text}"),
            Err(r) => Err(r.status),
        }
    }

    #[test]
    fn a_head_is_parsed_and_split_off_leaving_the_rest() {
        let mut buf = BytesMut::from(
            "POST /a?b=c HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\ncontent-length: 3\r\n\r\nabcGET",
        );
        let head = parse_head(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&buf[..], b"abcGET");
        let r = &head.request;
        assert_eq!(
            (r.method(), r.uri().path(), r.uri().query()),
            (&Method::POST, "/a", Some("b=c"))
        );
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keep_alive && !head.expect_continue);
    }

    #[test]
    fn an_incomplete_head_waits_and_a_long_one_is_refused_with_431() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let long = format!("GET / HTTP/1.1\r\nx-big: {}\r\n", "a".repeat(2000));
        let r = parse_head(&mut BytesMut::from(long.as_str()), 1024).err().unwrap();
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let many = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect::<Vec<_>>().concat();
        let r = parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err().unwrap();
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let table = [
            ("GET / HTTP/1.1\r\n\r\n", Ok(Framing::Empty)),
            ("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n", Ok(Framing::Empty)),
            ("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n", Ok(Framing::Length(5))),
            ("POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n", Ok(Framing::Length(5))),
            ("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\ncontent-length: 1x\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\ncontent-length: 5,\r\n\r\n", Err(400)),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", Ok(Framing::Chunked)),
            ("POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n", Ok(Framing::Chunked)),
            ("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n", Err(501)),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked, chunked\r\n\r\n", Err(501)),
            ("POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n", Err(400)),
            ("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", Err(400)),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                Ok(Framing::Chunked),
            ),
        ];
        for (text, want) in table {
            let want = want.map_err(|c| StatusCode::from_u16(c).unwrap());
            assert_eq!(framing_of(text), want, "{text}");
        }
    }

    #[test]
    fn keep_alive_and_expect_continue() {
        let head = |t: &str| parse(t).unwrap().unwrap();
        assert!(!head("GET / HTTP/1.1\r\nconnection: keep-alive, Close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n").keep_alive);
        let both = "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert!(!head(both).keep_alive, "an ambiguous head closes its connection");
        let forwarded = head(both).request;
        assert!(
            !forwarded.headers().contains_key(header::CONTENT_LENGTH),
            "and its Content-Length is not forwarded beside the decoded chunks"
        );
        let expect = "POST / HTTP/1.1\r\nexpect: 100-Continue\r\ncontent-length: 3\r\n\r\n";
        assert!(head(expect).expect_continue);
        assert!(!head("GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn bad_heads_are_refused_with_400() {
        for text in
            ["GET\r\n\r\n", "GET / HTTP/1.1\r\nbad header\r\n\r\n", "G@T / HTTP/1.1\r\n\r\n"]
        {
            assert_eq!(
                parse(text).err().map(|r| r.status),
                Some(StatusCode::BAD_REQUEST),
                "{text}"
            );
        }
    }

    /// Decodes `wire` fed in pieces of `step` bytes; returns the data and what is left.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), BadChunk> {
        let (mut state, mut buf, mut data) = (Chunked::Size, BytesMut::new(), Vec::new());
        let mut pieces = wire.chunks(step);
        loop {
            match state.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(BadChunk("ended early")),
                },
                Decoded::End => {
                    buf.extend(pieces.flatten());
                    return Ok((data, buf.to_vec()));
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces_and_leave_the_next_request() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\nGET";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, rest) = dechunk(wire, step).unwrap();
            assert_eq!(data, b"hello 0123456789", "step {step}");
            assert_eq!(rest, b"GET", "step {step}");
        }
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        let bad: [&[u8]; 6] = [
            b"x\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b";\r\n",
            b"+3\r\nabc\r\n0\r\n\r\n",
            b" 3\r\nabc\r\n0\r\n\r\n",
        ];
        for wire in bad {
            assert!(dechunk(wire, wire.len()).is_err(), "{}", String::from_utf8_lossy(wire));
        }
        let long = vec![b'1'; MAX_LINE + 1];
        assert_eq!(dechunk(&long, long.len()).err(), Some(BadChunk("a chunk line over 4 KiB")));
    }

    fn head_text(status: u16, headers: &[(&str, &str)], r: &Reply) -> (String, Out) {
        let mut resp = hyper::Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            resp.headers_mut()
                .append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let (parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        let how = response_head(&mut out, &parts, r);
        (String::from_utf8(out).unwrap(), how)
    }

    #[test]
    fn response_framing_follows_the_body_and_the_request() {
        let r = |head_request, http10, close, length| Reply { head_request, http10, close, length };
        let (text, how) =
            head_text(200, &[("content-length", "12")], &r(false, false, false, None));
        assert_eq!(how, Out::Length(12));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        let (text, how) = head_text(200, &[], &r(false, false, true, Some(3)));
        assert_eq!(how, Out::Length(3));
        assert!(text.contains("content-length: 3\r\n") && text.contains("connection: close\r\n"));
        let (text, how) = head_text(200, &[("date", "x")], &r(false, false, false, None));
        assert_eq!(
            (text.as_str(), how),
            ("HTTP/1.1 200 OK\r\ndate: x\r\ntransfer-encoding: chunked\r\n\r\n", Out::Chunked)
        );
        let (text, how) = head_text(200, &[("date", "x")], &r(false, true, false, Some(2)));
        assert_eq!(
            (text.as_str(), how),
            (
                "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n",
                Out::Length(2)
            )
        );
        let (text, how) = head_text(200, &[("date", "x")], &r(false, true, false, None));
        assert_eq!(
            (text.as_str(), how),
            ("HTTP/1.1 200 OK\r\ndate: x\r\nconnection: close\r\n\r\n", Out::UntilClose)
        );
        // No body, whatever the headers: HEAD keeps the upstream's Content-Length as it came.
        let (text, how) = head_text(
            200,
            &[("date", "x"), ("content-length", "7")],
            &r(true, false, false, Some(0)),
        );
        assert_eq!(
            (text.as_str(), how),
            ("HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 7\r\n\r\n", Out::None)
        );
        let (text, how) = head_text(
            204,
            &[("date", "x"), ("content-length", "0")],
            &r(false, false, false, Some(0)),
        );
        assert_eq!((text.as_str(), how), ("HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n", Out::None));
        let (_, how) = head_text(304, &[], &r(false, false, false, None));
        assert_eq!(how, Out::None);
        // Hop-by-hop headers are left out, those `Connection` names too; the proxy sets its own.
        let hop = [
            ("date", "x"),
            ("connection", "keep-alive, X-Private"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("proxy-authenticate", "x"),
            ("x-kept", "1"),
        ];
        let (text, _) = head_text(200, &hop, &r(false, false, false, Some(0)));
        assert_eq!(text, "HTTP/1.1 200 OK\r\ndate: x\r\nx-kept: 1\r\ncontent-length: 0\r\n\r\n");
        // The connection's own headers are the proxy's to set.
        let (text, _) = head_text(
            200,
            &[("date", "x"), ("connection", "x"), ("transfer-encoding", "chunked")],
            &r(false, false, false, Some(0)),
        );
        assert_eq!(text, "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 0\r\n\r\n");
    }
}
