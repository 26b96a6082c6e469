-- One row per committed event: its claim and the answer given for it.
-- A row exists if and only if the event's transaction committed.
CREATE TABLE exactly_processed_events (
    source         TEXT    NOT NULL,
    id             TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    handler        TEXT    NOT NULL,
    payload_sha256 BLOB    NOT NULL,
    status         INTEGER,
    reply          TEXT,
    result         TEXT,
    processed_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE INDEX exactly_processed_events_processed_at ON exactly_processed_events (processed_at);
