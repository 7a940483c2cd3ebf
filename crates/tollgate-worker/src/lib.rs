//! The worker: moves usage events from the hot store's log into the ledger, and runs the
//! periodic jobs.
//!
//! - [`usage_writer`]: reads the usage log in batches, writes each batch in one ledger
//!   transaction, acknowledges only after the commit (so a crash re-delivers, and the ledger's
//!   unique (account, request id) makes the re-delivery harmless).
//! - [`jobs`]: the hold sweeper (releases holds whose request died).
//! - [`retention`]: the `prune` job (stored responses past the replay window).
//! - [`reconcile`]: compares the ledger's rows, account_balance and the hot store; repairs.
//! - [`verify`]: the read-only proof of I1–I4 once quiet (`tollgate verify`).

pub mod jobs;
pub mod reconcile;
pub mod retention;
pub mod usage_writer;
pub mod verify;
