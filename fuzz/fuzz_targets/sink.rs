//! The reader's sink parser: any file content. A token it accepts is visible ASCII (it goes
//! into HTTP headers), and an error never quotes the file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match tokend::watch::parse_sink(std::path::Path::new("/fuzz/sink"), data) {
        Ok(t) => assert!(tokend::text::is_token(t.access_token.expose())),
        Err(e) => assert!(!e.to_string().contains(|c: char| c.is_control())),
    }
});
