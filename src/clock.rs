//! Time as the token service counts it: milliseconds since the Unix epoch,
//! so that "at `exp`" (a whole second) is exact.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The server clock, in [`Millis`]. A clock set before 1970 reads as 0.
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// `secs` since the Unix epoch as an RFC 3339 UTC timestamp
/// (`2026-01-02T03:04:05Z`); empty outside jiff's range (years -9999 to
/// 9999, less a day at each end), far beyond any time a token carries.
pub fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_whole_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_323_045), "2026-01-02T03:04:05Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        let max = k8s_openapi::jiff::Timestamp::MAX.as_second();
        assert!(rfc3339(max).starts_with("9999-12-30T"));
        assert_eq!(rfc3339(max + 1), "");
        assert_eq!(rfc3339(i64::MAX), "");
        assert_eq!(rfc3339(i64::MIN), "");
    }

    #[test]
    fn now_is_after_2026() {
        assert!(now_millis() > 1_767_225_600_000);
    }
}
