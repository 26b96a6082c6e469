//! `exactly`: an exactly-once CloudEvent sink that runs event handlers as
//! sandboxed WebAssembly components.
//!
//! An event travels through one module per stage:
//! [`decode`] (HTTP → validated CloudEvent) → [`manifest`] routing (type →
//! handler) → [`pipeline`] (the dedup transaction: claim, run, store, commit)
//! → [`runtime`] (the wasm sandbox and its `tx` / `log` imports, guarded by
//! [`policy`] and converted by [`convert`]) → [`storage`] (PostgreSQL or
//! SQLite) → [`answer`] (the one error type and the HTTP answer it maps to).
//! [`server`] wires HTTP, [`cli`] the command line.

mod answer;
mod cli;
mod convert;
mod decode;
mod manifest;
mod pipeline;
mod policy;
mod runtime;
mod server;
mod storage;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
