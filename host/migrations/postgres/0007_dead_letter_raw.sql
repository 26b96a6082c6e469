-- A dead letter the sink cannot take apart as a valid CloudEvent is still
-- stored (a 4xx would make the Knative dispatcher drop it): `problem` says
-- why it could not be validated, `raw_headers` holds the request headers
-- that shape an event (`ce-*`, Content-Type, Content-Encoding) exactly as
-- received, one `name: value` line each (CRLF-terminated), and `data` the
-- body as received. Both are NULL for a dead letter stored as an event.
ALTER TABLE exactly.dead_letters ADD COLUMN problem text, ADD COLUMN raw_headers bytea;
