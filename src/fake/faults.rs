//! Fault injection for token requests: a queue of faults, each answering the next N requests.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What a faulty token request gets instead of a normal answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// 500 with a RingCentral error body.
    Status500,
    /// 503, with `Retry-After` when given.
    Status503 { retry_after: Option<u64> },
    /// 429 (CMN-301), with `Retry-After` when given.
    Status429 { retry_after: Option<u64> },
    /// Wait this long, then answer normally (a client timeout should fire first).
    Hang { ms: u64 },
    /// Reset the connection before any reply.
    Reset,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with JSON cut off in the middle.
    Truncated,
    /// 502 with an HTML page, as a proxy would send.
    Html,
    /// 200 with valid JSON that lacks `access_token`.
    MissingAccessToken,
    /// 200 with a body of this many bytes (default 4 MiB).
    Oversized { bytes: Option<usize> },
    /// 401 `invalid_client` (OAU-146): a permanent refusal, as after the app's client secret was
    /// rotated; the tokens themselves stay valid.
    InvalidClient,
    /// Process the request (rotating the tokens), then reset the connection: the lost response.
    CommitThenDrop,
    /// Process the request (rotating the tokens), then wait before replying: a client that
    /// dies or times out meanwhile never learns the new pair.
    CommitThenHang { ms: u64 },
    /// Process the request, then overwrite fields of a 200 reply with those of `fields` (a
    /// JSON object): a hostile or broken server whose reply carries a real new pair.
    CommitThenPatch { fields: String },
    /// Answer `status` with `body` (JSON) without processing the request.
    Reply { status: u16, body: String },
}

/// A fault and how many token requests it still applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub kind: FaultKind,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// Parses the command-line form `kind[,key=value...]`, e.g. `status503,retry_after=2,count=3`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let mut obj = serde_json::Map::new();
        obj.insert("kind".into(), parts.next().unwrap_or_default().into());
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("fault option {part:?} is not key=value"))?;
            let value = v.parse::<u64>().map_or_else(|_| v.into(), serde_json::Value::from);
            obj.insert(k.into(), value);
        }
        serde_json::from_value(obj.into()).map_err(|e| {
            format!(
                "bad fault {s:?}: {e} (kinds: status500, status503, status429, hang, reset, \
                 malformed, truncated, html, missing_access_token, oversized, commit_then_drop, \
                 commit_then_hang, commit_then_patch, reply, invalid_client)"
            )
        })
    }
}

/// Pending faults, consumed front first.
#[derive(Debug, Default)]
pub struct FaultQueue(VecDeque<Fault>);

impl FaultQueue {
    pub fn push(&mut self, fault: Fault) {
        if fault.count > 0 {
            self.0.push_back(fault);
        }
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn pending(&self) -> Vec<Fault> {
        self.0.iter().cloned().collect()
    }

    /// Takes the fault for the next request, if any.
    pub fn next(&mut self) -> Option<FaultKind> {
        let front = self.0.front_mut()?;
        let kind = front.kind.clone();
        front.count -= 1;
        if front.count == 0 {
            self.0.pop_front();
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_form() {
        let f: Fault = "status503,retry_after=2,count=3".parse().unwrap();
        assert_eq!(f.kind, FaultKind::Status503 { retry_after: Some(2) });
        assert_eq!(f.count, 3);
        let f: Fault = "reset".parse().unwrap();
        assert_eq!((f.kind, f.count), (FaultKind::Reset, 1));
        assert!("nonsense".parse::<Fault>().unwrap_err().contains("kinds:"));
        assert!("hang,ms".parse::<Fault>().is_err());
    }

    #[test]
    fn queue_counts_down() {
        let mut q = FaultQueue::default();
        q.push("status500,count=2".parse().unwrap());
        q.push("reset".parse().unwrap());
        assert_eq!(q.next(), Some(FaultKind::Status500));
        assert_eq!(q.next(), Some(FaultKind::Status500));
        assert_eq!(q.next(), Some(FaultKind::Reset));
        assert_eq!(q.next(), None);
    }
}
