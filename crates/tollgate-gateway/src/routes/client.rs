//! The client API: LLM calls, and what a key holder may read about its own account.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate_core::Money;
use tollgate_protocol::Protocol;

use crate::auth::{Caller, authenticate};
use crate::charge;
use crate::error::{ApiError, ErrorShape};
use crate::proxy;
use crate::request_id::RequestId;
use crate::routes::{UsagePageParams, usage_page};
use crate::state::AppState;

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::OpenAiChat, request_id, caller, body).await
}

pub async fn messages(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::AnthropicMessages, request_id, caller, body).await
}

pub async fn embeddings(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    caller: Caller,
    body: Body,
) -> Response {
    proxy::handle(state, Protocol::OpenAiEmbeddings, request_id, caller, body).await
}

/// The models this key may use, OpenAI-shaped.
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

fn remaining(budget: Option<Money>, spent: Money) -> Option<String> {
    budget.map(|budget| budget.checked_sub(spent).unwrap_or(Money::ZERO).to_string())
}

/// The caller's live balance and quota use.
pub async fn balance(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let account_id = &context.account.id;
    let view = match state.hot.balance(account_id, &context.key.id).await? {
        Some(view) => view,
        None => {
            charge::load_account(&state, account_id).await?;
            state.hot.balance(account_id, &context.key.id).await?.ok_or_else(|| ApiError::BillingUnavailable(format!("account {account_id} could not be loaded into the hot store")))?
        }
    };
    let available = view
        .balance
        .checked_add(context.account.credit_limit)
        .and_then(|total| total.checked_sub(view.held))
        .ok_or(ApiError::Internal("available balance overflow".into()))?;
    Ok(Json(json!({
        "account_id": account_id,
        "balance": view.balance,
        "held": view.held,
        "available": available,
        "credit_limit": context.account.credit_limit,
        "currency": "USD",
        "daily_requests_used": view.daily_requests_used,
        "monthly_requests_used": view.monthly_requests_used,
        "daily_request_quota": context.account.daily_request_quota,
        "monthly_request_quota": context.account.monthly_request_quota,
        "key": {
            "id": context.key.id,
            "budget_daily_remaining": remaining(context.key.budget_daily, view.key_spent_daily),
            "budget_monthly_remaining": remaining(context.key.budget_monthly, view.key_spent_monthly),
            "budget_total_remaining": remaining(context.key.budget_total, view.key_spent_total),
        },
    })))
}

/// The caller's own usage rows, newest first, with a cursor for the next page.
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<UsagePageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let context = authenticate(&state, &caller).await?;
    let Query(mut params) = params.map_err(|error| ApiError::InvalidRequest(error.body_text()))?;
    // Only the caller's own account, whatever it asked for.
    params.account_id = Some(context.account.id.clone());
    Ok(Json(usage_page(&state, params).await?))
}

/// Errors of the client API outside the LLM handlers are OpenAI-shaped.
pub fn shaped(error: ApiError) -> Response {
    error.into_response_shaped(ErrorShape::OpenAi).into_response()
}
