//! Text that came from outside (a server, a file, a config) made safe to log, show or publish:
//! control characters escaped, tokens held to visible ASCII.

use std::borrow::Cow;
use std::fmt::Write;

/// Longest server-supplied text (error, code, description) kept for logs and status.
pub const MAX_SERVER_TEXT: usize = 512;

/// Characters that can forge a log line or drive a terminal: C0/C1 controls, DEL, and the
/// Unicode format characters that reorder or hide text (bidi overrides, zero-width).
fn is_hostile(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every hostile character written as `\u{..}` (newline as `\n`), so one value
/// stays one line and no escape sequence reaches a log or a terminal.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_hostile) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_hostile(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Server text for logs and status: controls escaped, cut to `MAX_SERVER_TEXT` characters.
pub fn server_text(s: &str) -> String {
    let escaped = escape_controls(s);
    match escaped.char_indices().nth(MAX_SERVER_TEXT) {
        Some((cut, _)) => format!("{}...", &escaped[..cut]),
        None => escaped.into_owned(),
    }
}

/// A path for people: `Display` with controls escaped.
pub fn path(p: &std::path::Path) -> String {
    escape_controls(&p.display().to_string()).into_owned()
}

/// Whether `s` can be sent as a bearer token: non-empty, visible ASCII only (0x21-0x7E).
/// RFC 6750's b64token is narrower still; this is what keeps a header from being split.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_plain_text_is_untouched() {
        let table = [
            ("invalid_grant", "invalid_grant"),
            ("a\nb", "a\\nb"),
            ("x\u{1b}[31mred", "x\\u{1b}[31mred"),
            ("\r\n", "\\r\\n"),
            ("\u{202e}evil", "\\u{202e}evil"),
            ("\u{7f}", "\\u{7f}"),
            ("café", "café"),
        ];
        for (input, want) in table {
            assert_eq!(escape_controls(input), want, "{input:?}");
        }
    }

    #[test]
    fn server_text_is_cut() {
        let long = "a".repeat(2000);
        assert_eq!(server_text(&long).len(), MAX_SERVER_TEXT + 3);
        assert_eq!(server_text("short"), "short");
    }

    #[test]
    fn tokens_are_visible_ascii() {
        for ok in ["a", "U0pDMDFQ~._-+/=", "!~"] {
            assert!(is_token(ok), "{ok:?}");
        }
        for bad in ["", "a b", "AT1\r\nX-Evil: 1", "a\u{1b}[31m", "é", "a\u{0}", "\t"] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }
}
