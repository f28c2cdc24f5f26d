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
    #[error("invalid duration {0:?}: expected e.g. 90s, 15m, 8h, 7d or 1h30m")]
    Syntax(String),
    #[error("invalid duration {0:?}: unknown unit {1:?} (use ms, s, m, h or d)")]
    Unit(String, String),
    #[error("invalid duration {0:?}: must be a whole number of seconds")]
    Fraction(String),
    #[error("invalid duration {0:?}: too large")]
    Overflow(String),
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
    let syntax = || DurationError::Syntax(input.to_string());
    let bytes = s.as_bytes();
    let mut i = 0;
    // Accumulate in milliseconds so that `1500ms` and `1.5s` can be judged whole or not.
    let mut total_ms: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int_part = &s[start..i];
        let mut frac_part = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let fstart = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac_part = &s[fstart..i];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(syntax());
        }
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &s[ustart..i];
        let unit_ms: u128 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(syntax()),
            other => return Err(DurationError::Unit(input.to_string(), other.to_string())),
        };
        let overflow = || DurationError::Overflow(input.to_string());
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut part = int.checked_mul(unit_ms).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            let digits = frac_part.len().min(18) as u32;
            let frac: u128 = frac_part[..digits as usize].parse().map_err(|_| syntax())?;
            let scaled = frac * unit_ms;
            let denom = 10u128.pow(digits);
            if !scaled.is_multiple_of(denom) {
                return Err(DurationError::Fraction(input.to_string()));
            }
            part += scaled / denom;
        }
        total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
        if total_ms > u64::MAX as u128 {
            return Err(overflow());
        }
    }
    if !total_ms.is_multiple_of(1_000) {
        return Err(DurationError::Fraction(input.to_string()));
    }
    Ok((total_ms / 1_000) as u64)
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
        assert_eq!(parse_seconds("1.5h"), Ok(5_400));
        assert_eq!(parse_seconds("2000ms"), Ok(2));
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
    }
}
