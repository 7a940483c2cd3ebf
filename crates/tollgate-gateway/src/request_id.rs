//! Request ids: taken from `X-Request-ID` (or `X-Trace-ID`) or made here, validated, put in the
//! request's extensions for handlers and on every response. Per account, a request id is also
//! the idempotency key: it is charged at most once.

use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::{ApiError, ErrorShape};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const TRACE_ID_HEADER: &str = "x-trace-id";
/// Longest request id accepted.
pub const REQUEST_ID_CHARS_MAX: usize = 128;

/// The id of the request being handled.
#[derive(Clone, Debug)]
pub struct RequestId {
    pub id: String,
    /// Sent by the client, so it may name a request charged long ago; an id made here is new.
    pub presented: bool,
}

fn valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= REQUEST_ID_CHARS_MAX && id.bytes().all(|byte| byte.is_ascii_graphic())
}

/// A fresh id: time-ordered, so logs and rows sort by it.
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

/// The error shape of the endpoint a request is for, so a refusal made before the handler runs
/// still reaches an Anthropic or Gemini SDK in the shape it parses.
fn error_shape(request: &Request) -> ErrorShape {
    let path = request.uri().path();
    if path == "/v1/messages" {
        ErrorShape::Anthropic
    } else if path.starts_with("/v1beta/models/") || (path.starts_with("/v1/models/") && request.method() == Method::POST) {
        ErrorShape::Google
    } else {
        ErrorShape::OpenAi
    }
}

/// Middleware: assigns the id and stamps it on the response.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    // Two ids for one request make the idempotency key ambiguous: refused, not guessed.
    let repeated = [REQUEST_ID_HEADER, TRACE_ID_HEADER].iter().any(|name| crate::auth::repeated(headers, name));
    let presented = headers
        .get(REQUEST_ID_HEADER)
        .or_else(|| headers.get(TRACE_ID_HEADER))
        .map(|value| value.to_str().map(str::to_string));
    let request_id = match presented {
        None => RequestId { id: new_request_id(), presented: false },
        Some(Ok(id)) if valid(&id) && !repeated => RequestId { id, presented: true },
        Some(_) => {
            let error = ApiError::InvalidRequest(format!(
                "X-Request-ID must be sent once, as 1 to {REQUEST_ID_CHARS_MAX} visible ASCII characters"
            ));
            let mut response = error.into_response_shaped(error_shape(&request));
            let generated = new_request_id();
            if let Ok(value) = HeaderValue::from_str(&generated) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            return response;
        }
    };
    let header = HeaderValue::from_str(&request_id.id);
    request.extensions_mut().insert(request_id);
    let mut response = next.run(request).await;
    if let Ok(value) = header {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}
