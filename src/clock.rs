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
