//! The duration parser (`8h`, `1d2h30m`): any text, and any number back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpolicy::duration::{format_seconds, parse_seconds};

fuzz_target!(|data: &[u8]| {
    // Whatever parses, formats to text that parses to the same seconds.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(secs) = parse_seconds(text) {
            let again = format_seconds(secs);
            assert_eq!(
                parse_seconds(&again).ok(),
                Some(secs),
                "{text:?} -> {again:?}"
            );
        }
    }
    // Every number of seconds formats to text that parses back to it.
    if let Some(first) = data.first_chunk::<8>() {
        let secs = u64::from_le_bytes(*first);
        let text = format_seconds(secs);
        assert_eq!(parse_seconds(&text).ok(), Some(secs), "{secs} -> {text:?}");
    }
});
