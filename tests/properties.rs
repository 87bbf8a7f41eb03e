//! Property tests for the pure decisions and the parsers.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use std::path::Path;
use std::time::Duration;
use tokend::oauth::parse_reply;
use tokend::policy::{backoff, refresh_deadline};

proptest! {
    #[test]
    fn backoff_is_bounded_and_honours_retry_after(
        attempt in 0u32..100,
        initial_ms in 1u64..10_000,
        max_ms in 1u64..600_000,
        retry_after in proptest::option::of(0u64..10_000),
        r in 0.0f64..1.0,
    ) {
        let (initial, max) = (Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
        let ra = retry_after.map(Duration::from_secs);
        let d = backoff(attempt, initial, max, ra, r);
        if let Some(ra) = ra {
            prop_assert!(d >= ra);
        }
        prop_assert!(d <= max.max(ra.unwrap_or_default()));
        // Never below half the first step (the jitter's floor); 1 us of slack for the f64
        // arithmetic of the jitter.
        prop_assert!(d + Duration::from_micros(1) >= initial.min(max) / 2, "{d:?} below half of {initial:?}");
    }

    #[test]
    fn refresh_deadline_is_inside_the_lifetime(issued in 0i64..4_000_000_000, lifetime in 0i64..10_000_000, margin in 0u64..100_000) {
        let issued = Utc.timestamp_opt(issued, 0).unwrap();
        let expires = issued + chrono::Duration::seconds(lifetime);
        let d = refresh_deadline(issued, expires, Duration::from_secs(margin));
        prop_assert!(d <= expires);
        // Never earlier than half the lifetime: a short token is not refreshed at once.
        prop_assert!(d >= issued + chrono::Duration::seconds(lifetime / 2));
        prop_assert!(expires - d <= chrono::Duration::seconds(i64::try_from(margin).unwrap()));
    }

    #[test]
    fn token_reply_parser_never_panics_and_never_quotes_the_body(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let marker = b"SECRETSECRET";
        let mut body = body;
        body.extend_from_slice(marker);
        match parse_reply(status, &body, None) {
            Ok(t) => prop_assert!((200..300).contains(&status) && !t.access_token.expose().is_empty()),
            Err(e) => {
                let text = format!("{e} {e:?}");
                prop_assert!(!text.contains("SECRETSECRET"));
                if (500..600).contains(&status) || status == 429 || status == 408 {
                    prop_assert!(e.is_transient());
                }
            }
        }
    }

    #[test]
    fn token_reply_round_trip(at in "[A-Za-z0-9._-]{1,64}", rt in proptest::option::of("[A-Za-z0-9._-]{1,64}"), exp in 0u64..100_000, extra in "[a-z_]{1,12}") {
        let mut v = serde_json::json!({"access_token": at, "token_type": "bearer", "expires_in": exp});
        if let Some(rt) = &rt {
            v["refresh_token"] = rt.clone().into();
        }
        v[extra.as_str()] = 1.into(); // unknown fields are tolerated
        let parsed = parse_reply(200, v.to_string().as_bytes(), None);
        // `extra` may overwrite a known field with a number; then it must be an error, not a panic.
        if let Ok(t) = parsed {
            prop_assert_eq!(t.access_token.expose(), at.as_str());
        }
    }

    #[test]
    fn config_loader_never_panics_and_points_inside_the_file(text in "\\PC{0,400}") {
        let result = tokend::config::Config::parse(Path::new("/x/config.toml"), &text);
        if let Some(line) = result.err().and_then(|e| e.line) {
            prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "line {} of {}", line, text.lines().count());
        }
    }

    #[test]
    fn config_loader_on_mutated_valid_configs(cut in 0usize..600, insert in "[a-z=\"\\[\\]0-9 \n]{0,20}") {
        let good = "[[token]]\nname = \"main\"\nserver = \"https://platform.ringcentral.com\"\nclient_id = \"id\"\nclient_secret = \"s\"\ngrant = \"jwt\"\njwt = \"j\"\nstate_file = \"/var/lib/tokend/main.state.json\"\n\n[[token.sink]]\npath = \"/run/tokend/main.json\"\nmode = \"0640\"\n";
        let at = cut.min(good.len());
        let at = (0..=at).rev().find(|i| good.is_char_boundary(*i)).unwrap();
        let text = format!("{}{}{}", &good[..at], insert, &good[at..]);
        let _ = tokend::config::Config::parse(Path::new("/x/config.toml"), &text);
    }

    #[test]
    fn sink_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = tokend::watch::parse_sink(Path::new("/x/s"), &bytes);
    }
}

/// Extreme and random values of a numeric reply field: mostly small, often at the edges.
fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..100_000,
        any::<u64>(),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        Just(10_000_000_000_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Issue 17's class rule: no number from the server reaches date or generation arithmetic
    /// unbounded. Every numeric reply field, random or extreme, goes through the whole path:
    /// parse, next state, save, load, publish (json and raw), read back by the reader.
    #[test]
    fn extreme_reply_numbers_survive_the_whole_path(
        expires_in in extreme_u64(),
        refresh_expires_in in proptest::option::of(extreme_u64()),
        retry_after in extreme_u64(),
        previous_generation in proptest::option::of(prop_oneof![
            0u64..1000,
            Just(tokend::store::MAX_GENERATION - 1),
            Just(tokend::store::MAX_GENERATION),
        ]),
    ) {
        use tokend::config::SinkFormat;
        let mut reply = serde_json::json!({
            "access_token": "AT-1", "token_type": "bearer", "expires_in": expires_in,
            "refresh_token": "RT-1",
        });
        if let Some(r) = refresh_expires_in {
            reply["refresh_token_expires_in"] = r.into();
        }
        let limit = Duration::from_secs(tokend::oauth::MAX_LIFETIME_SECS);
        let e = parse_reply(429, b"{}", Some(Duration::from_secs(retry_after))).unwrap_err();
        prop_assert!(e.retry_after().unwrap() <= tokend::oauth::MAX_RETRY_AFTER);
        let tokens = parse_reply(200, reply.to_string().as_bytes(), None).unwrap();
        prop_assert!(tokens.expires_in <= limit.as_secs());
        // Files keep milliseconds: a state read back equals the one written.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("main.state.json");
        let previous = previous_generation.map(|g| {
            let mut s = tokend::store::next_state("main", tokens.clone(), None, true, now);
            s.generation = g;
            s
        });
        let state = tokend::store::next_state("main", tokens, previous.as_ref(), false, now);
        let max_gen = tokend::store::MAX_GENERATION;
        prop_assert!(state.generation <= max_gen);
        if let Some(p) = &previous {
            prop_assert!(state.generation >= p.generation, "the generation never goes back");
        }
        let horizon = now + chrono::Duration::from_std(limit).unwrap();
        prop_assert!(state.access_expires_at <= horizon);
        prop_assert!(state.refresh_expires_at.is_none_or(|t| t <= horizon));
        state.save(&path).unwrap();
        let loaded = tokend::store::State::load_for(&path, "main").unwrap().unwrap();
        prop_assert_eq!(&loaded, &state);
        for format in [SinkFormat::Json, SinkFormat::Raw] {
            let bytes = tokend::store::render_sink(&loaded, format, false, now);
            let token = tokend::watch::parse_sink(Path::new("/x/s"), &bytes).unwrap();
            prop_assert_eq!(token.access_token.expose(), "AT-1");
            if format == SinkFormat::Json {
                prop_assert_eq!(token.expires_at, Some(state.access_expires_at));
                prop_assert_eq!(token.generation, Some(state.generation));
            }
        }
    }
}

/// One optional field of a token reply: absent, or one of a few values.
fn optional<T: std::fmt::Debug + Clone + 'static>(
    values: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(values)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Issue 14 (RFC 6749 sections 5.1 and 6): a refresh reply with any subset of the
    /// optional fields either parses or is refused with a named reason, and the state after
    /// it never loses the refresh token held (a reply without one keeps it), nor the scope.
    #[test]
    fn replies_with_any_optional_fields_keep_the_refresh_token_held(
        token_type in optional(prop_oneof![
            Just("bearer"), Just("Bearer"), Just("BEARER"), Just("mac"), Just("DPoP"),
        ]),
        expires_in in optional(0u64..100_000),
        refresh_token in optional("[A-Za-z0-9._-]{1,32}"),
        refresh_expires_in in optional(0u64..10_000_000),
        scope in optional("[a-z. ]{0,20}"),
        lifetime in optional(10u64..100_000),
        held in "[A-Za-z0-9._-]{1,32}",
    ) {
        let mut reply = serde_json::json!({"access_token": "AT-2"});
        let fields: [(&str, Option<serde_json::Value>); 5] = [
            ("token_type", token_type.map(Into::into)),
            ("expires_in", expires_in.map(Into::into)),
            ("refresh_token", refresh_token.clone().map(Into::into)),
            ("refresh_token_expires_in", refresh_expires_in.map(Into::into)),
            ("scope", scope.clone().map(Into::into)),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                reply[k] = v;
            }
        }
        let now = Utc::now();
        let held_rt = tokend::secret::RefreshToken::new(held.clone());
        let first = serde_json::json!({
            "access_token": "AT-1", "expires_in": 3600, "refresh_token": held, "scope": "held.scope",
            "refresh_token_expires_in": 600,
        });
        let previous = tokend::store::next_state(
            "main", parse_reply(200, first.to_string().as_bytes(), None).unwrap(), None, true, now,
        );
        let lifetime_d = lifetime.map(Duration::from_secs);
        let parsed = tokend::oauth::parse_reply_for(200, reply.to_string().as_bytes(), None, lifetime_d);
        let type_ok = token_type.is_none_or(|t| t.eq_ignore_ascii_case("bearer"));
        let expiry = expires_in.or(lifetime);
        match parsed {
            Err(e) => {
                let reason = e.to_string();
                prop_assert!(!e.is_transient(), "a retry gets the same reply: {}", reason);
                prop_assert!(
                    (expiry.is_none() && reason.contains("expires_in"))
                        || (!type_ok && reason.contains("token_type")),
                    "named reason: {}", reason
                );
            }
            Ok(tokens) => {
                prop_assert!(type_ok && expiry.is_some());
                let tokens = tokend::oauth::keep_refresh_token(tokens, Some(&held_rt));
                let state = tokend::store::next_state("main", tokens, Some(&previous), false, now);
                let want_rt = refresh_token.clone().unwrap_or(held.clone());
                prop_assert_eq!(state.refresh_token.as_ref().map(tokend::secret::RefreshToken::expose), Some(want_rt.as_str()));
                prop_assert_eq!(state.token_type.as_str(), "bearer");
                let want_scope = scope.clone().unwrap_or_else(|| "held.scope".into());
                prop_assert_eq!(state.scope.as_deref(), Some(want_scope.as_str()));
                let secs = i64::try_from(expiry.unwrap()).unwrap();
                prop_assert_eq!(state.access_expires_at, now + chrono::Duration::seconds(secs));
                if refresh_token.is_none() && refresh_expires_in.is_none() {
                    // The same token: its known expiry stays.
                    prop_assert_eq!(state.refresh_expires_at, previous.refresh_expires_at);
                }
            }
        }
    }
}
