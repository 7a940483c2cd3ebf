//! The operator API's operational side: reconciliation runs, periodic job runs, alerts (the
//! outbox) and their webhook deliveries.

use axum::extract::{Path, Query, State};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use axum::Json;
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

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(reconcile))
        .routes(routes!(reconciliations))
        .routes(routes!(job_runs))
        .routes(routes!(alerts))
        .routes(routes!(deliveries))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReconcileRequest {
    #[serde(default)]
    fix: bool,
}

/// Runs a reconciliation now, in this process, against this process's hot store.
#[utoipa::path(
    post,
    path = "/reconcile",
    tag = "operations",
    request_body(content = ReconcileRequest, content_type = "application/json"),
    responses((status = 200, description = "The run's report", body = tollgate_store::operations::ReconciliationRun), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn reconcile(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Json<Value>, ApiError> {
    let request: ReconcileRequest = if body.is_empty() { ReconcileRequest::default() } else { parse_body(&body)? };
    let reconciler = Reconciler { ledger: &*state.ledger, hot: Some(&*state.hot), hot_store_name: crate::jobs::hot_store_name(&state.config) };
    let run = reconciler.run(request.fix).await?;
    Ok(Json(serde_json::to_value(run).unwrap_or(Value::Null)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    job: Option<String>,
    account_id: Option<String>,
}

fn limit_of(params: &ListParams) -> u32 {
    params.limit.unwrap_or(LIST_ROWS_DEFAULT).clamp(1, LIST_ROWS_MAX)
}

#[utoipa::path(
    get,
    path = "/reconciliations",
    tag = "operations",
    params(ListParams),
    responses((status = 200, description = "Recent reconciliation runs", body = crate::openapi::ReconciliationList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn reconciliations(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let runs = state.ledger.reconciliations(limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": runs})))
}

#[utoipa::path(
    get,
    path = "/jobs",
    tag = "operations",
    params(ListParams),
    responses((status = 200, description = "Recent job runs", body = crate::openapi::JobRunList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn job_runs(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let runs = state.ledger.job_runs(params.job.as_deref(), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": runs})))
}

/// The outbox's events, newest first, with their delivery state.
#[utoipa::path(
    get,
    path = "/alerts",
    tag = "operations",
    params(ListParams),
    responses((status = 200, description = "Alerts (outbox events), newest first", body = crate::openapi::AlertList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn alerts(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let events = state.ledger.outbox_events(params.account_id.as_deref(), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": events})))
}

/// Every delivery attempt of one event, newest first.
#[utoipa::path(
    get,
    path = "/alerts/{id}/deliveries",
    tag = "operations",
    params(("id" = i64, Path, description = "The alert id"), ListParams),
    responses((status = 200, description = "Its webhook delivery attempts", body = crate::openapi::DeliveryList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn deliveries(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(query)?;
    let attempts = state.ledger.deliveries(Some(id), limit_of(&params)).await?;
    Ok(Json(json!({"object": "list", "data": attempts})))
}
