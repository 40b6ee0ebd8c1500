//! Duration strings as written in config entries and agent checks (`"5s"`,
//! `"250ms"`, `"1m30s"`): Go's `time.ParseDuration` format without signs.
//!
//! Units: `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`. Each number may have a fraction
//! (`"1.5s"`); parts add up (`"1h2m3s"`). A bare `"0"` is zero.

use std::time::Duration;

/// What is wrong with a duration string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration (write e.g. \"5s\")")]
    Empty,
    #[error("invalid duration {text:?}: expected a number at position {position}")]
    ExpectedNumber { text: String, position: usize },
    #[error(
        "invalid duration {text:?}: missing unit after the number at position {position} \
         (use ns, us, ms, s, m or h)"
    )]
    MissingUnit { text: String, position: usize },
    #[error("invalid duration {text:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { text: String, unit: String },
    #[error("invalid duration {text:?}: too large")]
    Overflow { text: String },
}

/// Parses a duration string such as `"5s"`, `"1m30s"` or `"1.5h"`.
/// A duration in a config entry is parsed once, when the entry is read.
impl crate::compiled::Compile for Duration {
    fn compile(source: &str) -> Result<Duration, String> {
        parse_duration(source).map_err(|e| e.to_string())
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut total_nanos: u128 = 0;
    while i < chars.len() {
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
            i += 1;
        }
        let number: String = chars[start..i].iter().collect();
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(DurationError::ExpectedNumber {
                text: text.to_string(),
                position: start + 1,
            });
        }
        let unit_start = i;
        while i < chars.len() && !(chars[i].is_ascii_digit() || chars[i] == '.') {
            i += 1;
        }
        let unit: String = chars[unit_start..i].iter().collect();
        let scale: u128 = match unit.as_str() {
            "" => {
                return Err(DurationError::MissingUnit {
                    text: text.to_string(),
                    position: start + 1,
                })
            }
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    text: text.to_string(),
                    unit,
                })
            }
        };
        let overflow = || DurationError::Overflow {
            text: text.to_string(),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((&number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| overflow())?
        };
        let mut nanos = whole.checked_mul(scale).ok_or_else(overflow)?;
        // Fraction digits beyond nanosecond precision are dropped.
        let mut divisor: u128 = 1;
        let mut frac_value: u128 = 0;
        for d in frac.chars().take(18) {
            frac_value = frac_value * 10 + u128::from(d.to_digit(10).unwrap_or(0));
            divisor *= 10;
        }
        nanos = nanos
            .checked_add(frac_value * scale / divisor)
            .ok_or_else(overflow)?;
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(overflow)?;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| DurationError::Overflow {
        text: text.to_string(),
    })?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("10µs"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
    }

    #[test]
    fn rejects_bad_durations() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("5"),
            Err(DurationError::MissingUnit { position: 1, .. })
        ));
        assert!(matches!(
            parse_duration("5sec"),
            Err(DurationError::UnknownUnit { ref unit, .. }) if unit == "sec"
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::ExpectedNumber { position: 1, .. })
        ));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::ExpectedNumber { position: 1, .. })
        ));
        assert!(matches!(
            parse_duration("1..2s"),
            Err(DurationError::ExpectedNumber { .. })
        ));
        assert!(matches!(
            parse_duration("5 s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999999999h"),
            Err(DurationError::Overflow { .. })
        ));
        let msg = parse_duration("5x").unwrap_err().to_string();
        assert!(msg.contains("unknown unit \"x\""), "{msg}");
    }
}
