//! Query results: [`Rows`], [`Row`] and the conversions out of [`Value`].

use crate::Value;
use crate::bindings::exactly::handler::types as wit_types;
use crate::tx::DbError;

/// The rows a query returned, with their column names.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

/// One row of [`Rows`]; read its columns with [`Row::get`].
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl Rows {
    pub(crate) fn from_wit(rows: wit_types::Rows) -> Self {
        Rows {
            columns: rows.columns,
            rows: rows.rows,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The column names, in the order of the select list.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The first row: what a lookup by key or an `INSERT … RETURNING` of one
    /// row needs.
    pub fn first(&self) -> Option<Row<'_>> {
        self.get(0)
    }

    pub fn get(&self, index: usize) -> Option<Row<'_>> {
        self.rows.get(index).map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    pub fn iter(&self) -> RowsIter<'_> {
        RowsIter {
            columns: &self.columns,
            rows: self.rows.iter(),
        }
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = Row<'a>;
    type IntoIter = RowsIter<'a>;

    fn into_iter(self) -> RowsIter<'a> {
        self.iter()
    }
}

/// Iterator over the [`Row`]s of [`Rows`], from [`Rows::iter`].
#[derive(Debug, Clone)]
pub struct RowsIter<'a> {
    columns: &'a [String],
    rows: std::slice::Iter<'a, Vec<Value>>,
}

impl<'a> Iterator for RowsIter<'a> {
    type Item = Row<'a>;

    fn next(&mut self) -> Option<Row<'a>> {
        let columns = self.columns;
        self.rows.next().map(|values| Row { columns, values })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.rows.size_hint()
    }
}

impl ExactSizeIterator for RowsIter<'_> {}

impl<'a> Row<'a> {
    /// Reads one column, by name (`row.get::<String>("status")`) or by
    /// position from 0 (`row.get::<i64>(0)`).
    ///
    /// Fails with [`DbErrorKind::Conversion`](crate::DbErrorKind::Conversion)
    /// when there is no such column or its value does not convert to `T`;
    /// a SQL `NULL` converts only to `Option<T>`. Such an error is the
    /// handler's own: no statement failed and the transaction is intact.
    pub fn get<T: FromValue>(&self, column: impl ColumnIndex) -> Result<T, DbError> {
        let index = column.column_index(self.columns)?;
        let value = self.values.get(index).ok_or_else(|| {
            DbError::conversion(format!("the row has no value for column {index}"))
        })?;
        T::from_value(value).map_err(|problem| {
            DbError::conversion(format!(
                "column {:?}: {problem}",
                self.columns.get(index).map_or("?", String::as_str)
            ))
        })
    }

    /// The raw values, in column order.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }
}

/// How [`Row::get`] finds a column: by name (`&str`, `String`) or position
/// (`usize`).
pub trait ColumnIndex {
    fn column_index(&self, columns: &[String]) -> Result<usize, DbError>;
}

impl ColumnIndex for &str {
    fn column_index(&self, columns: &[String]) -> Result<usize, DbError> {
        columns.iter().position(|name| name == self).ok_or_else(|| {
            DbError::conversion(format!(
                "no column named {self:?} (the columns are {columns:?})"
            ))
        })
    }
}

impl ColumnIndex for String {
    fn column_index(&self, columns: &[String]) -> Result<usize, DbError> {
        self.as_str().column_index(columns)
    }
}

impl ColumnIndex for usize {
    fn column_index(&self, columns: &[String]) -> Result<usize, DbError> {
        if *self < columns.len() {
            Ok(*self)
        } else {
            Err(DbError::conversion(format!(
                "no column {self}: the query returned {} columns",
                columns.len()
            )))
        }
    }
}

/// A Rust type a column value converts into.
///
/// The conversions are lenient where the two backends disagree on how a
/// value is stored, so one handler reads the same columns on both:
///
/// | type | accepts |
/// |---|---|
/// | `String` | text, numeric and timestamp (as text), JSON (its text), and integers or reals (their decimal text: SQLite keeps `numeric` columns as numbers) |
/// | `i64`, `i32` | integers, and numerics that are whole numbers in range |
/// | `f64` | reals, integers, numerics |
/// | `bool` | booleans, and the integers 0 and 1 (SQLite has no boolean) |
/// | `Vec<u8>` | bytes |
/// | `serde_json::Value` | JSON, and text that parses as JSON (SQLite keeps JSON as text) |
/// | `Option<T>` | `NULL` as `None`, anything `T` accepts as `Some` |
/// | [`Value`] | anything, as is |
pub trait FromValue: Sized {
    /// Converts, or says in a few words why not (the caller adds the
    /// column's name).
    fn from_value(value: &Value) -> Result<Self, String>;
}

/// Names a value's kind for error messages, without its content.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Boolean(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a real",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Json(_) => "JSON",
        Value::Numeric(_) => "a numeric",
        Value::Timestamp(_) => "a timestamp",
    }
}

fn mismatch(value: &Value, wanted: &str) -> String {
    match value {
        Value::Null => format!("the value is NULL; read it as Option<{wanted}>"),
        other => format!("cannot read {} as {wanted}", describe(other)),
    }
}

impl FromValue for Value {
    fn from_value(value: &Value) -> Result<Self, String> {
        Ok(value.clone())
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Text(text)
            | Value::Numeric(text)
            | Value::Timestamp(text)
            | Value::Json(text) => Ok(text.clone()),
            Value::Int(number) => Ok(number.to_string()),
            Value::Float(number) => Ok(number.to_string()),
            other => Err(mismatch(other, "String")),
        }
    }
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Int(number) => Ok(*number),
            Value::Numeric(text) => text
                .parse()
                .map_err(|_| format!("the numeric {text} is not a whole number that fits i64")),
            other => Err(mismatch(other, "i64")),
        }
    }
}

impl FromValue for i32 {
    fn from_value(value: &Value) -> Result<Self, String> {
        let number = i64::from_value(value).map_err(|_| mismatch(value, "i32"))?;
        i32::try_from(number).map_err(|_| format!("{number} does not fit i32"))
    }
}

impl FromValue for f64 {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Float(number) => Ok(*number),
            // Precision loss above 2^53 is what asking for an f64 means.
            Value::Int(number) => Ok(*number as f64),
            Value::Numeric(text) => text
                .parse()
                .map_err(|_| format!("the numeric {text} is not a number")),
            other => Err(mismatch(other, "f64")),
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Boolean(flag) => Ok(*flag),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(mismatch(other, "bool")),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Bytes(bytes) => Ok(bytes.clone()),
            other => Err(mismatch(other, "Vec<u8>")),
        }
    }
}

impl FromValue for serde_json::Value {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Json(text) | Value::Text(text) => serde_json::from_str(text)
                .map_err(|error| format!("the value is not valid JSON: {error}")),
            other => Err(mismatch(other, "serde_json::Value")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Rows {
        Rows {
            columns: vec!["name".into(), "total".into(), "note".into(), "paid".into()],
            rows: vec![vec![
                Value::Text("o-1".into()),
                Value::Numeric("99.95".into()),
                Value::Null,
                Value::Int(1),
            ]],
        }
    }

    #[test]
    fn reads_columns_by_name_and_position() {
        let rows = rows();
        let row = rows.first().unwrap();
        assert_eq!(row.get::<String>("name").unwrap(), "o-1");
        assert_eq!(row.get::<String>(1).unwrap(), "99.95");
        assert_eq!(row.get::<f64>("total").unwrap(), 99.95);
        assert_eq!(row.get::<Option<String>>("note").unwrap(), None);
        assert!(row.get::<bool>("paid").unwrap());
        assert_eq!(rows.iter().count(), 1);
        assert_eq!((&rows).into_iter().len(), 1);
    }

    #[test]
    fn conversion_errors_name_the_column() {
        let rows = rows();
        let row = rows.first().unwrap();
        let error = row.get::<String>("note").unwrap_err();
        assert_eq!(error.kind(), crate::DbErrorKind::Conversion);
        assert!(error.message().contains("\"note\""), "{error}");
        assert!(error.message().contains("Option<String>"), "{error}");
        assert!(row.get::<i64>("missing").is_err());
        assert!(row.get::<i64>(9).is_err());
        assert!(row.get::<i64>("total").is_err());
    }

    #[test]
    fn numbers_read_as_text_and_json_from_text() {
        assert_eq!(String::from_value(&Value::Int(100)).unwrap(), "100");
        assert_eq!(String::from_value(&Value::Float(99.95)).unwrap(), "99.95");
        assert_eq!(i32::from_value(&Value::Numeric("7".into())).unwrap(), 7);
        assert!(i32::from_value(&Value::Int(1 << 40)).is_err());
        assert_eq!(
            serde_json::Value::from_value(&Value::Text("{\"a\":1}".into())).unwrap(),
            serde_json::json!({"a": 1})
        );
    }
}
