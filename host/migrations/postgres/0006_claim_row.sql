-- The bookkeeping of 0005_claim_in_flight.sql, cheaper per event, behind
-- the same wall (README, "Performance"; SECURITY.md).
--
-- * No in-flight table: the claim is the event's row in
--   exactly.processed_events, inserted by `claim_event` (with the proof)
--   without an answer; a second delivery's insert waits for the first's
--   transaction to end, as the claim row did before the wall. The answer
--   is written into that row by `store_answer`, in the same transaction.
--   A row without an answer can commit only when a handler ends the
--   event's transaction itself; the next delivery takes such a row over
--   (it is not an answered event), so it needs no trigger to refuse it.
-- * `store_answer` takes no proof: it writes only the row whose claim the
--   calling transaction itself wrote (the row's xmin is the calling
--   transaction's id and its answer is still missing), and `claim_event`
--   writes a claim only with the proof. Since none of its parameters is a
--   secret, the host may send it as a cached (named) statement, in one
--   round trip. It returns a receipt, a digest of the proof and of the
--   answer stored, which the host checks against the answer it sent: a
--   handler that replaced the host's cached statement with its own SQL (SQL
--   PREPARE shares the driver's namespace) cannot forge it, and a receipt
--   the handler got by answering its own claim itself matches only if it
--   stored exactly the host's answer. The host also checks, in the same
--   round trip as its COMMIT, that the transaction is still the one that
--   claimed the event (a handler may have ended it).
-- * `reset_session` reads pg_prepared_statements once (it was twice), and
--   finds the role's large objects by the session user's OID.

DROP FUNCTION exactly.claim_event(text, text, bytea);
DROP FUNCTION exactly.store_answer(text, text, text, text, bytea, bytea, bigint, smallint, text, text);
DROP TABLE exactly.in_flight;

-- Claims (source, id) for the calling transaction: true when it inserted
-- the event's claim row (or took over a claim without an answer, which a
-- handler that ended its own transaction early left), NULL when the event
-- was answered before (read the answer with committed_answer). A
-- concurrent delivery's claim is waited for (bounded by lock_timeout).
CREATE FUNCTION exactly.claim_event(
    p_source text, p_id text, p_proof bytea, p_type text, p_handler text, p_payload_sha256 bytea)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claimed boolean;
    proven boolean;
BEGIN
    -- ON CONFLICT sees the row a concurrent delivery committed while this
    -- one waited, whatever this statement's snapshot (READ COMMITTED).
    WITH proof AS (
        SELECT p_proof = sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8')))) AS ok
          FROM exactly.secret s
    ), claim AS (
        INSERT INTO exactly.processed_events AS e (source, id, type, handler, payload_sha256)
        SELECT p_source, p_id, p_type, p_handler, p_payload_sha256 FROM proof WHERE proof.ok
        ON CONFLICT (source, id) DO UPDATE
           SET type = EXCLUDED.type, handler = EXCLUDED.handler, payload_sha256 = EXCLUDED.payload_sha256,
               processed_at = EXCLUDED.processed_at
         WHERE e.status IS NULL
        RETURNING true AS claimed
    )
    SELECT proof.ok, (SELECT c.claimed FROM claim c) INTO proven, claimed FROM proof;
    IF proven IS NOT TRUE THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    RETURN claimed;
END
$$;

-- Writes the answer into the event's claim row, only in the transaction
-- that claimed it; returns its receipt, a digest of the proof and of the
-- answer it stored (exactly these parameters): sha256(proof || 'stored' ||
-- status (2 bytes, big-endian) || reply IS NOT NULL (2 bytes) ||
-- sha256(reply or '') || sha256(result or '')). A row already
-- answered (another delivery committed in between, possible only outside
-- READ COMMITTED) is a serialization failure: the host answers 503 and the
-- redelivery replays.
CREATE FUNCTION exactly.store_answer(p_source text, p_id text, p_status smallint, p_reply text, p_result text)
RETURNS bytea
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The row is found by its key: the plan is cached from the first calls,
-- when exactly.processed_events may be nearly empty, and a sequential scan
-- of it would get slower with every event until analyze comes by.
-- (enable_seqscan off adds a huge cost to a plan's estimate: jit off, or a
-- server with JIT compiling would compile the statement on every call.)
SET enable_seqscan = off
SET jit = off
-- Planned once per session: with its parameters PL/pgSQL would otherwise
-- keep comparing custom plans with the generic one and plan the UPDATE on
-- every call (measured: about 130 µs of an event's 650).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    receipt bytea;
BEGIN
    UPDATE exactly.processed_events e
       SET status = p_status, reply = p_reply::jsonb, result = p_result::jsonb
     WHERE e.source = p_source AND e.id = p_id AND e.status IS NULL
       AND e.xmin = pg_current_xact_id()::xid
    RETURNING (SELECT sha256(sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))
                             || convert_to('stored', 'UTF8')
                             || int2send(p_status)
                             || int2send(CASE WHEN p_reply IS NULL THEN 0 ELSE 1 END::smallint)
                             || sha256(convert_to(coalesce(p_reply, ''), 'UTF8'))
                             || sha256(convert_to(coalesce(p_result, ''), 'UTF8')))
                 FROM exactly.secret s)
      INTO receipt;
    IF receipt IS NOT NULL THEN
        RETURN receipt;
    END IF;
    -- Why not (a rare path: a handler's call or the host's bug). Nothing
    -- is said about an event this transaction did not claim: the caller
    -- may be a handler asking about an event not its own.
    RAISE EXCEPTION 'exactly: this transaction holds no claim of event (%, %)', p_source, p_id
        USING ERRCODE = '42501';
END
$$;

REVOKE ALL ON FUNCTION exactly.claim_event(text, text, bytea, text, text, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.store_answer(text, text, smallint, text, text) FROM PUBLIC;

-- As in 0005 (see there), with one read of pg_prepared_statements.
CREATE OR REPLACE FUNCTION exactly.reset_session()
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
    SELECT pg_catalog.array_agg(p.name) FILTER (WHERE p.from_sql),
           pg_catalog.count(*) FILTER (WHERE NOT p.from_sql),
           (SELECT pg_catalog.count(pg_catalog.lo_unlink(l.oid)) FROM pg_catalog.pg_largeobject_metadata l
             WHERE l.lomowner OPERATOR(pg_catalog.=) pg_catalog.quote_ident(session_user)::pg_catalog.regrole::pg_catalog.oid)
      INTO prepared, driver, unlinked
      FROM pg_catalog.pg_prepared_statements p;
    IF prepared IS NOT NULL THEN
        FOREACH name IN ARRAY prepared LOOP
            EXECUTE pg_catalog.format('DEALLOCATE %I', name);
        END LOOP;
    END IF;
    RETURN driver;
END
$$;

-- As in 0005, granting the new claim_event and store_answer.
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
    EXECUTE format('GRANT EXECUTE ON FUNCTION exactly.claim_event(text, text, bytea, text, text, bytea), '
                   'exactly.committed_answer(text, text, bytea), exactly.reset_session(), '
                   'exactly.store_answer(text, text, smallint, text, text) TO %I',
                   p_login);
    IF NOT has_database_privilege(p_login, current_database(), 'CONNECT') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), p_login);
    END IF;
END
$$;
