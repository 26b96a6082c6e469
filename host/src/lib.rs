//! `exactly`: an exactly-once CloudEvent sink that runs event handlers as
//! sandboxed WebAssembly components.
//!
//! An event travels through one module per stage:
//! [`decode`] (HTTP → validated CloudEvent; [`media_type`] compares media
//! types) → [`manifest`] routing (type →
//! handler) → [`pipeline`] (the dedup transaction: claim, run, store, commit)
//! → [`runtime`] (the wasm sandbox and its `tx` / `log` imports, guarded by
//! [`policy`], converted and executed by [`tx`]) → [`storage`] (PostgreSQL or
//! SQLite; on SQLite
//! [`storage::sqlite_guard`] makes SQLite enforce the sandbox) → [`answer`] (a processed event's answer; [`rejection`] is the one error type and the HTTP answer it maps to).
//! [`server`] wires HTTP ([`content_encoding`] decodes compressed bodies), [`cli`] the command line (its database
//! flags, which `dlq` shares, in `database_args`), [`metrics`] what
//! `/metrics` reports, [`otel`] the OpenTelemetry export and trace
//! context, [`retention`] the sweeper that expires dedup records; [`fault`]
//! holds the test-only crash points, [`sql_switch`] the test-only switch
//! that turns the SQL policy off. Dead-lettered events take a
//! path of their own, [`dlq`]: stored, listed and replayed, never run.

pub mod answer;
pub mod bindings;
pub mod cli;
pub mod content_encoding;
mod database_args;
pub mod decode;
pub mod dlq;
pub mod fault;
pub mod https;
pub mod manifest;
pub mod media_type;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod policy;
pub mod printable;
pub mod rejection;
pub mod retention;
pub mod runtime;
pub mod server;
pub mod sql_switch;
pub mod storage;
pub mod tx;
