//! The gateway's one error type and its mapping to the contract's status codes and error codes.
//! Clients get the stable code and a message they can act on; logs get the detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tollgate_core::Money;
use tollgate_protocol::{Protocol, ProtocolError};
use tollgate_store::StoreError;

/// Which wire shape an error takes: OpenAI's `{"error": {...}}`, Anthropic's
/// `{"type": "error", "error": {...}}` or Google's `{"error": {"code", "message", "status"}}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ErrorShape {
    #[default]
    OpenAi,
    Anthropic,
    /// Google's `google.rpc.Status` JSON, which the Gemini SDKs parse; the contract's code rides
    /// in an `ErrorInfo` detail.
    Google,
}

impl ErrorShape {
    /// The shape the SDKs of a client protocol parse.
    pub fn for_protocol(protocol: Protocol) -> ErrorShape {
        match protocol {
            Protocol::OpenAiChat | Protocol::OpenAiEmbeddings => ErrorShape::OpenAi,
            Protocol::AnthropicMessages => ErrorShape::Anthropic,
            Protocol::GeminiGenerate => ErrorShape::Google,
        }
    }
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no price configured for {provider}:{model} and customer type {customer_type}")]
    PriceNotConfigured { provider: String, model: String, customer_type: String },
    #[error("{feature} is billed by the provider beyond token prices, and no price is configured for it on {provider}:{model}; send the request without it")]
    FeatureNotPriced { feature: String, provider: String, model: String },
    #[error("{0}")]
    InvalidApiKey(&'static str),
    #[error("insufficient balance: available {available}, this request needs up to {required}")]
    InsufficientBalance { available: Money, required: Money },
    #[error("the account's free funds (balance - held - charges not yet in the ledger) are {free}; taking out {amount} is refused")]
    InsufficientFreeFunds { free: Money, amount: Money },
    #[error("model {0} is not allowed for this key")]
    ModelNotAllowed(String),
    #[error("this API key has expired")]
    KeyExpired,
    #[error("account is suspended")]
    AccountSuspended,
    #[error("the operator token is missing or wrong")]
    Unauthorized,
    #[error("model {0} has no route on this gateway")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("a request with id {0} is in progress")]
    RequestInProgress(String),
    /// A charged request id whose response is not replayed: the id, and why not.
    #[error("request {0} was already completed and charged; {1}")]
    DuplicateRequest(String, &'static str),
    #[error("request id {0} names another request (sent by another key, or with another body or endpoint); a retry must repeat the request exactly, a new request needs a new X-Request-ID")]
    RequestIdReused(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body exceeds {limit_bytes} bytes")]
    RequestTooLarge { limit_bytes: usize },
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    #[error("request headers take {size} bytes, more than the {limit} allowed")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("rate limit reached for this key")]
    RateLimited { retry_after_secs: u64 },
    #[error("too many failed authentications from this address; retry after {retry_after_secs} s")]
    AuthFailuresThrottled { retry_after_secs: u64 },
    #[error("daily request quota exceeded")]
    DailyQuotaExceeded { retry_after_secs: u64 },
    #[error("monthly request quota exceeded")]
    MonthlyQuotaExceeded { retry_after_secs: u64 },
    #[error("{period} budget of this key exceeded")]
    KeyBudgetExceeded { period: &'static str, retry_after_secs: Option<u64> },
    #[error("upstream error: {0}")]
    Upstream(String),
    #[error("upstream returned status {status}: {message}")]
    UpstreamStatus { status: u16, message: String },
    #[error("upstream timed out after {0} ms")]
    UpstreamTimeout(u64),
    #[error("another request of this session is running (session lock); retry when it ends")]
    SessionBusy { retry_after_secs: u64 },
    /// Every channel of the model is disabled, open, cooling after a `Retry-After` or full.
    #[error("no upstream channel of model {model} is available now (circuit breakers open, rate limited or at capacity); nothing was charged")]
    NoChannelAvailable { model: String, retry_after_secs: Option<u64> },
    #[error("billing is unavailable, the request was not served: {0}")]
    BillingUnavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// Status and stable code, one arm per variant.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::PriceNotConfigured { .. } | ApiError::FeatureNotPriced { .. } => (StatusCode::BAD_REQUEST, "price_not_configured"),
            ApiError::InvalidApiKey(_) => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InsufficientBalance { .. } | ApiError::InsufficientFreeFunds { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_balance"),
            ApiError::ModelNotAllowed(_) => (StatusCode::FORBIDDEN, "model_not_allowed"),
            ApiError::KeyExpired => (StatusCode::FORBIDDEN, "key_expired"),
            ApiError::AccountSuspended => (StatusCode::FORBIDDEN, "account_suspended"),
            ApiError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::RequestInProgress(_) => (StatusCode::CONFLICT, "request_in_progress"),
            ApiError::SessionBusy { .. } => (StatusCode::CONFLICT, "session_busy"),
            ApiError::DuplicateRequest(..) => (StatusCode::CONFLICT, "duplicate_request"),
            ApiError::RequestIdReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "request_id_reused"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RequestTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "invalid_request"),
            ApiError::HeadersTooLarge { .. } => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request_too_large"),
            ApiError::RateLimited { .. } | ApiError::AuthFailuresThrottled { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::DailyQuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "daily_quota_exceeded"),
            ApiError::MonthlyQuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "monthly_quota_exceeded"),
            ApiError::KeyBudgetExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "key_budget_exceeded"),
            ApiError::Upstream(_) | ApiError::NoChannelAvailable { .. } => (StatusCode::BAD_GATEWAY, "upstream_error"),
            ApiError::UpstreamStatus { status, .. } => (upstream_status(*status), "upstream_error"),
            ApiError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ApiError::BillingUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "billing_unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::AuthFailuresThrottled { retry_after_secs }
            | ApiError::DailyQuotaExceeded { retry_after_secs }
            | ApiError::MonthlyQuotaExceeded { retry_after_secs }
            | ApiError::SessionBusy { retry_after_secs } => Some(*retry_after_secs),
            ApiError::KeyBudgetExceeded { retry_after_secs, .. } | ApiError::NoChannelAvailable { retry_after_secs, .. } => *retry_after_secs,
            _ => None,
        }
    }

    /// The OpenAI error `type` field; SDKs show it, few branch on it.
    fn openai_type(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 404 | 409 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "api_error",
        }
    }

    /// The Anthropic error `type` field.
    fn anthropic_type(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 409 | 402 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// Google's canonical status name for an HTTP status (`google.rpc.Code`), which the Gemini
    /// SDKs show and branch on.
    fn google_status(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 413 | 422 | 431 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            402 => "FAILED_PRECONDITION",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            408 => "DEADLINE_EXCEEDED",
            409 => "ABORTED",
            429 => "RESOURCE_EXHAUSTED",
            500 => "INTERNAL",
            501 => "UNIMPLEMENTED",
            502 | 503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "UNKNOWN",
        }
    }

    /// Renders the error in the given wire shape.
    pub fn into_response_shaped(self, shape: ErrorShape) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(detail, "internal error");
                "internal error; see the gateway log".to_string()
            }
            ApiError::BillingUnavailable(detail) => {
                tracing::error!(detail, "billing unavailable");
                "billing is unavailable, the request was not served; retry later".to_string()
            }
            other => other.to_string(),
        };
        let body = match shape {
            ErrorShape::OpenAi => serde_json::json!({
                "error": {"message": message, "type": Self::openai_type(status), "code": code, "param": null}
            }),
            ErrorShape::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": Self::anthropic_type(status), "message": message, "code": code}
            }),
            ErrorShape::Google => serde_json::json!({
                "error": {
                    "code": status.as_u16(),
                    "message": message,
                    "status": Self::google_status(status),
                    "details": [{
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": code.to_ascii_uppercase(),
                        "domain": "tollgate",
                        "metadata": {"code": code},
                    }],
                }
            }),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs()
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        if matches!(self, ApiError::RequestTooLarge { .. }) {
            // The rest of the body was never read, so the connection cannot carry another
            // request: said outright, so a client does not reuse it and meet a reset.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Upstream 4xx caused by the client's request pass through with their status; anything else
/// (5xx, or our own upstream credentials refused) is a 502.
fn upstream_status(status: u16) -> StatusCode {
    match status {
        400 | 404 | 413 | 422 => StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_shaped(ErrorShape::OpenAi)
    }
}

impl From<ProtocolError> for ApiError {
    fn from(error: ProtocolError) -> Self {
        match error {
            ProtocolError::InvalidRequest(message) => ApiError::InvalidRequest(message),
            ProtocolError::NotFound(message) => ApiError::NotFound(message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { entity, id } => ApiError::NotFound(format!("{entity} {id} not found")),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Invalid(message) => ApiError::InvalidRequest(message),
            StoreError::Unavailable(detail) => ApiError::BillingUnavailable(detail),
            StoreError::Overflow(what) => ApiError::InvalidRequest(format!("amount out of range ({what})")),
            StoreError::Corrupt(detail) | StoreError::Archive(detail) => ApiError::Internal(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_errors_keep_their_message_and_take_the_contract_code() {
        let invalid = ApiError::from(ProtocolError::InvalidRequest("model is required".into()));
        assert_eq!(invalid.status_and_code(), (StatusCode::BAD_REQUEST, "invalid_request"));
        assert_eq!(invalid.to_string(), "model is required");
        let not_found = ApiError::from(ProtocolError::NotFound("method countTokens is not served".into()));
        assert_eq!(not_found.status_and_code(), (StatusCode::NOT_FOUND, "not_found"));
        assert_eq!(not_found.to_string(), "method countTokens is not served");
    }

    #[test]
    fn each_protocol_gets_the_error_shape_its_sdks_parse() {
        assert_eq!(ErrorShape::for_protocol(Protocol::OpenAiChat), ErrorShape::OpenAi);
        assert_eq!(ErrorShape::for_protocol(Protocol::OpenAiEmbeddings), ErrorShape::OpenAi);
        assert_eq!(ErrorShape::for_protocol(Protocol::AnthropicMessages), ErrorShape::Anthropic);
        assert_eq!(ErrorShape::for_protocol(Protocol::GeminiGenerate), ErrorShape::Google);
    }
}
