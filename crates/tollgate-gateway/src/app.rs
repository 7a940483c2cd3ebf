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
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Everything on one listener (no `internal_listen` configured).
pub fn app(state: AppState) -> Router {
    let routes = client_routes().nest("/internal", guarded(internal_routes(), &state)).merge(metrics_route());
    finish(routes.split_for_parts().0, state)
}

/// The client API and health checks, for `listen` when `/internal` has a listener of its own.
pub fn public_app(state: AppState) -> Router {
    finish(client_routes().split_for_parts().0, state)
}

/// The operator API, `/metrics` and health checks, for `internal_listen`.
pub fn internal_app(state: AppState) -> Router {
    let routes = OpenApiRouter::new().nest("/internal", guarded(internal_routes(), &state)).merge(metrics_route());
    finish(routes.split_for_parts().0, state)
}

/// Every documented route, for the description (`crate::openapi`): what `app` serves.
pub fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .merge(client_routes())
        .nest("/internal", internal_routes())
        .merge(metrics_route())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
}

/// Each handler authenticates (and throttles refused keys, `auth::authenticate`) before it
/// reads a body.
fn client_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(client::chat_completions))
        .routes(routes!(client::messages))
        .routes(routes!(client::embeddings))
        .routes(routes!(gemini::generate))
        // The same handler under the path Google's own clients also use.
        .route("/v1/models/{model_method}", post(gemini::generate))
        .routes(routes!(client::models))
        .routes(routes!(client::balance))
        .routes(routes!(client::usage))
        .routes(routes!(client::usage_summary))
        .routes(routes!(client::statement))
        .routes(routes!(client::keys))
}

/// The operator API.
fn internal_routes() -> OpenApiRouter<AppState> {
    admin::router().merge(operations::router()).merge(statements::router()).merge(channels::router())
}

/// Every operator route behind the token, checked before any extractor runs.
fn guarded(routes: OpenApiRouter<AppState>, state: &AppState) -> OpenApiRouter<AppState> {
    routes.route_layer(from_fn_with_state(state.clone(), auth::operator_only))
}

fn metrics_route() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ops::metrics))
}

/// Health checks, the console, the description, the fallback and the layers every listener has.
fn finish(routes: Router<AppState>, state: AppState) -> Router {
    // Bodies are read with an explicit limit in each handler (a 413 in the contract's shape);
    // this outer limit is a backstop for routes that read with extractors.
    let body_limit = state.config.limits.request_body_bytes_max;
    let header_limit = state.config.limits.header_bytes_max;
    routes
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(openapi_json))
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

/// `GET /openapi.json`: the description, built once.
async fn openapi_json() -> Response {
    static DESCRIPTION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DESCRIPTION.get_or_init(crate::openapi::description_json);
    ([(axum::http::header::CONTENT_TYPE, "application/json")], text.clone()).into_response()
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
