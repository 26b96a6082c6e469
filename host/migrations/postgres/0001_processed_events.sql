-- One row per committed event: its claim and the answer given for it.
-- A row exists if and only if the event's transaction committed.
CREATE TABLE exactly.processed_events (
    source         text        NOT NULL,
    id             text        NOT NULL,
    type           text        NOT NULL,
    handler        text        NOT NULL,
    payload_sha256 bytea       NOT NULL,
    status         smallint,
    reply          jsonb,
    result         jsonb,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, id)
);
CREATE INDEX processed_events_processed_at ON exactly.processed_events (processed_at);
