//! Anthropic Messages: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::SharedState;
use crate::common::{
    ApiError, Behaviour, Flavor, MAX_NON_STREAM_TOKENS, MockOverrides, bad_body, hello_text,
    json_response, json_string, next_id, truncated_json_response,
};
use crate::stream::SseFrames;
use tollgate_core::tokens::{count_chat_prompt, count_text, encoding_for_model};

const F: Flavor = Flavor::Anthropic;
const REQUEST_ID: &str = "request-id";

const CONTENT_BLOCK_START: &[u8] = b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
const PING: &[u8] = b"event: ping\ndata: {\"type\":\"ping\"}\n\n";
const TEXT_DELTA: &[u8] = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" hello\"}}\n\n";
const CONTENT_BLOCK_STOP: &[u8] =
    b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
const MESSAGE_STOP: &[u8] = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    messages: Vec<Value>,
    system: Option<Value>,
    max_tokens: Option<u64>,
    stream: Option<bool>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    mock: Option<MockOverrides>,
}

/// The tool a request forces (`tool_choice` "any": the first tool; "tool": the one named),
/// which a non-streaming answer then uses instead of writing text.
fn forced_tool(tools: &[Value], tool_choice: Option<&Value>) -> Option<String> {
    let choice = tool_choice?;
    let name = match choice.get("type")?.as_str()? {
        "any" => tools.first()?.get("name")?,
        "tool" => choice.get("name")?,
        _ => return None,
    };
    name.as_str().map(str::to_string)
}

fn require_version(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key("anthropic-version") {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            F,
            "anthropic-version: header is required",
        ))
    }
}

/// Input tokens: messages plus the `system` prompt (string or text blocks).
fn input_tokens(req: &MessagesRequest) -> Result<u64, ApiError> {
    let enc = encoding_for_model(&req.model);
    let system = match &req.system {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => count_text(enc, s),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .map(|t| count_text(enc, t))
            .fold(0u64, u64::saturating_add),
        Some(_) => {
            return Err(ApiError::bad_request(
                F,
                "system: expected a string or an array of text blocks",
            ));
        }
    };
    Ok(count_chat_prompt(enc, &req.messages).saturating_add(system))
}

fn parse(headers: &HeaderMap, body: &[u8]) -> Result<MessagesRequest, ApiError> {
    require_version(headers)?;
    serde_json::from_slice(body).map_err(|e| bad_body(F, &e))
}

pub(crate) async fn count_tokens(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut req = parse(&headers, &body)?;
    let behaviour = Behaviour::resolve(&state.config, &headers, state.overrides_for(req.mock.take()), F)?;
    behaviour.check_api_key(crate::common::header_text(&headers, "x-api-key"), F)?;
    behaviour.check_injected_failure(F)?;
    let tokens = input_tokens(&req)?;
    behaviour.first_byte_delay().await;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"input_tokens":{tokens}}}"#),
    )
        .into_response())
}

pub(crate) async fn messages(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut req = parse(&headers, &body)?;
    let mut behaviour = Behaviour::resolve(&state.config, &headers, state.overrides_for(req.mock.take()), F)?;
    behaviour.check_api_key(crate::common::header_text(&headers, "x-api-key"), F)?;
    behaviour.check_injected_failure(F)?;
    let (tokens, capped) = behaviour.capped_output(req.max_tokens);
    let stop_reason = if capped { "max_tokens" } else { "end_turn" };
    let stream = req.stream.unwrap_or(false);
    if !stream && tokens > MAX_NON_STREAM_TOKENS {
        return Err(ApiError::bad_request(
            F,
            format!("mock: non-streaming output limited to {MAX_NON_STREAM_TOKENS} tokens"),
        ));
    }
    let input = input_tokens(&req)?;
    let id = next_id("msg_mock_");
    let model = json_string(&req.model);
    let usage_override = behaviour.usage_override.take();
    let omit_usage = behaviour.omit_usage;
    let (cache_read, cache_write) = (behaviour.cached_tokens, behaviour.cache_write_tokens);
    // Usage for `message_start` (`start`) or the final usage.
    let usage = |start: bool| -> Option<String> {
        if omit_usage {
            None
        } else if let Some(o) = &usage_override {
            Some(o.clone())
        } else if start {
            Some(usage_json(input, cache_read, cache_write, 1))
        } else if stream {
            Some(format!(r#"{{"output_tokens":{tokens}}}"#))
        } else {
            Some(usage_json(input, cache_read, cache_write, tokens))
        }
    };

    behaviour.first_byte_delay().await;

    Ok(if stream {
        let mut start = format!(
            r#"event: message_start
data: {{"type":"message_start","message":{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":[],"stop_reason":null,"stop_sequence":null"#
        );
        if let Some(u) = usage(true) {
            let _ = write!(start, r#","usage":{u}"#);
        }
        start.push_str("}}\n\n");
        let mut delta = format!(
            r#"event: message_delta
data: {{"type":"message_delta","delta":{{"stop_reason":"{stop_reason}","stop_sequence":null}}"#
        );
        if let Some(u) = usage(false) {
            let _ = write!(delta, r#","usage":{u}"#);
        }
        delta.push_str("}\n\n");
        let head = vec![
            Bytes::from(start),
            Bytes::from_static(CONTENT_BLOCK_START),
            Bytes::from_static(PING),
        ];
        let tail = vec![
            Bytes::from_static(CONTENT_BLOCK_STOP),
            Bytes::from(delta),
            Bytes::from_static(MESSAGE_STOP),
        ];
        SseFrames::new(
            behaviour.stream_head(head),
            vec![Bytes::from_static(TEXT_DELTA)],
            tokens,
            tail,
            behaviour.fail_after_chunks,
            behaviour.chunk_interval,
        )
        .into_response(REQUEST_ID, &id)
    } else {
        let text = hello_text(tokens);
        let (content, stop_reason) = match forced_tool(&req.tools, req.tool_choice.as_ref()) {
            Some(tool) => (
                format!(r#"[{{"type":"tool_use","id":"toolu_mock_0","name":{},"input":{{"mock":true}}}}]"#, json_string(&tool)),
                "tool_use",
            ),
            None => (format!(r#"[{{"type":"text","text":"{text}"}}]"#), stop_reason),
        };
        let mut out = String::with_capacity(content.len() + 384);
        let _ = write!(
            out,
            r#"{{"id":"{id}","type":"message","role":"assistant","model":{model},"content":{content},"stop_reason":"{stop_reason}","stop_sequence":null"#
        );
        if let Some(u) = usage(false) {
            let _ = write!(out, r#","usage":{u}"#);
        }
        out.push('}');
        if behaviour.fail_after_chunks.is_some() {
            truncated_json_response(out, REQUEST_ID, &id)
        } else {
            json_response(out, REQUEST_ID, &id)
        }
    })
}

/// Anthropic reports uncached input apart from cache reads and writes: `prompt` is split.
fn usage_json(prompt: u64, cache_read: u64, cache_write: u64, output: u64) -> String {
    let cache_read = cache_read.min(prompt);
    let cache_write = cache_write.min(prompt - cache_read);
    let input = prompt - cache_read - cache_write;
    format!(
        r#"{{"input_tokens":{input},"cache_creation_input_tokens":{cache_write},"cache_read_input_tokens":{cache_read},"output_tokens":{output}}}"#
    )
}
