//! Object keys: the key template (checked when the config is read) and the calendar of the
//! hours objects are cut at.
//!
//! The default template puts objects under Hive-style partitions of their records' receive
//! hour in UTC, which Athena (partition projection) and Glue crawlers read as the columns
//! `dt` and `hr`:
//!
//! ```text
//! {prefix}/dt={dt}/hr={hr}/{gateway}-{first_seq}-{last_seq}.{ext}
//! ```
//!
//! A key is a function of the object's records only (route, hour, first and last sequence
//! number), so an object uploaded again after a crash lands on the same key. No I/O, no clock.

/// The default key template.
pub(crate) const DEFAULT_TEMPLATE: &str =
    "{prefix}/dt={dt}/hr={hr}/{gateway}-{first_seq}-{last_seq}.{ext}";

/// The fields a template may name.
const FIELDS: &[&str] = &[
    "prefix",
    "route",
    "gateway",
    "dt",
    "hr",
    "year",
    "month",
    "day",
    "first_seq",
    "last_seq",
    "ext",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(&'static str),
}

/// A checked key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    text: String,
    pieces: Vec<Piece>,
}

/// What one object's key is made of.
pub(crate) struct KeyFields<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) route: &'a str,
    pub(crate) gateway: &'a str,
    /// Any time in the object's hour (ms since the Unix epoch, UTC).
    pub(crate) hour_ms: u64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) ext: &'a str,
}

impl KeyTemplate {
    /// Parses `text`; says which field is unknown or what is missing.
    pub(crate) fn parse(text: &str) -> Result<KeyTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{{` at `{}` is not closed", &rest[open..]));
            };
            let name = &rest[open + 1..open + close];
            let Some(field) = FIELDS.iter().find(|f| **f == name) else {
                return Err(format!(
                    "unknown field `{{{name}}}` (known: {})",
                    FIELDS
                        .iter()
                        .map(|f| format!("{{{f}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            pieces.push(Piece::Field(field));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`}}` in `{rest}` has no `{{`"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        // Two objects of one route never share a first record: with it the keys are unique.
        if !pieces.contains(&Piece::Field("first_seq")) {
            return Err("must contain {first_seq}, or two objects could get one key".into());
        }
        Ok(KeyTemplate {
            text: text.to_string(),
            pieces,
        })
    }

    /// The template as written.
    pub(crate) fn source(&self) -> &str {
        &self.text
    }

    /// The key of one object: the template filled in, empty path segments (an empty prefix)
    /// left out.
    pub(crate) fn render(&self, f: &KeyFields<'_>) -> String {
        let (year, month, day) = civil_date(f.hour_ms);
        let hour = (f.hour_ms / 3_600_000) % 24;
        let mut key = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => key.push_str(t),
                Piece::Field(name) => match *name {
                    "prefix" => key.push_str(f.prefix),
                    "route" => key.push_str(f.route),
                    "gateway" => key.push_str(f.gateway),
                    "dt" => key.push_str(&format!("{year:04}-{month:02}-{day:02}")),
                    "hr" => key.push_str(&format!("{hour:02}")),
                    "year" => key.push_str(&format!("{year:04}")),
                    "month" => key.push_str(&format!("{month:02}")),
                    "day" => key.push_str(&format!("{day:02}")),
                    "first_seq" => key.push_str(&f.first_seq.to_string()),
                    "last_seq" => key.push_str(&f.last_seq.to_string()),
                    "ext" => key.push_str(f.ext),
                    _ => unreachable!("fields are checked at parse"),
                },
            }
        }
        key.split('/')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The UTC calendar date (year, month, day) of `ms` since the Unix epoch.
pub(crate) fn civil_date(ms: u64) -> (i64, u32, u32) {
    // Days to civil date, proleptic Gregorian (the algorithm of Howard Hinnant's
    // `civil_from_days`, public domain).
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The start of the UTC hour holding `ms`.
pub(crate) fn hour_start(ms: u64) -> u64 {
    ms - ms % 3_600_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(hour_ms: u64) -> KeyFields<'static> {
        KeyFields {
            prefix: "telemetry",
            route: "r",
            gateway: "gw-1",
            hour_ms,
            first_seq: 17,
            last_seq: 4242,
            ext: "ndjson.zst",
        }
    }

    #[test]
    fn the_default_key_is_hive_partitioned_by_the_utc_hour() {
        let t = KeyTemplate::parse(DEFAULT_TEMPLATE).unwrap();
        // 2026-12-03T13:59:59.999Z
        let ms = 1_796_306_399_999;
        assert_eq!(
            t.render(&fields(ms)),
            "telemetry/dt=2026-12-03/hr=13/gw-1-17-4242.ndjson.zst"
        );
        // An empty prefix leaves no empty segment.
        let key = t.render(&KeyFields {
            prefix: "",
            ..fields(ms + 1)
        });
        assert_eq!(key, "dt=2026-12-03/hr=14/gw-1-17-4242.ndjson.zst");
    }

    #[test]
    fn dates_are_right_across_months_leap_days_and_years() {
        let day = 86_400_000;
        assert_eq!(civil_date(0), (1970, 1, 1));
        // 2024-02-29 and the day after.
        assert_eq!(civil_date(19_782 * day), (2024, 2, 29));
        assert_eq!(civil_date(19_783 * day), (2024, 3, 1));
        assert_eq!(civil_date(20_454 * day - 1), (2025, 12, 31));
        assert_eq!(civil_date(20_454 * day), (2026, 1, 1));
        assert_eq!(hour_start(3_600_000 * 5 + 42), 3_600_000 * 5);
    }

    #[test]
    fn a_template_with_an_unknown_field_or_without_first_seq_is_refused() {
        let e = KeyTemplate::parse("{prefix}/{date}/{first_seq}").unwrap_err();
        assert!(e.contains("unknown field `{date}`"), "{e}");
        let e = KeyTemplate::parse("{prefix}/{dt}/{gateway}.json").unwrap_err();
        assert!(e.contains("{first_seq}"), "{e}");
        assert!(KeyTemplate::parse("{prefix/{first_seq}").is_err());
        let t = KeyTemplate::parse("y={year}/m={month}/d={day}/{route}-{first_seq}").unwrap();
        assert_eq!(t.render(&fields(0)), "y=1970/m=01/d=01/r-17");
    }
}
