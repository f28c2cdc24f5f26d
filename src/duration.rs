//! Go/Kubernetes-style duration strings (`90s`, `15m`, `8h`, `7d`, `1h30m`).
//!
//! Policy durations are whole seconds: JWT timestamps are whole seconds, so a
//! sub-second policy value could not be enforced as written.

use std::fmt;

/// A parse failure; the caller adds the field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected e.g. 90s, 15m, 8h, 7d or 1d12h (days first)")]
    Syntax(String),
    #[error("invalid duration {0:?}: unknown unit {1:?} (use d, h, m or s)")]
    Unit(String, String),
    #[error("invalid duration {0:?}: use whole numbers of d, h, m or s")]
    Fraction(String),
    #[error("invalid duration {0:?}: too large")]
    Overflow(String),
}

/// The grammar, shared with the CRD's OpenAPI pattern: `0`, or an optional
/// leading whole number of days followed by whole numbers of hours, minutes
/// and seconds (`7d`, `1d12h`, `1h30m`, `90s`).
pub const PATTERN: &str = "^(0|([0-9]+d)?([0-9]+[hms])*)$";

// The recommended defaults, one source for the CRD (its defaults and CEL
// rules), the policy file and `Policy::default()`. Macros, because the CEL
// rules are assembled with `concat!`, which takes literals only.
#[macro_export]
macro_rules! default_session {
    () => {
        "8h"
    };
}
#[macro_export]
macro_rules! default_token {
    () => {
        "30m"
    };
}
#[macro_export]
macro_rules! default_renew_limit {
    () => {
        "10m"
    };
}
#[macro_export]
macro_rules! default_grace {
    () => {
        "10s"
    };
}

// The same defaults in whole seconds, for the CEL rules, which compare
// seconds; a test checks that each equals its duration above.
#[macro_export]
macro_rules! default_session_secs {
    () => {
        "28800"
    };
}
#[macro_export]
macro_rules! default_token_secs {
    () => {
        "1800"
    };
}
#[macro_export]
macro_rules! default_renew_limit_secs {
    () => {
        "600"
    };
}

/// Parses a duration string into whole seconds.
pub fn parse_seconds(input: &str) -> Result<u64, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(0);
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    let mut first = true;
    let overflow = || DurationError::Overflow(input.to_string());
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(DurationError::Syntax(input.to_string()));
        }
        if i < bytes.len() && bytes[i] == b'.' {
            return Err(DurationError::Fraction(input.to_string()));
        }
        let number: u64 = s[start..i].parse().map_err(|_| overflow())?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = match &s[ustart..i] {
            "d" if first => 86_400,
            "h" => 3_600,
            "m" => 60,
            "s" => 1,
            "" => return Err(DurationError::Syntax(input.to_string())),
            "d" => return Err(DurationError::Syntax(input.to_string())),
            "ms" | "us" | "µs" | "ns" => return Err(DurationError::Fraction(input.to_string())),
            other => return Err(DurationError::Unit(input.to_string(), other.to_string())),
        };
        let part = number.checked_mul(unit).ok_or_else(overflow)?;
        total = total.checked_add(part).ok_or_else(overflow)?;
        first = false;
    }
    Ok(total)
}

/// Formats whole seconds the way a person writes them: `1h30m`, `7d`, `0s`.
pub fn format_seconds(secs: u64) -> String {
    struct D(u64);
    impl fmt::Display for D {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let mut s = self.0;
            if s == 0 {
                return f.write_str("0s");
            }
            for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
                if s >= size {
                    write!(f, "{}{}", s / size, unit)?;
                    s %= size;
                }
            }
            Ok(())
        }
    }
    D(secs).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_go_and_kubernetes_forms() {
        assert_eq!(parse_seconds("90s"), Ok(90));
        assert_eq!(parse_seconds("15m"), Ok(900));
        assert_eq!(parse_seconds("8h"), Ok(28_800));
        assert_eq!(parse_seconds("7d"), Ok(604_800));
        assert_eq!(parse_seconds("1h30m"), Ok(5_400));
        assert_eq!(parse_seconds("1d12h"), Ok(129_600));
        assert_eq!(parse_seconds("0"), Ok(0));
        assert_eq!(parse_seconds("0s"), Ok(0));
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        assert_eq!(parse_seconds(""), Err(DurationError::Empty));
        assert!(matches!(parse_seconds("10"), Err(DurationError::Syntax(_))));
        assert!(matches!(
            parse_seconds("-5m"),
            Err(DurationError::Syntax(_))
        ));
        assert!(matches!(
            parse_seconds("5 m"),
            Err(DurationError::Syntax(_))
        ));
        assert!(matches!(parse_seconds("h"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse_seconds("3w"), Err(DurationError::Unit(_, u)) if u == "w"));
        assert!(matches!(
            parse_seconds("1500ms"),
            Err(DurationError::Fraction(_))
        ));
        assert!(matches!(
            parse_seconds("0.5s"),
            Err(DurationError::Fraction(_))
        ));
        assert!(matches!(
            parse_seconds("99999999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(secs in 0u64..100_000_000) {
            prop_assert_eq!(parse_seconds(&format_seconds(secs)), Ok(secs));
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_seconds(&s);
        }

        /// The parser and the CRD pattern accept the same strings.
        #[test]
        fn parser_agrees_with_the_crd_pattern(s in "[0-9dhms.]{1,8}") {
            let re = regex_lite::Regex::new(PATTERN).unwrap();
            let by_pattern = re.is_match(&s);
            let by_parser = !matches!(parse_seconds(&s), Err(DurationError::Syntax(_) | DurationError::Fraction(_) | DurationError::Unit(..) | DurationError::Empty));
            prop_assert_eq!(by_pattern, by_parser, "{}", s);
        }
    }

    #[test]
    fn default_seconds_match_their_durations() {
        for (d, secs) in [
            (crate::default_session!(), crate::default_session_secs!()),
            (crate::default_token!(), crate::default_token_secs!()),
            (
                crate::default_renew_limit!(),
                crate::default_renew_limit_secs!(),
            ),
        ] {
            assert_eq!(parse_seconds(d).unwrap().to_string(), secs, "{d}");
        }
    }
}
