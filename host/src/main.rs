//! The `exactly` binary; everything lives in the library (see `lib.rs`).

use std::process::ExitCode;

fn main() -> ExitCode {
    exactly::cli::main()
}
