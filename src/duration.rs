//! Durations as people write them on the command line and in the config:
//! `90s`, `10m`, `1h`, or a sum such as `1h30m`.

use std::time::Duration;

/// Why a duration string was rejected; the message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: expected a whole number with a unit s, m or h, such as 90s, 10m or 1h"
)]
pub struct ParseError {
    input: String,
}

/// Parses `90s`, `10m`, `1h` and sums of them (`1h30m`).
pub fn parse(input: &str) -> Result<Duration, ParseError> {
    let error = || ParseError {
        input: input.to_owned(),
    };
    let text = input.trim();
    if text.is_empty() {
        return Err(error());
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return Err(error());
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| error())?;
        let mut chars = tail.chars();
        let unit = match chars.next() {
            Some('s') => 1,
            Some('m') => 60,
            Some('h') => 3600,
            _ => return Err(error()),
        };
        total = number
            .checked_mul(unit)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or_else(error)?;
        rest = chars.as_str();
    }
    Ok(Duration::from_secs(total))
}

/// Formats whole seconds the way [`parse`] reads them back (`1h`, `10m`, `90s`).
pub fn format(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0 => "0s".to_owned(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_unit_and_sums() {
        for (text, seconds) in [
            ("90s", 90),
            ("10m", 600),
            ("1h", 3600),
            ("1h30m", 5400),
            ("0s", 0),
            (" 60s ", 60),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(seconds)), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for text in [
            "",
            "60",
            "s",
            "1d",
            "1.5h",
            "-5s",
            "1h 30m",
            "99999999999s",
            "1hh",
        ] {
            let error = parse(text).unwrap_err();
            assert!(
                error.to_string().contains("expected a whole number"),
                "{text}"
            );
        }
    }

    #[test]
    fn format_round_trips() {
        for seconds in [0, 59, 60, 90, 600, 3600, 5400] {
            let duration = Duration::from_secs(seconds);
            assert_eq!(parse(&format(duration)), Ok(duration));
        }
    }
}
