//! The reader's sink parser: any file content.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tokend::watch::parse_sink(std::path::Path::new("/fuzz/sink"), data);
});
