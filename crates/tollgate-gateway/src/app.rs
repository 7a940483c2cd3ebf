//! The HTTP surface: client API under `/v1`, operator API under `/internal`, operations at the
//! root. `app` returns the router so tests can drive it without a socket.

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::auth;
use crate::console;
use crate::error::ApiError;

use crate::routes::{admin, channels, client, gemini, operations, ops, statements};
use crate::state::AppState;

/// Everything on one listener (no `internal_listen` configured).
pub fn app(state: AppState) -> Router {
    finish(client_routes().nest("/internal", internal_routes(&state)).route("/metrics", get(ops::metrics)), state)
}

/// The client API and health checks, for `listen` when `/internal` has a listener of its own.
pub fn public_app(state: AppState) -> Router {
    finish(client_routes(), state)
}

/// The operator API, `/metrics` and health checks, for `internal_listen`.
pub fn internal_app(state: AppState) -> Router {
    finish(Router::new().nest("/internal", internal_routes(&state)).route("/metrics", get(ops::metrics)), state)
}

/// Each handler authenticates (and throttles refused keys, `auth::authenticate`) before it
/// reads a body.
fn client_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(client::chat_completions))
        .route("/v1/messages", post(client::messages))
        .route("/v1/embeddings", post(client::embeddings))
        .route("/v1beta/models/{model_method}", post(gemini::generate))
        .route("/v1/models/{model_method}", post(gemini::generate))
        .route("/v1/models", get(client::models))
        .route("/v1/balance", get(client::balance))
        .route("/v1/usage", get(client::usage))
        .route("/v1/usage/summary", get(client::usage_summary))
        .route("/v1/statement", get(client::statement))
        .route("/v1/keys", get(client::keys))
}

/// The operator API, every route behind the token, checked before any extractor runs.
fn internal_routes(state: &AppState) -> Router<AppState> {
    admin::router()
        .merge(operations::router())
        .merge(statements::router())
        .merge(channels::router())
        .route_layer(from_fn_with_state(state.clone(), auth::operator_only))
}

/// Health checks, the console, the fallback and the layers every listener has.
fn finish(routes: Router<AppState>, state: AppState) -> Router {
    // Bodies are read with an explicit limit in each handler (a 413 in the contract's shape);
    // this outer limit is a backstop for routes that read with extractors.
    let body_limit = state.config.limits.request_body_bytes_max;
    let header_limit = state.config.limits.header_bytes_max;
    routes
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/", get(console::to_console))
        .route("/console", get(console::to_console))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .fallback(ops::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(crate::request_id::assign))
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| limit_headers(request, next, header_limit)))
        .with_state(state)
}

/// Refuses requests whose headers, all together, exceed the limit (431), before anything else
/// reads them. (The HTTP server's own bound, about 400 KiB and 100 headers, stays behind it.)
async fn limit_headers(request: Request, next: Next, limit: usize) -> Response {
    let size: usize = request.headers().iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if size > limit {
        return ApiError::HeadersTooLarge { size, limit }.into_response();
    }
    next.run(request).await
}
