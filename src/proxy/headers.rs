//! Hop-by-hop headers (RFC 9110 section 7.6.1): they describe one connection, so a proxy drops
//! them both ways; every other header passes through unchanged.

use hyper::header::{self, HeaderMap, HeaderName};

/// Always connection-specific, whether or not `Connection` names them.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Removes the hop-by-hop headers: the fixed list, every `Proxy-*` header and whatever the
/// `Connection` header names. (An answer's are left out as its head is written instead: see
/// `Connection::named` and `wire::response_head`.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The usual request has none: one pass over the names, no hashing, no removal. (A header
    // that `Connection` names only counts when `Connection` itself is there.)
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Only the names present are removed (each removal hashes its name).
    let mut gone: Vec<HeaderName> = headers.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok());
    gone.extend(named);
    for name in gone {
        headers.remove(name);
    }
}

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    let name = name.as_str();
    // Called for every header both ways: most names are told apart by their first byte.
    matches!(name.as_bytes().first(), Some(b'c' | b'k' | b't' | b'u' | b'p'))
        && (HOP_BY_HOP.contains(&name) || name.starts_with("proxy-"))
}

/// The header names a `Connection` header lists (lowercase ASCII compared), if there is one:
/// they are hop-by-hop too.
pub struct ConnectionNamed<'a>(Vec<&'a [u8]>);

impl<'a> ConnectionNamed<'a> {
    pub fn of(headers: &'a HeaderMap) -> Self {
        let values = headers.get_all(header::CONNECTION).iter();
        Self(
            values
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .collect(),
        )
    }

    /// Whether `name` is hop-by-hop in a message with these headers.
    pub fn drops(&self, name: &HeaderName) -> bool {
        is_hop_by_hop(name)
            || self.0.iter().any(|n| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_hop_by_hop_and_what_connection_names_and_keeps_the_rest() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-rate-limit-remaining", "3"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("retry-after", "60"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["content-length", "content-type", "retry-after", "x-rate-limit-remaining"]
        );
    }
}
