//! Request ids: taken from `X-Request-ID` (or `X-Trace-ID`) or made here, validated, put in the
//! request's extensions for handlers and on every response. Per account, a request id is also
//! the idempotency key: it is charged at most once.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const TRACE_ID_HEADER: &str = "x-trace-id";
/// Longest request id accepted.
pub const REQUEST_ID_CHARS_MAX: usize = 128;

/// The id of the request being handled.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

fn valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= REQUEST_ID_CHARS_MAX && id.bytes().all(|byte| byte.is_ascii_graphic())
}

/// A fresh id: time-ordered, so logs and rows sort by it.
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

/// Middleware: assigns the id and stamps it on the response.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .or_else(|| request.headers().get(TRACE_ID_HEADER))
        .map(|value| value.to_str().map(str::to_string));
    let request_id = match presented {
        None => new_request_id(),
        Some(Ok(id)) if valid(&id) => id,
        Some(_) => {
            let error = ApiError::InvalidRequest(format!(
                "X-Request-ID must be 1 to {REQUEST_ID_CHARS_MAX} visible ASCII characters"
            ));
            let mut response = error.into_response();
            let generated = new_request_id();
            if let Ok(value) = HeaderValue::from_str(&generated) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            return response;
        }
    };
    request.extensions_mut().insert(RequestId(request_id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
