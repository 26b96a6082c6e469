-- Dead letters: events the Knative dispatcher gave up on, as it posted them
-- to `POST /dead-letter`. A row is written only when the dead letter's
-- transaction commits, and answered 202 only after that.
--
-- Dedup: Knative delivers to the dead-letter sink at least once, so one
-- dead letter may arrive several times. `dedup_key` is
-- sha256(source, id, payload, knativeerrordest) (computed by the host); it is
-- unique among rows not yet replayed, so a redelivery only bumps
-- `deliveries`, while the same event dead-lettered again after a successful
-- replay gets a row of its own.
CREATE TABLE exactly_dead_letters (
    dead_letter_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    source             TEXT    NOT NULL,
    id                 TEXT    NOT NULL,
    type               TEXT    NOT NULL,
    subject            TEXT,
    time               TEXT,
    datacontenttype    TEXT,
    dataschema         TEXT,
    -- Every extension as delivered, knativeerror* included: {"name": "value"}.
    extensions         TEXT    NOT NULL,
    data               BLOB,
    -- Knative's extensions, as received (error_data is base64).
    error_code         TEXT,
    error_data         TEXT,
    error_dest         TEXT,
    dedup_key          BLOB    NOT NULL,
    received_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_received_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    deliveries         INTEGER NOT NULL DEFAULT 1,
    -- `exactly dlq replay`: the last attempt, and when one was accepted (2xx).
    replay_attempts    INTEGER NOT NULL DEFAULT 0,
    last_replay_at     TEXT,
    last_replay_to     TEXT,
    last_replay_status INTEGER,
    last_replay_error  TEXT,
    replayed_at        TEXT
);
CREATE UNIQUE INDEX exactly_dead_letters_pending ON exactly_dead_letters (dedup_key) WHERE replayed_at IS NULL;
CREATE INDEX exactly_dead_letters_received_at ON exactly_dead_letters (received_at);
