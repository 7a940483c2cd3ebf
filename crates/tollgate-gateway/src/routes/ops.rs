//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use std::time::Duration;

use tollgate_store::StoreError;

use crate::config::HotStoreDown;
use crate::error::ApiError;
use crate::state::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Longest a readiness probe waits for a store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Ready when a charge could be made now, by the store that makes it: in services mode Redis
/// (or, with `hot_store_down = "charge_ledger"`, Redis or PostgreSQL) — PostgreSQL being down
/// does not stop charging there —, in embedded mode the ledger; and the tokenizer is loaded.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if !tollgate_core::tokens::tokenizer_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "tokenizer not loaded").into_response();
    }
    let probe = |store: &'static str, result: Result<Result<(), StoreError>, tokio::time::error::Elapsed>| match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("{store} unavailable: {error}")),
        Err(_) => Err(format!("{store} did not answer within {} ms", PROBE_TIMEOUT.as_millis())),
    };
    let ledger = || async { probe("ledger", tokio::time::timeout(PROBE_TIMEOUT, state.ledger.ping()).await) };
    let verdict = if state.config.redis_url.is_none() {
        ledger().await
    } else {
        match probe("redis", tokio::time::timeout(PROBE_TIMEOUT, state.hot.ping()).await) {
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

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}
