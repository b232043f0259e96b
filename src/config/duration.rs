//! Durations in the filter JSON are strings such as "500ms", "1s", "1m", "24h" or "7d".

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::algorithm::time::NANOS_PER_SECOND;

/// A year is the longest period that keeps every bucket computation far from overflow.
const MAX_NANOS: u64 = 366 * 86_400 * NANOS_PER_SECOND;

/// Why a duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurationError {
    /// Not `<positive whole number><unit>`.
    Invalid(String),
    /// Longer than [`MAX_NANOS`].
    TooLong(String),
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::Invalid(text) => write!(
                f,
                "invalid duration \"{text}\": expected a positive whole number followed by ms, s, m, h or d (e.g. \"1m\")"
            ),
            DurationError::TooLong(text) => write!(f, "invalid duration \"{text}\": longer than the maximum of 366d"),
        }
    }
}

/// A strictly positive duration in nanoseconds, parsed from the filter JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duration {
    nanos: u64,
}

impl Duration {
    pub fn from_nanos(nanos: u64) -> Option<Duration> {
        (nanos > 0).then_some(Duration { nanos })
    }

    pub fn as_nanos(self) -> u64 {
        self.nanos
    }

    /// Parses `<positive integer><unit>` where unit is one of ms, s, m, h, d.
    pub fn parse(text: &str) -> Result<Duration, DurationError> {
        let invalid = || DurationError::Invalid(text.to_owned());
        let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(digits_end);
        let unit_nanos: u64 = match unit {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SECOND,
            "m" => 60 * NANOS_PER_SECOND,
            "h" => 3_600 * NANOS_PER_SECOND,
            "d" => 86_400 * NANOS_PER_SECOND,
            _ => return Err(invalid()),
        };
        let count: u64 = number.parse().map_err(|_| invalid())?;
        match count.checked_mul(unit_nanos) {
            Some(nanos) if nanos > MAX_NANOS => Err(DurationError::TooLong(text.to_owned())),
            Some(nanos) => Duration::from_nanos(nanos).ok_or_else(invalid),
            None => Err(invalid()),
        }
    }
}

/// The largest unit that divides the duration exactly: `90s` stays `90s`, `3600s` prints `1h`.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 5] = [
            (86_400 * NANOS_PER_SECOND, "d"),
            (3_600 * NANOS_PER_SECOND, "h"),
            (60 * NANOS_PER_SECOND, "m"),
            (NANOS_PER_SECOND, "s"),
            (1_000_000, "ms"),
        ];
        for (unit, suffix) in UNITS {
            if self.nanos % unit == 0 {
                return write!(f, "{}{suffix}", self.nanos / unit);
            }
        }
        write!(f, "{}ns", self.nanos)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_unit() {
        let nanos = |t: &str| Duration::parse(t).map(Duration::as_nanos);
        assert_eq!(nanos("500ms"), Ok(500_000_000));
        assert_eq!(nanos("1s"), Ok(NANOS_PER_SECOND));
        assert_eq!(nanos("1m"), Ok(60 * NANOS_PER_SECOND));
        assert_eq!(nanos("24h"), Ok(86_400 * NANOS_PER_SECOND));
        assert_eq!(nanos("7d"), Ok(7 * 86_400 * NANOS_PER_SECOND));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        for text in ["500ms", "90s", "1m", "36h", "7d"] {
            assert_eq!(Duration::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_zero_missing_units_signs_and_overflow() {
        for bad in ["0s", "1", "s", "", "-1s", "1.5s", "1 s", "1sec", "99999999999999999999d", "367d"] {
            assert!(Duration::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
