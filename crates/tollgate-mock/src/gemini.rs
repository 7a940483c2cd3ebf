//! Gemini: `POST /v1beta/models/{model}:generateContent` and
//! `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`, also under `/v1/models/…`
//! (Google AI Studio, key in `x-goog-api-key` or `?key=`) and under
//! `/v1/projects/{project}/locations/{location}/publishers/google/models/…` (Vertex AI, token in
//! `Authorization: Bearer`).
//!
//! Each candidate is `N` × `" hello"`, as everywhere in the mock. `usageMetadata` follows
//! Google's conventions: `promptTokenCount` includes `cachedContentTokenCount`,
//! `candidatesTokenCount` excludes `thoughtsTokenCount`, and zero counts are omitted (proto
//! JSON). A stream uses CRLF event ends as Google's does, carries the prompt count alone on its
//! early chunks, and ends — there is no terminal event — after one chunk per candidate carrying
//! that candidate's `finishReason`, the last of them with the final counts.

use std::fmt::Write as _;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::common::{
    ApiError, Behaviour, Flavor, MAX_NON_STREAM_TOKENS, MockOverrides, TOKEN_TEXT, bad_body,
    bearer_token, header_text, hello_text, json_response, json_string, next_id,
    truncated_json_response,
};
use crate::stream::SseFrames;
use crate::{AppState, SharedState};
use tollgate_core::tokens::{Encoding, count_text, encoding_for_model};

const F: Flavor = Flavor::Google;
const REQUEST_ID: &str = "x-request-id";
/// Google's upper bound for `generationConfig.candidateCount`.
const MAX_CANDIDATES: u64 = 8;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    contents: Vec<Value>,
    #[serde(alias = "system_instruction")]
    system_instruction: Option<Value>,
    #[serde(alias = "generation_config")]
    generation_config: Option<GenerationConfig>,
    mock: Option<MockOverrides>,
}

/// Google's JSON parser accepts proto names too (`max_output_tokens`).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(alias = "max_output_tokens")]
    max_output_tokens: Option<u64>,
    #[serde(alias = "candidate_count")]
    candidate_count: Option<u64>,
}

#[derive(Deserialize)]
pub(crate) struct GoogleQuery {
    alt: Option<String>,
    key: Option<String>,
}

/// AI Studio routes: the key in `x-goog-api-key` or `?key=`.
pub(crate) async fn generate(
    State(state): State<SharedState>,
    Path(model_method): Path<String>,
    query: Result<Query<GoogleQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(F, rejection.body_text()))?;
    let presented = header_text(&headers, "x-goog-api-key").or(query.key.as_deref());
    respond(&state, &model_method, query.alt.as_deref(), &headers, &body, presented).await
}

/// Vertex AI routes: the token in `Authorization: Bearer`.
pub(crate) async fn vertex_generate(
    State(state): State<SharedState>,
    Path((_project, _location, model_method)): Path<(String, String, String)>,
    query: Result<Query<GoogleQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(F, rejection.body_text()))?;
    respond(&state, &model_method, query.alt.as_deref(), &headers, &body, bearer_token(&headers)).await
}

/// Prompt tokens: the text parts of `contents` and `systemInstruction`.
fn prompt_tokens(encoding: Encoding, req: &GenerateRequest) -> u64 {
    let content_tokens = |content: &Value| -> u64 {
        content
            .get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(|text| count_text(encoding, text))
            .fold(0u64, u64::saturating_add)
    };
    let system = match &req.system_instruction {
        Some(Value::String(text)) => count_text(encoding, text),
        Some(content) => content_tokens(content),
        None => 0,
    };
    req.contents.iter().map(content_tokens).fold(system, u64::saturating_add)
}

/// The counts a response reports.
struct Counts {
    prompt: u64,
    cached: u64,
    candidates: u64,
    thoughts: u64,
}

/// The final `usageMetadata`, zero counts omitted.
fn usage_json(counts: &Counts) -> String {
    let Counts { prompt, cached, candidates, thoughts } = *counts;
    let total = prompt.saturating_add(candidates).saturating_add(thoughts);
    let mut out = format!(r#"{{"promptTokenCount":{prompt}"#);
    if candidates > 0 {
        let _ = write!(out, r#","candidatesTokenCount":{candidates}"#);
    }
    let _ = write!(out, r#","totalTokenCount":{total}"#);
    if cached > 0 {
        let _ = write!(out, r#","cachedContentTokenCount":{cached}"#);
    }
    let _ = write!(out, r#","promptTokensDetails":[{{"modality":"TEXT","tokenCount":{prompt}}}]"#);
    if thoughts > 0 {
        let _ = write!(out, r#","thoughtsTokenCount":{thoughts}"#);
    }
    out.push('}');
    out
}

/// The `usageMetadata` of an early stream chunk: the prompt alone, as Google sends it.
fn early_usage_json(prompt: u64) -> String {
    format!(r#"{{"promptTokenCount":{prompt},"totalTokenCount":{prompt},"promptTokensDetails":[{{"modality":"TEXT","tokenCount":{prompt}}}]}}"#)
}

async fn respond(
    state: &AppState,
    model_method: &str,
    alt: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    presented_key: Option<&str>,
) -> Result<Response, ApiError> {
    let (model, stream) = match model_method.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model, false),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model, true),
        _ => {
            return Err(ApiError::new(
                F,
                StatusCode::NOT_FOUND,
                format!("mock: models/{model_method} is not served; generateContent and streamGenerateContent are"),
            ));
        }
    };
    if stream && alt != Some("sse") {
        return Err(ApiError::bad_request(F, "mock: streamGenerateContent is served only with alt=sse"));
    }
    let mut req: GenerateRequest = serde_json::from_slice(body).map_err(|error| bad_body(F, &error))?;
    let mut behaviour = Behaviour::resolve(&state.config, headers, state.overrides_for(req.mock.take()), F)?;
    behaviour.check_api_key(presented_key, F)?;
    behaviour.check_injected_failure(F)?;
    let config = req.generation_config.take().unwrap_or_default();
    let candidates = config.candidate_count.unwrap_or(1);
    if !(1..=MAX_CANDIDATES).contains(&candidates) {
        return Err(ApiError::bad_request(
            F,
            format!("generationConfig.candidateCount must be within 1..={MAX_CANDIDATES}, got {candidates}"),
        ));
    }
    let (tokens, capped) = behaviour.capped_output(config.max_output_tokens);
    let finish_reason = if capped { "MAX_TOKENS" } else { "STOP" };
    let candidates_tokens = tokens.saturating_mul(candidates);
    if !stream && candidates_tokens > MAX_NON_STREAM_TOKENS {
        return Err(ApiError::bad_request(
            F,
            format!("mock: non-streaming output limited to {MAX_NON_STREAM_TOKENS} tokens"),
        ));
    }
    let prompt = prompt_tokens(encoding_for_model(model), &req);
    let counts = Counts {
        prompt,
        cached: behaviour.cached_tokens.min(prompt),
        candidates: candidates_tokens,
        thoughts: behaviour.thoughts_tokens,
    };
    let (final_usage, early_usage) = if behaviour.omit_usage {
        (None, None)
    } else {
        let final_usage = behaviour.usage_override.take().unwrap_or_else(|| usage_json(&counts));
        (Some(final_usage), Some(early_usage_json(prompt)))
    };
    let spec = ResponseSpec {
        id: next_id("mock-"),
        model: json_string(model),
        candidates,
        tokens,
        finish_reason,
        final_usage,
        early_usage,
    };

    behaviour.first_byte_delay().await;

    Ok(if stream {
        stream_frames(&spec, behaviour.stream_head(Vec::new()), behaviour.fail_after_chunks, behaviour.chunk_interval).into_response(REQUEST_ID, &spec.id)
    } else if behaviour.fail_after_chunks.is_some() {
        truncated_json_response(response_json(&spec), REQUEST_ID, &spec.id)
    } else {
        json_response(response_json(&spec), REQUEST_ID, &spec.id)
    })
}

struct ResponseSpec {
    id: String,
    /// JSON-encoded model string.
    model: String,
    candidates: u64,
    tokens: u64,
    finish_reason: &'static str,
    final_usage: Option<String>,
    /// For stream chunks before the last.
    early_usage: Option<String>,
}

impl ResponseSpec {
    /// `,"usageMetadata":…,"modelVersion":…,"responseId":…}`: how every response object ends.
    fn ending(&self, usage: Option<&str>) -> String {
        let mut out = String::new();
        if let Some(usage) = usage {
            let _ = write!(out, r#","usageMetadata":{usage}"#);
        }
        let _ = write!(out, r#","modelVersion":{},"responseId":"{}"}}"#, self.model, self.id);
        out
    }
}

fn response_json(spec: &ResponseSpec) -> String {
    let text = hello_text(spec.tokens);
    let per_candidate = text.len() + 128;
    let mut out = String::with_capacity(512 + per_candidate.saturating_mul(spec.candidates as usize));
    out.push_str(r#"{"candidates":["#);
    for index in 0..spec.candidates {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"content":{{"parts":[{{"text":"{text}"}}],"role":"model"}},"finishReason":"{}","index":{index}}}"#,
            spec.finish_reason
        );
    }
    out.push(']');
    out.push_str(&spec.ending(spec.final_usage.as_deref()));
    out
}

/// Gemini streams open with no frame of their own: `head` is only what a test injects.
fn stream_frames(spec: &ResponseSpec, head: Vec<Bytes>, cut_after: Option<u64>, interval: std::time::Duration) -> SseFrames {
    let frame = |candidate: String, usage: Option<&str>| -> Bytes {
        Bytes::from(format!(r#"data: {{"candidates":[{candidate}]{}"#, spec.ending(usage)) + "\r\n\r\n")
    };
    let per_token = (0..spec.candidates)
        .map(|index| {
            frame(
                format!(r#"{{"content":{{"parts":[{{"text":"{TOKEN_TEXT}"}}],"role":"model"}},"index":{index}}}"#),
                spec.early_usage.as_deref(),
            )
        })
        .collect();
    let last = spec.candidates.saturating_sub(1);
    let tail = (0..spec.candidates)
        .map(|index| {
            let usage = if index == last { spec.final_usage.as_deref() } else { spec.early_usage.as_deref() };
            frame(
                format!(
                    r#"{{"content":{{"parts":[{{"text":""}}],"role":"model"}},"finishReason":"{}","index":{index}}}"#,
                    spec.finish_reason
                ),
                usage,
            )
        })
        .collect();
    SseFrames::new(head, per_token, spec.tokens, tail, cut_after, interval)
}
