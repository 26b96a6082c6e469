-- Dead letters have a quota (`--dead-letter-quota`): each row records the
-- bytes it stores (data, extensions as stored, attribute text), computed by
-- the host. Rows stored before this migration get the same count here.
-- The partial index holds the sizes of the rows not yet replayed, the ones
-- the quota counts, so the quota's SUM reads the index alone.
ALTER TABLE exactly.dead_letters ADD COLUMN stored_bytes bigint NOT NULL DEFAULT 0;
UPDATE exactly.dead_letters SET stored_bytes =
    coalesce(octet_length(data), 0) + octet_length(extensions::text) + octet_length(source) + octet_length(id)
    + octet_length(type) + coalesce(octet_length(subject), 0) + coalesce(octet_length(time), 0)
    + coalesce(octet_length(datacontenttype), 0) + coalesce(octet_length(dataschema), 0);
CREATE INDEX dead_letters_pending_bytes ON exactly.dead_letters (stored_bytes) WHERE replayed_at IS NULL;
