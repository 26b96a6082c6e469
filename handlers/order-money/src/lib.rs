//! Money in the order handlers: a non-negative amount that fits
//! `numeric(12,2)`, read from an event's JSON (a number or a decimal
//! string) and bound as an exact `numeric`. Shared by `order-created` and
//! `order-payment`, which store and compare the same amounts.

use exactly_guest::{Error, Value};
use serde_json::Map;

/// The amount in `fields[name]`: `None` when absent or null, a permanent
/// error (the event is bad) when it is not an exact non-negative amount.
pub fn amount(fields: &Map<String, serde_json::Value>, name: &str) -> Result<Option<Cents>, Error> {
    let text = match fields.get(name) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(number)) => number.to_string(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => {
            return Err(Error::permanent(format!(
                "field `{name}` must be a number or a decimal string, got {other}"
            )));
        }
    };
    Cents::parse(&text)
        .map(Some)
        .map_err(|problem| Error::permanent(format!("field `{name}`: {text:?} {problem}")))
}

/// [`amount`], which must be there.
pub fn required_amount(fields: &Map<String, serde_json::Value>, name: &str) -> Result<Cents, Error> {
    amount(fields, name)?.ok_or_else(|| Error::permanent(format!("field `{name}` is missing")))
}

/// A non-negative amount of money that fits `numeric(12,2)`, in hundredths.
///
/// Kept as an integer so that "same total" means the same number whatever
/// its spelling (`100`, `100.0`, `"100.00"`), and bound as an exact
/// `numeric` so no digit is lost to floating point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cents(i64);

impl Cents {
    /// The largest value of `numeric(12,2)`: 10 digits before the point.
    const MAX_WHOLE_DIGITS: usize = 10;

    /// Parses `123`, `123.4`, `123.45` (and `123.450`: trailing zeros are
    /// not precision). Returns what is wrong, to be prefixed with the value.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let fraction = fraction.trim_end_matches('0');
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err("is not a non-negative decimal number");
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err("is not a non-negative decimal number");
        }
        if fraction.len() > 2 {
            return Err("has more than 2 decimal places");
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > Self::MAX_WHOLE_DIGITS {
            return Err("is too large (at most 10 digits before the decimal point)");
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "is not a number")?
        };
        let hundredths: i64 = format!("{fraction:0<2}")
            .parse()
            .map_err(|_| "is not a number")?;
        Ok(Cents(whole * 100 + hundredths))
    }

    pub fn to_value(self) -> Value {
        Value::numeric(self.to_string())
    }
}

impl std::fmt::Display for Cents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_parse_to_exact_cents() {
        for (text, cents) in [
            ("99.95", 9995),
            ("100", 10000),
            ("100.0", 10000),
            ("100.00", 10000),
            ("0.5", 50),
            ("0012.30", 1230),
            ("9999999999.99", 999_999_999_999),
        ] {
            assert_eq!(Cents::parse(text), Ok(Cents(cents)), "{text}");
        }
        for text in [
            "",
            ".5",
            "-1",
            "1e3",
            "99.955",
            "12345678901",
            "1.2.3",
            "abc",
            " 1",
        ] {
            assert!(Cents::parse(text).is_err(), "{text}");
        }
        assert_eq!(Cents(9995).to_string(), "99.95");
        assert_eq!(Cents(5).to_string(), "0.05");
    }
}
