//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use std::time::Duration;

use tollgate_store::StoreError;

use crate::config::HotStoreDown;
use crate::error::ApiError;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "The process is up", body = String), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody))
)]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Longest a readiness probe waits for a store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Ready when a charge could be made now, by the store that makes it: in services mode Redis
/// (or, with `hot_store_down = "charge_ledger"`, Redis or PostgreSQL) — PostgreSQL being down
/// does not stop charging there —, in embedded mode the ledger; and the tokenizer is loaded.
/// The answer names the store in a fixed phrase; the store's own error (hosts, ports, the
/// driver's words) goes to the log, as the probe may be public.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, description = "The gateway can charge (503 when it cannot)", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody))
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if !tollgate_core::tokens::tokenizer_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "tokenizer not loaded").into_response();
    }
    let ledger = || async { probe_verdict("ledger", tokio::time::timeout(PROBE_TIMEOUT, state.ledger.ping()).await) };
    let verdict = if state.config.redis_url.is_none() {
        ledger().await
    } else {
        match probe_verdict("redis", tokio::time::timeout(PROBE_TIMEOUT, state.hot.ping()).await) {
            Err(redis) if state.config.degradation.hot_store_down == HotStoreDown::ChargeLedger => {
                ledger().await.map_err(|ledger| format!("{redis}; {ledger}"))
            }
            other => other,
        }
    };
    match verdict {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

/// One store's probe, as the reason readiness gives (the error itself is logged).
fn probe_verdict(store: &'static str, result: Result<Result<(), StoreError>, tokio::time::error::Elapsed>) -> Result<(), String> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(store, %error, "readiness probe failed");
            Err(format!("{store} unavailable"))
        }
        Err(_) => Err(format!("{store} did not answer within {} ms", PROBE_TIMEOUT.as_millis())),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(())
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 4: readiness may be public; a store's error (its host, port, driver
    /// message) stays in the log.
    #[test]
    fn readiness_names_the_store_not_its_error() {
        let refused = StoreError::Unavailable("redis: Connection refused (os error 111) at cache.internal:6379".into());
        assert_eq!(probe_verdict("redis", Ok(Err(refused))), Err("redis unavailable".to_string()));
        assert_eq!(probe_verdict("ledger", Ok(Ok(()))), Ok(()));
    }
}
