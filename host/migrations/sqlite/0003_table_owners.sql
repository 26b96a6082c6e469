-- Which handler owns each table: read from the database after each of the
-- handler's migrations (the tables it created), never from migration text.
-- The handler's SQLite authorizer allows exactly its own tables and those
-- it lists in `uses` (SECURITY.md, "SQLite: SQLite itself enforces").
CREATE TABLE exactly_table_owners (
    table_name TEXT NOT NULL PRIMARY KEY COLLATE NOCASE,
    handler    TEXT NOT NULL
) WITHOUT ROWID;
