//! SQL parameters: [`Value`], its conversions and the [`params!`](crate::params) macro.

use serde::Serialize;

use crate::Error;
pub use crate::bindings::exactly::handler::types::Value;

impl Value {
    /// An exact decimal, as text: `Value::numeric("12.30")`.
    ///
    /// Use it for money and other `numeric` columns so no digit is lost to
    /// floating point on the way. The host checks that the text is a
    /// decimal number of at most 1,000 characters, then binds it as
    /// `numeric` on PostgreSQL and as that text on SQLite (where a column
    /// of NUMERIC affinity stores it as a number). Text that is not a
    /// decimal number is a conversion error before the statement runs
    /// ([`DbErrorKind::Conversion`](crate::DbErrorKind::Conversion)), and
    /// it dooms the event's transaction like a failed statement.
    pub fn numeric(decimal: impl Into<String>) -> Self {
        Value::Numeric(decimal.into())
    }

    /// A point in time, as RFC 3339 text: `Value::timestamp("2026-11-26T15:50:53Z")`.
    pub fn timestamp(rfc3339: impl Into<String>) -> Self {
        Value::Timestamp(rfc3339.into())
    }

    /// A JSON document serialized from any `Serialize` value, bound as
    /// `jsonb`/`json` on PostgreSQL and as text on SQLite.
    ///
    /// Fails (permanently: the same data would fail again) only if `serde`
    /// cannot represent the value as JSON, e.g. a map with non-string keys.
    /// A `serde_json::Value` converts infallibly with `Value::from`.
    pub fn json(document: &impl Serialize) -> Result<Self, Error> {
        serde_json::to_string(document)
            .map(Value::Json)
            .map_err(|error| {
                Error::permanent(format!("cannot serialize a JSON parameter: {error}"))
            })
    }
}

impl From<&str> for Value {
    fn from(text: &str) -> Self {
        Value::Text(text.to_owned())
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Value::Text(text)
    }
}

impl From<&String> for Value {
    fn from(text: &String) -> Self {
        Value::Text(text.clone())
    }
}

impl From<i64> for Value {
    fn from(number: i64) -> Self {
        Value::Int(number)
    }
}

impl From<i32> for Value {
    fn from(number: i32) -> Self {
        Value::Int(number.into())
    }
}

impl From<u32> for Value {
    fn from(number: u32) -> Self {
        Value::Int(number.into())
    }
}

impl From<f64> for Value {
    fn from(number: f64) -> Self {
        Value::Float(number)
    }
}

impl From<bool> for Value {
    fn from(flag: bool) -> Self {
        Value::Boolean(flag)
    }
}

impl From<&[u8]> for Value {
    fn from(bytes: &[u8]) -> Self {
        Value::Bytes(bytes.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Value {
    fn from(bytes: &[u8; N]) -> Self {
        Value::Bytes(bytes.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    fn from(bytes: Vec<u8>) -> Self {
        Value::Bytes(bytes)
    }
}

impl From<serde_json::Value> for Value {
    fn from(document: serde_json::Value) -> Self {
        Value::Json(document.to_string())
    }
}

impl From<&serde_json::Value> for Value {
    fn from(document: &serde_json::Value) -> Self {
        Value::Json(document.to_string())
    }
}

impl From<&Value> for Value {
    fn from(value: &Value) -> Self {
        value.clone()
    }
}

/// `None` is SQL `NULL`.
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// Builds the parameter list of a statement: `params![a, b, c]` is a
/// `&[Value]` whose elements are `Value::from(a)`, … in order, matching
/// `$1, $2, $3`.
///
/// ```
/// use exactly_guest::{params, Value};
///
/// let note: Option<&str> = None;
/// let params = params!["o-1", 3, Value::numeric("12.30"), note];
/// assert_eq!(params[1], Value::Int(3));
/// assert_eq!(params[3], Value::Null);
/// assert!(params![].is_empty());
/// ```
#[macro_export]
macro_rules! params {
    () => {
        &[] as &[$crate::Value]
    };
    ($($value:expr),+ $(,)?) => {
        &[$($crate::Value::from($value)),+] as &[$crate::Value]
    };
}
