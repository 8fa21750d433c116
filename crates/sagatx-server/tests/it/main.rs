//! The coordinator's integration tests (one binary).

mod api;
mod harness;
