//! Config validation: every error names the file, the line and the key.

use super::*;

const GOOD: &str = r#"
[log]
format = "json"

[[token]]
name = "main"
server = "https://platform.ringcentral.com"
client_id = "id"
client_secret = "literal-secret"
grant = "jwt"
jwt = { env = "TOKEND_TEST_JWT_UNSET_XYZ" }
state_file = "/var/lib/tokend/main.state.json"

[[token.sink]]
path = "/run/tokend/main.json"
format = "json"
mode = "0640"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/tokend/config.toml"), text)
}

fn with_jwt(text: &str) -> String {
    text.replace(r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#, r#""jwt-literal""#)
}

#[test]
fn good_config_resolves_defaults() {
    let c = parse(&with_jwt(GOOD)).unwrap();
    assert_eq!(c.log_format, LogFormat::Json);
    let t = &c.tokens[0];
    assert_eq!(t.schedule.expr, DEFAULT_SCHEDULE);
    assert_eq!(t.jitter, Duration::from_secs(120));
    assert_eq!(t.token_url.as_str(), "https://platform.ringcentral.com/restapi/oauth/token");
    assert_eq!(t.sinks[0].mode, 0o640);
    let debug = format!("{c:?}");
    assert!(!debug.contains("literal-secret") && !debug.contains("jwt-literal"), "{debug}");
}

fn err(text: &str) -> ConfigError {
    parse(text).unwrap_err()
}

#[test]
fn errors_name_line_and_key() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        // (replace, with, expected line, key contains, message contains)
        ("format = \"json\"", "format = \"yaml\"", 3, "log.format", "valid: \"text\", \"json\""),
        ("mode = \"0640\"", "mode = \"rw-r\"", 17, "sink.mode", "octal"),
        ("mode = \"0640\"", "colour = \"red\"", 17, "token.sink.colour", "unknown field"),
        ("grant = \"jwt\"", "grant = \"magic\"", 10, "grant", "valid: \"jwt\""),
        ("name = \"main\"", "name = \"Main!\"", 6, "token.name", "[a-z0-9_-]+"),
        (
            "server = \"https://platform.ringcentral.com\"",
            "server = \"not a url\"",
            7,
            "server",
            "not a URL",
        ),
        ("[log]", "[log]\nschedule = 1", 3, "log.schedule", "unknown field"),
    ];
    for (from, to, line, key, msg) in cases {
        let e = err(&with_jwt(GOOD).replace(from, to));
        assert_eq!(e.line, Some(*line), "{e}");
        assert!(e.key.contains(key), "key {key:?} not in: {e}");
        assert!(e.message.contains(msg), "message {msg:?} not in: {e}");
        assert!(e.to_string().starts_with("/etc/tokend/config.toml:"), "{e}");
    }
}

#[test]
fn schedule_and_jitter_are_checked() {
    let text =
        with_jwt(GOOD).replace("grant = \"jwt\"", "grant = \"jwt\"\nschedule = \"*/5 * * *\"");
    let e = err(&text);
    assert!(e.key.ends_with("schedule") && e.message.contains("seconds field"), "{e}");
    let text = with_jwt(GOOD).replace(
        "grant = \"jwt\"",
        "grant = \"jwt\"\nschedule = \"*/10 * * * * *\"\njitter = \"5s\"",
    );
    let e = err(&text);
    assert!(e.message.contains("tenth"), "{e}");
    let text =
        with_jwt(GOOD).replace("grant = \"jwt\"", "grant = \"jwt\"\nschedule = \"*/10 * * * * *\"");
    assert_eq!(parse(&text).unwrap().tokens[0].jitter, Duration::from_secs(1));
}

/// Resolving is the second step: the error names the file, the secret's line and its key.
fn resolve_err(text: &str) -> ConfigError {
    parse(text).expect("parses without reading secrets").resolve_secrets().unwrap_err()
}

#[test]
fn parsing_reads_no_secret() {
    // Every source that exists only inside the unit (or nowhere) parses: check, status,
    // token and watch work outside it.
    for source in [
        r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#,
        r#"{ credential = "jwt" }"#,
        r#"{ file = "/nonexistent/jwt" }"#,
    ] {
        let c = parse(&GOOD.replace(r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#, source)).unwrap();
        assert!(c.plan().contains("jwt (secret from "), "{}", c.plan());
    }
    let mut c = parse(&with_jwt(GOOD)).unwrap();
    c.resolve_secrets().unwrap();
    assert!(
        matches!(&c.tokens[0].grant, Grant::Jwt { assertion } if assertion.get().expose() == "jwt-literal")
    );
}

#[test]
#[should_panic(expected = "used before Config::resolve_secrets")]
fn an_unresolved_secret_is_never_read_as_empty() {
    let c = parse(&with_jwt(GOOD)).unwrap();
    let _ = c.tokens[0].client_secret.as_ref().unwrap().get();
}

#[test]
fn secret_sources_say_where_they_looked() {
    let e = resolve_err(GOOD);
    assert!(e.message.contains("TOKEND_TEST_JWT_UNSET_XYZ") && e.key.ends_with("jwt"), "{e}");
    assert_eq!(e.line, Some(11), "{e}");
    assert!(
        e.to_string().starts_with("/etc/tokend/config.toml:11: key `token \"main\".jwt`"),
        "{e}"
    );
    let text = GOOD
        .replace(r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#, r#"{ file = "/nonexistent/jwt" }"#);
    assert!(resolve_err(&text).message.contains("/nonexistent/jwt"));
    let text =
        GOOD.replace(r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#, r#"{ credential = "jwt" }"#);
    assert!(resolve_err(&text).message.contains("CREDENTIALS_DIRECTORY"));
    let text = GOOD.replace(r#"{ env = "TOKEND_TEST_JWT_UNSET_XYZ" }"#, r#"{ vault = "x" }"#);
    assert!(err(&text).message.contains("unknown secret source"), "{}", err(&text));
}

#[test]
fn duplicates_and_missing_tokens() {
    assert!(err("").message.contains("no [[token]]"));
    let one = with_jwt(GOOD);
    let tail = &one[one.find("[[token]]").unwrap()..];
    let e = err(&format!("{one}\n{tail}"));
    assert!(e.message.contains("duplicate"), "{e}");
}

fn with_cluster(section: &str) -> String {
    format!("{section}\n{}", with_jwt(GOOD))
}

#[cfg(feature = "etcd")]
#[test]
fn cluster_section_defaults_and_errors() {
    let c =
        parse(&with_cluster("[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"a\""))
            .unwrap();
    let cl = c.cluster.unwrap();
    assert_eq!(
        (cl.prefix.as_str(), cl.lease_ttl, cl.node.as_str()),
        ("/tokend", DEFAULT_LEASE_TTL, "a")
    );
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let sealed = parse(&with_cluster(&format!(
        "[cluster]\nendpoints = [\"http://e:2379\"]\nprefix = \"/x/\"\nencryption_key = \"{key}\""
    )))
    .unwrap();
    let debug = format!("{:?}", sealed.cluster);
    assert!(!debug.contains(key), "{debug}");
    // No node: the host name, read when resolving, not when parsing.
    assert_eq!(sealed.cluster.as_ref().unwrap().node, "");
    let e = parse(&with_cluster(
        "[cluster]\nendpoints = [\"https://e:1\"]\nnode = \"a\"\nca_file = \"/nonexistent/ca.pem\"",
    ))
    .unwrap()
    .resolve_secrets()
    .unwrap_err();
    assert_eq!((e.line, e.key.as_str()), (Some(4), "cluster.ca_file"), "{e}");
    let mut resolved = sealed.clone();
    resolved.resolve_secrets().unwrap();
    assert!(!resolved.cluster.as_ref().unwrap().node.is_empty());
    assert_eq!(sealed.cluster.unwrap().prefix, "/x");
    for (section, line, key, needle) in [
        ("[cluster]\nendpoints = []", 2, "cluster.endpoints", "at least one"),
        ("[cluster]\nendpoints = [\"127.0.0.1:2379\"]", 2, "cluster.endpoints", "not an etcd URL"),
        (
            "[cluster]\nbackend = \"consul\"\nendpoints = [\"http://e:1\"]",
            2,
            "cluster.backend",
            "valid: \"etcd\"",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nlease_ttl = \"1s\"",
            3,
            "cluster.lease_ttl",
            "2s",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nprefix = \"t\"",
            3,
            "cluster.prefix",
            "key prefix",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nencryption_key = \"c2hvcnQ=\"",
            3,
            "cluster.encryption_key",
            "32 random bytes",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nusername = \"u\"",
            3,
            "cluster.password",
            "needs a password",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nca_file = \"/etc/hosts\"",
            3,
            "cluster.ca_file",
            "https://",
        ),
        (
            "[cluster]\nendpoints = [\"http://e:1\"]\nlease = \"2s\"",
            3,
            "cluster.lease",
            "unknown field",
        ),
    ] {
        let e = err(&with_cluster(section));
        assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{section}: {e}");
        assert!(e.message.contains(needle), "{section}: {e}");
    }
}

#[cfg(not(feature = "etcd"))]
#[test]
fn cluster_section_needs_the_etcd_feature() {
    let e = err(&with_cluster("[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]"));
    assert_eq!((e.line, e.key.as_str()), (Some(1), "cluster"));
    assert!(e.message.contains("--features etcd"), "{e}");
}

#[test]
fn numbers_from_the_config_are_bounded() {
    // (line added to the token, key, message) -- each used to be accepted.
    let cases: &[(&str, &str, &str)] = &[
        ("retry_initial = \"0s\"", "retry_initial", "out of range; use 100ms to 1h"),
        ("rate_window = \"0s\"", "rate_window", "out of range; use 1s to 1day"),
        ("request_timeout = \"0s\"", "request_timeout", "out of range; use 1s to 10m"),
        ("retry_max = \"100years\"", "retry_max", "out of range"),
        ("safety_margin = \"30days\"", "safety_margin", "out of range"),
        (
            "on_refresh = [\"/bin/true\"]\non_refresh_timeout = \"0s\"",
            "on_refresh_timeout",
            "out of range",
        ),
        ("rate_limit = 1000000", "rate_limit", "out of range; use 1 to 1000"),
        ("rate_limit = 0", "rate_limit", "out of range"),
        ("session_budget = 0", "session_budget", "0 is out of range; use 1 to 60"),
        ("session_budget = 61", "session_budget", "out of range; use 1 to 60"),
        ("access_token_ttl = 0", "access_token_ttl", "out of range"),
        ("access_token_ttl = 10000000000000", "access_token_ttl", "out of range"),
        ("retry_initial = \"10s\"\nretry_max = \"1s\"", "retry_max", "shorter than"),
    ];
    for (line, key, message) in cases {
        let text = with_jwt(GOOD).replace("grant = \"jwt\"", &format!("grant = \"jwt\"\n{line}"));
        let e = parse(&text).expect_err(line);
        assert!(e.key.ends_with(key) && e.message.contains(message), "{line}: {e}");
        assert!(matches!(e.line, Some(11 | 12)), "{line}: {e}");
    }
    let e = err(&format!("[daemon]\nmax_concurrent_requests = 100000\n{}", with_jwt(GOOD)));
    assert!(e.message.contains("1 to 1024"), "{e}");
    let ok = with_jwt(GOOD).replace(
        "grant = \"jwt\"",
        "grant = \"jwt\"\nretry_initial = \"100ms\"\nrate_limit = 1000\nrequest_timeout = \"1s\"\nsession_budget = 60",
    );
    assert_eq!(parse(&ok).unwrap().tokens[0].rate.sessions, 60);
    assert_eq!(parse(&with_jwt(GOOD)).unwrap().tokens[0].rate.sessions, 3, "the default");
}

#[test]
fn check_warns_about_writable_sinks_and_prints_no_credentials_or_controls() {
    let text = with_jwt(GOOD)
        .replace("mode = \"0640\"", "mode = \"0666\"")
        .replace(
            "server = \"https://platform.ringcentral.com\"",
            "server = \"https://id:hunter2@platform.example.com/?client_secret=hunter3\"",
        )
        .replace("/run/tokend/main.json", "/run/tokend/main\\u001b[31m.json")
        .replace("grant = \"jwt\"", "grant = \"jwt\"\nschedule = \"0 0 0 1 1 * 2099\"");
    let c = parse(&text).unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("mode 0666, writable by every user")),
        "{:?}",
        c.warnings
    );
    let plan = c.plan();
    assert!(!plan.contains("hunter2") && !plan.contains("hunter3"), "{plan}");
    assert!(plan.contains("REDACTED"), "{plan}");
    assert!(!plan.contains('\u{1b}') && plan.contains("main\\u{1b}[31m.json"), "{plan}");
    assert!(plan.contains("then never again") && !plan.contains("every 1h"), "{plan}");
}

#[test]
fn secrets_lose_trailing_newlines_from_every_source() {
    // (`{ env }` values take the same trim; setting a variable needs unsafe in Rust 2024.)
    let s = SecretSource::Literal(crate::secret::Secret::new("abc\r\n")).resolve().unwrap();
    assert_eq!(s.expose(), "abc");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s");
    std::fs::write(&f, "xyz\n\n").unwrap();
    assert_eq!(SecretSource::File(f).resolve().unwrap().expose(), "xyz");
    let e = SecretSource::File("/dev/zero".into()).resolve().unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
}

/// `GOOD` as another provider's token: `server` dropped, the grant replaced.
fn provider_config(extra: &str, grant: &str) -> String {
    with_jwt(GOOD)
        .replace("server = \"https://platform.ringcentral.com\"\n", extra)
        .replace("grant = \"jwt\"", grant)
}

#[test]
fn providers_set_the_defaults() {
    let code = "grant = \"refresh_token\"\nrefresh_token = \"rt\"";
    let c = parse(&provider_config("provider = \"google\"\n", code)).unwrap();
    let t = &c.tokens[0];
    assert_eq!(t.token_url.as_str(), "https://oauth2.googleapis.com/token");
    assert_eq!(t.server.as_str(), "https://oauth2.googleapis.com/", "the proxies' upstream");
    assert_eq!((t.provider.name, t.client_auth), ("google", crate::provider::ClientAuth::Body));
    let text = provider_config(
        "provider = \"salesforce\"\nclient_auth = \"basic\"\naccess_token_lifetime = \"30m\"\naudience = \"api\"\n",
        "grant = \"client_credentials\"",
    );
    let t = &parse(&text).unwrap().tokens[0];
    assert_eq!(t.client_auth, crate::provider::ClientAuth::Basic);
    assert_eq!(t.access_token_lifetime, Some(Duration::from_secs(1800)));
    assert_eq!((t.grant.name(), t.audience.as_deref()), ("client_credentials", Some("api")));
    let text = provider_config(
        "provider = \"okta\"\ntoken_url = \"https://x.okta.com/oauth2/v1/token\"\n",
        "grant = \"client_credentials\"",
    );
    assert_eq!(parse(&text).unwrap().tokens[0].token_url.host_str(), Some("x.okta.com"));
    // RingCentral, the default, keeps its token URL on `server`.
    assert_eq!(parse(&with_jwt(GOOD)).unwrap().tokens[0].provider.name, "ringcentral");
}

#[test]
fn provider_errors_name_line_and_key() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        // (extra lines instead of `server`, grant line, line, key contains, message contains)
        ("provider = \"hubspot\"\n", "grant = \"jwt\"", 7, "provider", "valid: \"ringcentral\""),
        ("provider = \"okta\"\n", "grant = \"client_credentials\"", 6, "token_url", "per tenant"),
        ("", "grant = \"jwt\"", 6, "server", "needs `server`"),
        ("provider = \"google\"\n", "grant = \"jwt\"", 10, "grant", "has no \"jwt\" grant"),
        (
            "provider = \"zoom\"\nclient_auth = \"post\"\n",
            "grant = \"refresh_token\"\nrefresh_token = \"r\"",
            8,
            "client_auth",
            "valid: \"basic\"",
        ),
        (
            "provider = \"google\"\naccess_token_lifetime = \"1s\"\n",
            "grant = \"authorization_code\"",
            8,
            "access_token_lifetime",
            "out of range",
        ),
        (
            "provider = \"google\"\naccess_token_lifetime = \"soon\"\n",
            "grant = \"authorization_code\"",
            8,
            "access_token_lifetime",
            "not a duration",
        ),
    ];
    for (extra, grant, line, key, msg) in cases {
        let e = err(&provider_config(extra, grant));
        assert_eq!(e.line, Some(*line), "{e}");
        assert!(e.key.contains(key), "key {key:?} not in: {e}");
        assert!(e.message.contains(msg), "message {msg:?} not in: {e}");
    }
    let text = provider_config("provider = \"xero\"\n", "grant = \"client_credentials\"")
        .replace("client_secret = \"literal-secret\"\n", "");
    let e = err(&text);
    assert!(
        e.key.ends_with("client_secret") && e.message.contains("needs a `client_secret`"),
        "{e}"
    );
}

/// A written file that is a hard link to another (an existing state file under a sink's
/// name) is one file: found by its inode, in a directory listed once (issue 15), whether the
/// link is the later name or the earlier one.
#[test]
fn a_hard_link_between_written_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = with_jwt(GOOD)
        .replace("/var/lib/tokend/main.state.json", &format!("{d}/main.state.json"))
        .replace("/run/tokend/main.json", &format!("{d}/main.json"));
    let config = parse(&text).unwrap();
    config.check_files().unwrap();
    std::fs::write(dir.path().join("main.state.json"), "{}").unwrap();
    config.check_files().unwrap();
    std::fs::hard_link(dir.path().join("main.state.json"), dir.path().join("main.json")).unwrap();
    let err = config.check_files().unwrap_err().to_string();
    assert!(err.contains("is the same file as"), "{err}");
    assert!(err.contains("token \"main\".sink.path"), "{err}");
}
