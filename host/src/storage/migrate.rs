//! Migrations: the host's own (SQLite's here, PostgreSQL's in
//! [`super::postgres`]) and each handler's, applied once, in order, each
//! recorded with its digest so an edited migration stops start-up; which
//! tables a handler's migration creates, read from its SQL before it runs
//! ([`tables_created_by`]); which tables each handler owns, read from the
//! database after migrating.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use sqlparser::ast::{ObjectName, Statement};
use sqlparser::parser::Parser;
use sqlx::{AssertSqlSafe, Sqlite, SqlitePool, Transaction};

use crate::manifest::Manifest;

use super::{Backend, HOST_OWNER};

pub(super) static HOST_MIGRATIONS_SQLITE: &[(&str, &str)] = &[
    ("0001_processed_events.sql", include_str!("../../migrations/sqlite/0001_processed_events.sql")),
    ("0002_dead_letters.sql", include_str!("../../migrations/sqlite/0002_dead_letters.sql")),
    ("0003_table_owners.sql", include_str!("../../migrations/sqlite/0003_table_owners.sql")),
    ("0004_dead_letter_quota.sql", include_str!("../../migrations/sqlite/0004_dead_letter_quota.sql")),
    ("0005_dead_letter_raw.sql", include_str!("../../migrations/sqlite/0005_dead_letter_raw.sql")),
];

/// A handler's tables: its own, and those it lists in `uses`, each of
/// which must be some handler's table.
pub(super) fn handler_tables(handler: &crate::manifest::HandlerSpec, owned: &HashMap<String, Vec<String>>) -> anyhow::Result<Vec<String>> {
    let mut tables = owned.get(&handler.name).cloned().unwrap_or_default();
    for used in &handler.uses {
        let used = used.to_ascii_lowercase();
        if !owned.values().flatten().any(|table| *table == used) {
            bail!(
                "handler {} lists table {used:?} in `uses`, but no handler's migrations created it",
                handler.name
            );
        }
        tables.push(used);
    }
    tables.sort();
    tables.dedup();
    Ok(tables)
}

/// SQLite's migrations. A handler's tables are those that appear in
/// `sqlite_master` while its migration runs; a migration that names a
/// table another handler owns, or changes the schema of one, is refused.
pub(super) async fn migrate_sqlite(pool: &SqlitePool, manifest: &Manifest) -> anyhow::Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS exactly_migrations (
             owner TEXT NOT NULL, name TEXT NOT NULL, sha256 BLOB NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
             PRIMARY KEY (owner, name))",
    )
    .execute(&mut *tx)
    .await?;
    let mut plan: Vec<(String, String, String)> = HOST_MIGRATIONS_SQLITE
        .iter()
        .map(|(name, sql)| (HOST_OWNER.to_owned(), (*name).to_owned(), (*sql).to_owned()))
        .collect();
    for handler in &manifest.handlers {
        if let Some(dir) = &handler.migrations {
            for (name, sql) in
                read_migrations(&dir.join("sqlite")).with_context(|| format!("migrations of handler {}", handler.name))?
            {
                plan.push((handler.name.clone(), name, sql));
            }
        }
    }
    for (owner, name, sql) in plan {
        let is_handler = owner != HOST_OWNER;
        if is_handler {
            claim_named_sqlite_tables(&mut tx, &owner, &name, &sql).await?;
        }
        let digest = Sha256::digest(sql.as_bytes()).to_vec();
        let applied: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sha256 FROM exactly_migrations WHERE owner = ?1 AND name = ?2")
                .bind(&owner)
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await?;
        if check_applied(&owner, &name, applied.as_deref(), &digest)? {
            continue;
        }
        let before = sqlite_schema(&mut tx).await?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {name} of {owner} failed"))?;
        if is_handler {
            let after = sqlite_schema(&mut tx).await?;
            let owners: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
                "SELECT lower(table_name), handler FROM exactly_table_owners",
            )
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            for (key, entry) in &after {
                let other = owners.get(&entry.table).filter(|h| **h != owner);
                if let Some(other) = other
                    && before.get(key) != Some(entry)
                {
                    bail!("migration {name} of handler {owner} changes {key} on table {}, which belongs to handler {other}", entry.table);
                }
            }
            for (key, entry) in &before {
                if let Some(other) = owners.get(&entry.table).filter(|h| **h != owner)
                    && !after.contains_key(key)
                {
                    bail!("migration {name} of handler {owner} drops {key} of table {}, which belongs to handler {other}", entry.table);
                }
            }
            for (key, entry) in &after {
                if entry.is_table && !before.contains_key(key) {
                    sqlx::query("INSERT INTO exactly_table_owners (table_name, handler) VALUES (?1, ?2)")
                        .bind(&entry.table)
                        .bind(&owner)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query("INSERT INTO exactly_migrations (owner, name, sha256) VALUES (?1, ?2, ?3)")
            .bind(&owner)
            .bind(&name)
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        tracing::info!(%owner, migration = %name, "migration applied");
    }
    tx.commit().await?;
    Ok(())
}

/// One object of `sqlite_master`: the table it belongs to and its SQL.
#[derive(PartialEq, Eq)]
struct SchemaEntry {
    table: String,
    is_table: bool,
    sql: Option<String>,
}

/// `sqlite_master` by `type:name`, names lower-cased.
async fn sqlite_schema(tx: &mut Transaction<'static, Sqlite>) -> anyhow::Result<HashMap<String, SchemaEntry>> {
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT type, lower(name), lower(tbl_name), sql FROM sqlite_master")
            .fetch_all(&mut **tx)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, name, table, sql)| {
            let is_table = kind == "table" || kind == "view";
            (format!("{kind} {name}"), SchemaEntry { table, is_table, sql })
        })
        .collect())
}

/// Before a handler's SQLite migration: every table it names in `CREATE
/// TABLE` / `CREATE VIEW` must be new or its own. A table that exists with
/// no recorded owner was left by a version of exactly that kept no owners:
/// it becomes this handler's (the upgrade path).
async fn claim_named_sqlite_tables(
    tx: &mut Transaction<'static, Sqlite>,
    handler: &str,
    name: &str,
    sql: &str,
) -> anyhow::Result<()> {
    let named = tables_created_by(Backend::Sqlite, sql)
        .map_err(|e| anyhow::anyhow!("cannot read migration {name} of handler {handler}: {e}"))?;
    for table in named {
        let owner: Option<String> = sqlx::query_scalar("SELECT handler FROM exactly_table_owners WHERE table_name = ?1")
            .bind(&table)
            .fetch_optional(&mut **tx)
            .await?;
        match owner {
            Some(owner) if owner == handler => {}
            Some(other) => bail!(
                "migration {name} of handler {handler} names table {table}, which belongs to handler {other}; \
                 a handler's migrations may create and change only its own tables (list it in `uses` to read and write it)"
            ),
            None => {
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE)",
                )
                .bind(&table)
                .fetch_one(&mut **tx)
                .await?;
                if exists {
                    sqlx::query("INSERT INTO exactly_table_owners (table_name, handler) VALUES (?1, ?2)")
                        .bind(&table)
                        .bind(handler)
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// `Ok(true)`: already applied, skip. `Ok(false)`: apply it now.
pub(super) fn check_applied(owner: &str, name: &str, applied: Option<&[u8]>, digest: &[u8]) -> anyhow::Result<bool> {
    match applied {
        None => Ok(false),
        Some(stored) if stored == digest => Ok(true),
        Some(_) => bail!(
            "migration {name} of {owner} was changed after it was applied; add a new migration file instead of editing an applied one"
        ),
    }
}

pub(super) fn read_migrations(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read migration folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "sql") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let sql = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            files.push((name, sql));
        }
    }
    files.sort();
    Ok(files)
}

/// The table a relation names, if it is in the default schema (`public` on
/// PostgreSQL, `main` on SQLite) or unqualified.
fn table_name(name: &ObjectName) -> Option<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| part.as_ident().map(|ident| ident.value.to_ascii_lowercase()))
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [table] => Some(table.clone()),
        [schema, table] if schema == "public" || schema == "main" => Some(table.clone()),
        _ => None,
    }
}

/// The tables a handler's migration creates (`CREATE TABLE`, `CREATE
/// VIEW`): they are the handler's own. A migration the parser cannot read
/// is an error, since the handler's tables would be unknown.
pub(super) fn tables_created_by(backend: Backend, sql: &str) -> Result<Vec<String>, String> {
    let statements = Parser::parse_sql(backend.dialect(), sql).map_err(|e| e.to_string())?;
    Ok(statements
        .iter()
        .filter_map(|statement| match statement {
            Statement::CreateTable(create) => table_name(&create.name),
            Statement::CreateView { name, .. } => table_name(name),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tables_a_migration_creates() {
        let sql = "CREATE TABLE orders (id text primary key); CREATE INDEX i ON orders (id); CREATE TABLE IF NOT EXISTS Order_Events (x int)";
        assert_eq!(tables_created_by(Backend::Postgres, sql).unwrap(), ["orders", "order_events"]);
        assert!(tables_created_by(Backend::Sqlite, "CREATE TABL x").is_err());
    }
}
