//! The gateway: HTTP in, upstream out, every request billed exactly once.
//!
//! - [`app`]: the router. [`state`]: shared state. [`config`]: typed configuration.
//! - [`routes`]: handlers — `client` (`/v1`), `admin` (`/internal`), `ops` (health, metrics).
//! - [`proxy`]: the LLM request path — authenticate, price, hold, forward, measure, settle.
//! - [`charge`]: the charge protocol's steps around the hot store (authorize, settle, void,
//!   cold account load, fund application); [`fallback`]: charging in the ledger while Redis is
//!   unreachable (opt-in), and the resync when it returns.
//! - The protocols themselves (request facts, usage extraction, the event splitter streams go
//!   through) are the `tollgate-protocol` crate, kept apart so they can be fuzzed on their own.
//! - [`auth`], [`keys`], [`context`]: who pays, cached; [`throttle`]: failed authentications
//!   per source address; [`upstream`]: providers and routes;
//!   [`upstream_errors`]: what a client is told of an upstream's refusal (nothing of the
//!   operator's account).
//! - [`error`]: the one error type and its contract codes; [`request_id`]; [`metrics`].
//! - [`server`]: start, serve, shut down in order; [`listener`]: one listener's accept loop and
//!   its connection bounds (cap, idle and header-read timeout, client address on each request);
//!   [`jobs`]: which periodic jobs run here;
//!   [`webhooks`]: signed delivery of the outbox's alerts; [`demo`]: the offline demo set-up;
//!   [`notifications`]: LISTEN/NOTIFY from the PostgreSQL ledger; [`pricing`]: routed models
//!   without a price for a tier in use, and price-list import plans.

pub mod app;
pub mod auth;
pub mod charge;
pub mod config;
pub mod console;
pub mod context;
pub mod error;
pub mod fallback;
pub mod jobs;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod notifications;
pub mod openapi;
pub mod passthrough;
pub mod pricing;
pub mod routing;
pub mod proxy;
pub mod request_id;
pub mod routes;
pub mod state;
pub mod tokenizer_pool;
pub mod throttle;
pub mod upstream;
pub mod upstream_errors;
pub mod webhooks;

pub use app::app;
pub use config::GatewayConfig;
pub use state::AppState;
pub mod server;
pub mod demo;
