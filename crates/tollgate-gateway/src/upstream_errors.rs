//! What a client is told when the upstream refuses a request, and what the operator's log keeps.
//!
//! An upstream's error text speaks to the account that called it — the operator's: OpenAI's 429
//! names the organization and its limits, a 401 says which key was refused. The client gets the
//! upstream's own message only for the refusals that are about its request (400, 404, 413, 422,
//! passed on with their status: a context too long, a model that does not exist), with anything
//! that looks like an identifier taken out and the length bounded; for every other status only
//! the upstream's error code (`rate_limit_exceeded`), beside the status the error states. The
//! operator's log gets the text as sent, bounded.

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

/// Most of an upstream error body read: past it the rest is not waited for.
pub const ERROR_BODY_BYTES_MAX: usize = 16 * 1024;
/// Most of an upstream error body written to the log.
const LOGGED_BYTES_MAX: usize = 2048;
/// Most characters of an upstream message passed to a client.
const CLIENT_MESSAGE_CHARS_MAX: usize = 300;
/// Most characters of an upstream error code passed to a client.
const CODE_CHARS_MAX: usize = 64;
/// Pieces of text that mark an identifier of the operator's account, a credential or an address.
const IDENTIFYING: [&str; 10] = ["org-", "org_", "sk-", "sk_", "proj_", "proj-", "key-", "acct_", "user-", "://"];

/// The client's message where the upstream gave no code to pass on.
const WITHHELD: &str = "details withheld";

/// An upstream refusal, split for its two readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamRefusal {
    /// For the client, after "upstream returned status N: " in the error's `message`.
    pub client_message: String,
    /// For the operator's log: the body as sent, bounded, lossily decoded.
    pub logged: String,
}

/// Reads at most [`ERROR_BODY_BYTES_MAX`] of a body, within `timeout`; what was read by then.
pub async fn read_error_body(response: reqwest::Response, timeout: std::time::Duration) -> Bytes {
    let mut body = Vec::new();
    let _ = tokio::time::timeout(timeout, read_body_at_most(response, ERROR_BODY_BYTES_MAX, &mut body)).await;
    Bytes::from(body)
}

/// Appends an upstream body to `body` up to `limit` bytes: `Ok(true)` when it ended within
/// them, `Ok(false)` when it went on past them (the rest is neither read nor waited for, so an
/// endless body costs `limit` bytes of memory, not all the gateway has).
///
/// # Errors
/// The upstream connection failed mid-body; `body` keeps what was read.
pub async fn read_body_at_most(response: reqwest::Response, limit: usize, body: &mut Vec<u8>) -> Result<bool, reqwest::Error> {
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(false);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(true)
}

/// Splits an upstream's error `body` with `status` into what the client and the log are told.
pub fn refusal(status: u16, body: &[u8]) -> UpstreamRefusal {
    let json = serde_json::from_slice::<Value>(body).ok();
    let field = |pointer: &str| json.as_ref().and_then(|json| json.pointer(pointer)).and_then(Value::as_str);
    let logged = String::from_utf8_lossy(&body[..body.len().min(LOGGED_BYTES_MAX)]).into_owned();
    let about_the_request = matches!(status, 400 | 404 | 413 | 422);
    let client_message = match field("/error/message") {
        Some(message) if about_the_request => scrubbed(message),
        // OpenAI's code, Anthropic's type, Google's status.
        _ => ["/error/code", "/error/type", "/error/status"]
            .into_iter()
            .filter_map(field)
            .find(|code| is_code(code))
            .map_or_else(|| WITHHELD.to_string(), str::to_string),
    };
    UpstreamRefusal { client_message, logged }
}

fn is_code(text: &str) -> bool {
    !text.is_empty() && text.len() <= CODE_CHARS_MAX && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// The message without words that look like identifiers, control characters or excess length.
fn scrubbed(message: &str) -> String {
    let mut out = String::new();
    for word in message.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        let lower = word.to_ascii_lowercase();
        if IDENTIFYING.iter().any(|mark| lower.contains(mark)) || word.contains('@') {
            out.push_str("[redacted]");
        } else {
            out.extend(word.chars().filter(|character| !character.is_control()));
        }
    }
    if out.chars().count() > CLIENT_MESSAGE_CHARS_MAX {
        out = out.chars().take(CLIENT_MESSAGE_CHARS_MAX).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_account_error_tells_the_client_the_status_and_code_only() {
        let body = br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-AbC123 on tokens per min (TPM): Limit 30000, Used 29000","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let rate_limited = refusal(429, body);
        assert_eq!(rate_limited.client_message, "rate_limit_exceeded");
        assert!(rate_limited.logged.contains("org-AbC123"), "the operator sees it all");
        let anthropic = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert_eq!(refusal(401, anthropic).client_message, "authentication_error");
        assert_eq!(refusal(503, b"<html>bad gateway</html>").client_message, WITHHELD);
        let odd_code = br#"{"error":{"message":"x","code":"has spaces and <html>"}}"#;
        assert_eq!(refusal(500, odd_code).client_message, WITHHELD);
    }

    #[test]
    fn a_request_error_keeps_its_message_without_identifiers() {
        let body = br#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130512 tokens.","code":"context_length_exceeded"}}"#;
        assert_eq!(refusal(400, body).client_message, "This model's maximum context length is 128000 tokens. However, your messages resulted in 130512 tokens.");
        let naming = br#"{"error":{"message":"The model gpt-9 does not exist or you do not have access to it (project proj_XYZ, org-42, ops@example.com, see https://x.test/a)\u0007"}}"#;
        assert_eq!(
            refusal(404, naming).client_message,
            "The model gpt-9 does not exist or you do not have access to it (project [redacted] [redacted] [redacted] see [redacted]"
        );
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "word ".repeat(200));
        let message = refusal(400, long.as_bytes()).client_message;
        assert_eq!(message.chars().count(), CLIENT_MESSAGE_CHARS_MAX + 1);
        assert!(message.ends_with('…'));
        // No message: the status alone.
        assert_eq!(refusal(413, b"too large").client_message, WITHHELD);
    }
}
