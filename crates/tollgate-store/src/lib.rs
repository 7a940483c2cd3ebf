//! Storage for the charge protocol.
//!
//! - [`hot`]: the `HotStore` trait — authorize, settle, void, expire — with the types its steps
//!   take and return. Implementations: [`memory`] (embedded) and [`redis_store`] (Redis or
//!   Redis Cluster, one Lua script per step; also the usage log on Redis Streams).
//! - [`ledger`]: the `Ledger` trait — the system of record. Implementations: [`sqlite`]
//!   (embedded) and [`postgres`] (production, with NOTIFY on fund and configuration changes).
//!   Both read rows back through `sql_rows`; the reads whose SQL is the same for both are
//!   written once in `sql_reads`, over `sqlx::Database`.
//! - [`ledger_charging`]: authorize, settle and void in PostgreSQL itself, for the opt-in mode
//!   that keeps charging while the hot store is unreachable.
//! - [`queue`]: the usage log from settle to the worker (`EventLog`), embedded as a channel.
//! - [`model`]: the records both keep. [`clock`]: the periods quotas count in.
//! - [`unbilled`]: a hot store that charges nothing, for `billing = "off"` (benchmarks only).
//! - [`verify`]: checks invariants I2 and I4 for an account from the ledger alone.
//! - [`operations`]: reconciliation reads and repairs, job leases, the outbox; [`alerts`]: the
//!   events a money change queues in its own transaction.
//! - [`retention`]: pruning what is kept for a window (stored responses), compaction.
//! - [`archive`]: old months of usage rows out to files, with what proves the balances kept.

pub mod archive;
pub mod clock;
pub mod error;
pub mod hot;
pub mod ledger;
pub mod ledger_charging;
pub mod memory;
pub mod model;
pub mod alerts;
pub mod operations;
mod postgres_ops;
mod sqlite_ops;
pub mod queue;
pub mod recent;
pub mod redis_store;
pub mod retention;
pub mod postgres;
pub mod sqlite;
mod sql_reads;
mod sql_rows;
pub mod unbilled;
pub mod verify;

pub use error::{StoreError, StoreResult};
pub use hot::HotStore;
pub use ledger::Ledger;
