//! Log lines attributed to the handler and the event.
//!
//! The host writes them into its own (JSON) log with the handler's name and
//! the event's `source` and `id`, so a handler does not need to repeat them.
//! Each level exists twice, in the function and in the macro namespace:
//!
//! ```no_run
//! use exactly_guest::log;
//!
//! log::info("order stored");
//! let order_id = "o-1";
//! log::warn!("order {order_id} was already paid");
//! ```
//!
//! `println!` and `eprintln!` also reach the host log, without level, and a
//! panic message goes there too.

use crate::bindings::exactly::handler::log::{Level, write};

/// Logs at trace level.
pub fn trace(message: impl AsRef<str>) {
    write(Level::Trace, message.as_ref());
}

/// Logs at debug level.
pub fn debug(message: impl AsRef<str>) {
    write(Level::Debug, message.as_ref());
}

/// Logs at info level.
pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message.as_ref());
}

/// Logs at warn level.
pub fn warn(message: impl AsRef<str>) {
    write(Level::Warn, message.as_ref());
}

/// Logs at error level.
pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message.as_ref());
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_trace {
    ($($arg:tt)+) => { $crate::log::trace(::std::format!($($arg)+)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug {
    ($($arg:tt)+) => { $crate::log::debug(::std::format!($($arg)+)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_info {
    ($($arg:tt)+) => { $crate::log::info(::std::format!($($arg)+)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn {
    ($($arg:tt)+) => { $crate::log::warn(::std::format!($($arg)+)) };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_error {
    ($($arg:tt)+) => { $crate::log::error(::std::format!($($arg)+)) };
}

/// `log::trace!("format {args}")`: [`trace`](fn@trace) with `format!` arguments.
#[doc(inline)]
pub use crate::__log_trace as trace;

/// `log::debug!("format {args}")`: [`debug`](fn@debug) with `format!` arguments.
#[doc(inline)]
pub use crate::__log_debug as debug;

/// `log::info!("format {args}")`: [`info`](fn@info) with `format!` arguments.
#[doc(inline)]
pub use crate::__log_info as info;

/// `log::warn!("format {args}")`: [`warn`](fn@warn) with `format!` arguments.
#[doc(inline)]
pub use crate::__log_warn as warn;

/// `log::error!("format {args}")`: [`error`](fn@error) with `format!` arguments.
#[doc(inline)]
pub use crate::__log_error as error;
