//! `metadata.creationTimestamp` as an instant that orders like istiod orders it.
//!
//! Kubernetes writes RFC 3339 in UTC with whole seconds (`2024-05-01T10:00:00Z`); other offsets
//! and fractions are accepted too, so that hand-written files compare correctly.

use std::fmt;

use serde::{Serialize, Serializer};

/// An instant in UTC, ordered by time: seconds since the Unix epoch plus nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    seconds: i64,
    nanos: u32,
}

impl Timestamp {
    /// The instant `seconds` after 1970-01-01T00:00:00Z (negative: before it).
    pub fn from_unix(seconds: i64) -> Self {
        Self { seconds, nanos: 0 }
    }

    /// Seconds since the Unix epoch, rounded down.
    pub fn unix_seconds(&self) -> i64 {
        self.seconds
    }

    /// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
    /// Returns `None` for anything else, including impossible dates such as February 30.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
            return None;
        }
        if !matches!(b[10], b'T' | b't') {
            return None;
        }
        let year = digits(b, 0, 4)?;
        let month = digits(b, 5, 2)?;
        let day = digits(b, 8, 2)?;
        let hour = digits(b, 11, 2)?;
        let minute = digits(b, 14, 2)?;
        let second = digits(b, 17, 2)?;
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return None;
        }
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }

        // Fraction: any number of digits, kept to nanosecond precision.
        let mut pos = 19;
        let mut nanos: u32 = 0;
        if b.get(pos) == Some(&b'.') {
            pos += 1;
            let start = pos;
            while b.get(pos).is_some_and(u8::is_ascii_digit) {
                if pos - start < 9 {
                    nanos = nanos * 10 + u32::from(b[pos] - b'0');
                }
                pos += 1;
            }
            let kept = (pos - start).min(9);
            if kept == 0 {
                return None;
            }
            nanos *= 10u32.pow(9 - kept as u32);
        }

        let offset_seconds = match &b[pos..] {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let hours = digits(b, pos + 1, 2)?;
                let minutes = digits(b, pos + 4, 2)?;
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = i64::from(hours * 3600 + minutes * 60);
                if *sign == b'-' { -offset } else { offset }
            }
            _ => return None,
        };

        let days = days_from_civil(i64::from(year), month, day);
        let local = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
        Some(Self {
            seconds: local - offset_seconds,
            nanos,
        })
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, with a fraction only when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.seconds.div_euclid(86_400);
        let secs = self.seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        if self.nanos != 0 {
            let frac = format!("{:09}", self.nanos);
            write!(f, ".{}", frac.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The number made of `len` ASCII digits at `start`, or `None` if any is not a digit.
fn digits(b: &[u8], start: usize, len: usize) -> Option<u32> {
    let slice = b.get(start..start + len)?;
    slice.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date. Counts in 400-year eras (146 097 days
/// each) with the year starting in March, so that the leap day is the last day of a year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_timestamps() {
        let t = Timestamp::parse_rfc3339("1970-01-02T00:00:01Z").expect("valid");
        assert_eq!(t.unix_seconds(), 86_401);
        // 2000-03-01 follows a leap day: 30 years of days plus the 7 leap days before 2000,
        // plus January (31) and a 29-day February.
        let t = Timestamp::parse_rfc3339("2000-03-01T00:00:00Z").expect("valid");
        assert_eq!(t.unix_seconds(), (30 * 365 + 7 + 31 + 29) * 86_400);
    }

    #[test]
    fn offsets_and_fractions_compare_as_instants() {
        let utc = Timestamp::parse_rfc3339("2024-05-01T10:00:00Z").expect("valid");
        let plus_two = Timestamp::parse_rfc3339("2024-05-01T12:00:00+02:00").expect("valid");
        assert_eq!(utc, plus_two);
        let later = Timestamp::parse_rfc3339("2024-05-01T10:00:00.5Z").expect("valid");
        assert!(utc < later);
        assert_eq!(later.to_string(), "2024-05-01T10:00:00.5Z");
        let west = Timestamp::parse_rfc3339("2024-05-01T09:30:00-01:00").expect("valid");
        assert!(west > utc);
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "1969-12-31T23:59:59Z",
            "2024-02-29T23:00:00Z",
            "0001-01-01T00:00:00Z",
        ] {
            let t = Timestamp::parse_rfc3339(text).expect("valid");
            assert_eq!(t.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed_or_impossible_times() {
        for text in [
            "",
            "2024-05-01",
            "2024-05-01 10:00:00Z",
            "2024-13-01T10:00:00Z",
            "2023-02-29T10:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00+0200",
            "2024-05-01T10:00:00Zjunk",
            "２０２４-05-01T10:00:00Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(text), None, "{text:?}");
        }
    }
}
