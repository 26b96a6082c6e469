-- The bookkeeping of 0003_wall.sql, at a fraction of its cost, behind the
-- same wall (README, "Performance"; SECURITY.md).
--
-- 0003 inserted the claim row first, updated it with the answer, and had a
-- deferred trigger refuse a COMMIT of a claim without answer. Now the
-- claim row is written once, complete, by `store_answer`, right before
-- COMMIT; until then nothing of the event is in `exactly.processed_events`,
-- so there is no half-done row to guard and no trigger to run:
--
-- * `claim_event` serializes the deliveries of one event on a row of
--   `exactly.in_flight` keyed by the event's proof (a table no handler may
--   read, write or lock; an advisory lock would not do: any role can read
--   the keys of held advisory locks in pg_locks and take them itself), then
--   reads whether the event was committed before. It returns the calling
--   transaction's id, or NULL for a committed event.
-- * `store_answer` inserts the row (and drops the in-flight mark), only in
--   the transaction whose id
--   `claim_event` returned (a bound parameter the handler never sees): a
--   handler that ends the event's transaction early leaves the host's
--   store to run in another transaction, which is refused.
-- * `reset_session` undoes what a handler's statements can leave in its
--   session; the host runs it with the event's COMMIT or ROLLBACK, in the
--   same round trip, and checks the count of the driver's statements it
--   returns against its statement cache.
-- * The proof is computed inside each PL/pgSQL function (cached plans),
--   not in a separate SQL function planned on every call:
--   sha256(key || sha256(sha256(source) || sha256(id))), as before.

DROP TRIGGER processed_events_answered ON exactly.processed_events;
DROP FUNCTION exactly.require_answer();
DROP FUNCTION exactly.claim_event(text, text, text, text, bytea, bytea);
DROP FUNCTION exactly.store_answer(text, text, bytea, smallint, text, text);
DROP FUNCTION exactly.event_proof(text, text);

-- One row per event whose delivery is being processed, keyed by its proof,
-- inserted and deleted by the same transaction: a second delivery's insert
-- waits for the first's transaction to end. UNLOGGED: it is never needed
-- after a crash, which ends every transaction that held a row.
CREATE UNLOGGED TABLE exactly.in_flight (
    proof bytea PRIMARY KEY
);
REVOKE ALL ON exactly.in_flight FROM PUBLIC;

-- Claims (source, id) for the calling transaction: waits (bounded by
-- lock_timeout) while another delivery of the event is in flight, then
-- returns this transaction's id (pg_current_xact_id) when the event has
-- not been committed, NULL when it has (read it with committed_answer).
CREATE FUNCTION exactly.claim_event(p_source text, p_id text, p_proof bytea)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The proof and the in-flight mark in one statement. ON CONFLICT DO
    -- UPDATE waits for a delivery in flight (bounded by lock_timeout), and
    -- takes over a mark a transaction ended early left committed.
    INSERT INTO exactly.in_flight (proof)
    SELECT p_proof FROM exactly.secret s
     WHERE p_proof = sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))
    ON CONFLICT (proof) DO UPDATE SET proof = EXCLUDED.proof;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    -- A statement of its own: under READ COMMITTED it sees what the
    -- delivery it waited for committed.
    IF EXISTS (SELECT 1 FROM exactly.processed_events e WHERE e.source = p_source AND e.id = p_id) THEN
        RETURN NULL;
    END IF;
    RETURN pg_current_xact_id()::text::bigint;
END
$$;

-- The stored answer of a committed event, for its redelivery: the digest
-- of the payload it was committed with, its status and reply.
CREATE FUNCTION exactly.committed_answer(p_source text, p_id text, p_proof bytea)
RETURNS TABLE (payload_sha256 bytea, status smallint, reply text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    expected bytea;
BEGIN
    SELECT sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))
      INTO expected FROM exactly.secret s;
    IF p_proof IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT e.payload_sha256, e.status, e.reply::text
        FROM exactly.processed_events e WHERE e.source = p_source AND e.id = p_id;
END
$$;

-- Records the event, with its answer, in the transaction that claimed it
-- (`p_xact`, from claim_event) and nowhere else. A row already there
-- (another delivery committed in between, possible only outside READ
-- COMMITTED) is a serialization failure: the host answers 503 and the
-- redelivery replays.
CREATE FUNCTION exactly.store_answer(
    p_source text, p_id text, p_type text, p_handler text, p_payload_sha256 bytea, p_proof bytea,
    p_xact bigint, p_status smallint, p_reply text, p_result text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- One statement: the row goes in only with the event's proof and in
    -- the transaction that claimed it; the in-flight mark goes.
    WITH done AS (DELETE FROM exactly.in_flight f WHERE f.proof = p_proof)
    INSERT INTO exactly.processed_events (source, id, type, handler, payload_sha256, status, reply, result)
    SELECT p_source, p_id, p_type, p_handler, p_payload_sha256, p_status, p_reply::jsonb, p_result::jsonb
      FROM exactly.secret s
     WHERE p_proof = sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))
       AND pg_current_xact_id()::text::bigint = p_xact
    ON CONFLICT (source, id) DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Why not (a rare path; a handler's forgery or the host's bug).
    IF pg_current_xact_id()::text::bigint IS DISTINCT FROM p_xact THEN
        RAISE EXCEPTION 'exactly: event (%, %) is answered outside the transaction that claimed it', p_source, p_id
            USING ERRCODE = '42501';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM exactly.secret s
                   WHERE p_proof = sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))) THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    RAISE EXCEPTION 'exactly: event (%, %) was committed by another delivery', p_source, p_id
        USING ERRCODE = '40001';
END
$$;

-- Runs as the handler's own role (SECURITY INVOKER). Its names are
-- resolved with the fixed search_path of its SET clause (pg_temp last: a
-- temporary table cannot shadow a type or table it names); its RESET ALL,
-- like any plain SET in the body, outlasts the call, search_path included,
-- and the statements after it name everything schema-qualified. Undoes what a
-- handler's statements can leave in the session beyond the event: the
-- role and every setting (back to the start-up values), temporary tables,
-- sequence caches, LISTENs, cursors WITH HOLD, advisory locks (released at
-- once), large objects the role owns (no handler has a use for them, and
-- they would outlive the event outside its tables) and statements it
-- prepared with SQL PREPARE (the driver's own protocol-level statements,
-- `from_sql = false`, stay). Called before COMMIT, the COMMIT itself runs
-- with the host's synchronous_commit whatever the handler set.
CREATE FUNCTION exactly.reset_session()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prepared text[];
    driver bigint;
    unlinked bigint;
    name text;
BEGIN
    RESET ROLE;
    RESET ALL;
    DISCARD TEMP;
    DISCARD SEQUENCES;
    UNLISTEN *;
    EXECUTE 'CLOSE ALL';
    PERFORM pg_catalog.pg_advisory_unlock_all();
    -- One statement for the lookups (each is one more executor run on
    -- every event).
    SELECT (SELECT pg_catalog.array_agg(p.name) FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql),
           (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements p WHERE NOT p.from_sql),
           (SELECT pg_catalog.count(pg_catalog.lo_unlink(l.oid)) FROM pg_catalog.pg_largeobject_metadata l
             WHERE l.lomowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r
                                                         WHERE r.rolname OPERATOR(pg_catalog.=) session_user))
      INTO prepared, driver, unlinked;
    IF prepared IS NOT NULL THEN
        FOREACH name IN ARRAY prepared LOOP
            EXECUTE pg_catalog.format('DEALLOCATE %I', name);
        END LOOP;
    END IF;
    -- The driver's own statements still there: the host compares this with
    -- its statement cache, and closes a session where a handler dropped one.
    RETURN driver;
END
$$;

REVOKE ALL ON FUNCTION exactly.claim_event(text, text, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.committed_answer(text, text, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.store_answer(text, text, text, text, bytea, bytea, bigint, smallint, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.reset_session() FROM PUBLIC;

-- As in 0003, granting the calls above.
CREATE OR REPLACE FUNCTION exactly.prepare_handler_roles(p_login text, p_owner text, p_password text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    membership record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_owner) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN', p_owner);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_login) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', p_login);
    END IF;
    EXECUTE format('ALTER ROLE %I WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', p_owner);
    EXECUTE format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT PASSWORD %L',
                   p_login, p_password);
    -- The login role belongs to no role: nothing to SET ROLE to.
    FOR membership IN
        SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
        WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = p_login)
    LOOP
        EXECUTE format('REVOKE %I FROM %I', membership.rolname, p_login);
    END LOOP;
    IF NOT pg_has_role(current_user, p_owner, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', p_owner, current_user);
    END IF;
    -- The account may cancel the login role's statements (pg_cancel_backend
    -- when an event's deadline passes); the login role stays a member of
    -- nothing.
    IF NOT pg_has_role(current_user, p_login, 'MEMBER') THEN
        EXECUTE format('GRANT %I TO %I', p_login, current_user);
    END IF;
    -- Role-level settings (ALTER ROLE … SET) would survive every session reset.
    EXECUTE format('ALTER ROLE %I RESET ALL', p_login);
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA public TO %I', p_owner);
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', p_login);
    EXECUTE format('REVOKE CREATE ON SCHEMA public FROM %I', p_login);
    EXECUTE format('GRANT USAGE ON SCHEMA exactly TO %I', p_login);
    EXECUTE format('GRANT EXECUTE ON FUNCTION exactly.claim_event(text, text, bytea), '
                   'exactly.committed_answer(text, text, bytea), exactly.reset_session(), '
                   'exactly.store_answer(text, text, text, text, bytea, bytea, bigint, smallint, text, text) TO %I',
                   p_login);
    IF NOT has_database_privilege(p_login, current_database(), 'CONNECT') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), p_login);
    END IF;
END
$$;
