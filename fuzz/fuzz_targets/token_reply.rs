//! The token endpoint's reply parser: any status and body.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((status, body)) = data.split_first_chunk::<2>() {
        let status = u16::from_le_bytes(*status) % 600;
        let _ = tokend::oauth::parse_reply(status, body, None);
    }
});
