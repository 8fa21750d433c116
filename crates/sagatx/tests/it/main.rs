//! The integration tests of the `sagatx` crate (one binary).

mod bad_input;
mod crash;
mod engine;
mod examples;
mod execute;
mod faults;
mod oplog;
mod participants;
#[cfg(feature = "postgres")]
mod postgres;
mod store;
mod support;
