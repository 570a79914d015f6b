//! Human-friendly units in config files: byte sizes (`"512MiB"`, `"64KiB"`, `1048576`) and
//! durations (`"250ms"`, `"30s"`, `"5m"`, `"1h"`).
//!
//! Parsing happens inside serde deserialization, so a bad value is reported by the TOML parser
//! with its file line and field. This module never touches the filesystem.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// A size or a duration that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is not a size; write e.g. \"512MiB\", \"64KiB\" or 1048576")]
    NotASize(String),
    #[error("unknown size unit `{unit}` in `{text}`; use B, KB, KiB, MB, MiB, GB or GiB")]
    SizeUnit { unit: String, text: String },
    #[error("`{0}` is not a duration; write e.g. \"250ms\", \"30s\" or \"5m\"")]
    NotADuration(String),
    #[error("duration `{0}` needs a unit: ms, s, m, h or d")]
    NoDurationUnit(String),
    #[error("unknown duration unit `{unit}` in `{text}`; use ms, s, m, h or d")]
    DurationUnit { unit: String, text: String },
    #[error("{what} `{text}` is out of range")]
    OutOfRange { what: &'static str, text: String },
}

/// A size in bytes, written as an integer or a string with a unit (B, KB, KiB, MB, MiB, GB, GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ByteSize(pub u64);

impl ByteSize {
    pub(crate) fn parse(text: &str) -> Result<ByteSize, UnitError> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .replace('_', "")
            .parse()
            .map_err(|_| UnitError::NotASize(text.to_string()))?;
        let multiplier: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(UnitError::SizeUnit {
                    unit: other.to_string(),
                    text: text.to_string(),
                })
            }
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(UnitError::OutOfRange {
                what: "size",
                text: text.to_string(),
            });
        }
        Ok(ByteSize(bytes.round() as u64))
    }

    pub(crate) fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b % (1 << 30) == 0 {
            write!(f, "{}GiB", b >> 30)
        } else if b >= 1 << 20 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b % (1 << 10) == 0 {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte size such as \"512MiB\" or an integer number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A duration written as a string with a unit: ms, s, m, h, d (e.g. "250ms", "30s").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<HumanDuration, UnitError> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| UnitError::NotADuration(text.to_string()))?;
        let seconds = match unit.trim() {
            "ms" => number / 1000.0,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            "d" => number * 86400.0,
            "" => return Err(UnitError::NoDurationUnit(text.to_string())),
            other => {
                return Err(UnitError::DurationUnit {
                    unit: other.to_string(),
                    text: text.to_string(),
                })
            }
        };
        Duration::try_from_secs_f64(seconds)
            .map(HumanDuration)
            .map_err(|_| UnitError::OutOfRange {
                what: "duration",
                text: text.to_string(),
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumanDuration::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("512MiB").unwrap().bytes(), 512 << 20);
        assert_eq!(ByteSize::parse("64 KiB").unwrap().bytes(), 64 << 10);
        assert_eq!(ByteSize::parse("1.5KB").unwrap().bytes(), 1500);
        assert_eq!(ByteSize::parse("1_000").unwrap().bytes(), 1000);
        assert!(ByteSize::parse("12 parsecs")
            .unwrap_err()
            .to_string()
            .contains("unknown size unit"));
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            HumanDuration::parse("2m").unwrap().0,
            Duration::from_secs(120)
        );
        assert!(HumanDuration::parse("30")
            .unwrap_err()
            .to_string()
            .contains("needs a unit"));
        assert!(HumanDuration::parse("3 fortnights").is_err());
    }
}
