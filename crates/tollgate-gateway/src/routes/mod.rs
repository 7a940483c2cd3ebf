//! Handlers: extract, call the service, shape the answer.

pub mod admin;
pub mod channels;
pub mod client;
pub mod gemini;
pub mod operations;
pub mod ops;
pub mod reports;
pub mod statements;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use futures_util::StreamExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tollgate_store::model::UsageQuery;

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::state::AppState;

/// Reads a request body under the configured limits, the one way every endpoint does:
/// 413 `request_too_large` once it passes `request_body_bytes_max` (at once when its declared
/// `Content-Length` already does, without waiting for a slow client to send it all);
/// 408 when it has not arrived within `request_body_timeout_ms`; 400 `invalid_request` when it
/// cannot be read to its end (the client stopped mid-body — not a size problem).
///
/// # Errors
/// As above.
pub async fn read_limited_body(limits: &LimitsConfig, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit_bytes = limits.request_body_bytes_max;
    let declared_bytes = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared_bytes.is_some_and(|declared| u64::try_from(limit_bytes).is_ok_and(|limit| declared > limit)) {
        return Err(ApiError::RequestTooLarge { limit_bytes });
    }
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|error| ApiError::InvalidRequest(format!("the request body could not be read to its end: {error}")))?;
            if bytes.len().saturating_add(chunk.len()) > limit_bytes {
                return Err(ApiError::RequestTooLarge { limit_bytes });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    let timeout_ms = limits.request_body_timeout_ms;
    tokio::time::timeout(Duration::from_millis(timeout_ms), read).await.map_err(|_| ApiError::BodyTimeout(timeout_ms))?
}

/// An operator API body, read by [`read_limited_body`] (axum's own `Bytes` extractor would
/// answer an oversized or unreadable body in plain text, not in the contract's shape).
pub struct LimitedBody(pub Bytes);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<LimitedBody, ApiError> {
        let (parts, body) = request.into_parts();
        read_limited_body(&state.config.limits, &parts.headers, body).await.map(LimitedBody)
    }
}

/// Rows per usage page by default and at most.
const PAGE_ROWS_DEFAULT: u32 = 100;
const PAGE_ROWS_MAX: u32 = 1_000;

/// The filters of a usage listing, as query parameters.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsagePageParams {
    pub account_id: Option<String>,
    pub api_key_id: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<i64>,
}

/// One page of usage rows, newest first, with the cursor of the next page when this one is full.
/// Rows inserted meanwhile have larger ids, so paging by `id < cursor` never repeats or skips.
///
/// # Errors
/// Bad times, or the ledger cannot be read.
pub async fn usage_page(state: &AppState, params: UsagePageParams) -> Result<Value, ApiError> {
    let limit = params.limit.unwrap_or(PAGE_ROWS_DEFAULT).clamp(1, PAGE_ROWS_MAX);
    let query = UsageQuery {
        account_id: params.account_id,
        api_key_id: params.api_key_id,
        start: time_param("start", params.start.as_deref())?,
        end: time_param("end", params.end.as_deref())?,
        limit,
        cursor: params.cursor,
    };
    let rows = state.ledger.usage_rows(query).await?;
    let next_cursor = if rows.len() == limit as usize { rows.last().map(|row| row.id) } else { None };
    Ok(json!({"object": "list", "data": rows, "next_cursor": next_cursor}))
}

/// Parses an optional RFC 3339 query parameter.
///
/// # Errors
/// `InvalidRequest` naming the parameter.
pub fn time_param(name: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    value
        .map(|text| {
            OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|_| ApiError::InvalidRequest(format!("{name} must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z")))
        })
        .transpose()
}
