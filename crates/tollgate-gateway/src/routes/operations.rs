//! The operator API's operational side: reconciliation runs, periodic job runs, alerts (the
//! outbox) and their webhook deliveries.

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_worker::reconcile::Reconciler;

use crate::error::ApiError;
use crate::routes::LimitedBody;
use crate::routes::admin::{parse_body, parse_query};
use crate::state::AppState;

/// Rows a listing returns by default and at most.
const LIST_ROWS_DEFAULT: u32 = 50;
const LIST_ROWS_MAX: u32 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/reconcile", post(reconcile))
        .route("/reconciliations", get(reconciliations))
        .route("/jobs", get(job_runs))
        .route("/alerts", get(alerts))
        .route("/alerts/{id}/deliveries", get(deliveries))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReconcileRequest {
    #[serde(default)]
    fix: bool,
}

/// Runs a reconciliation now, in this process, against this process's hot store.
async fn reconcile(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Json<Value>, ApiError> {
    let request: ReconcileRequest = if body.is_empty() { ReconcileRequest::default() } else { parse_body(&body)? };
    let reconciler = Reconciler { ledger: &*state.ledger, hot: Some(&*state.hot), hot_store_name: crate::jobs::hot_store_name(&state.config) };
    let run = reconciler.run(request.fix).await?;
    Ok(Json(serde_json::to_value(run).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    job: Option<String>,
    account_id: Option<String>,
}

fn limit_of(params: &ListParams) -> u32 {
    params.limit.unwrap_or(LIST_ROWS_DEFAULT).clamp(1, LIST_ROWS_MAX)
}

async fn reconciliations(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let runs = state.ledger.reconciliations(limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": runs})))
}

async fn job_runs(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let runs = state.ledger.job_runs(params.job.as_deref(), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": runs})))
}

/// The outbox's events, newest first, with their delivery state.
async fn alerts(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let events = state.ledger.outbox_events(params.account_id.as_deref(), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": events})))
}

/// Every delivery attempt of one event, newest first.
async fn deliveries(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let attempts = state.ledger.deliveries(Some(id), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": attempts})))
}
