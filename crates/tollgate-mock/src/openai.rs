//! OpenAI Chat Completions: `POST /v1/chat/completions`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::SharedState;
use crate::common::{
    ApiError, Behaviour, Flavor, MAX_NON_STREAM_TOKENS, MockOverrides, TOKEN_TEXT, bad_body,
    hello_text, json_response, json_string, next_id, truncated_json_response, unix_now,
};
use crate::stream::SseFrames;
use tollgate_core::tokens::{count_chat_prompt, encoding_for_model};

const F: Flavor = Flavor::OpenAi;
const REQUEST_ID: &str = "x-request-id";
/// OpenAI's documented upper bound for `n`.
const MAX_CHOICES: u64 = 128;
const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    mock: Option<MockOverrides>,
}

/// The function a request forces (`tool_choice` "required": the first tool; or one named), which
/// a non-streaming answer then calls instead of writing text.
fn forced_function(tools: &[Value], tool_choice: Option<&Value>) -> Option<String> {
    let name = match tool_choice? {
        Value::String(choice) if choice == "required" => tools.first()?.pointer("/function/name")?,
        choice => choice.pointer("/function/name")?,
    };
    name.as_str().map(str::to_string)
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// `usage` object of a chat completion: `cached` of the prompt came from the cache,
/// `reasoning` of the completion was hidden thinking.
fn usage_json(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> String {
    format!(
        concat!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"#,
            r#""prompt_tokens_details":{{"cached_tokens":{}}},"#,
            r#""completion_tokens_details":{{"reasoning_tokens":{}}}}}"#
        ),
        prompt,
        completion,
        prompt.saturating_add(completion),
        cached.min(prompt),
        reasoning.min(completion)
    )
}

pub(crate) async fn chat_completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = serde_json::from_slice(&body).map_err(|e| bad_body(F, &e))?;
    let mut behaviour = Behaviour::resolve(&state.config, &headers, state.overrides_for(req.mock), F)?;
    behaviour.check_api_key(crate::common::bearer_token(&headers), F)?;
    behaviour.check_injected_failure(F)?;
    let choices = req.n.unwrap_or(1);
    if choices == 0 || choices > MAX_CHOICES {
        return Err(ApiError::bad_request(
            F,
            format!("n must be within 1..={MAX_CHOICES}, got {choices}"),
        ));
    }
    let cap = match (req.max_completion_tokens, req.max_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (tokens, capped) = behaviour.capped_output(cap);
    let mut finish_reason = if capped { "length" } else { "stop" };
    let tool_call = forced_function(&req.tools, req.tool_choice.as_ref());
    if tool_call.is_some() {
        finish_reason = "tool_calls";
    }
    let completion_tokens = tokens.saturating_mul(choices);
    let stream = req.stream.unwrap_or(false);
    if !stream && completion_tokens > MAX_NON_STREAM_TOKENS {
        return Err(ApiError::bad_request(
            F,
            format!("mock: non-streaming output limited to {MAX_NON_STREAM_TOKENS} tokens"),
        ));
    }

    let enc = encoding_for_model(&req.model);
    let prompt_tokens = count_chat_prompt(enc, &req.messages);
    let usage = if behaviour.omit_usage {
        None
    } else {
        Some(
            behaviour
                .usage_override
                .take()
                .unwrap_or_else(|| {
                    let completion = completion_tokens.saturating_add(behaviour.thoughts_tokens);
                    usage_json(prompt_tokens, completion, behaviour.cached_tokens, behaviour.thoughts_tokens)
                }),
        )
    };
    let id = next_id("chatcmpl-mock-");
    let created = unix_now();
    let model = json_string(&req.model);

    behaviour.first_byte_delay().await;

    Ok(if stream {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let frames = stream_frames(&StreamSpec {
            behaviour: &behaviour,
            id: &id,
            created,
            model: &model,
            choices,
            tokens,
            finish_reason,
            usage_nulls: include_usage && usage.is_some(),
            usage: if include_usage {
                usage.as_deref()
            } else {
                None
            },
            cut_after: behaviour.fail_after_chunks,
            interval: behaviour.chunk_interval,
        });
        frames.into_response(REQUEST_ID, &id)
    } else {
        let mut body = completion_json(
            &id,
            created,
            &model,
            choices,
            tokens,
            finish_reason,
            usage.as_deref(),
        );
        if let Some(function) = &tool_call {
            body = with_tool_calls(&body, function);
        }
        if behaviour.fail_after_chunks.is_some() {
            truncated_json_response(body, REQUEST_ID, &id)
        } else {
            json_response(body, REQUEST_ID, &id)
        }
    })
}

fn completion_json(
    id: &str,
    created: u64,
    model: &str,
    choices: u64,
    tokens: u64,
    finish_reason: &str,
    usage: Option<&str>,
) -> String {
    let content = hello_text(tokens);
    let per_choice = content.len() + 128;
    let cap = 256 + per_choice.saturating_mul(choices as usize) + usage.map_or(0, str::len);
    let mut out = String::with_capacity(cap);
    let _ = write!(
        out,
        r#"{{"id":"{id}","object":"chat.completion","created":{created},"model":{model},"choices":["#
    );
    for i in 0..choices {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"index":{i},"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"{finish_reason}"}}"#
        );
    }
    out.push(']');
    if let Some(usage) = usage {
        out.push_str(r#","usage":"#);
        out.push_str(usage);
    }
    out.push('}');
    out
}

/// Replaces every choice's text with a call of `function` (arguments `{"mock":true}`).
fn with_tool_calls(body: &str, function: &str) -> String {
    let Ok(mut completion) = serde_json::from_str::<Value>(body) else { return body.to_string() };
    for choice in completion.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten() {
        let index = choice.get("index").cloned().unwrap_or(Value::from(0));
        choice["message"] = serde_json::json!({
            "role": "assistant", "content": null, "refusal": null,
            "tool_calls": [{"id": format!("call_mock_{index}"), "type": "function",
                "function": {"name": function, "arguments": "{\"mock\":true}"}}],
        });
    }
    completion.to_string()
}

struct StreamSpec<'a> {
    /// Supplies the malformed text injected after the opening frames, if any.
    behaviour: &'a Behaviour,
    id: &'a str,
    created: u64,
    /// JSON-encoded model string.
    model: &'a str,
    choices: u64,
    tokens: u64,
    finish_reason: &'a str,
    /// Add `"usage":null` to every non-final chunk (OpenAI does this when
    /// `include_usage` is set).
    usage_nulls: bool,
    /// Usage for the final `choices: []` chunk, if one is sent.
    usage: Option<&'a str>,
    cut_after: Option<u64>,
    interval: std::time::Duration,
}

fn stream_frames(spec: &StreamSpec<'_>) -> SseFrames {
    let StreamSpec {
        id, created, model, ..
    } = *spec;
    let prefix = format!(
        r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":{model},"choices":["#
    );
    let suffix = if spec.usage_nulls {
        "],\"usage\":null}\n\n"
    } else {
        "]}\n\n"
    };
    let frame = |choice: String| -> Bytes {
        let mut s = String::with_capacity(prefix.len() + choice.len() + suffix.len());
        s.push_str(&prefix);
        s.push_str(&choice);
        s.push_str(suffix);
        Bytes::from(s)
    };
    let n = spec.choices;
    let head = (0..n)
        .map(|i| {
            frame(format!(
                r#"{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}"#
            ))
        })
        .collect();
    let per_token = (0..n)
        .map(|i| {
            frame(format!(
                r#"{{"index":{i},"delta":{{"content":"{TOKEN_TEXT}"}},"logprobs":null,"finish_reason":null}}"#
            ))
        })
        .collect();
    let mut tail: Vec<Bytes> = (0..n)
        .map(|i| {
            frame(format!(
                r#"{{"index":{i},"delta":{{}},"logprobs":null,"finish_reason":"{}"}}"#,
                spec.finish_reason
            ))
        })
        .collect();
    if let Some(usage) = spec.usage {
        tail.push(Bytes::from(format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model},\"choices\":[],\"usage\":{usage}}}\n\n"
        )));
    }
    tail.push(Bytes::from_static(DONE));
    SseFrames::new(
        spec.behaviour.stream_head(head),
        per_token,
        spec.tokens,
        tail,
        spec.cut_after,
        spec.interval,
    )
}
