//! Shared pieces: per-request overrides, provider-shaped errors, ids, text.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::MockConfig;

/// The text of one output token. `" hello"` repeated `N` times is exactly `N`
/// tokens in every supported encoding.
pub(crate) const TOKEN_TEXT: &str = " hello";

/// Longest completion served from the precomputed text (no allocation).
const CACHED_TOKENS: usize = 16 * 1024;

/// Upper bound on `n * N` for non-streaming responses (the whole body is
/// materialised in memory). Streams are produced lazily and are unbounded.
pub(crate) const MAX_NON_STREAM_TOKENS: u64 = 4_000_000;

/// Delays (latency, chunk interval) are clamped to this.
const MAX_DELAY: Duration = Duration::from_secs(3600);

static HELLO_CACHE: LazyLock<String> = LazyLock::new(|| TOKEN_TEXT.repeat(CACHED_TOKENS));

/// `" hello"` repeated `n` times.
pub(crate) fn hello_text(n: u64) -> Cow<'static, str> {
    match usize::try_from(n) {
        Ok(n) if n <= CACHED_TOKENS => {
            Cow::Borrowed(HELLO_CACHE.get(..n * TOKEN_TEXT.len()).unwrap_or_default())
        }
        Ok(n) => Cow::Owned(TOKEN_TEXT.repeat(n)),
        Err(_) => Cow::Borrowed(""),
    }
}

/// Which provider's wire format a response uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    OpenAi,
    Anthropic,
    /// Gemini (AI Studio and Vertex AI): `google.rpc.Status` errors.
    Google,
}

/// Per-request behaviour overrides, read from the top-level `"mock"` field of
/// a request body. Unknown fields are rejected (catches typos in tests).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockOverrides {
    /// Completion length in tokens (before `max_tokens` capping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    /// Delay before the first byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Delay between streamed chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_interval_ms: Option<u64>,
    /// Report no usage at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omit_usage: Option<bool>,
    /// Fail immediately with this HTTP status (200..=599) and a provider-shaped error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_status: Option<u16>,
    /// The error message of an injected failure (default: "mock: injected failure with status
    /// N"), e.g. the text of a real provider's error naming the operator's organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_message: Option<String>,
    /// Cut the connection after this many content chunks (non-streaming: the
    /// JSON body is truncated mid-way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_after_chunks: Option<u64>,
    /// Any JSON value, substituted verbatim for the usage object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_override: Option<Value>,
    /// Hidden thinking tokens to report on top of the output tokens (Gemini
    /// `thoughtsTokenCount`; OpenAI `completion_tokens_details.reasoning_tokens`, inside
    /// `completion_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thoughts_tokens: Option<u64>,
    /// Prompt tokens to report as served from the cache, at most the prompt (Gemini
    /// `cachedContentTokenCount`; OpenAI `prompt_tokens_details.cached_tokens`; Anthropic
    /// `cache_read_input_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Anthropic: prompt tokens to report as written to the cache
    /// (`cache_creation_input_tokens`; with `cached_tokens`, at most the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// Answer 401 unless the request carries this upstream API key the way its protocol sends
    /// it (OpenAI and Vertex AI: `Authorization: Bearer`; Anthropic: `x-api-key`; Gemini:
    /// `x-goog-api-key` or `?key=`), so a gateway's upstream credentials can be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_api_key: Option<String>,
    /// Streams: this text is sent verbatim right after the opening frames, before the first
    /// content frame — malformed server-sent events for a client to survive (data that is not
    /// JSON, lines without a field name, an event with no terminating blank line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed_sse: Option<String>,
    /// Generate `output_tokens` whatever the request's output cap says, as some upstreams do
    /// (and a gateway must then bound the stream and the charge itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_output_cap: Option<bool>,
    /// With `fail_status`: the `Retry-After` header of the failure, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl MockOverrides {
    /// Each field of `self`, else of `under` (the server-wide overrides beneath a request's).
    pub(crate) fn over(self, under: &MockOverrides) -> MockOverrides {
        let under = under.clone();
        MockOverrides {
            output_tokens: self.output_tokens.or(under.output_tokens),
            latency_ms: self.latency_ms.or(under.latency_ms),
            chunk_interval_ms: self.chunk_interval_ms.or(under.chunk_interval_ms),
            omit_usage: self.omit_usage.or(under.omit_usage),
            fail_status: self.fail_status.or(under.fail_status),
            fail_message: self.fail_message.or(under.fail_message),
            fail_after_chunks: self.fail_after_chunks.or(under.fail_after_chunks),
            usage_override: self.usage_override.or(under.usage_override),
            thoughts_tokens: self.thoughts_tokens.or(under.thoughts_tokens),
            cached_tokens: self.cached_tokens.or(under.cached_tokens),
            cache_write_tokens: self.cache_write_tokens.or(under.cache_write_tokens),
            expect_api_key: self.expect_api_key.or(under.expect_api_key),
            malformed_sse: self.malformed_sse.or(under.malformed_sse),
            ignore_output_cap: self.ignore_output_cap.or(under.ignore_output_cap),
            retry_after_secs: self.retry_after_secs.or(under.retry_after_secs),
        }
    }
}

/// Effective behaviour for one request.
#[derive(Debug)]
pub(crate) struct Behaviour {
    pub(crate) output_tokens: u64,
    pub(crate) latency: Duration,
    pub(crate) chunk_interval: Duration,
    pub(crate) omit_usage: bool,
    pub(crate) fail_status: Option<StatusCode>,
    pub(crate) fail_message: Option<String>,
    pub(crate) fail_after_chunks: Option<u64>,
    /// Pre-serialised usage override.
    pub(crate) usage_override: Option<String>,
    pub(crate) thoughts_tokens: u64,
    pub(crate) cached_tokens: u64,
    pub(crate) cache_write_tokens: u64,
    pub(crate) expect_api_key: Option<String>,
    /// Raw bytes sent after a stream's opening frames (see [`MockOverrides::malformed_sse`]).
    pub(crate) malformed_sse: Option<Bytes>,
    /// See [`MockOverrides::ignore_output_cap`].
    pub(crate) ignore_output_cap: bool,
    pub(crate) retry_after_secs: Option<u64>,
}

impl Behaviour {
    /// The output tokens to generate under the request's cap, and whether the cap stopped them.
    pub(crate) fn capped_output(&self, cap: Option<u64>) -> (u64, bool) {
        match cap {
            Some(cap) if cap < self.output_tokens && !self.ignore_output_cap => (cap, true),
            _ => (self.output_tokens, false),
        }
    }
}

impl Behaviour {
    /// Merges body overrides > `x-mock-*` headers > config.
    pub(crate) fn resolve(
        config: &MockConfig,
        headers: &HeaderMap,
        body: Option<MockOverrides>,
        flavor: Flavor,
    ) -> Result<Self, ApiError> {
        let body = body.unwrap_or_default();
        let output_tokens = pick(
            body.output_tokens,
            header_u64(headers, "x-mock-output-tokens", flavor)?,
            config.output_tokens,
        );
        let latency_ms = pick(
            body.latency_ms,
            header_u64(headers, "x-mock-latency-ms", flavor)?,
            config.latency_ms,
        );
        let chunk_interval_ms = pick(
            body.chunk_interval_ms,
            header_u64(headers, "x-mock-chunk-interval-ms", flavor)?,
            config.chunk_interval_ms,
        );
        let omit_usage = body
            .omit_usage
            .or(header_bool(headers, "x-mock-omit-usage", flavor)?)
            .unwrap_or(false);
        let fail_status =
            match body
                .fail_status
                .or(header_u16(headers, "x-mock-fail-status", flavor)?)
            {
                None => None,
                Some(code) => match StatusCode::from_u16(code) {
                    Ok(s) if (200..=599).contains(&code) => Some(s),
                    _ => {
                        return Err(ApiError::bad_request(
                            flavor,
                            format!("mock.fail_status must be within 200..=599, got {code}"),
                        ));
                    }
                },
            };
        let fail_after_chunks =
            body.fail_after_chunks
                .or(header_u64(headers, "x-mock-fail-after-chunks", flavor)?);
        let usage_override = body.usage_override.as_ref().map(Value::to_string);
        let thoughts_tokens = body.thoughts_tokens.unwrap_or(0);
        let cached_tokens = body.cached_tokens.unwrap_or(0);
        Ok(Self {
            output_tokens,
            latency: Duration::from_millis(latency_ms).min(MAX_DELAY),
            chunk_interval: Duration::from_millis(chunk_interval_ms).min(MAX_DELAY),
            omit_usage,
            fail_status,
            fail_message: body.fail_message,
            fail_after_chunks,
            usage_override,
            thoughts_tokens,
            cached_tokens,
            cache_write_tokens: body.cache_write_tokens.unwrap_or(0),
            ignore_output_cap: body.ignore_output_cap.unwrap_or(false),
            retry_after_secs: body.retry_after_secs,
            expect_api_key: body.expect_api_key,
            malformed_sse: body.malformed_sse.map(Bytes::from),
        })
    }

    /// Refuses a request without the expected upstream key, if one is expected.
    pub(crate) fn check_api_key(&self, presented: Option<&str>, flavor: Flavor) -> Result<(), ApiError> {
        match (&self.expect_api_key, presented) {
            (None, _) => Ok(()),
            (Some(expected), Some(presented)) if presented == expected => Ok(()),
            (Some(_), Some(_)) => Err(ApiError::new(flavor, StatusCode::UNAUTHORIZED, "mock: wrong API key")),
            (Some(_), None) => Err(ApiError::new(flavor, StatusCode::UNAUTHORIZED, "mock: missing API key")),
        }
    }

    /// Fails with the injected status, if one was requested.
    pub(crate) fn check_injected_failure(&self, flavor: Flavor) -> Result<(), ApiError> {
        match self.fail_status {
            None => Ok(()),
            Some(status) => {
                tracing::debug!(%status, "tollgate-mock: injected failure");
                let message = self.fail_message.clone().unwrap_or_else(|| format!("mock: injected failure with status {}", status.as_u16()));
                Err(ApiError { retry_after_secs: self.retry_after_secs, ..ApiError::new(flavor, status, message) })
            }
        }
    }

    /// A stream's opening frames, followed by the malformed text to inject, if any.
    pub(crate) fn stream_head(&self, mut head: Vec<Bytes>) -> Vec<Bytes> {
        head.extend(self.malformed_sse.clone());
        head
    }

    /// Sleeps for the configured first-byte latency.
    pub(crate) async fn first_byte_delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

fn pick(body: Option<u64>, header: Option<u64>, default: u64) -> u64 {
    body.or(header).unwrap_or(default)
}

fn header_str<'h>(
    headers: &'h HeaderMap,
    name: &str,
    flavor: Flavor,
) -> Result<Option<&'h str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| bad_header(name, flavor)),
    }
}

fn bad_header(name: &str, flavor: Flavor) -> ApiError {
    ApiError::bad_request(flavor, format!("invalid value for header {name}"))
}

fn header_u64(headers: &HeaderMap, name: &str, flavor: Flavor) -> Result<Option<u64>, ApiError> {
    match header_str(headers, name, flavor)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| bad_header(name, flavor)),
    }
}

fn header_u16(headers: &HeaderMap, name: &str, flavor: Flavor) -> Result<Option<u16>, ApiError> {
    match header_str(headers, name, flavor)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| bad_header(name, flavor)),
    }
}

fn header_bool(headers: &HeaderMap, name: &str, flavor: Flavor) -> Result<Option<bool>, ApiError> {
    match header_str(headers, name, flavor)? {
        None => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(_) => Err(bad_header(name, flavor)),
    }
}

/// A provider-shaped error (rendered by [`error_response`]).
#[derive(Debug)]
pub(crate) struct ApiError {
    flavor: Flavor,
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(flavor: Flavor, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            flavor,
            status,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub(crate) fn bad_request(flavor: Flavor, message: impl Into<String>) -> Self {
        Self::new(flavor, StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = error_response(self.flavor, self.status, &self.message);
        if let Some(value) = self.retry_after_secs.and_then(|secs| HeaderValue::from_str(&secs.to_string()).ok()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// A provider-shaped JSON error response.
pub(crate) fn error_response(flavor: Flavor, status: StatusCode, message: &str) -> Response {
    let code = status.as_u16();
    let body = match flavor {
        Flavor::OpenAi => {
            let (kind, err_code) = match code {
                400 => ("invalid_request_error", Some("invalid_request")),
                401 => ("invalid_request_error", Some("invalid_api_key")),
                403 => ("permission_error", Some("permission_denied")),
                404 => ("invalid_request_error", Some("not_found")),
                413 => ("invalid_request_error", Some("request_too_large")),
                429 => ("requests", Some("rate_limit_exceeded")),
                503 => ("server_error", Some("service_unavailable")),
                500..=599 => ("server_error", Some("server_error")),
                _ => ("invalid_request_error", None),
            };
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": err_code}})
        }
        Flavor::Anthropic => {
            let kind = match code {
                401 => "authentication_error",
                402 => "billing_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                504 => "timeout_error",
                529 => "overloaded_error",
                500..=599 => "api_error",
                _ => "invalid_request_error",
            };
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Flavor::Google => {
            let status_name = match code {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                409 => "ABORTED",
                429 => "RESOURCE_EXHAUSTED",
                501 => "UNIMPLEMENTED",
                503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                500..=599 => "INTERNAL",
                _ => "UNKNOWN",
            };
            serde_json::json!({"error": {"code": code, "message": message, "status": status_name}})
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The token of `Authorization: Bearer <token>`.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A header's value as text.
pub(crate) fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim)
}

/// 400 for an unparseable / ill-typed body.
pub(crate) fn bad_body(flavor: Flavor, err: &serde_json::Error) -> ApiError {
    ApiError::bad_request(flavor, format!("invalid request body: {err}"))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique id with the given prefix.
pub(crate) fn next_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{n:016x}")
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `s` as a JSON string literal (with quotes).
pub(crate) fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// A complete JSON response.
pub(crate) fn json_response(body: String, request_id_header: &'static str, id: &str) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    insert_request_id(&mut resp, request_id_header, id);
    resp
}

/// A 200 JSON response whose body is cut after roughly half of its bytes,
/// simulating a connection dropped mid-response.
pub(crate) fn truncated_json_response(
    body: String,
    request_id_header: &'static str,
    id: &str,
) -> Response {
    let bytes = Bytes::from(body);
    let stream = crate::stream::SseFrames::truncated(bytes.slice(..bytes.len() / 2));
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response();
    insert_request_id(&mut resp, request_id_header, id);
    resp
}

pub(crate) fn insert_request_id(resp: &mut Response, name: &'static str, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(name, v);
    }
}
