//! HTTP/1.1 toward a plain-HTTP upstream, the pure part: a request head written with the
//! framing of its body, and an answer's head parsed (httparse) into `http` types with its
//! body's framing (RFC 9112 section 6.3) and whether the connection may carry another request.

use super::headers::ConnectionNamed;
use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};

/// The most header fields an answer's head may have (hyper's client allowed 100).
const MAX_HEADERS: usize = 100;

/// The longest answer head read (all interim answers before it included).
pub const MAX_HEAD: usize = 64 * 1024;

/// How a request's body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// No body, or the whole of it written with the head.
    Whole,
    /// A streamed body of this declared length.
    Length(u64),
    /// A streamed body of unknown length, as chunks.
    Chunked,
}

/// A request as it goes upstream: the client's method, target (origin form) and headers, the
/// upstream's `Host` and the proxy's `Authorization`.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    /// The client's: its `Host`, `Authorization` and hop-by-hop fields are left out.
    pub headers: &'a HeaderMap,
    pub host: &'a HeaderValue,
    pub auth: &'a HeaderValue,
}

/// Writes the request line and headers, straight from the client's (no header map is built
/// for the upstream: copying one cost about 2k instructions per request), and the body's
/// framing: `whole` is the body's length when it is all here, else it streams, with the
/// client's `Content-Length` if it gave one. A whole body is appended by the caller.
pub fn request_head(out: &mut Vec<u8>, req: &Outgoing<'_>, whole: Option<usize>) -> Sending {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    field(out, b"host", req.host.as_bytes());
    // Usually none: no allocation unless the request has a `Connection` header.
    let hop = ConnectionNamed::of(req.headers);
    let mut declared: Option<u64> = None;
    for (name, value) in req.headers {
        if name == header::CONTENT_LENGTH {
            // Checked by the client side already (one value): written below, once.
            declared = std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.parse().ok());
            continue;
        }
        if name == header::HOST || name == header::AUTHORIZATION || hop.drops(name) {
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    field(out, b"authorization", req.auth.as_bytes());
    let sending = match whole {
        Some(len) => {
            // The body's own length; an empty body has one where the method has a body
            // (RFC 9110 section 8.6), or where the client sent one.
            if len > 0 || declared.is_some() || expects_body(req.method) {
                field(out, b"content-length", len.to_string().as_bytes());
            }
            Sending::Whole
        }
        None => {
            if let Some(n) = declared {
                field(out, b"content-length", n.to_string().as_bytes());
                Sending::Length(n)
            } else {
                field(out, b"transfer-encoding", b"chunked");
                Sending::Chunked
            }
        }
    };
    out.extend_from_slice(b"\r\n");
    sending
}

fn expects_body(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304, or a length of 0).
    Empty,
    Length(u64),
    Chunked,
    /// No length and no chunks: the body ends when the upstream closes.
    UntilClose,
}

/// A final answer's head.
pub struct Answer {
    pub head: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once this body is read to its end.
    pub keep_alive: bool,
}

/// An answer the proxy cannot pass on (a 502 to the client, the connection closed).
#[derive(Debug, PartialEq, Eq)]
pub struct BadAnswer(pub &'static str);

/// Parses the answer at the start of `buf` and removes its head (the body stays); interim
/// (1xx) answers before it are dropped, as hyper's client dropped them, and counted in
/// `interim` (the bytes they took, kept by the caller across calls): they count against
/// `MAX_HEAD`, or an upstream sending them without end would hold the request for ever.
/// `Ok(None)`: not all here yet.
pub fn parse_answer(
    buf: &mut BytesMut,
    head_request: bool,
    interim: &mut usize,
) -> Result<Option<Answer>, BadAnswer> {
    loop {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) if *interim + len <= MAX_HEAD => len,
            Ok(httparse::Status::Complete(_)) if *interim > 0 => {
                return Err(BadAnswer("interim (1xx) answers and a head over 64 KiB"));
            }
            Ok(httparse::Status::Complete(_)) => {
                return Err(BadAnswer("an answer head over 64 KiB"));
            }
            Ok(httparse::Status::Partial) if *interim + buf.len() >= MAX_HEAD => {
                return Err(BadAnswer("an answer head over 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BadAnswer("an answer head with over 100 header fields"));
            }
            Err(_) => return Err(BadAnswer("an answer that is not HTTP/1.1")),
        };
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            *interim += len;
            continue;
        }
        let (status, version) = status_of(&parsed)?;
        // Where each field's name and value are in the head, and what they say: the values
        // become slices of the head's bytes, not copies (one allocation each).
        let base = buf.as_ptr() as usize;
        // Within the head (at most 64 KiB): u32 halves the table to clear.
        let at = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
        let mut spans = [((0, 0), (0, 0)); MAX_HEADERS];
        let mut seen = Seen::default();
        for (f, span) in parsed.headers.iter().zip(&mut spans) {
            seen.field(f.name, f.value)?;
            *span = (at(f.name.as_bytes()), at(f.value));
        }
        let fields = parsed.headers.len();
        let head = buf.split_to(len).freeze();
        let headers = headers_of(&head, &spans[..fields])?;
        return answer_of(status, version, headers, &seen, head_request).map(Some);
    }
}

/// The status line's status and version; a 101 is refused.
fn status_of(parsed: &httparse::Response<'_, '_>) -> Result<(StatusCode, Version), BadAnswer> {
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())
        .map_err(|_| BadAnswer("an invalid status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The proxy never asks for an upgrade (`Upgrade` is hop-by-hop).
        return Err(BadAnswer("an upgrade the proxy did not ask for"));
    }
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    Ok((status, version))
}

/// Where a field's name or value is in its head: offset and length.
type Span = (u32, u32);

/// The header map of a head, from where each field's name and value are in it.
fn headers_of(head: &Bytes, spans: &[(Span, Span)]) -> Result<HeaderMap, BadAnswer> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    let range = |(at, len): Span| at as usize..(at + len) as usize;
    for &(name, value) in spans {
        let name = HeaderName::from_bytes(&head[range(name)]);
        let value = HeaderValue::from_maybe_shared(head.slice(range(value)));
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(BadAnswer("an invalid header field"));
        };
        headers.append(name, value);
    }
    Ok(headers)
}

fn answer_of(
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    seen: &Seen,
    head_request: bool,
) -> Result<Answer, BadAnswer> {
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body { Framing::Empty } else { seen.framing()? };
    // HTTP/1.0 keeps a connection only when it says so (RFC 9112 section 9.3); a body framed
    // by both chunks and a length may be an attempt at smuggling, and chunks in HTTP/1.0 are
    // framing to take as faulty (RFC 9112 section 6.1): not trusted for another request.
    let asked = if version == Version::HTTP_10 { seen.keep_alive } else { !seen.close };
    let ambiguous = seen.codings > 0 && (seen.length.is_some() || version == Version::HTTP_10);
    let keep_alive = asked && framing != Framing::UntilClose && !ambiguous;
    let mut head = Response::new(());
    *head.status_mut() = status;
    *head.version_mut() = version;
    *head.headers_mut() = headers;
    Ok(Answer { head, framing, keep_alive })
}

/// What an answer's fields say about its body and the connection.
#[derive(Default)]
struct Seen {
    length: Option<u64>,
    codings: usize,
    chunked_last: bool,
    close: bool,
    keep_alive: bool,
}

impl Seen {
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), BadAnswer> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            for n in value.split(|b| *b == b',') {
                // 1*DIGIT, and every value the same (RFC 9110 section 8.6).
                let n = Some(n.trim_ascii())
                    .filter(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
                    .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok());
                let Some(n) = n.filter(|n| self.length.is_none_or(|l| l == *n)) else {
                    return Err(BadAnswer("an invalid Content-Length"));
                };
                self.length = Some(n);
            }
        } else if is("transfer-encoding") {
            for coding in value.split(|b| *b == b',') {
                self.codings += 1;
                self.chunked_last = coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if is("connection") {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }

    /// RFC 9112 section 6.3: chunks over a length; a length; else until the close.
    fn framing(&self) -> Result<Framing, BadAnswer> {
        match (self.codings, self.length) {
            (1, _) if self.chunked_last => Ok(Framing::Chunked),
            // A coding besides chunked (gzip, chunked) would reach the client without the
            // header that names it (`Transfer-Encoding` is hop-by-hop).
            (1.., _) => Err(BadAnswer("a transfer coding other than chunked")),
            (0, Some(0)) => Ok(Framing::Empty),
            (0, Some(n)) => Ok(Framing::Length(n)),
            (0, None) => Ok(Framing::UntilClose),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(
        method: &Method,
        headers: &[(&str, &str)],
        whole: Option<usize>,
    ) -> (String, Sending) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let (host, auth) = (HeaderValue::from_static("u"), HeaderValue::from_static("Bearer t"));
        let req = Outgoing { method, target: "/p?q=1", headers: &map, host: &host, auth: &auth };
        let mut out = Vec::new();
        let sending = request_head(&mut out, &req, whole);
        (String::from_utf8(out).unwrap(), sending)
    }

    #[test]
    fn request_bodies_are_framed_one_way() {
        let line = |m: &str| format!("{m} /p?q=1 HTTP/1.1\r\nhost: u\r\n");
        let auth = "authorization: Bearer t\r\n";
        let (text, how) = written(&Method::GET, &[], Some(0));
        assert_eq!((text, how), (format!("{}{auth}\r\n", line("GET")), Sending::Whole));
        let (text, _) = written(&Method::POST, &[], Some(0));
        assert_eq!(text, format!("{}{auth}content-length: 0\r\n\r\n", line("POST")));
        // A whole body's own length, once, wherever the client's was.
        let (text, _) = written(&Method::PUT, &[("content-length", "3"), ("x", "1")], Some(3));
        assert_eq!(text, format!("{}x: 1\r\n{auth}content-length: 3\r\n\r\n", line("PUT")));
        let (text, how) = written(&Method::POST, &[("content-length", "9")], None);
        let want = format!("{}{auth}content-length: 9\r\n\r\n", line("POST"));
        assert_eq!((text, how), (want, Sending::Length(9)));
        let (text, how) = written(&Method::POST, &[], None);
        let want = format!("{}{auth}transfer-encoding: chunked\r\n\r\n", line("POST"));
        assert_eq!((text, how), (want, Sending::Chunked));
    }

    #[test]
    fn the_clients_host_authorization_and_hop_by_hop_fields_stay_behind() {
        let client = [
            ("host", "client"),
            ("authorization", "Bearer callers-own"),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "1"),
        ];
        let (text, _) = written(&Method::GET, &client, Some(0));
        let want = "GET /p?q=1 HTTP/1.1\r\nhost: u\r\nx-kept: 1\r\nauthorization: Bearer t\r\n\r\n";
        assert_eq!(text, want);
    }

    fn parse(text: &str, head_request: bool) -> Result<Option<(Answer, String)>, BadAnswer> {
        let mut buf = BytesMut::from(text);
        let answer = parse_answer(&mut buf, head_request, &mut 0)?;
        Ok(answer.map(|a| (a, String::from_utf8(buf.to_vec()).unwrap())))
    }

    fn framing(text: &str) -> (Framing, bool) {
        let (a, _) = parse(text, false).unwrap().unwrap();
        (a.framing, a.keep_alive)
    }

    #[test]
    fn answers_are_framed_per_rfc_9112() {
        let f = framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(f, (Framing::Length(5), true));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n").0,
            Framing::Length(5)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").0, Framing::Empty);
        let f = framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(f, (Framing::Chunked, true));
        // Both: the chunks count, and the connection is not trusted with another request.
        let both = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(framing(both), (Framing::Chunked, false));
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        let close = "HTTP/1.1 200 OK\r\nconnection: x, Close\r\ncontent-length: 1\r\n\r\n";
        assert_eq!(framing(close), (Framing::Length(1), false));
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        let kept = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n";
        assert_eq!(framing(kept), (Framing::Length(1), true));
        let chunks =
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(framing(chunks), (Framing::Chunked, false));
        for no_body in [
            "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(framing(no_body), (Framing::Empty, true), "{no_body}");
        }
        let (head, _) =
            parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Empty);
    }

    #[test]
    fn interim_answers_are_dropped_and_the_body_stays() {
        let text = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nokHTTP";
        let (a, rest) = parse(text, false).unwrap().unwrap();
        assert_eq!(a.head.status(), StatusCode::CREATED);
        assert_eq!(a.head.headers()["x-a"], "1");
        assert!(!a.head.headers().contains_key("link"));
        assert_eq!(rest, "okHTTP");
        assert!(parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false).unwrap().is_none());
    }

    #[test]
    fn bad_answers_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse(text, false).is_err(), "{text}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(parse(&long, false).err(), Some(BadAnswer("an answer head over 64 KiB")));
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "x-a: 1\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(
            parse(&many, false).err(),
            Some(BadAnswer("an answer head with over 100 header fields"))
        );
    }

    #[test]
    fn interim_answers_count_against_the_head_bound_across_reads() {
        let (mut interim, mut buf) = (0, BytesMut::new());
        let one = b"HTTP/1.1 100 Continue\r\n\r\n";
        // Bounded: the bound is reached after MAX_HEAD / 25 answers.
        for _ in 0..MAX_HEAD {
            buf.extend_from_slice(one);
            match parse_answer(&mut buf, false, &mut interim) {
                Ok(None) => assert!(buf.is_empty()),
                Err(e) => {
                    return assert_eq!(
                        e,
                        BadAnswer("interim (1xx) answers and a head over 64 KiB")
                    );
                }
                Ok(Some(_)) => panic!("an interim answer taken as final"),
            }
        }
        panic!("interim answers without end were taken");
    }
}
