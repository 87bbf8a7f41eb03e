//! The reader-facing sink formats: `json` (the contract's fields) and `raw` (the token alone).

use super::state::State;
use crate::config::SinkFormat;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The `json` sink document. Readers (the watch module, other languages) parse this.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkDoc {
    pub name: String,
    pub access_token: String,
    pub token_type: String,
    #[serde(with = "crate::time::rfc3339")]
    pub expires_at: DateTime<Utc>,
    /// Milliseconds since the epoch: the field the RingCentral JS SDK keeps.
    pub expire_time: i64,
    /// Seconds left when the file was written (for SDKs that want `expires_in`).
    pub expires_in: i64,
    pub generation: u64,
    #[serde(with = "crate::time::rfc3339")]
    pub refreshed_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub owner_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub endpoint_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub refresh_token_expire_time: Option<i64>,
}

impl std::fmt::Debug for SinkDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkDoc")
            .field("name", &self.name)
            .field("generation", &self.generation)
            .field("expires_at", &self.expires_at)
            .field("access_token", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The bytes of one sink for `state`.
pub fn render_sink(
    state: &State,
    format: SinkFormat,
    include_refresh_token: bool,
    now: DateTime<Utc>,
) -> Vec<u8> {
    match format {
        SinkFormat::Raw => state.access_token.expose().as_bytes().to_vec(),
        SinkFormat::Json => {
            let doc = SinkDoc {
                name: state.name.clone(),
                access_token: state.access_token.expose().to_string(),
                token_type: state.token_type.clone(),
                expires_at: state.access_expires_at,
                expire_time: state.access_expires_at.timestamp_millis(),
                expires_in: (state.access_expires_at - now).num_seconds().max(0),
                generation: state.generation,
                refreshed_at: state.refreshed_at,
                scope: state.scope.clone(),
                owner_id: state.owner_id.clone(),
                endpoint_id: state.endpoint_id.clone(),
                refresh_token: include_refresh_token
                    .then(|| state.refresh_token.as_ref().map(|r| r.expose().to_string()))
                    .flatten(),
                refresh_token_expire_time: include_refresh_token
                    .then(|| state.refresh_expires_at.map(|t| t.timestamp_millis()))
                    .flatten(),
            };
            let mut bytes = serde_json::to_vec_pretty(&doc).expect("sink serializes");
            bytes.push(b'\n');
            bytes
        }
    }
}

/// Writes every sink of `cfg` named in `stale` from `state`; each one written leaves `stale`.
/// Failures are logged (naming the path) and stay in `stale` for the caller to retry.
pub fn write_stale_sinks(
    cfg: &crate::config::TokenConfig,
    state: &crate::store::State,
    stale: &mut std::collections::BTreeSet<std::path::PathBuf>,
) {
    let now = chrono::Utc::now();
    for sink in &cfg.sinks {
        if !stale.contains(&sink.path) {
            continue;
        }
        let bytes = render_sink(state, sink.format, sink.include_refresh_token, now);
        match super::write_atomic(&sink.path, &bytes, sink.mode) {
            Ok(()) => {
                stale.remove(&sink.path);
            }
            Err(e) => {
                tracing::error!(token = %cfg.name, path = %sink.path.display(), error = %e, "cannot write sink; will retry");
            }
        }
    }
}
