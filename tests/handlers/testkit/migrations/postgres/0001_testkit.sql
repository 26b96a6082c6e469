-- Tables of the testkit handler (end-to-end tests only).

-- One row per committed run: how the tests count handler runs.
CREATE TABLE test_effects (
    event_source TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    note         TEXT
);

-- Switches the tests flip between deliveries (test.flaky reads 'fail').
CREATE TABLE test_flags (
    name TEXT NOT NULL PRIMARY KEY
);

-- test.swallow inserts its event id here twice.
CREATE TABLE test_unique (
    k TEXT NOT NULL PRIMARY KEY
);
