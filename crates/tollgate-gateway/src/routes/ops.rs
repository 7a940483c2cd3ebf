//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when a charge could be made now: the ledger answers and the tokenizer is loaded.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.ledger.ping().await {
        Ok(()) if tollgate_core::tokens::tokenizer_ready() => (StatusCode::OK, "ready").into_response(),
        Ok(()) => (StatusCode::SERVICE_UNAVAILABLE, "tokenizer not loaded").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("ledger unavailable: {error}")).into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
