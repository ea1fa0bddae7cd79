//! Operator-facing durations, one grammar for the whole product: a whole number and a unit,
//! such as `500ms`, `30s`, `5m`, `12h`, `90d`, `10y`.
//!
//! Parsing only; a year is 365 days and a week 7 days (certificate validity, not calendars).
//! Two uses share the grammar and differ only in what they admit: a certificate's validity
//! ([`parse`]) is at least a second and never zero; a node setting ([`parse_setting`], used
//! by the node's configuration) also takes milliseconds, and zero where a setting means "off".

use std::fmt;
use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} ({})", use_.expected())]
pub(crate) struct DurationError {
    /// The rejected text.
    pub(crate) input: String,
    /// What is wrong with it.
    pub(crate) reason: &'static str,
    use_: Use,
}

/// What a duration is for, and so which of the grammar's values it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Validity,
    Setting,
}

impl Use {
    fn expected(self) -> &'static str {
        match self {
            Self::Validity => "expected a positive number and a unit: s, m, h, d, w or y, e.g. 90d",
            Self::Setting => "expected a whole number and a unit: ms, s, m, h, d, w or y, e.g. 30s",
        }
    }
}

/// Longest duration either use accepts: far below what `time::OffsetDateTime` can represent.
const LONGEST_SECS: u64 = 1_000 * 365 * 86_400;

/// Parses a certificate validity: `<number><unit>` with unit `s`, `m`, `h`, `d`, `w` or `y`.
/// Zero is rejected.
pub(crate) fn parse(input: &str) -> Result<Duration, DurationError> {
    parse_for(input, Use::Validity)
}

/// Parses a node setting: `<number><unit>` with unit `ms`, `s`, `m`, `h`, `d`, `w` or `y`.
/// Zero is accepted (`"0s"`); whether it means "off" is the setting's to say.
pub(crate) fn parse_setting(input: &str) -> Result<Duration, DurationError> {
    parse_for(input, Use::Setting)
}

fn parse_for(input: &str, use_: Use) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
        use_,
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
    let unit_millis: u64 = match (unit, use_) {
        ("ms", Use::Setting) => 1,
        ("s", _) => 1_000,
        ("m", _) => 60_000,
        ("h", _) => 3_600_000,
        ("d", _) => 86_400_000,
        ("w", _) => 7 * 86_400_000,
        ("y", _) => 365 * 86_400_000,
        _ => return Err(err("unknown unit")),
    };
    if count == 0 && use_ == Use::Validity {
        return Err(err("must be greater than zero"));
    }
    let millis = count
        .checked_mul(unit_millis)
        .ok_or_else(|| err("number too large"))?;
    if millis > LONGEST_SECS * 1_000 {
        return Err(err("longer than 1000 years"));
    }
    Ok(Duration::from_millis(millis))
}

/// A rejected setting, worded for serde's `invalid value: …, expected …`.
struct ExpectedSetting(DurationError);

impl serde::de::Expected for ExpectedSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a duration: {} ({})",
            self.0.reason,
            self.0.use_.expected()
        )
    }
}

/// `#[serde(with = "hybridge_ca::duration::setting")]` for a `Duration` or `Option<Duration>`
/// field of a configuration file, parsed with [`parse_setting`].
pub mod setting {
    use std::time::Duration;

    use serde::Deserialize as _;
    use serde::de::{Deserializer, Error as _, Unexpected};

    use super::{ExpectedSetting, parse_setting};

    /// A field type a setting duration fills.
    pub trait SettingField: Sized {
        fn from_duration(duration: Duration) -> Self;
    }

    impl SettingField for Duration {
        fn from_duration(duration: Duration) -> Self {
            duration
        }
    }

    impl SettingField for Option<Duration> {
        fn from_duration(duration: Duration) -> Self {
            Some(duration)
        }
    }

    /// Reads a string such as `"30s"`; any other text fails with serde's `invalid value`
    /// error naming what is wrong and the grammar.
    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: SettingField,
    {
        let text = String::deserialize(deserializer)?;
        parse_setting(&text)
            .map(T::from_duration)
            .map_err(|e| D::Error::invalid_value(Unexpected::Str(&text), &ExpectedSetting(e)))
    }
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
        assert!(parse("500ms").is_err(), "a validity is at least a second");
        assert_eq!(
            parse("10x").unwrap_err().to_string(),
            "invalid duration \"10x\": unknown unit (expected a positive number and a unit: s, m, h, d, w or y, e.g. 90d)"
        );
    }

    #[test]
    fn settings_take_milliseconds_and_zero_and_nothing_else() {
        assert_eq!(parse_setting("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_setting("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_setting("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_setting(" 10s ").unwrap(), Duration::from_secs(10));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "1h30m",
            "1h 30m",
            "5 minutes",
            "-1s",
            "10x",
        ] {
            assert!(parse_setting(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_setting("5").unwrap_err().to_string(),
            "invalid duration \"5\": missing unit (expected a whole number and a unit: ms, s, m, h, d, w or y, e.g. 30s)"
        );
    }

    #[test]
    fn a_setting_field_reads_a_duration_or_an_option_of_one() {
        #[derive(serde::Deserialize)]
        struct Settings {
            #[serde(with = "setting")]
            timeout: Duration,
            #[serde(default, with = "setting")]
            body: Option<Duration>,
        }
        let s: Settings = serde_json::from_str(r#"{"timeout": "500ms", "body": "0s"}"#).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(500));
        assert_eq!(s.body, Some(Duration::ZERO));
        let e = serde_json::from_str::<Settings>(r#"{"timeout": "5"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("invalid value: string \"5\", expected a duration: missing unit (expected a whole number and a unit: ms, s, m, h, d, w or y, e.g. 30s)"),
            "{e}"
        );
    }
}
