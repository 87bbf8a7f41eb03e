//! The config loader: any text. A config it accepts has every duration and count inside its
//! bounds, and its plan (what `check` prints) holds no control character.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = tokend::config::Config::parse(std::path::Path::new("/fuzz/config.toml"), text)
    else {
        return;
    };
    for t in &config.tokens {
        assert!(t.retry.initial >= std::time::Duration::from_millis(100));
        assert!(t.rate.window >= std::time::Duration::from_secs(1));
        assert!(t.request_timeout >= std::time::Duration::from_secs(1));
        assert!((1..=1000).contains(&t.rate.requests));
    }
    let plan = config.plan();
    assert!(!plan.contains(|c: char| c.is_control() && c != '\n'), "{plan:?}");
});
