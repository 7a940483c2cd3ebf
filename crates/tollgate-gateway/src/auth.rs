//! Who is calling: a client key resolved to its billing context, or the operator token.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tollgate_store::model::{AccountStatus, KeyStatus};

use crate::charge;
use crate::context::{BillingContext, Cached};
use crate::error::ApiError;
use crate::keys::hash_key;
use crate::state::AppState;
use crate::throttle::source_address;

/// The key from `Authorization: Bearer <key>`, `x-api-key: <key>` (Anthropic SDKs) or
/// `x-goog-api-key: <key>` (Gemini SDKs).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|value| value.to_str().ok()) {
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
        return Some(token.trim());
    }
    let value = headers.get("x-api-key").or_else(|| headers.get("x-goog-api-key"))?;
    value.to_str().ok().map(str::trim)
}

/// What a client route knows of its caller before it reads a body: the headers and the
/// address the request came from (for the refused-key throttle, [`crate::throttle`]).
pub struct Caller {
    pub headers: HeaderMap,
    pub source: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, Infallible> {
        Ok(Caller { headers: parts.headers.clone(), source: source_address(&parts.extensions) })
    }
}

/// Resolves the caller's key to its billing context, from the cache when warm. Every refused
/// key counts against the caller's address; an address past its refusals this minute is
/// refused (429) any key that would cost a ledger query and was never confirmed to exist — a
/// stranger cycling random keys is bounded, while clients sharing its address (one proxy)
/// keep working with their real keys.
///
/// # Errors
/// 401 for a missing, unknown or revoked key; 403 for an expired key or a suspended account;
/// 429 for a throttled address; 503 if the ledger cannot be read on a cache miss.
pub async fn authenticate(state: &AppState, caller: &Caller) -> Result<Arc<BillingContext>, ApiError> {
    let result = resolve_key(state, caller).await;
    if matches!(result, Err(ApiError::InvalidApiKey(_))) {
        state.key_auth_failures.record_failure(caller.source, Instant::now());
    }
    result
}

async fn resolve_key(state: &AppState, caller: &Caller) -> Result<Arc<BillingContext>, ApiError> {
    let headers = &caller.headers;
    // A key header sent twice is ambiguous (a proxy in front may have checked the other copy):
    // neither is trusted.
    if [AUTHORIZATION.as_str(), "x-api-key", "x-goog-api-key"].iter().any(|name| repeated(headers, name)) {
        return Err(ApiError::InvalidApiKey("send the API key in one header, once"));
    }
    let key = presented_key(headers)
        .filter(|key| !key.is_empty())
        .ok_or(ApiError::InvalidApiKey("missing API key: send Authorization: Bearer <key>"))?;
    let key_hash = hash_key(key);
    let cached = state.contexts.get(&key_hash);
    if !matches!(cached, Cached::Fresh(_))
        && let Some(retry_after_secs) = state.key_auth_failures.refused_for_secs(caller.source, Instant::now())
        && !state.contexts.confirmed(&key_hash)
    {
        metrics::counter!("tollgate_auth_throttled_total", "api" => "client").increment(1);
        return Err(ApiError::AuthFailuresThrottled { retry_after_secs });
    }
    let context = match cached {
        Cached::Fresh(context) => context,
        Cached::UnknownKey => return Err(ApiError::InvalidApiKey("unknown API key")),
        Cached::Miss { stale } => {
            let generation = state.contexts.generation();
            match load_context(state, &key_hash, stale.is_some()).await {
                Ok(context) => {
                    state.contexts.insert(key_hash, context.clone(), generation);
                    context.ok_or(ApiError::InvalidApiKey("unknown API key"))?
                }
                Err(ApiError::BillingUnavailable(detail)) => {
                    let Some(stale) = stale else { return Err(ApiError::BillingUnavailable(detail)) };
                    metrics::counter!("tollgate_context_cache_total", "result" => "stale_served").increment(1);
                    tracing::warn!(detail, key_id = stale.key.id, "the ledger cannot be read; using the key's billing context loaded before its TTL ran out");
                    stale
                }
                Err(error) => return Err(error),
            }
        }
    };
    if context.key.status == KeyStatus::Revoked {
        return Err(ApiError::InvalidApiKey("API key revoked"));
    }
    if context.key.expires_at.is_some_and(|expires_at| expires_at <= OffsetDateTime::now_utc()) {
        return Err(ApiError::KeyExpired);
    }
    if context.account.status == AccountStatus::Suspended {
        return Err(ApiError::AccountSuspended);
    }
    Ok(context)
}

/// Whether a header appears more than once (a key or a request id sent twice is refused, never
/// guessed at).
pub(crate) fn repeated(headers: &HeaderMap, name: &str) -> bool {
    headers.get_all(name).iter().nth(1).is_some()
}

/// Reads a key and its account from the ledger (`None`: no such key), within
/// `limits.context_lookup_timeout_ms`. While lookups are paused after a failed one (see
/// [`charge::ledger_unreachable`]) a key with a stale copy does not wait: an outage costs one
/// request a second that waits, not every one.
async fn load_context(state: &AppState, key_hash: &str, stale_available: bool) -> Result<Option<Arc<BillingContext>>, ApiError> {
    // The pause only ever trades a wait for a stale copy: a key with none is always asked for
    // (within the timeout), so a request just after the cache was dropped is not refused for
    // a failure that preceded the ledger's return.
    if stale_available && charge::ledger_lookups_paused(state) {
        return Err(ApiError::BillingUnavailable("the ledger did not answer a moment ago; lookups paused".into()));
    }
    let timeout = Duration::from_millis(state.config.limits.context_lookup_timeout_ms);
    let lookup = async {
        let Some(api_key) = state.ledger.key_by_hash(key_hash).await? else { return Ok(None) };
        let account = state
            .ledger
            .account(&api_key.account_id)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("key {} names a missing account", api_key.id)))?;
        Ok(Some(Arc::new(BillingContext { key: api_key, account })))
    };
    let result = match tokio::time::timeout(timeout, lookup).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::BillingUnavailable(format!("the ledger did not answer within {} ms", timeout.as_millis()))),
    };
    if matches!(result, Err(ApiError::BillingUnavailable(_))) {
        charge::ledger_unreachable(state);
    }
    result
}

/// The operator API's gate, a layer on every `/internal` route: it runs before any extractor,
/// so a stranger's body is never read (1,000 of them would otherwise pin 4 MiB each for up to
/// `request_body_timeout_ms`). A source past its failures this minute is refused without the
/// token being compared ([`crate::throttle`]); a missing or wrong token is a 401, counted.
pub async fn operator_only(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let source = source_address(request.extensions());
    let now = Instant::now();
    if let Some(retry_after_secs) = state.operator_auth_failures.refused_for_secs(source, now) {
        metrics::counter!("tollgate_auth_throttled_total", "api" => "operator").increment(1);
        return ApiError::AuthFailuresThrottled { retry_after_secs }.into_response();
    }
    if let Err(error) = require_operator(&state, request.headers()) {
        state.operator_auth_failures.record_failure(source, now);
        return error.into_response();
    }
    next.run(request).await
}

/// Checks the operator token in constant time.
///
/// # Errors
/// 401 when it is missing or wrong, or when no operator token is configured.
pub fn require_operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = state.config.admin_token.as_deref().filter(|token| !token.is_empty()).ok_or(ApiError::Unauthorized)?;
    if repeated(headers, AUTHORIZATION.as_str()) {
        return Err(ApiError::Unauthorized);
    }
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}
