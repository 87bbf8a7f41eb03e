//! Secret-carrying newtypes: their `Debug` is redacted and they have no `Display`, so a
//! secret can only leave through an explicit, greppable `expose()`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

macro_rules! secret_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a value that must never be logged.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The raw value, for the wire and for files written on purpose.
            pub fn expose(&self) -> &str {
                &self.0
            }

            /// A short hash prefix that names this value in logs without revealing it.
            pub fn fingerprint(&self) -> String {
                fingerprint(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_type!(
    /// A client secret, JWT credential, password or any other configured secret.
    Secret
);
secret_type!(
    /// An OAuth access token.
    AccessToken
);
secret_type!(
    /// An OAuth refresh token.
    RefreshToken
);

/// First 8 hex digits of SHA-256: enough to tell tokens apart in logs, useless to an attacker.
pub fn fingerprint(value: &str) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(value.as_bytes());
    digest[..4].iter().fold(String::with_capacity(8), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2");
        let a = AccessToken::new("at-value");
        let r = RefreshToken::new("rt-value");
        let all = format!("{s:?} {a:?} {r:?} {:#?}", vec![s.clone()]);
        assert!(!all.contains("hunter2") && !all.contains("at-value") && !all.contains("rt-value"));
        assert!(all.contains("[redacted]"));
    }

    #[test]
    fn fingerprint_is_stable_and_short() {
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_eq!(AccessToken::new("abc").fingerprint(), "ba7816bf");
    }
}
