//! tollgate-mock: a deterministic mock upstream LLM server.
//!
//! Speaks enough of the OpenAI Chat Completions / Embeddings protocol, the
//! Anthropic Messages protocol and Google's Gemini API (as AI Studio and Vertex AI
//! serve it) for demos, integration tests and benchmarks.
//!
//! Every completion is `N` repetitions of `" hello"`, which is exactly `N`
//! tokens in every encoding, so usage reported by the mock can be checked
//! against an independent count. Prompt usage is computed with
//! [`tollgate_core::tokens`].
//!
//! Behaviour can be changed per request through a top-level `"mock"` object
//! in the JSON body (see [`MockOverrides`]) or through `x-mock-*` headers, and for every
//! request at once with `PUT /mock/overrides` (a `MockOverrides` object; `{}` clears).
//! Precedence: body `mock` field > server-wide overrides > `x-mock-*` header > [`MockConfig`].
//!
//! Routes:
//! - `POST /v1/chat/completions` (OpenAI, streaming and non-streaming)
//! - `POST /v1/messages` (Anthropic, streaming and non-streaming)
//! - `POST /v1/messages/count_tokens` (Anthropic)
//! - `POST /v1/embeddings` (OpenAI)
//! - `POST /v1beta/models/{model}:generateContent`, `…:streamGenerateContent?alt=sse`
//!   (Gemini; also under `/v1/models/` and Vertex AI's
//!   `/v1/projects/{project}/locations/{location}/publishers/google/models/`)
//! - `GET /v1/models` (OpenAI shape; Anthropic shape if `anthropic-version` is sent)
//! - `GET|PUT /mock/overrides`, `GET /mock/stats`, `GET /mock/requests/last`
//! - `GET /healthz` → `200 ok`

mod anthropic;
mod common;
mod embeddings;
mod gemini;
mod openai;
mod stream;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;

pub use common::MockOverrides;

/// Server-wide defaults; each can be overridden per request.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Delay before the first byte of a response (default 0).
    pub latency_ms: u64,
    /// Default completion length in tokens (default 16).
    pub output_tokens: u64,
    /// Delay between streamed chunks (default 0).
    pub chunk_interval_ms: u64,
    /// Keep the last generation request for `GET /mock/requests/last` (default off: it buffers
    /// and copies every request's head, which the benchmark ceiling should not pay).
    pub record_last_request: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            output_tokens: 16,
            chunk_interval_ms: 0,
            record_last_request: false,
        }
    }
}

/// Maximum accepted request body size.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

pub(crate) struct AppState {
    pub(crate) config: MockConfig,
    /// Completion and embedding requests received, for tests that prove nothing reached the
    /// upstream without a hold (`GET /mock/stats`).
    generation_requests: std::sync::atomic::AtomicU64,
    last_request: std::sync::Mutex<Option<LastRequest>>,
    /// Overrides for every request, beneath each request's own (`PUT /mock/overrides`): one
    /// mock made to fail, slow down or recover while a test runs.
    overrides: std::sync::RwLock<MockOverrides>,
    models_openai: Bytes,
    models_anthropic: Bytes,
}

pub(crate) type SharedState = Arc<AppState>;

/// Models advertised by `GET /v1/models` (id, owner).
const MODELS: &[(&str, &str)] = &[
    ("demo-gpt", "tollgate-mock"),
    ("demo-gpt-mini", "tollgate-mock"),
    ("demo-claude", "tollgate-mock"),
    ("demo-embedding", "tollgate-mock"),
    ("demo-gemini", "tollgate-mock"),
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("text-embedding-3-small", "openai"),
    ("claude-sonnet-4-5", "anthropic"),
    ("claude-haiku-4-5", "anthropic"),
    ("gemini-2.5-flash", "google"),
];

fn models_openai_json() -> Bytes {
    let data: Vec<serde_json::Value> = MODELS
        .iter()
        .map(|(id, owner)| {
            serde_json::json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": owner})
        })
        .collect();
    let v = serde_json::json!({"object": "list", "data": data});
    Bytes::from(v.to_string())
}

fn models_anthropic_json() -> Bytes {
    let data: Vec<serde_json::Value> = MODELS
        .iter()
        .map(|(id, _)| {
            serde_json::json!({"type": "model", "id": id, "display_name": id, "created_at": "2023-11-14T22:13:20Z"})
        })
        .collect();
    let first = MODELS.first().map(|m| m.0);
    let last = MODELS.last().map(|m| m.0);
    let v =
        serde_json::json!({"data": data, "has_more": false, "first_id": first, "last_id": last});
    Bytes::from(v.to_string())
}

/// Builds the mock's router (already bound to its state).
pub fn router(config: MockConfig) -> Router {
    let state: SharedState = Arc::new(AppState {
        config,
        models_openai: models_openai_json(),
        models_anthropic: models_anthropic_json(),
        generation_requests: std::sync::atomic::AtomicU64::new(0),
        last_request: std::sync::Mutex::new(None),
        overrides: std::sync::RwLock::new(MockOverrides::default()),
    });
    let generation = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1beta/models/{model_method}", post(gemini::generate))
        .route("/v1/models/{model_method}", post(gemini::generate))
        .route(
            "/v1/projects/{project}/locations/{location}/publishers/google/models/{model_method}",
            post(gemini::vertex_generate),
        )
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), count_request));
    Router::new()
        .merge(generation)
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .route("/mock/requests/last", get(last_request))
        .route("/mock/overrides", get(overrides).put(set_overrides))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` resolves (graceful: in-flight
/// requests are allowed to finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // TCP_NODELAY: a stream's small chunks must not wait for the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        let _ = stream.set_nodelay(true);
    });
    // A router clone per connection, not a rebuilt route table (see the gateway's server.rs).
    axum::serve(listener, router(config).into_make_service())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn count_request(State(state): State<SharedState>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    state.generation_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let anthropic = request.uri().path().ends_with("/messages");
    let request = if state.config.record_last_request { record(&state, request).await } else { Ok(request) };
    let mut response = match request {
        Ok(request) => next.run(request).await,
        Err(refusal) => return refusal,
    };
    add_rate_limit_headers(response.headers_mut(), anthropic);
    response
}

/// Keeps the request as received (the body in a reference-counted buffer, not copied) so tests
/// can check what a gateway in front forwarded; hands it on unchanged.
async fn record(state: &AppState, request: axum::extract::Request) -> Result<axum::extract::Request, Response> {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return Err(common::error_response(common::Flavor::OpenAi, StatusCode::PAYLOAD_TOO_LARGE, "request body too large"));
    };
    if let Ok(mut last) = state.last_request.lock() {
        *last = Some(LastRequest { uri: parts.uri.clone(), headers: parts.headers.clone(), body: bytes.clone() });
    }
    Ok(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// The rate-limit headers OpenAI (`x-ratelimit-*`) and Anthropic (`anthropic-ratelimit-*`) send
/// with every answer, with fixed values, so tests can check a gateway passes them on.
fn add_rate_limit_headers(headers: &mut HeaderMap, anthropic: bool) {
    let pairs: &[(&'static str, &'static str)] = if anthropic {
        &[
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3999"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z"),
        ]
    } else {
        &[
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-reset-requests", "6ms"),
        ]
    };
    for (name, value) in pairs {
        headers.insert(*name, axum::http::HeaderValue::from_static(value));
    }
}

/// The last generation request the mock received.
pub(crate) struct LastRequest {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// `{"path", "headers", "body"}` of the last generation request (`body` as JSON when it is JSON),
/// or 404 before the first or when `record_last_request` is off.
async fn last_request(State(state): State<SharedState>) -> Response {
    let Ok(last) = state.last_request.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Some(last) = last.as_ref() else {
        return common::error_response(common::Flavor::OpenAi, StatusCode::NOT_FOUND, "no request recorded: none received yet, or record_last_request is off");
    };
    let body = serde_json::from_slice::<serde_json::Value>(&last.body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&last.body).into_owned()));
    let headers: serde_json::Map<String, serde_json::Value> = last
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_string(), serde_json::Value::String(value.to_str().ok()?.to_string()))))
        .collect();
    axum::Json(serde_json::json!({"path": last.uri.to_string(), "headers": headers, "body": body})).into_response()
}

impl AppState {
    /// A request's overrides over the server-wide ones.
    pub(crate) fn overrides_for(&self, request: Option<MockOverrides>) -> Option<MockOverrides> {
        let server = self.overrides.read().map(|server| server.clone()).unwrap_or_default();
        if server == MockOverrides::default() {
            return request;
        }
        Some(request.unwrap_or_default().over(&server))
    }
}

/// The server-wide overrides.
async fn overrides(State(state): State<SharedState>) -> Response {
    let current = state.overrides.read().map(|current| current.clone()).unwrap_or_default();
    axum::Json(current).into_response()
}

/// Replaces the server-wide overrides (`{}` clears them); answers with them.
async fn set_overrides(State(state): State<SharedState>, axum::Json(new): axum::Json<MockOverrides>) -> Response {
    if let Ok(mut current) = state.overrides.write() {
        *current = new.clone();
    }
    axum::Json(new).into_response()
}

/// `{"requests": N}`: generation requests received since start.
async fn stats(State(state): State<SharedState>) -> Response {
    let requests = state.generation_requests.load(std::sync::atomic::Ordering::Relaxed);
    axum::Json(serde_json::json!({"requests": requests})).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn models(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let body = if headers.contains_key("anthropic-version") {
        state.models_anthropic.clone()
    } else {
        state.models_openai.clone()
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_found(uri: Uri) -> Response {
    common::error_response(
        common::Flavor::OpenAi,
        StatusCode::NOT_FOUND,
        &format!("Unknown request URL: {}", uri.path()),
    )
}
