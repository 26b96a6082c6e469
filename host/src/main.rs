//! The `exactly` binary; everything lives in the library (see `lib.rs`).

use std::process::ExitCode;

/// The static musl build (the container image) allocates with mimalloc:
/// musl's malloc is slow under many threads. See host/Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    exactly::cli::main()
}
