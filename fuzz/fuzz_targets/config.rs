//! The config loader: any text.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tokend::config::Config::parse(std::path::Path::new("/fuzz/config.toml"), text);
    }
});
