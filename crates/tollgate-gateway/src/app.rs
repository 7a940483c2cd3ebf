//! The HTTP surface: client API under `/v1`, operator API under `/internal`, operations at the
//! root. `app` returns the router so tests can drive it without a socket.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::routes::{admin, client, gemini, operations, ops, statements};
use crate::state::AppState;

pub fn app(state: AppState) -> Router {
    // Bodies are read with an explicit limit in each handler (a 413 in the contract's shape);
    // this outer limit is a backstop for routes that read with extractors.
    let body_limit = state.config.limits.request_body_bytes_max;
    Router::new()
        .route("/v1/chat/completions", post(client::chat_completions))
        .route("/v1/messages", post(client::messages))
        .route("/v1/embeddings", post(client::embeddings))
        .route("/v1beta/models/{model_method}", post(gemini::generate))
        .route("/v1/models/{model_method}", post(gemini::generate))
        .route("/v1/models", get(client::models))
        .route("/v1/balance", get(client::balance))
        .route("/v1/usage", get(client::usage))
        .nest("/internal", admin::router().merge(operations::router()).merge(statements::router()))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(crate::request_id::assign))
        .with_state(state)
}
