//! Request ids: taken from `X-Request-ID` (or `X-Trace-ID`) or made here, validated, put in the
//! request's extensions for handlers and on every response. Per account, a request id is also
//! the idempotency key: it is charged at most once.

use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tollgate_protocol::{Protocol, UrlFacts};

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

/// What a charged request id is bound to besides its key: SHA-256 over the endpoint (the
/// protocol, and the model a Gemini URL names) and the body as the client sent it, in canonical
/// form (keys sorted at every depth, no whitespace), as hex of its first 16 bytes. Any other
/// value of any field makes another request, whose id then gets `request_id_reused`, never the
/// stored answer of the first — except streaming, which is left out (a `stream` field, a
/// Gemini streaming URL): a streaming retry of a charged request gets `duplicate_request`, as
/// the contract says of every streaming retry.
pub fn request_fingerprint(protocol: Protocol, url: &UrlFacts, body: &Map<String, Value>) -> String {
    let mut hash = Sha256::new();
    hash.update(format!("{protocol:?}\0{}\0", url.model.as_deref().unwrap_or_default()));
    // serde_json's Map keeps keys sorted (its `preserve_order` feature is off): the form is
    // canonical. A key and its value in JSON delimit themselves, so the sequence is unambiguous.
    for (field, value) in body.iter().filter(|(field, _)| field.as_str() != "stream") {
        // Writing into a hash cannot fail, and these values came from JSON.
        let _ = serde_json::to_writer(HashWriter(&mut hash), &(field, value));
    }
    hex::encode(&hash.finalize()[..16])
}

/// Feeds what is serialized into a hash, with no buffer in between.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use serde_json::json;

    use super::*;

    fn fingerprint(protocol: Protocol, model: Option<&str>, body: Value) -> String {
        let url = UrlFacts { model: model.map(str::to_string), stream: false };
        request_fingerprint(protocol, &url, body.as_object().unwrap())
    }

    #[test]
    fn a_fingerprint_names_the_request_not_its_spelling() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        let chat = fingerprint(Protocol::OpenAiChat, None, body.clone());
        assert_eq!(chat.len(), 32);
        let reordered: Value = serde_json::from_str(r#"{ "max_tokens": 5, "messages": [{"content": "hi", "role": "user"}], "model": "m" }"#).unwrap();
        assert_eq!(fingerprint(Protocol::OpenAiChat, None, reordered), chat, "key order and whitespace are spelling");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        assert_eq!(fingerprint(Protocol::OpenAiChat, None, streamed), chat, "streaming is left out");

        let mut other_content = body.clone();
        other_content["messages"][0]["content"] = json!("hi!");
        let mut other_cap = body.clone();
        other_cap["max_tokens"] = json!(6);
        let mut extra_field = body.clone();
        extra_field["temperature"] = json!(0);
        for other in [other_content, other_cap, extra_field] {
            assert_ne!(fingerprint(Protocol::OpenAiChat, None, other), chat);
        }
        assert_ne!(fingerprint(Protocol::AnthropicMessages, None, body.clone()), chat, "another endpoint");
        let gemini = json!({"contents": [{"parts": [{"text": "hi"}]}]});
        assert_ne!(fingerprint(Protocol::GeminiGenerate, Some("a"), gemini.clone()), fingerprint(Protocol::GeminiGenerate, Some("b"), gemini), "the model in the URL");
    }
}
