//! The operator API for routing: every model's channels with their live state, a channel
//! added, removed, disabled or enabled for every gateway, the upstream attempts of a request, and an account's
//! session pins cleared.

use axum::extract::{Path, Query, State};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tollgate_store::model::{AddedChannel, ChannelState};

use crate::error::ApiError;
use crate::routes::LimitedBody;
use crate::routes::admin::{parse_body, parse_query, rfc3339_ms as rfc3339};
use crate::routing::breaker::BreakerState;
use crate::state::AppState;
use crate::upstream::AddedChannelError;

/// Longest reason an operator may give.
const REASON_CHARS_MAX: usize = 500;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(add))
        .routes(routes!(remove))
        .routes(routes!(disable))
        .routes(routes!(enable))
        .routes(routes!(attempts))
        .routes(routes!(clear_pins))
        .routes(routes!(release_session_lock))
}

/// Releases a session's lock whoever holds it (a holder that is stuck, not dead: a dead one's
/// lock expires by itself). `session` is the session key as the client sends it.
#[utoipa::path(
    delete,
    path = "/accounts/{id}/sessions/{session}/lock",
    tag = "routing",
    params(("id" = String, Path, description = "The account id"), ("session" = String, Path, description = "The session id")),
    responses((status = 200, description = "Released", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn release_session_lock(State(state): State<AppState>, Path((account_id, session)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    let name = crate::routing::session_lock::lock_session_name(&session);
    let released = state.hot.unlock_session(&account_id, &name, None).await?;
    tracing::warn!(account_id, released, "session lock released by an operator");
    Ok(Json(json!({"account_id": account_id, "released": released})))
}

/// Forgets where every session of an account was pinned (routing affinity): each session's
/// next request goes by priority and weight, and its success pins it again.
#[utoipa::path(
    delete,
    path = "/accounts/{id}/pins",
    tag = "routing",
    params(("id" = String, Path, description = "The account id")),
    responses((status = 200, description = "Pins cleared", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn clear_pins(State(state): State<AppState>, Path(account_id): Path<String>) -> Result<Json<Value>, ApiError> {
    if state.ledger.account(&account_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("account {account_id} not found")));
    }
    state.hot.clear_pins(&account_id).await?;
    Ok(Json(json!({"account_id": account_id, "pins_cleared": true})))
}

/// Every channel of every model, as this gateway sees it now.
#[utoipa::path(
    get,
    path = "/channels",
    tag = "routing",
    responses((status = 200, description = "Every model's channels with their state", body = ChannelList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn list(State(state): State<AppState>) -> Json<ChannelList> {
    let now_ms = state.now_ms();
    let mut channels = Vec::new();
    for route in state.upstreams.models() {
        for channel in &route.channels {
            let (breaker, open_until_ms) = match channel.breaker_state() {
                BreakerState::Open { until_ms } => ("open", Some(until_ms)),
                state => (state.label(), None),
            };
            let cooling_until = Some(channel.cooling_until_ms()).filter(|until_ms| *until_ms > now_ms);
            let [requests_last_minute, tokens_last_minute] = channel.rate_used(now_ms);
            channels.push(ChannelView {
                model: route.model.clone(),
                channel: channel.spec.name.clone(),
                provider: channel.spec.provider.name.clone(),
                upstream_model: channel.spec.upstream_model.clone(),
                priority: channel.spec.priority,
                weight: channel.spec.weight,
                enabled: channel.enabled(),
                added: channel.spec.added,
                breaker,
                open_until: open_until_ms.map(rfc3339),
                retry_after_until: cooling_until.map(rfc3339),
                in_flight: channel.in_flight(),
                concurrent_requests_max: channel.spec.concurrent_requests_max,
                requests_per_minute_max: channel.spec.rates.requests_per_minute,
                tokens_per_minute_max: channel.spec.rates.tokens_per_minute,
                requests_last_minute,
                tokens_last_minute,
            });
        }
    }
    Json(ChannelList { channels })
}

/// Every channel of every model.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

/// A channel as this gateway sees it now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelView {
    pub model: String,
    pub channel: String,
    pub provider: String,
    pub upstream_model: String,
    pub priority: i32,
    pub weight: u32,
    /// As configured or added, unless an operator disabled or enabled it.
    pub enabled: bool,
    /// Added through this API (only those can be removed).
    pub added: bool,
    /// `closed`, `open` or `half_open`.
    #[schema(value_type = String)]
    pub breaker: &'static str,
    /// While the breaker is open: when it lets a probe through.
    pub open_until: Option<String>,
    /// While an upstream's `Retry-After` keeps the channel out: until when.
    pub retry_after_until: Option<String>,
    /// Requests this gateway has on the channel now.
    pub in_flight: u32,
    pub concurrent_requests_max: Option<u32>,
    pub requests_per_minute_max: Option<u64>,
    pub tokens_per_minute_max: Option<u64>,
    /// The last 60 s as the rate limits count them (this gateway's count, with the fleet's as
    /// last shared in services mode); 0 for a channel without rate limits.
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
}

/// A channel to add to a model.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewChannel {
    name: String,
    provider: String,
    upstream_model: Option<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default = "one")]
    weight: u32,
    concurrent_requests_max: Option<u32>,
    requests_per_minute_max: Option<u32>,
    tokens_per_minute_max: Option<u64>,
}

fn one() -> u32 {
    1
}

/// Adds a channel to a routed model, for every gateway: kept in the ledger, applied here at once
/// and by the others on the config notification. It starts enabled, with a closed breaker.
#[utoipa::path(
    post,
    path = "/channels/{model}",
    tag = "routing",
    params(("model" = String, Path, description = "The routed model")),
    request_body = NewChannel,
    responses((status = 201, description = "The channel added", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn add(State(state): State<AppState>, Path(model): Path<String>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let new: NewChannel = parse_body(&body)?;
    let added = AddedChannel {
        model,
        channel: new.name,
        provider: new.provider,
        upstream_model: new.upstream_model,
        priority: new.priority,
        weight: new.weight,
        concurrent_requests_max: new.concurrent_requests_max,
        requests_per_minute_max: new.requests_per_minute_max,
        tokens_per_minute_max: new.tokens_per_minute_max,
        created_at_ms: state.now_ms(),
    };
    let spec = state.upstreams.added_spec(&added).map_err(|error| match error {
        AddedChannelError::ModelNotRouted => ApiError::NotFound(format!("model {} is not routed", added.model)),
        AddedChannelError::Invalid(message) => ApiError::InvalidRequest(message),
    })?;
    state.ledger.add_channel(added.clone()).await?;
    state.reload_channels().await?;
    tracing::warn!(model = added.model, channel = added.channel, provider = added.provider, "channel added by an operator");
    let body = json!({
        "model": added.model,
        "channel": added.channel,
        "provider": added.provider,
        "upstream_model": spec.upstream_model,
        "priority": added.priority,
        "weight": added.weight,
        "concurrent_requests_max": added.concurrent_requests_max,
        "requests_per_minute_max": added.requests_per_minute_max,
        "tokens_per_minute_max": added.tokens_per_minute_max,
        "enabled": true,
        "added": true,
        "created_at": rfc3339(added.created_at_ms),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Removes a channel an operator added (a configured one can only be disabled). Requests it
/// serves now finish on it; no new one is sent to it.
#[utoipa::path(
    delete,
    path = "/channels/{model}/{channel}",
    tag = "routing",
    params(("model" = String, Path, description = "The routed model"), ("channel" = String, Path, description = "The channel")),
    responses((status = 200, description = "Removed", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn remove(State(state): State<AppState>, Path((model, channel)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    let route = state.upstreams.route(&model).ok_or_else(|| ApiError::NotFound(format!("model {model} is not routed")))?;
    if route.channels.iter().any(|candidate| candidate.spec.name == channel && !candidate.spec.added) {
        return Err(ApiError::Conflict(format!("channel {channel} of model {model} is configured: disable it instead, or remove it from the configuration")));
    }
    if !state.ledger.remove_channel(&model, &channel).await? {
        return Err(ApiError::NotFound(format!("model {model} has no added channel {channel}")));
    }
    state.reload_channels().await?;
    tracing::warn!(model, channel, "channel removed by an operator");
    Ok(Json(json!({"model": model, "channel": channel, "removed": true})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StateChange {
    reason: Option<String>,
}

#[utoipa::path(
    post,
    path = "/channels/{model}/{channel}/disable",
    tag = "routing",
    params(("model" = String, Path, description = "The routed model"), ("channel" = String, Path, description = "The channel")),
    responses((status = 200, description = "Disabled", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn disable(state: State<AppState>, path: Path<(String, String)>, body: LimitedBody) -> Result<Json<Value>, ApiError> {
    set_enabled(state, path, body, false).await
}

#[utoipa::path(
    post,
    path = "/channels/{model}/{channel}/enable",
    tag = "routing",
    params(("model" = String, Path, description = "The routed model"), ("channel" = String, Path, description = "The channel")),
    responses((status = 200, description = "Enabled", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn enable(state: State<AppState>, path: Path<(String, String)>, body: LimitedBody) -> Result<Json<Value>, ApiError> {
    set_enabled(state, path, body, true).await
}

/// Records the operator's word in the ledger (every gateway reloads on its notification) and
/// applies it here at once.
async fn set_enabled(
    State(state): State<AppState>,
    Path((model, channel)): Path<(String, String)>,
    LimitedBody(body): LimitedBody,
    enabled: bool,
) -> Result<Json<Value>, ApiError> {
    let change: StateChange = if body.is_empty() { StateChange::default() } else { parse_body(&body)? };
    if change.reason.as_ref().is_some_and(|reason| reason.chars().count() > REASON_CHARS_MAX) {
        return Err(ApiError::InvalidRequest(format!("reason must be at most {REASON_CHARS_MAX} characters")));
    }
    let route = state.upstreams.route(&model).ok_or_else(|| ApiError::NotFound(format!("model {model} is not routed")))?;
    if !route.channels.iter().any(|candidate| candidate.spec.name == channel) {
        return Err(ApiError::NotFound(format!("model {model} has no channel {channel}")));
    }
    state
        .ledger
        .set_channel_state(ChannelState { model: model.clone(), channel: channel.clone(), enabled, reason: change.reason.clone(), updated_at_ms: state.now_ms() })
        .await?;
    state.reload_channels().await?;
    Ok(Json(json!({"model": model, "channel": channel, "enabled": enabled, "reason": change.reason})))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AttemptsQuery {
    account_id: String,
    request_id: String,
}

/// The upstream attempts of a request: which channels, how they answered, what the upstream
/// reported using — to set a provider's bill against what the customer paid.
#[utoipa::path(
    get,
    path = "/billing/attempts",
    tag = "routing",
    params(AttemptsQuery),
    responses((status = 200, description = "A request's upstream attempts", body = AttemptList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn attempts(
    State(state): State<AppState>,
    query: Result<Query<AttemptsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AttemptList>, ApiError> {
    let query = parse_query(query)?;
    let recorded = state.ledger.upstream_attempts(&query.account_id, &query.request_id).await?;
    let attempts = recorded
        .into_iter()
        .map(|recorded| {
            let attempt = recorded.attempt_row;
            AttemptView {
                usage_id: recorded.usage_id,
                attempt: recorded.attempt,
                billed_to: if attempt.served { "customer" } else { "operator" },
                channel: attempt.channel,
                provider: attempt.provider,
                upstream_model: attempt.upstream_model,
                status_code: attempt.status_code,
                served: attempt.served,
                error: attempt.error,
                latency_ms: attempt.latency_ms,
                first_byte_ms: attempt.first_byte_ms,
                upstream_usage: attempt.upstream_usage,
                created_at: rfc3339(recorded.created_at_ms),
            }
        })
        .collect();
    Ok(Json(AttemptList { account_id: query.account_id, request_id: query.request_id, attempts }))
}

/// A request's upstream attempts: newest usage row first (a request id sent again after a
/// failure has several), each in attempt order; at most 1,000.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AttemptList {
    pub account_id: String,
    pub request_id: String,
    pub attempts: Vec<AttemptView>,
}

/// One upstream attempt as recorded with its request's usage row.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// The id of the request's usage row.
    pub usage_id: i64,
    /// 1 for the first.
    pub attempt: u32,
    pub channel: String,
    pub provider: String,
    pub upstream_model: String,
    /// The upstream's HTTP status; null when it never answered (connection, timeout).
    pub status_code: Option<u16>,
    /// Its answer went to the client.
    pub served: bool,
    /// `customer` for the serving attempt (charged at the model's price), `operator` for a
    /// failed one (what the upstream may bill for it is the operator's cost).
    #[schema(value_type = String)]
    pub billed_to: &'static str,
    /// Why it failed, in a word (`status`, `timeout`, `connect`, …).
    pub error: Option<String>,
    pub latency_ms: u64,
    pub first_byte_ms: Option<u64>,
    /// What the upstream said it used, when it said.
    pub upstream_usage: Option<tollgate_core::Usage>,
    pub created_at: String,
}
