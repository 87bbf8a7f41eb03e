//! The token endpoint's reply parser: any status and body. A reply that parses must also
//! survive the rest of the path (next state, render, read back) with its numbers bounded, its
//! token visible ASCII, and server text free of control characters.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else { return };
    let status = u16::from_le_bytes(*status) % 600;
    match tokend::oauth::parse_reply(status, body, None) {
        Ok(tokens) => {
            assert!(tokens.expires_in <= tokend::oauth::MAX_LIFETIME_SECS);
            assert!(tokend::text::is_token(tokens.access_token.expose()));
            let now = chrono::Utc::now();
            let state = tokend::store::next_state("f", tokens, None, true, now);
            let bytes =
                tokend::store::render_sink(&state, tokend::config::SinkFormat::Json, false, now);
            let back = tokend::watch::parse_sink(std::path::Path::new("/fuzz/s"), &bytes)
                .expect("a rendered sink reads back");
            assert_eq!(back.access_token, state.access_token);
        }
        Err(e) => {
            let text = format!("{e} {}", e.code());
            assert!(!text.contains(|c: char| c.is_control()), "control character in {text:?}");
        }
    }
});
