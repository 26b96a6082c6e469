-- The per-event transaction of one order.created event, as a pgbench
-- script: the same rows written (claim, the handler's two inserts, the
-- answer), no wasm and no HTTP. These are the plain statements exactly ran
-- before the database wall; on PostgreSQL it now claims and answers through
-- exactly.claim_event / exactly.store_answer and resets the session
-- (README, "Performance"). Its TPS is the database's ceiling for the work.
-- (No colons in literals: pgbench would read `:name` as a variable.)
\set n random(1, 2000000000)
BEGIN;
INSERT INTO exactly.processed_events (source, id, type, handler, payload_sha256)
  VALUES ('urn-pgbench', (CAST(:client_id AS text) || '-' || CAST(:n AS text)), 'order.created', 'order-created', '\x00')
  ON CONFLICT (source, id) DO NOTHING;
INSERT INTO orders (order_id, customer_id, total, status)
  VALUES ('pgb-' || (CAST(:client_id AS text) || '-' || CAST(:n AS text)), 'c-1', 12.50, 'pending')
  ON CONFLICT (order_id) DO NOTHING RETURNING order_id, status;
INSERT INTO order_events (order_id, kind, event_source, event_id)
  VALUES ('pgb-' || (CAST(:client_id AS text) || '-' || CAST(:n AS text)), 'created', 'urn-pgbench', (CAST(:client_id AS text) || '-' || CAST(:n AS text)));
UPDATE exactly.processed_events SET status = 202, reply = NULL, result = '{"status":"created"}'
  WHERE source = 'urn-pgbench' AND id = (CAST(:client_id AS text) || '-' || CAST(:n AS text));
COMMIT;
