//! The examples in other languages, run against the real daemon and fake server: each makes
//! API calls through several refreshes with no 401 beyond the moment of rotation.

use crate::harness::{CLIENT_ID, TokenSpec, World};
use serde_json::Value;
use std::path::Path;

const SECONDS: &str = "5";

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

fn need(program: &str, what: &str) {
    let ok = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    crate::harness::require(ok, &format!("{program} is missing (for {what})"));
}

async fn run(program: &str, args: Vec<String>) -> Value {
    let out = tokio::process::Command::new(program).args(&args).output().await.unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn check(name: &str, summary: &Value) {
    eprintln!("{name}: {summary}");
    assert_eq!(summary["failed"], 0, "{name}: a 401 that a re-read did not fix: {summary}");
    assert!(
        summary["generations"].as_array().unwrap().len() >= 3,
        "{name}: too few refreshes seen: {summary}"
    );
    assert!(summary["ok"].as_u64().unwrap() > 20, "{name}: {summary}");
}

#[tokio::test]
async fn python_node_and_the_js_sdk_read_through_refreshes_without_failures() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main").schedule("* * * * * *")]);
    let mut d = w.daemon();
    d.wait_ready().await;
    let sink = w.path("main.json").display().to_string();
    let api = format!("{}/restapi/v1.0/account/~/extension/~", w.server.url());
    let ex = examples();
    let mut jobs = Vec::new();
    need("python3", "examples/python");
    need("node", "examples/node");
    let sdk_installed = ex.join("node/node_modules/@ringcentral/sdk").exists();
    crate::harness::require(sdk_installed, "examples/node/node_modules is missing");
    {
        let args = vec![
            ex.join("python/reader.py").display().to_string(),
            sink.clone(),
            api.clone(),
            SECONDS.into(),
        ];
        jobs.push(("python", tokio::spawn(run("python3", args))));
    }
    {
        let args = vec![
            ex.join("node/reader.js").display().to_string(),
            sink.clone(),
            api.clone(),
            SECONDS.into(),
        ];
        jobs.push(("node", tokio::spawn(run("node", args))));
        {
            let args = vec![
                ex.join("node/ringcentral-sdk.js").display().to_string(),
                sink.clone(),
                w.server.url(),
                CLIENT_ID.into(),
                SECONDS.into(),
            ];
            jobs.push(("ringcentral-js-sdk", tokio::spawn(run("node", args))));
        }
    }
    for (name, job) in jobs {
        check(name, &job.await.unwrap());
    }
    assert_eq!(w.stats().logins, 1);
    assert!(d.stop().await.success());
}
