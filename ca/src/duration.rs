//! Operator-facing durations such as `10y`, `90d`, `12h`, `30m`, `45s`.
//!
//! Parsing only; a year is 365 days and a week 7 days (certificate validity, not calendars).

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (expected a positive number and a unit: s, m, h, d, w or y, e.g. 90d)"
)]
pub struct DurationError {
    /// The rejected text.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses `<number><unit>` with unit `s`, `m`, `h`, `d`, `w` or `y`. Zero is rejected.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let trimmed = input.trim();
    let unit_at = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| err("missing unit"))?;
    let (digits, unit) = trimmed.split_at(unit_at);
    if digits.is_empty() {
        return Err(err("missing number"));
    }
    let count: u64 = digits.parse().map_err(|_| err("number too large"))?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(err("unknown unit")),
    };
    if count == 0 {
        return Err(err("must be greater than zero"));
    }
    let secs = count
        .checked_mul(unit_secs)
        .ok_or_else(|| err("number too large"))?;
    // Keep far below what time::OffsetDateTime can represent.
    if secs > 1_000 * 365 * 86_400 {
        return Err(err("longer than 1000 years"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(
            parse("10y").unwrap(),
            Duration::from_secs(10 * 365 * 86_400)
        );
        assert_eq!(parse("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse("12h").unwrap(), Duration::from_secs(12 * 3_600));
        assert_eq!(parse("30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse("45s").unwrap(), Duration::from_secs(45));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "d",
            "10",
            "0d",
            "-1d",
            "1.5d",
            "10x",
            "1d2h",
            "99999999999999999999d",
            "5000y",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse("10x").unwrap_err().to_string(),
            "invalid duration \"10x\": unknown unit (expected a positive number and a unit: s, m, h, d, w or y, e.g. 90d)"
        );
    }
}
