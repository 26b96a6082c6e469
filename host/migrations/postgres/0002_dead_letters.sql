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
CREATE TABLE exactly.dead_letters (
    dead_letter_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source             text        NOT NULL,
    id                 text        NOT NULL,
    type               text        NOT NULL,
    subject            text,
    time               text,
    datacontenttype    text,
    dataschema         text,
    -- Every extension as delivered, knativeerror* included: {"name": "value"}.
    extensions         jsonb       NOT NULL,
    data               bytea,
    -- Knative's extensions, as received (error_data is base64).
    error_code         text,
    error_data         text,
    error_dest         text,
    dedup_key          bytea       NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    last_received_at   timestamptz NOT NULL DEFAULT now(),
    deliveries         integer     NOT NULL DEFAULT 1,
    -- `exactly dlq replay`: the last attempt, and when one was accepted (2xx).
    replay_attempts    integer     NOT NULL DEFAULT 0,
    last_replay_at     timestamptz,
    last_replay_to     text,
    last_replay_status smallint,
    last_replay_error  text,
    replayed_at        timestamptz
);
CREATE UNIQUE INDEX dead_letters_pending ON exactly.dead_letters (dedup_key) WHERE replayed_at IS NULL;
CREATE INDEX dead_letters_received_at ON exactly.dead_letters (received_at);
