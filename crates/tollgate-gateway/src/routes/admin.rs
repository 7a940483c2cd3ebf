//! The operator API (`/internal`), behind the admin token: checked for every route, before any
//! body is read, by the layer `app` puts on them ([`crate::auth::operator_only`]). Every
//! change to an account, key or price invalidates the billing-context cache at once; every
//! committed fund change is applied to the hot balance, in order, by its ledger sequence.

use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tollgate_core::{Money, Usage};
use tollgate_store::model::{
    AccountKind, AccountPatch, AccountQuery, AccountStatus, FundKind, NewAccount, NewApiKey, NewFund, NewPrice, PriceHistoryQuery, TopUpQuery,
    TopUpStatus,
};

use crate::charge;
use crate::error::ApiError;
use crate::openapi::{AccountPage, AccountView, SummaryPage};
use crate::keys::generate_key;
use crate::routes::reports::{self, StatementParams, SummaryParams};
use crate::routes::{LimitedBody, UsagePageParams, usage_page};
use crate::state::AppState;

/// Longest id or reference an operator may give.
const IDENTIFIER_CHARS_MAX: usize = 128;
/// Prices per `PUT /internal/prices` at most.
const PRICES_PER_REQUEST_MAX: usize = 10_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(get_account, patch_account))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(list_prices, put_prices))
        .routes(routes!(price_history))
        .routes(routes!(create_topup, list_topups))
        .routes(routes!(confirm_topup))
        .routes(routes!(refund))
        .routes(routes!(adjust))
        .routes(routes!(statement))
        .routes(routes!(quote))
        .routes(routes!(transactions))
        .routes(routes!(summary))
}

/// Parses a JSON body into `T`, with errors in the contract's shape.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| ApiError::InvalidRequest(format!("invalid JSON body: {error}")))
}

pub(crate) fn parse_query<T: DeserializeOwned>(query: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(value)| value).map_err(|error| ApiError::InvalidRequest(error.body_text()))
}

fn check_identifier(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > IDENTIFIER_CHARS_MAX || value.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!("{field} must be 1 to {IDENTIFIER_CHARS_MAX} printable characters")));
    }
    Ok(())
}

fn check_account_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid { Ok(()) } else { Err(ApiError::InvalidRequest("account id must be 1 to 64 characters of A-Z a-z 0-9 _ . -".into())) }
}

fn positive(field: &str, amount: Money) -> Result<Money, ApiError> {
    if amount.is_positive() { Ok(amount) } else { Err(ApiError::InvalidRequest(format!("{field} must be positive"))) }
}

/// A money field that must be written without a sign (amounts whose direction the endpoint
/// fixes): parsed from the raw string, so "+5" and "-5" are refused, not reinterpreted.
fn unsigned_amount(field: &str, text: &str) -> Result<Money, ApiError> {
    let amount = Money::parse_non_negative(text).map_err(|error| ApiError::InvalidRequest(format!("{field}: {error}")))?;
    in_hot_store_range(field, amount)
}

/// Every money field an operator sets ends up in the hot store (a fund amount, a credit limit,
/// a key budget) or beside one: refused here beyond what it holds exactly, rather than failing
/// later on every authorize or every apply ([`Money::HOT_STORE_MAX`] says why the range).
fn in_hot_store_range(field: &str, amount: Money) -> Result<Money, ApiError> {
    if amount.in_hot_store_range() {
        Ok(amount)
    } else {
        Err(ApiError::InvalidRequest(format!("{field}: {amount} is out of range; amounts must lie between -{max} and {max}", max = Money::HOT_STORE_MAX)))
    }
}

async fn apply_funds(state: &AppState, account_id: &str) {
    if let Err(error) = charge::apply_pending_funds(state, account_id).await {
        // Committed in the ledger; the next load or apply picks it up.
        tracing::warn!(account_id, %error, "fund change committed but not yet applied to the hot balance; retried each second until it is");
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    id: Option<String>,
    kind: AccountKind,
    name: String,
    customer_type: String,
    #[schema(value_type = Option<Money>)]
    credit_limit: Option<String>,
    daily_request_quota: Option<u64>,
    monthly_request_quota: Option<u64>,
    #[schema(value_type = Option<Money>)]
    low_balance_threshold: Option<String>,
}

#[utoipa::path(
    post,
    path = "/accounts",
    tag = "accounts",
    request_body = CreateAccount,
    responses((status = 201, description = "The account", body = tollgate_store::model::Account), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn create_account(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let request: CreateAccount = parse_body(&body)?;
    let id = request.id.unwrap_or_else(|| format!("acct_{}", uuid::Uuid::now_v7().simple()));
    check_account_id(&id)?;
    check_identifier("name", &request.name)?;
    check_identifier("customer_type", &request.customer_type)?;
    let credit_limit = request.credit_limit.as_deref().map(|text| unsigned_amount("credit_limit", text)).transpose()?.unwrap_or(Money::ZERO);
    let account = state
        .ledger
        .create_account(NewAccount {
            id,
            kind: request.kind,
            name: request.name,
            customer_type: request.customer_type,
            credit_limit,
            daily_request_quota: request.daily_request_quota,
            monthly_request_quota: request.monthly_request_quota,
            low_balance_threshold: request.low_balance_threshold.as_deref().map(|text| unsigned_amount("low_balance_threshold", text)).transpose()?,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(account)).into_response())
}

#[utoipa::path(
    get,
    path = "/accounts/{id}",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    responses((status = 200, description = "The account with its live balance, held, available and quota use", body = crate::openapi::AccountView), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn get_account(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AccountView>, ApiError> {
    let account = state.ledger.account(&id).await?.ok_or_else(|| ApiError::NotFound(format!("account {id} not found")))?;
    Ok(Json(reports::account_view(&state, &account).await?))
}

/// Accounts per page by default and at most (each page reads every account's live balance).
const ACCOUNTS_PAGE_DEFAULT: u32 = 50;
const ACCOUNTS_PAGE_MAX: u32 = 100;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AccountsParams {
    /// A case-insensitive part of the id or the name.
    q: Option<String>,
    limit: Option<u32>,
    /// The previous page's `next_cursor` (its last account's id).
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/accounts",
    tag = "accounts",
    params(AccountsParams),
    responses((status = 200, description = "A page of accounts by id, with live balances", body = crate::openapi::AccountPage), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn list_accounts(
    State(state): State<AppState>,
    params: Result<Query<AccountsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AccountPage>, ApiError> {
    let params = parse_query(params)?;
    let limit = params.limit.unwrap_or(ACCOUNTS_PAGE_DEFAULT).clamp(1, ACCOUNTS_PAGE_MAX);
    let search = params.q.filter(|text| !text.is_empty());
    if let Some(search) = &search {
        check_identifier("q", search)?;
    }
    let accounts = state.ledger.accounts_page(AccountQuery { search, after: params.cursor, limit }).await?;
    let mut data = Vec::with_capacity(accounts.len());
    for account in &accounts {
        data.push(reports::account_view(&state, account).await?);
    }
    let next_cursor = if accounts.len() == limit as usize { accounts.last().map(|account| account.id.clone()) } else { None };
    Ok(Json(AccountPage { object: "list".into(), data, next_cursor }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchAccount {
    name: Option<String>,
    customer_type: Option<String>,
    status: Option<AccountStatus>,
    #[schema(value_type = Option<Money>)]
    credit_limit: Option<String>,
    #[serde(default, deserialize_with = "present")]
    daily_request_quota: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    monthly_request_quota: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present_text")]
    #[schema(value_type = Option<Money>)]
    low_balance_threshold: Option<Option<String>>,
}

/// Distinguishes an absent field (leave as is) from `null` (clear the limit).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(deserializer).map(Some)
}

fn present_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

#[utoipa::path(
    patch,
    path = "/accounts/{id}",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    request_body = PatchAccount,
    responses((status = 200, description = "The account as changed", body = tollgate_store::model::Account), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn patch_account(State(state): State<AppState>, Path(id): Path<String>, LimitedBody(body): LimitedBody) -> Result<Json<Value>, ApiError> {
    let request: PatchAccount = parse_body(&body)?;
    if let Some(name) = &request.name {
        check_identifier("name", name)?;
    }
    if let Some(customer_type) = &request.customer_type {
        check_identifier("customer_type", customer_type)?;
    }
    let patch = AccountPatch {
        name: request.name,
        customer_type: request.customer_type,
        status: request.status,
        credit_limit: request.credit_limit.as_deref().map(|text| unsigned_amount("credit_limit", text)).transpose()?,
        daily_request_quota: request.daily_request_quota,
        monthly_request_quota: request.monthly_request_quota,
        low_balance_threshold: match request.low_balance_threshold {
            Some(Some(text)) => Some(Some(unsigned_amount("low_balance_threshold", &text)?)),
            Some(None) => Some(None),
            None => None,
        },
    };
    let account = state.ledger.update_account(&id, patch).await?;
    state.contexts.invalidate_all();
    tracing::info!(account_id = id, "account changed; billing contexts invalidated");
    Ok(Json(serde_json::to_value(&account).map_err(|error| ApiError::Internal(error.to_string()))?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[schema(value_type = Option<Money>)]
    budget_daily: Option<String>,
    #[schema(value_type = Option<Money>)]
    budget_monthly: Option<String>,
    #[schema(value_type = Option<Money>)]
    budget_total: Option<String>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    allowed_models: Option<Vec<String>>,
    /// `off`, `reject` or `wait`, over the session lock of the models the key calls.
    session_lock: Option<tollgate_store::model::SessionLockMode>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
}

#[utoipa::path(
    post,
    path = "/accounts/{id}/keys",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    request_body = CreateKey,
    responses((status = 201, description = "The key, its secret shown once", body = crate::openapi::CreatedKey), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn create_key(State(state): State<AppState>, Path(account_id): Path<String>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let request: CreateKey = parse_body(&body)?;
    check_identifier("name", &request.name)?;
    let budget = |field: &str, value: Option<String>| value.as_deref().map(|text| unsigned_amount(field, text)).transpose();
    let generated = generate_key();
    let key = state
        .ledger
        .create_key(NewApiKey {
            id: format!("key_{}", uuid::Uuid::now_v7().simple()),
            account_id,
            name: request.name,
            key_hash: generated.hash,
            prefix: generated.display_prefix,
            budget_daily: budget("budget_daily", request.budget_daily)?,
            budget_monthly: budget("budget_monthly", request.budget_monthly)?,
            budget_total: budget("budget_total", request.budget_total)?,
            rpm: request.rpm,
            tpm: request.tpm,
            allowed_models: request.allowed_models,
            session_lock: request.session_lock,
            expires_at: request.expires_at,
        })
        .await?;
    state.contexts.invalidate_all();
    let mut value = serde_json::to_value(&key).map_err(|error| ApiError::Internal(error.to_string()))?;
    if let Some(object) = value.as_object_mut() {
        // Shown once; only its hash is stored.
        object.insert("key".into(), json!(generated.secret));
    }
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

#[utoipa::path(
    get,
    path = "/accounts/{id}/keys",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    responses((status = 200, description = "The account's keys", body = crate::openapi::KeyList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn list_keys(State(state): State<AppState>, Path(account_id): Path<String>) -> Result<Json<Value>, ApiError> {
    if state.ledger.account(&account_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("account {account_id} not found")));
    }
    let keys = state.ledger.keys_for_account(&account_id).await?;
    Ok(Json(json!({"data": keys})))
}

#[utoipa::path(
    delete,
    path = "/keys/{id}",
    tag = "accounts",
    params(("id" = String, Path, description = "The key id")),
    responses((status = 200, description = "The key, revoked at once", body = tollgate_store::model::ApiKey), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn revoke_key(State(state): State<AppState>, Path(key_id): Path<String>) -> Result<Json<Value>, ApiError> {
    let key = state.ledger.revoke_key(&key_id).await?;
    state.contexts.invalidate_all();
    tracing::info!(key_id, "key revoked");
    Ok(Json(serde_json::to_value(&key).map_err(|error| ApiError::Internal(error.to_string()))?))
}

/// Price rows per history page by default and at most.
const PRICE_HISTORY_DEFAULT: u32 = 100;
const PRICE_HISTORY_MAX: u32 = 1_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PriceHistoryParams {
    provider: Option<String>,
    model: Option<String>,
    customer_type: Option<String>,
    limit: Option<u32>,
}

/// Every price a (provider, model, tier) has had, newest first: the rows usage rows point at.
#[utoipa::path(
    get,
    path = "/prices/history",
    tag = "prices",
    params(PriceHistoryParams),
    responses((status = 200, description = "Price rows newest first, superseded ones too", body = crate::openapi::PriceList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn price_history(
    State(state): State<AppState>,
    params: Result<Query<PriceHistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = parse_query(params)?;
    let limit = params.limit.unwrap_or(PRICE_HISTORY_DEFAULT).clamp(1, PRICE_HISTORY_MAX);
    let rows = state.ledger.price_history(PriceHistoryQuery { provider: params.provider, model: params.model, customer_type: params.customer_type, limit }).await?;
    Ok(Json(json!({"object": "list", "data": rows})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PutPrice {
    provider: String,
    model: String,
    customer_type: String,
    #[schema(value_type = Money)]
    input_per_mtok: String,
    #[schema(value_type = Money)]
    output_per_mtok: String,
    #[schema(value_type = Option<Money>)]
    cached_input_per_mtok: Option<String>,
    #[schema(value_type = Option<Money>)]
    cache_write_per_mtok: Option<String>,
    #[schema(value_type = Option<Money>)]
    per_request: Option<String>,
}

#[utoipa::path(
    put,
    path = "/prices",
    tag = "prices",
    request_body = Vec<PutPrice>,
    responses((status = 200, description = "The price rows added to the history, in effect at once", body = crate::openapi::PriceList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn put_prices(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Json<Value>, ApiError> {
    let request: Vec<PutPrice> = parse_body(&body)?;
    if request.is_empty() || request.len() > PRICES_PER_REQUEST_MAX {
        return Err(ApiError::InvalidRequest(format!("send 1 to {PRICES_PER_REQUEST_MAX} prices")));
    }
    let mut prices = Vec::with_capacity(request.len());
    for price in request {
        check_identifier("provider", &price.provider)?;
        check_identifier("model", &price.model)?;
        check_identifier("customer_type", &price.customer_type)?;
        let optional = |field: &str, value: Option<String>| value.as_deref().map(|text| unsigned_amount(field, text)).transpose();
        prices.push(NewPrice {
            provider: price.provider,
            model: price.model,
            customer_type: price.customer_type,
            price: tollgate_core::Price {
                input_per_mtok: unsigned_amount("input_per_mtok", &price.input_per_mtok)?,
                output_per_mtok: unsigned_amount("output_per_mtok", &price.output_per_mtok)?,
                cached_input_per_mtok: optional("cached_input_per_mtok", price.cached_input_per_mtok)?,
                cache_write_per_mtok: optional("cache_write_per_mtok", price.cache_write_per_mtok)?,
                per_request: optional("per_request", price.per_request)?.unwrap_or(Money::ZERO),
            },
        });
    }
    let rows = state.ledger.put_prices(prices).await?;
    state.reload_prices().await?;
    state.contexts.invalidate_all();
    tracing::info!(prices = rows.len(), "prices changed");
    Ok(Json(json!({"data": rows})))
}

#[utoipa::path(
    get,
    path = "/prices",
    tag = "prices",
    responses((status = 200, description = "The current price of every (provider, model, tier)", body = crate::openapi::PriceList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn list_prices(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut rows = state.prices.all();
    rows.sort_by(|left, right| (&left.provider, &left.model, &left.customer_type).cmp(&(&right.provider, &right.model, &right.customer_type)));
    Ok(Json(json!({"data": rows})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTopUp {
    account_id: String,
    #[schema(value_type = Money)]
    amount: String,
    reference_id: String,
}

/// Top-ups per listing by default and at most.
const TOPUPS_DEFAULT: u32 = 100;
const TOPUPS_MAX: u32 = 1_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TopUpsParams {
    account_id: Option<String>,
    /// `pending` (created, not yet confirmed) or `confirmed`.
    status: Option<TopUpStatus>,
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/topups",
    tag = "accounts",
    params(TopUpsParams),
    responses((status = 200, description = "Top-ups newest first: a pending one is found here to be confirmed", body = crate::openapi::TopUpList), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn list_topups(
    State(state): State<AppState>,
    params: Result<Query<TopUpsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<crate::openapi::TopUpList>, ApiError> {
    let params = parse_query(params)?;
    let limit = params.limit.unwrap_or(TOPUPS_DEFAULT).clamp(1, TOPUPS_MAX);
    let data = state.ledger.topups(TopUpQuery { account_id: params.account_id, status: params.status, limit }).await?;
    Ok(Json(crate::openapi::TopUpList { object: "list".into(), data }))
}

#[utoipa::path(
    post,
    path = "/topups",
    tag = "accounts",
    request_body = CreateTopUp,
    responses((status = 201, description = "The pending top-up (200: the same reference again)", body = tollgate_store::model::TopUp), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn create_topup(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let request: CreateTopUp = parse_body(&body)?;
    check_identifier("reference_id", &request.reference_id)?;
    let amount = positive("amount", unsigned_amount("amount", &request.amount)?)?;
    let topup = state.ledger.create_topup(&request.account_id, amount, &request.reference_id).await?;
    Ok((StatusCode::CREATED, Json(topup)).into_response())
}

#[utoipa::path(
    post,
    path = "/topups/{id}/confirm",
    tag = "accounts",
    params(("id" = String, Path, description = "The top-up id")),
    responses((status = 200, description = "The top-up and its deposit (idempotent)", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn confirm_topup(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let (topup, transaction) = state.ledger.confirm_topup(&id).await?;
    apply_funds(&state, &topup.account_id).await;
    tracing::info!(topup_id = id, account_id = topup.account_id, amount = %topup.amount, "top-up confirmed");
    Ok(Json(json!({"topup": topup, "transaction": transaction})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Refund {
    #[schema(value_type = Money)]
    amount: String,
    reason: String,
    reference_id: String,
}

#[utoipa::path(
    post,
    path = "/accounts/{id}/refunds",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    request_body = Refund,
    responses((status = 201, description = "The refund (200: the same reference again)", body = tollgate_store::model::FundTransaction), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn refund(State(state): State<AppState>, Path(account_id): Path<String>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let request: Refund = parse_body(&body)?;
    check_identifier("reference_id", &request.reference_id)?;
    let amount = positive("amount", unsigned_amount("amount", &request.amount)?)?;
    let amount = amount.checked_neg().ok_or_else(|| ApiError::InvalidRequest("amount out of range".into()))?;
    record_fund(&state, NewFund { account_id, kind: FundKind::Refund, amount, reference_id: request.reference_id, reason: Some(request.reason), operator_id: None }).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    amount: Money,
    reason: String,
    operator_id: String,
    reference_id: String,
}

#[utoipa::path(
    post,
    path = "/accounts/{id}/adjustments",
    tag = "accounts",
    params(("id" = String, Path, description = "The account id")),
    request_body = Adjustment,
    responses((status = 201, description = "The adjustment (200: the same reference again)", body = tollgate_store::model::FundTransaction), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn adjust(State(state): State<AppState>, Path(account_id): Path<String>, LimitedBody(body): LimitedBody) -> Result<Response, ApiError> {
    let request: Adjustment = parse_body(&body)?;
    check_identifier("reference_id", &request.reference_id)?;
    check_identifier("operator_id", &request.operator_id)?;
    if request.amount.is_zero() {
        return Err(ApiError::InvalidRequest("amount must not be zero".into()));
    }
    in_hot_store_range("amount", request.amount)?;
    let fund = NewFund {
        account_id,
        kind: FundKind::Adjustment,
        amount: request.amount,
        reference_id: request.reference_id,
        reason: Some(request.reason),
        operator_id: Some(request.operator_id),
    };
    record_fund(&state, fund).await
}

async fn record_fund(state: &AppState, fund: NewFund) -> Result<Response, ApiError> {
    let account_id = fund.account_id.clone();
    let outcome = if fund.amount.is_negative() {
        charge::record_withdrawal(state, fund).await?
    } else {
        let outcome = state.ledger.record_fund(fund).await?;
        apply_funds(state, &account_id).await;
        outcome
    };
    let status = if outcome.newly_applied { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(outcome.transaction)).into_response())
}

pub(crate) fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Unix milliseconds as RFC 3339 (empty when out of range).
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map(rfc3339).unwrap_or_default()
}

pub(crate) fn csv_field(value: &Value) -> String {
    let text = match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text }
}

#[utoipa::path(
    get,
    path = "/accounts/{id}/statement",
    tag = "billing",
    params(("id" = String, Path, description = "The account id"), crate::routes::reports::StatementParams),
    responses((status = 200, description = "Fund and usage rows in ledger order; CSV with `format=csv`", body = crate::openapi::Statement), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn statement(
    State(state): State<AppState>,
    Path(account_id): Path<String>,
    params: Result<Query<StatementParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = parse_query(params)?;
    if state.ledger.account(&account_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("account {account_id} not found")));
    }
    reports::statement(&state, &account_id, params).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Quote {
    model: String,
    provider: Option<String>,
    customer_type: Option<String>,
    account_id: Option<String>,
    usage: Usage,
}

#[utoipa::path(
    post,
    path = "/billing/quote",
    tag = "billing",
    request_body = Quote,
    responses((status = 200, description = "The cost breakdown", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn quote(State(state): State<AppState>, LimitedBody(body): LimitedBody) -> Result<Json<Value>, ApiError> {
    let request: Quote = parse_body(&body)?;
    let customer_type = match (request.customer_type, request.account_id) {
        (Some(customer_type), None) => customer_type,
        (None, Some(account_id)) => {
            state.ledger.account(&account_id).await?.ok_or_else(|| ApiError::NotFound(format!("account {account_id} not found")))?.customer_type
        }
        _ => return Err(ApiError::InvalidRequest("give exactly one of customer_type and account_id".into())),
    };
    let provider = match request.provider {
        Some(provider) => provider,
        None => state.upstreams.route(&request.model).map(|route| route.provider.name.clone()).ok_or_else(|| ApiError::ModelNotFound(request.model.clone()))?,
    };
    let price = state.prices.get(&provider, &request.model, &customer_type).ok_or_else(|| ApiError::PriceNotConfigured {
        provider: provider.clone(),
        model: request.model.clone(),
        customer_type: customer_type.clone(),
    })?;
    let breakdown = tollgate_core::cost(&price.price, &request.usage).map_err(|error| ApiError::InvalidRequest(format!("cannot price this usage: {error}")))?;
    Ok(Json(json!({
        "provider": provider,
        "model": request.model,
        "customer_type": customer_type,
        "price_id": price.id,
        "input": breakdown.input,
        "cached_input": breakdown.cached_input,
        "cache_write": breakdown.cache_write,
        "output": breakdown.output,
        "per_request": breakdown.per_request,
        "total": breakdown.total,
    })))
}

#[utoipa::path(
    get,
    path = "/billing/transactions",
    tag = "billing",
    params(crate::routes::UsagePageParams),
    responses((status = 200, description = "Usage rows, newest first", body = crate::openapi::UsagePage), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn transactions(
    State(state): State<AppState>,
    params: Result<Query<UsagePageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(usage_page(&state, parse_query(params)?).await?))
}

#[utoipa::path(
    get,
    path = "/billing/summary",
    tag = "billing",
    params(crate::routes::reports::SummaryParams),
    responses((status = 200, description = "Usage totals by day, model or key", body = crate::openapi::SummaryPage), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn summary(
    State(state): State<AppState>,
    params: Result<Query<SummaryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SummaryPage>, ApiError> {
    let params = parse_query(params)?;
    if let Some(account_id) = &params.account_id
        && state.ledger.account(account_id).await?.is_none()
    {
        return Err(ApiError::NotFound(format!("account {account_id} not found")));
    }
    Ok(Json(reports::summary_page(&state, params, None).await?))
}
