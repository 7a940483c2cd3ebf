//! The client API: LLM calls, and what a key holder may read about its own account.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate_core::Money;
use tollgate_protocol::Protocol;

use crate::auth::{Caller, authenticate};
use crate::error::{ApiError, ErrorShape};
use crate::routes::admin::parse_query;
use crate::openapi::{Balance, KeyBalance, SummaryPage};
use crate::proxy;
use crate::request_id::RequestId;
use crate::routes::reports::{self, StatementParams, SummaryParams};
use crate::routes::{UsagePageParams, usage_page};
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "client",
    request_body(content = serde_json::Value, description = "An OpenAI Chat Completions request; `stream` true or false", content_type = "application/json"),
    responses((status = 200, description = "The upstream's answer (JSON, or `text/event-stream` when streaming) with `X-Tollgate-Cost` and `X-Tollgate-Balance`", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::OpenAiChat, request_id, caller, body).await
}

#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "client",
    request_body(content = serde_json::Value, description = "An Anthropic Messages request", content_type = "application/json"),
    responses((status = 200, description = "The upstream's answer (JSON or event stream)", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn messages(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::AnthropicMessages, request_id, caller, body).await
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "client",
    request_body(content = serde_json::Value, description = "An OpenAI Embeddings request", content_type = "application/json"),
    responses((status = 200, description = "The embeddings", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::OpenAiEmbeddings, request_id, caller, body).await
}

/// The models this key may use, OpenAI-shaped.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "client",
    responses((status = 200, description = "The models this key may use (OpenAI list form)", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn models(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let data: Vec<Value> = state
        .upstreams
        .models()
        .into_iter()
        .filter(|route| context.key.allowed_models.as_ref().is_none_or(|allowed| allowed.contains(&route.model)))
        .map(|route| json!({"id": route.model, "object": "model", "created": 0, "owned_by": route.provider.name}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn remaining(budget: Option<Money>, spent: Money) -> Option<Money> {
    budget.map(|budget| budget.checked_sub(spent).unwrap_or(Money::ZERO))
}

/// The caller's live balance and quota use.
#[utoipa::path(
    get,
    path = "/v1/balance",
    tag = "client",
    responses((status = 200, description = "The caller's balance, holds, quota use and key budgets", body = crate::openapi::Balance), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn balance(State(state): State<AppState>, caller: Caller) -> Result<Json<Balance>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let account_id = &context.account.id;
    let view = reports::live_balance(&state, account_id, &context.key.id).await?;
    let available = reports::available(&view, &context.account)?;
    Ok(Json(Balance {
        account_id: account_id.clone(),
        balance: view.balance,
        held: view.held,
        available,
        credit_limit: context.account.credit_limit,
        currency: reports::CURRENCY.into(),
        daily_requests_used: view.daily_requests_used,
        monthly_requests_used: view.monthly_requests_used,
        daily_request_quota: context.account.daily_request_quota,
        monthly_request_quota: context.account.monthly_request_quota,
        key: KeyBalance {
            id: context.key.id.clone(),
            budget_daily_remaining: remaining(context.key.budget_daily, view.key_spent_daily),
            budget_monthly_remaining: remaining(context.key.budget_monthly, view.key_spent_monthly),
            budget_total_remaining: remaining(context.key.budget_total, view.key_spent_total),
        },
    }))
}

/// The caller's own usage rows, newest first, with a cursor for the next page.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "client",
    params(crate::routes::UsagePageParams),
    responses((status = 200, description = "The caller's usage rows, newest first", body = crate::openapi::UsagePage), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<UsagePageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let mut params = parse_query(params)?;
    // Only the caller's own account, whatever it asked for.
    params.account_id = Some(context.account.id.clone());
    Ok(Json(usage_page(&state, params).await?))
}

/// The caller's own usage totals by day, model or key (`group_by`, as the operator's summary),
/// within `[start, end)`; the last 31 days when `start` is not given.
#[utoipa::path(
    get,
    path = "/v1/usage/summary",
    tag = "client",
    params(crate::routes::reports::SummaryParams),
    responses((status = 200, description = "The caller's usage totals (the last 31 days without `start`)", body = crate::openapi::SummaryPage), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn usage_summary(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<SummaryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SummaryPage>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let mut params = parse_query(params)?;
    default_start(&state, &mut params.start);
    Ok(Json(reports::summary_page(&state, params, Some(context.account.id.clone())).await?))
}

/// How far back a key holder's summary and statement reach when no `start` is given: a
/// bounded read by default, any range on request.
const CLIENT_DAYS_DEFAULT: i64 = 31;

fn default_start(state: &AppState, start: &mut Option<String>) {
    if start.is_none() {
        *start = Some(reports::days_before(state, CLIENT_DAYS_DEFAULT));
    }
}

/// The caller's own statement (fund and usage rows in ledger order), JSON or CSV, within
/// `[start, end)`; the last 31 days when `start` is not given.
#[utoipa::path(
    get,
    path = "/v1/statement",
    tag = "client",
    params(crate::routes::reports::StatementParams),
    responses((status = 200, description = "The caller's statement (the last 31 days without `start`); CSV with `format=csv`", body = crate::openapi::Statement), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn statement(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<StatementParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let mut params = parse_query(params)?;
    default_start(&state, &mut params.start);
    reports::statement(&state, &context.account.id, params).await
}

/// The keys of the caller's account: names, prefixes, status, budgets and limits (a key's
/// secret is never stored, so never shown).
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "client",
    responses((status = 200, description = "The keys of the caller's account (never a secret)", body = crate::openapi::KeyList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn keys(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let keys = state.ledger.keys_for_account(&context.account.id).await?;
    Ok(Json(json!({"object": "list", "data": keys})))
}

/// Errors of the client API outside the LLM handlers are OpenAI-shaped.
pub fn shaped(error: ApiError) -> Response {
    error.into_response_shaped(ErrorShape::OpenAi).into_response()
}
