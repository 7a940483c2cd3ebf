//! The Gemini API's client routes: `POST /v1beta/models/{model}:generateContent` and
//! `POST /v1beta/models/{model}:streamGenerateContent?alt=sse` (the same under `/v1`). The URL
//! names the model and the method; from there the charge path is the one every protocol takes
//! ([`proxy::handle_at`]), and errors come back in Google's shape.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde::Deserialize;

use tollgate_protocol::{Protocol, UrlFacts, gemini};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorShape};
use crate::proxy;
use crate::request_id::RequestId;
use crate::state::AppState;

/// The query parameters Gemini clients send; others are ignored.
#[derive(Deserialize)]
pub struct GeminiQuery {
    /// `sse` asks for a stream of server-sent events (the only stream served).
    alt: Option<String>,
    /// The API key, from clients that put it in the URL rather than in a header.
    key: Option<String>,
}

/// `generateContent` and `streamGenerateContent` of one model.
#[utoipa::path(
    post,
    path = "/v1beta/models/{model_method}",
    tag = "client",
    params(("model_method" = String, Path, description = "`<model>:generateContent` or `<model>:streamGenerateContent`")),
    request_body(content = serde_json::Value, description = "A Gemini generateContent request", content_type = "application/json"),
    responses((status = 200, description = "The upstream's answer", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("client_key" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    model_method: Result<Path<String>, PathRejection>,
    query: Result<Query<GeminiQuery>, QueryRejection>,
    mut caller: Caller,
    body: Body,
) -> Response {
    let facts = match url_facts(model_method, query, &mut caller.headers) {
        Ok(facts) => facts,
        Err(error) => {
            metrics::counter!("tollgate_requests_total", "outcome" => error.status_and_code().1).increment(1);
            return error.into_response_shaped(ErrorShape::Google);
        }
    };
    proxy::handle_at(state, Protocol::GeminiGenerate, facts, request_id, caller, body).await
}

/// Reads the URL; a `?key=` stands in for the key header when no credential header was sent
/// (the key is never forwarded: upstream URLs are built from the route alone).
fn url_facts(
    model_method: Result<Path<String>, PathRejection>,
    query: Result<Query<GeminiQuery>, QueryRejection>,
    headers: &mut HeaderMap,
) -> Result<UrlFacts, ApiError> {
    let Path(model_method) = model_method.map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
    let Query(query) = query.map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
    let has_credential_header = [AUTHORIZATION.as_str(), "x-api-key", "x-goog-api-key"].iter().any(|name| headers.contains_key(*name));
    if !has_credential_header
        && let Some(key) = query.key.as_deref().and_then(|key| HeaderValue::from_str(key).ok()) {
            headers.insert("x-goog-api-key", key);
        }
    Ok(gemini::url_facts(&model_method, query.alt.as_deref())?)
}
