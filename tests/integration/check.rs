//! `tokend check`: the resolved plan without secrets, and every kind of config error.

use crate::harness::{CLIENT_SECRET, JWT, TokenSpec, World, tokend};

fn check(w: &World) -> (i32, String, String) {
    let out = tokend(&["check", "--config", w.config_path().to_str().unwrap()]);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn plan_names_everything_but_secrets() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main").extra("on_refresh = [\"/bin/true\"]")]);
    let (code, out, _) = check(&w);
    assert_eq!(code, 0);
    for needle in [
        "token \"main\"",
        "main.state.json",
        "main.json (json, mode 0640)",
        "main.raw (raw, mode 0644)",
        "jwt (secret set in the config)",
        "/bin/true",
    ] {
        assert!(out.contains(needle), "{needle:?} not in plan:\n{out}");
    }
    assert!(!out.contains(JWT) && !out.contains(CLIENT_SECRET), "plan shows a secret:\n{out}");
}

#[tokio::test]
async fn every_kind_of_config_error_names_file_line_and_key() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let good = std::fs::read_to_string(w.config_path()).unwrap();
    let cases = [
        ("schedule = \"0 0 0 1 1 *\"", "schedule = \"every minute\"", "schedule", "seconds field"),
        ("mode = \"0640\"", "mode = \"999\"", "sink.mode", "octal"),
        ("format = \"json\"", "format = \"xml\"", "sink.format", "valid: \"json\", \"raw\""),
        ("grant = \"jwt\"", "grant = \"saml\"", "grant", "valid:"),
        (
            "retry_initial = \"100ms\"",
            "retry_initial = \"soon\"",
            "retry_initial",
            "not a duration",
        ),
        ("name = \"main\"", "name = \"Main Token\"", "name", "[a-z0-9_-]+"),
        ("rate_limit = 1000", "rate_limt = 1000", "rate_limt", "unknown field"),
        ("rate_limit = 1000", "rate_limit = \"many\"", "rate_limit", "invalid type"),
    ];
    for (from, to, key, msg) in cases {
        assert!(good.contains(from), "{from}");
        let bad = good.replacen(from, to, 1);
        std::fs::write(w.config_path(), &bad).unwrap();
        let line =
            bad.lines().position(|l| l.contains(to.split('=').next().unwrap().trim())).unwrap() + 1;
        let (code, _, err) = check(&w);
        assert_eq!(code, 78, "{err}");
        let prefix = format!("{}:{line}", w.config_path().display());
        assert!(err.contains(&prefix), "{prefix} not in: {err}");
        assert!(err.contains(key) && err.contains(msg), "{key:?}/{msg:?} not in: {err}");
    }
    std::fs::remove_file(w.config_path()).unwrap();
    let (code, _, err) = check(&w);
    assert_eq!(code, 78);
    assert!(err.contains("cannot read"), "{err}");
}

#[tokio::test]
async fn the_shipped_example_config_is_valid() {
    let w = World::new().await;
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let d = w.dir.path().display().to_string();
    std::fs::write(
        w.config_path(),
        example.replace("/var/lib/tokend", &d).replace("/run/tokend", &d),
    )
    .unwrap();
    std::fs::write(w.path("client_secret"), "s\n").unwrap();
    std::fs::write(w.path("jwt"), "j\n").unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["check", "--config", w.config_path().to_str().unwrap()])
        .env("CREDENTIALS_DIRECTORY", w.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `check` (and `status`) read no secret: a config whose secrets exist only inside the unit
/// checks fine outside it, and says where each secret will come from. `run` reads them and
/// stops with exit 78, the file, the line and the key when one is missing.
#[tokio::test]
async fn check_reads_no_secret_and_run_names_the_missing_one() {
    let w = World::new().await;
    w.write_config(&[TokenSpec::new("main")]);
    let good = std::fs::read_to_string(w.config_path()).unwrap();
    for (to, source, missing) in [
        (
            "client_secret = { env = \"TOKEND_NO_SUCH_VAR\" }",
            "from environment variable TOKEND_NO_SUCH_VAR",
            "TOKEND_NO_SUCH_VAR is not set",
        ),
        (
            "client_secret = { credential = \"secret\" }",
            "from systemd credential \"secret\"",
            "CREDENTIALS_DIRECTORY",
        ),
    ] {
        let bad = good.replacen("client_secret = \"tokend-demo-secret\"", to, 1);
        std::fs::write(w.config_path(), &bad).unwrap();
        let (code, out, err) = check(&w);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(source), "{source:?} not in plan:\n{out}");
        let status = tokend(&["status", "--config", w.config_path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&status.stderr);
        assert_ne!(status.status.code(), Some(78), "status read a secret: {err}");
        let line = bad.lines().position(|l| l.starts_with("client_secret")).unwrap() + 1;
        let run = tokend(&["run", "--config", w.config_path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(78), "{err}");
        let prefix =
            format!("{}:{line}: key `token \"main\".client_secret`", w.config_path().display());
        assert!(
            err.contains(&prefix) && err.contains(missing),
            "{prefix:?}/{missing:?} not in: {err}"
        );
    }
}
