//! Integration tests: one binary, real HTTP, a real mock upstream, a real SQLite ledger.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod suite;
