//! The bytes stored in etcd: the token pair (a `State`) and the refresh intent, optionally
//! sealed with AES-256-GCM so that etcd's disk, backups and snapshots hold no usable token.

use crate::secret::Secret;
use crate::store::State;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// A refresh about to be sent: written (fenced) before the token request, deleted in the
/// transaction that publishes its result. A new leader that finds one replays that refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The node that sent the request.
    pub node: String,
    /// The pair key's mod revision the refresh started from.
    pub pair_revision: i64,
    /// Fingerprint (not the value) of the refresh token in use.
    pub refresh_token: String,
    #[serde(with = "crate::time::rfc3339")]
    pub at: chrono::DateTime<chrono::Utc>,
}

pub use crate::policy::Budget;

/// A sealed value: `{"sealed":"A256GCM","nonce":..,"data":..}`.
#[derive(Serialize, Deserialize)]
struct Envelope {
    sealed: String,
    nonce: String,
    data: String,
}

const ALG: &str = "A256GCM";

/// Encodes and decodes stored values.
pub struct Codec {
    key: Option<LessSafeKey>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Codec {{ sealed: {} }}", self.key.is_some())
    }
}

impl Codec {
    /// `key` is 32 bytes in base64 (checked when the config was loaded).
    pub fn new(key: Option<&Secret>) -> Result<Self, String> {
        let key = match key {
            None => None,
            Some(k) => {
                let bytes = B64
                    .decode(k.expose().trim())
                    .map_err(|_| "cluster.encryption_key is not base64".to_string())?;
                let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
                    .map_err(|_| "cluster.encryption_key is not 32 bytes".to_string())?;
                Some(LessSafeKey::new(unbound))
            }
        };
        Ok(Self { key })
    }

    /// `aad` binds the value to its key, so a sealed value cannot be moved to another token.
    pub fn encode<T: Serialize>(&self, value: &T, aad: &[u8]) -> Vec<u8> {
        let plain = serde_json::to_vec(value).expect("serializes");
        let Some(key) = &self.key else { return plain };
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = plain;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut data,
        )
        .expect("sealing cannot fail for these sizes");
        let sealed =
            Envelope { sealed: ALG.into(), nonce: B64.encode(nonce_bytes), data: B64.encode(data) };
        serde_json::to_vec(&sealed).expect("serializes")
    }

    /// Errors name what is wrong, never what the value holds.
    pub fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        bytes: &[u8],
        aad: &[u8],
    ) -> Result<T, String> {
        if let Ok(sealed) = serde_json::from_slice::<Envelope>(bytes) {
            let Some(key) = &self.key else {
                return Err("the stored value is encrypted; set cluster.encryption_key".into());
            };
            if sealed.sealed != ALG {
                return Err(format!("unknown sealing {:?}", sealed.sealed));
            }
            let nonce: [u8; NONCE_LEN] = B64
                .decode(&sealed.nonce)
                .ok()
                .and_then(|n| n.try_into().ok())
                .ok_or("bad nonce in sealed value")?;
            let mut data = B64.decode(&sealed.data).map_err(|_| "bad base64 in sealed value")?;
            let plain = key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut data)
                .map_err(|_| "cannot decrypt the stored value: wrong cluster.encryption_key")?;
            return serde_json::from_slice(plain).map_err(|e| format!("sealed value: {e}"));
        }
        if self.key.is_some() {
            // Readable, but someone stored it unencrypted: refuse rather than trust it.
            return Err(
                "the stored value is not encrypted but cluster.encryption_key is set".into()
            );
        }
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Decodes a pair and checks it is one.
pub fn decode_state(codec: &Codec, bytes: &[u8], aad: &[u8]) -> Result<State, String> {
    let state: State = codec.decode(bytes, aad)?;
    if state.version != crate::store::STATE_VERSION {
        return Err(format!("stored pair has version {}", state.version));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_round_trip_and_bind_to_their_key() {
        let key = Secret::new(B64.encode([7u8; 32]));
        let codec = Codec::new(Some(&key)).unwrap();
        let intent = Intent {
            node: "a".into(),
            pair_revision: 9,
            refresh_token: "fp".into(),
            at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        };
        let bytes = codec.encode(&intent, b"/t/main/intent");
        assert!(!String::from_utf8_lossy(&bytes).contains("\"node\""), "sealed value is readable");
        assert_eq!(codec.decode::<Intent>(&bytes, b"/t/main/intent").unwrap(), intent);
        assert!(codec.decode::<Intent>(&bytes, b"/t/other/intent").is_err());
        let other = Codec::new(Some(&Secret::new(B64.encode([8u8; 32])))).unwrap();
        let err = other.decode::<Intent>(&bytes, b"/t/main/intent").unwrap_err();
        assert!(err.contains("wrong cluster.encryption_key"), "{err}");
        let plain = Codec::new(None).unwrap();
        assert!(plain.decode::<Intent>(&bytes, b"x").unwrap_err().contains("encrypted"));
        let unsealed = plain.encode(&intent, b"x");
        assert!(codec.decode::<Intent>(&unsealed, b"x").unwrap_err().contains("not encrypted"));
    }
}
