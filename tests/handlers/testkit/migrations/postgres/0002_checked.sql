-- test.insert writes here and test.read-as-integer reads `note` as an
-- integer (tests/tests/error_classes.rs): a not-null and a check
-- constraint, a primary key, a text column.
CREATE TABLE test_checked (
    k    TEXT    NOT NULL PRIMARY KEY,
    n    INTEGER NOT NULL CHECK (n >= 0),
    note TEXT
);
