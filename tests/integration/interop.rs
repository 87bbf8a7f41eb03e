//! Software written by others driving tokend: the official RingCentral Python SDK.

use crate::harness::{CLIENT_ID, CLIENT_SECRET, JWT};
use std::path::PathBuf;
use tokend::fake::{FakeConfig, FakeServer};

/// The virtual environment `scripts/test` prepares; `TOKEND_PYTHON` overrides it. A test
/// that needs it fails, never passes, without it.
pub fn python() -> PathBuf {
    let p = std::env::var_os("TOKEND_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from,
    );
    let ok = p.exists()
        && std::process::Command::new(&p)
            .args(["-c", "import ringcentral"])
            .output()
            .is_ok_and(|o| o.status.success());
    crate::harness::require(ok, &format!("{} cannot import ringcentral", p.display()));
    p
}

#[tokio::test]
async fn official_python_sdk_logs_in_refreshes_and_sees_the_old_token_refused() {
    let python = python();
    let server = FakeServer::start(FakeConfig::default()).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/python_sdk.py");
    let out = tokio::process::Command::new(python)
        .args([script, &server.url(), CLIENT_ID, CLIENT_SECRET, JWT])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python SDK interop failed:\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["old_token_code"], "OAU-129");
    assert_eq!(summary["extension_id"], "100000");
    let stats = server.stats();
    assert_eq!((stats.logins, stats.refreshes, stats.api_accepted), (1, 1, 2));
    assert_eq!(stats.api_rejected["OAU-129"], 1);
}
