//! Handlers: extract, call the service, shape the answer.

pub mod admin;
pub mod client;
pub mod gemini;
pub mod operations;
pub mod ops;
pub mod statements;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tollgate_store::model::UsageQuery;

use crate::error::ApiError;
use crate::state::AppState;

/// A request body for the operator API, read under the configured size limit. axum's own `Bytes`
/// extractor answers an oversized or unreadable body in plain text; this answers in the
/// contract's shape (413 `request_too_large`, 400 `invalid_request`).
pub struct LimitedBody(pub Bytes);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<LimitedBody, ApiError> {
        let timeout_ms = state.config.limits.request_body_timeout_ms;
        let read = tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), Bytes::from_request(request, state));
        match read.await.map_err(|_| ApiError::BodyTimeout(timeout_ms))? {
            Ok(bytes) => Ok(LimitedBody(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::RequestTooLarge { limit_bytes: state.config.limits.request_body_bytes_max })
            }
            Err(rejection) => Err(ApiError::InvalidRequest(format!("the request body could not be read: {}", rejection.body_text()))),
        }
    }
}

/// Rows per usage page by default and at most.
const PAGE_ROWS_DEFAULT: u32 = 100;
const PAGE_ROWS_MAX: u32 = 1_000;

/// The filters of a usage listing, as query parameters.
#[derive(serde::Deserialize)]
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
