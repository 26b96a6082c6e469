-- The database is the wall (SECURITY.md, "PostgreSQL: the database is the
-- wall"). Each handler's statements run on a session whose LOGIN role has
-- that handler's privileges and nothing more; the host's bookkeeping on
-- that same session goes through the two SECURITY DEFINER functions below,
-- which act only on the event a proof names. The proof is
--
--     sha256(key || sha256(sha256(source) || sha256(id)))
--
-- with `key` the 32 random bytes of `exactly.secret`, readable by the
-- host's account alone. The host computes the proof and binds it as a
-- parameter; a handler never sees the key or a proof, so it cannot claim,
-- read or answer any event but the one its transaction claimed.

-- One row: the key. Generated here by the server's strong random source
-- (gen_random_uuid, PostgreSQL 13 and later), never sent by the host.
CREATE TABLE exactly.secret (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key       bytea   NOT NULL CHECK (length(key) = 32)
);
INSERT INTO exactly.secret (key) VALUES (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()));
REVOKE ALL ON exactly.secret FROM PUBLIC;

-- The proof of (source, id). Called only by the two functions below (as
-- the host's account); EXECUTE revoked from PUBLIC.
CREATE FUNCTION exactly.event_proof(p_source text, p_id text)
RETURNS bytea
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(s.key || sha256(sha256(convert_to(p_source, 'UTF8')) || sha256(convert_to(p_id, 'UTF8'))))
    FROM exactly.secret s
$$;
REVOKE ALL ON FUNCTION exactly.event_proof(text, text) FROM PUBLIC;

-- Claims (source, id) for the calling transaction. `owned`: this
-- transaction inserted the claim row and runs the handler; otherwise the
-- committed row's payload digest and stored answer, for the replay. A
-- concurrent first delivery holds the row lock: the INSERT waits for it
-- (bounded by lock_timeout), then sees its committed row (each statement
-- of a VOLATILE function takes a fresh snapshot under READ COMMITTED).
CREATE FUNCTION exactly.claim_event(
    p_source text, p_id text, p_type text, p_handler text, p_payload_sha256 bytea, p_proof bytea)
RETURNS TABLE (owned boolean, stored_payload_sha256 bytea, stored_status smallint, stored_reply text, backend_pid integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_proof IS DISTINCT FROM exactly.event_proof(p_source, p_id) THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    INSERT INTO exactly.processed_events (source, id, type, handler, payload_sha256)
    VALUES (p_source, p_id, p_type, p_handler, p_payload_sha256)
    ON CONFLICT (source, id) DO NOTHING;
    IF FOUND THEN
        RETURN QUERY SELECT true, NULL::bytea, NULL::smallint, NULL::text, pg_backend_pid();
    ELSE
        RETURN QUERY SELECT false, e.payload_sha256, e.status, e.reply::text, pg_backend_pid()
            FROM exactly.processed_events e WHERE e.source = p_source AND e.id = p_id;
    END IF;
END
$$;

-- Stores the answer on the claim row, which must have been inserted by the
-- calling transaction itself (xmin) and not answered yet: a proof for an
-- event committed or claimed elsewhere changes nothing. Returns the number
-- of rows updated (1, or 0 when the claim is not this transaction's).
CREATE FUNCTION exactly.store_answer(
    p_source text, p_id text, p_proof bytea, p_status smallint, p_reply text, p_result text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    updated integer;
BEGIN
    IF p_proof IS DISTINCT FROM exactly.event_proof(p_source, p_id) THEN
        RAISE EXCEPTION 'exactly: no proof for this event' USING ERRCODE = '42501';
    END IF;
    UPDATE exactly.processed_events
       SET status = p_status, reply = p_reply::jsonb, result = p_result::jsonb
     WHERE source = p_source AND id = p_id AND status IS NULL
       AND xmin = pg_current_xact_id()::xid;
    GET DIAGNOSTICS updated = ROW_COUNT;
    RETURN updated;
END
$$;

REVOKE ALL ON FUNCTION exactly.claim_event(text, text, text, text, bytea, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.store_answer(text, text, bytea, smallint, text, text) FROM PUBLIC;

-- A claim never commits without its answer: checked at COMMIT (a deferred
-- constraint trigger), so a handler that ends the transaction early
-- (COMMIT through a statement the filter missed) makes that COMMIT fail,
-- and the claim and everything the event wrote roll back with it.
CREATE FUNCTION exactly.require_answer()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM exactly.processed_events
               WHERE source = NEW.source AND id = NEW.id AND status IS NULL) THEN
        RAISE EXCEPTION 'exactly: event (%, %) would commit without its answer', NEW.source, NEW.id
            USING ERRCODE = '42501';
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION exactly.require_answer() FROM PUBLIC;
CREATE CONSTRAINT TRIGGER processed_events_answered
    AFTER INSERT ON exactly.processed_events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION exactly.require_answer();

-- Migration-time only (the host's account; EXECUTE revoked from PUBLIC):
-- makes `p_owner` the NOLOGIN role that owns a handler's tables (its
-- migrations run under it), and `p_login` the LOGIN role its events run
-- as: member of no role, no attributes, USAGE on the schemas and EXECUTE
-- on the two bookkeeping functions. Names and password reach SQL text only
-- through format('%I' / '%L') on the server.
CREATE FUNCTION exactly.prepare_handler_roles(p_login text, p_owner text, p_password text)
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
    EXECUTE format('GRANT EXECUTE ON FUNCTION exactly.claim_event(text, text, text, text, bytea, bytea), '
                   'exactly.store_answer(text, text, bytea, smallint, text, text) TO %I', p_login);
    IF NOT has_database_privilege(p_login, current_database(), 'CONNECT') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), p_login);
    END IF;
END
$$;

-- Migration-time only: gives `p_login` exactly SELECT, INSERT, UPDATE and
-- DELETE on `p_tables` (schema public) and USAGE on the sequences those
-- tables own (serial and identity columns), and nothing else in public.
CREATE FUNCTION exactly.grant_handler_tables(p_login text, p_tables text[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    relation record;
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', p_login);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', p_login);
    FOR relation IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relname = ANY (p_tables)
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.%I TO %I', relation.relname, p_login);
    END LOOP;
    FOR relation IN
        SELECT s.relname FROM pg_class s
        JOIN pg_namespace n ON n.oid = s.relnamespace
        JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid AND d.deptype IN ('a', 'i')
        JOIN pg_class t ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
        WHERE s.relkind = 'S' AND n.nspname = 'public' AND t.relname = ANY (p_tables)
    LOOP
        EXECUTE format('GRANT USAGE ON SEQUENCE public.%I TO %I', relation.relname, p_login);
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION exactly.prepare_handler_roles(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION exactly.grant_handler_tables(text, text[]) FROM PUBLIC;

-- Migration-time only: hands a table left owned by the host's account (by
-- a version of exactly without owner roles) to a handler's owner role.
CREATE FUNCTION exactly.reassign_table(p_table text, p_owner text)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('ALTER TABLE public.%I OWNER TO %I', p_table, p_owner);
END
$$;
REVOKE ALL ON FUNCTION exactly.reassign_table(text, text) FROM PUBLIC;
