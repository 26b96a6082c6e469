-- Dead letters have a quota (`--dead-letter-quota`): each row records the
-- bytes it stores (data, extensions as stored, attribute text), computed by
-- the host. Rows stored before this migration get the same count here.
-- The partial index holds the sizes of the rows not yet replayed, the ones
-- the quota counts, so the quota's SUM reads the index alone.
ALTER TABLE exactly_dead_letters ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE exactly_dead_letters SET stored_bytes =
    coalesce(length(CAST(data AS BLOB)), 0) + length(CAST(extensions AS BLOB)) + length(CAST(source AS BLOB))
    + length(CAST(id AS BLOB)) + length(CAST(type AS BLOB)) + coalesce(length(CAST(subject AS BLOB)), 0)
    + coalesce(length(CAST(time AS BLOB)), 0) + coalesce(length(CAST(datacontenttype AS BLOB)), 0)
    + coalesce(length(CAST(dataschema AS BLOB)), 0);
CREATE INDEX exactly_dead_letters_pending_bytes ON exactly_dead_letters (stored_bytes) WHERE replayed_at IS NULL;
