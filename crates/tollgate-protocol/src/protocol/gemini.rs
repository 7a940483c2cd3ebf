//! Google's Gemini API, as Google AI Studio and Vertex AI serve it:
//! `POST …/models/{model}:generateContent` and `POST …/models/{model}:streamGenerateContent?alt=sse`.
//!
//! Three things set it apart from the OpenAI and Anthropic protocols:
//! - The model and the choice to stream are in the URL ([`url_facts`]), not in the body; the body
//!   (`contents`, `systemInstruction`, `tools`, `generationConfig`, …) is forwarded as sent.
//! - Usage is `usageMetadata`, whose `promptTokenCount` includes the cached tokens and whose
//!   `candidatesTokenCount` excludes thinking ([`usage`]).
//! - A stream has no terminal event: it ends at EOF after a chunk whose candidate carries a
//!   `finishReason`. Chunks from that one on are [`EventAction::MaybeTerminal`], so the pump keeps
//!   the last one back until the charge is settled (I1). Earlier chunks may carry a partial
//!   `usageMetadata` (the prompt count alone), so only the metadata of finishing chunks is taken
//!   as the request's usage; a stream cut before it is billed the latest prompt count received
//!   plus the tokenizer's count of the output relayed.
//!
//! Google's JSON parser accepts a field by its JSON name or by its proto name
//! (`generationConfig` or `generation_config`), so billing reads both.

use serde_json::{Map, Value};
use tollgate_core::{MediaBounds, MediaReference, PromptEstimate, Usage};
use tollgate_core::tokens::{self, Encoding};

use super::{CHOICES_MAX, EventAction, ParsedRequest, StreamInspector, UrlFacts, invalid};
use crate::error::ProtocolError;
use crate::sse::SseEvent;


/// The model methods Tollgate serves and bills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    GenerateContent,
    StreamGenerateContent,
}

/// Reads what a Gemini URL says: the last path segment `{model}:{method}` (split at its last
/// ':') and the `alt` query parameter.
///
/// # Errors
/// `NotFound` for a method Tollgate does not serve; `InvalidRequest` for an empty model or a
/// stream not asked for as server-sent events (Google's default JSON-array stream is not
/// served: a gateway must see where each chunk ends to bill it).
pub fn url_facts(model_method: &str, alt: Option<&str>) -> Result<UrlFacts, ProtocolError> {
    let Some((model, method)) = model_method.rsplit_once(':') else {
        return Err(ProtocolError::NotFound(format!(
            "models/{model_method}: the URL must name a method, e.g. models/{model_method}:generateContent"
        )));
    };
    if model.is_empty() {
        return Err(invalid("the model name in the URL is empty"));
    }
    let method = match method {
        "generateContent" => Method::GenerateContent,
        "streamGenerateContent" => Method::StreamGenerateContent,
        other => {
            return Err(ProtocolError::NotFound(format!(
                "method {other} is not served by this gateway; generateContent and streamGenerateContent are"
            )));
        }
    };
    let stream = method == Method::StreamGenerateContent;
    if stream && alt != Some("sse") {
        return Err(invalid("streamGenerateContent is served only as server-sent events: add ?alt=sse to the URL"));
    }
    Ok(UrlFacts { model: Some(model.to_string()), stream })
}

/// A field by its JSON name or its proto name; null counts as absent.
fn field<'a>(object: &'a Map<String, Value>, json_name: &str, proto_name: &str) -> Option<&'a Value> {
    object.get(json_name).or_else(|| object.get(proto_name)).filter(|value| !value.is_null())
}

/// An optional int32 count: proto JSON sends it as a number, and also accepts a decimal string.
fn optional_count(object: &Map<String, Value>, json_name: &str, proto_name: &str) -> Result<Option<u64>, ProtocolError> {
    let Some(value) = field(object, json_name, proto_name) else {
        return Ok(None);
    };
    let count = match value {
        Value::String(text) => text.parse::<u64>().ok(),
        other => other.as_u64(),
    };
    count.map(Some).ok_or_else(|| invalid(format!("generationConfig.{json_name} must be a non-negative integer")))
}

/// Reads what billing needs from a Gemini body, with the model and streaming from the URL.
///
/// # Errors
/// `InvalidRequest` naming the field that is missing or malformed.
/// The model named in the URL.
pub(super) fn requested_model(url: &UrlFacts) -> Result<String, ProtocolError> {
    url.model
        .clone()
        .filter(|model| !model.is_empty())
        .ok_or_else(|| invalid("the model is named in the URL: …/models/{model}:generateContent"))
}

pub(super) fn parse(body: &Map<String, Value>, url: &UrlFacts) -> Result<ParsedRequest, ProtocolError> {
    let model = requested_model(url)?;
    let contents = match field(body, "contents", "contents") {
        Some(Value::Array(contents)) if !contents.is_empty() => contents,
        Some(Value::Array(_)) => return Err(invalid("contents must not be empty")),
        Some(_) => return Err(invalid("contents must be an array")),
        None => return Err(invalid("contents is required")),
    };
    let encoding = tokens::encoding_for_model(&model);
    let mut prompt = PromptEstimate::default();
    for content in contents {
        if !content.is_object() {
            return Err(invalid(format!("every content must be an object, got {content}")));
        }
        estimate_content(encoding, content, &mut prompt)?;
    }
    match field(body, "systemInstruction", "system_instruction") {
        None => {}
        Some(Value::String(text)) => prompt.add_text(tokens::count_text(encoding, text)),
        Some(system @ Value::Object(_)) => estimate_content(encoding, system, &mut prompt)?,
        Some(_) => return Err(invalid("systemInstruction must be a Content object")),
    }
    // Tool declarations are part of the prompt the provider bills.
    if let Some(tools) = field(body, "tools", "tools") {
        prompt.add_text(tokens::count_text(encoding, &tools.to_string()));
    }
    let (output_tokens_max, choices, thinking_budget) = match field(body, "generationConfig", "generation_config") {
        None => (None, 1, None),
        Some(Value::Object(config)) => {
            let cap = optional_count(config, "maxOutputTokens", "max_output_tokens")?;
            if cap == Some(0) {
                return Err(invalid("generationConfig.maxOutputTokens must be at least 1"));
            }
            let choices = optional_count(config, "candidateCount", "candidate_count")?.unwrap_or(1);
            if choices == 0 || choices > CHOICES_MAX {
                return Err(invalid(format!("generationConfig.candidateCount must be between 1 and {CHOICES_MAX}")));
            }
            (cap, choices, thinking_budget(config)?)
        }
        Some(_) => return Err(invalid("generationConfig must be an object")),
    };
    let mut parsed = ParsedRequest::new(model, url.stream, output_tokens_max, choices, prompt, encoding);
    parsed.thinking_budget = thinking_budget;
    Ok(parsed)
}

/// `generationConfig.thinkingConfig.thinkingBudget`: tokens of thinking (0 turns it off), or
/// -1 (or none) for the model to decide, which leaves it to the gateway's default hold.
fn thinking_budget(config: &Map<String, Value>) -> Result<Option<u64>, ProtocolError> {
    let thinking = match field(config, "thinkingConfig", "thinking_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(thinking)) => thinking,
        Some(_) => return Err(invalid("generationConfig.thinkingConfig must be an object")),
    };
    let Some(budget) = field(thinking, "thinkingBudget", "thinking_budget") else { return Ok(None) };
    let budget = match budget {
        Value::String(text) => text.parse::<i64>().ok(),
        other => other.as_i64(),
    };
    match budget {
        Some(-1) => Ok(None),
        Some(budget) if budget >= 0 => Ok(u64::try_from(budget).ok()),
        _ => Err(invalid("generationConfig.thinkingConfig.thinkingBudget must be an integer of at least -1")),
    }
}

/// Sets `generationConfig.maxOutputTokens` (in the object the client sent, whichever its name)
/// to the cap the hold was sized with. Returns whether the body changed.
pub(super) fn insert_output_cap(body: &mut Map<String, Value>, cap: u64) -> bool {
    let name = if body.get("generationConfig").is_none() && body.get("generation_config").is_some_and(Value::is_object) {
        "generation_config"
    } else {
        "generationConfig"
    };
    let config = body.entry(name).or_insert_with(|| Value::Object(Map::new()));
    if !config.is_object() {
        // parse refused a non-object config; null is the only other value that reaches here.
        *config = Value::Object(Map::new());
    }
    if let Some(config) = config.as_object_mut() {
        config.remove("max_output_tokens");
        config.insert("maxOutputTokens".into(), Value::from(cap));
    }
    true
}

/// Adds one `Content` (`{role, parts: [...]}`) to the estimate: text parts as text, media at
/// Gemini's ceilings ([`MediaBounds::GEMINI`]: inline data by its MIME type and bytes, a file
/// by URI at the image ceiling if it is an image, else unsized), any other part (function
/// calls and responses, code) as its JSON.
fn estimate_content(encoding: Encoding, content: &Value, prompt: &mut PromptEstimate) -> Result<(), ProtocolError> {
    let parts = match content.get("parts") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(invalid("parts must be an array")),
    };
    let bounds = MediaBounds::GEMINI;
    for part in parts {
        let Some(fields) = part.as_object() else {
            return Err(invalid(format!("every part must be an object, got {part}")));
        };
        let mime_type = |media: &Map<String, Value>| field(media, "mimeType", "mime_type").and_then(Value::as_str).unwrap_or_default().to_string();
        if let Some(text) = fields.get("text").and_then(Value::as_str) {
            prompt.add_text(tokens::count_text(encoding, text));
        } else if let Some(inline) = field(fields, "inlineData", "inline_data").and_then(Value::as_object) {
            let data = inline.get("data").and_then(Value::as_str).unwrap_or_default();
            prompt.add_media(bounds.inline_tokens_max(&mime_type(inline), data.len()));
        } else if let Some(file) = field(fields, "fileData", "file_data").and_then(Value::as_object) {
            if let Some(uri) = field(file, "fileUri", "file_uri").and_then(Value::as_str) {
                prompt.references.push(MediaReference::gemini_file_uri(uri));
            }
            if mime_type(file).to_ascii_lowercase().starts_with("image/") {
                prompt.add_media(bounds.image_tokens_max);
            } else {
                prompt.add_unsized();
            }
        } else {
            prompt.add_text(tokens::count_text(encoding, &part.to_string()));
        }
    }
    Ok(())
}

/// The request's usage from a `usageMetadata` object, if it reports one and every count in it
/// is a non-negative integer (anything else is no usage: the tokenizer counts instead).
///
/// Google's counts overlap where Tollgate's are disjoint: `promptTokenCount` includes
/// `cachedContentTokenCount`, and tool-use prompt tokens (e.g. search results fed back) are
/// billed as input on top of it; `candidatesTokenCount` excludes `thoughtsTokenCount`, which is
/// billed as output. Proto JSON omits zero counts, so an absent count is 0 — except the prompt
/// count, without which the object is not a usage report (Vertex streams send
/// `{"trafficType": …}` alone on early chunks).
pub(super) fn usage(metadata: &Value) -> Option<Usage> {
    let count = |name: &str| -> Option<u64> {
        match metadata.get(name) {
            None | Some(Value::Null) => Some(0),
            Some(value) => value.as_u64(),
        }
    };
    let prompt = metadata.get("promptTokenCount")?.as_u64()?;
    let cached = count("cachedContentTokenCount")?;
    let candidates = count("candidatesTokenCount")?;
    let thoughts = count("thoughtsTokenCount")?;
    let tool_use_prompt = count("toolUsePromptTokenCount")?;
    if cached > prompt {
        tracing::warn!(prompt, cached, "inconsistent upstream usage; cached tokens capped at the prompt");
    }
    let cached = cached.min(prompt);
    Some(Usage {
        input_tokens: (prompt - cached).saturating_add(tool_use_prompt),
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        output_tokens: candidates.saturating_add(thoughts),
        reasoning_tokens: thoughts,
    })
}

/// Whether a `usageMetadata` object claims to report the request's usage (see [`usage`]).
fn reports_usage(metadata: &Value) -> bool {
    metadata.get("promptTokenCount").is_some()
}

/// Appends the generated text of a response or stream chunk, for the tokenizer fallback:
/// candidates' text parts (thoughts included, when the client asked to see them), function
/// calls as name and arguments, and generated code.
pub(super) fn append_output(text: &mut String, response: &Value) {
    for candidate in response.get("candidates").and_then(Value::as_array).into_iter().flatten() {
        for part in candidate.pointer("/content/parts").and_then(Value::as_array).into_iter().flatten() {
            if let Some(part_text) = part.get("text").and_then(Value::as_str) {
                text.push_str(part_text);
            }
            if let Some(call) = part.get("functionCall").or_else(|| part.get("function_call")) {
                if let Some(name) = call.get("name").and_then(Value::as_str) {
                    text.push_str(name);
                }
                if let Some(arguments) = call.get("args").filter(|arguments| !arguments.is_null()) {
                    text.push_str(&arguments.to_string());
                }
            }
            if let Some(code) = part.pointer("/executableCode/code").and_then(Value::as_str) {
                text.push_str(code);
            }
        }
    }
}

/// Whether a chunk ends the response: a candidate finished, or the prompt was blocked (then no
/// candidate comes at all).
fn finishes(chunk: &Value) -> bool {
    let finished_candidate = chunk
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|candidate| candidate.get("finishReason").and_then(Value::as_str).is_some_and(|reason| !reason.is_empty()));
    finished_candidate || chunk.pointer("/promptFeedback/blockReason").and_then(Value::as_str).is_some()
}

impl StreamInspector {
    /// One `alt=sse` event: a whole `GenerateContentResponse`.
    pub(super) fn inspect_gemini(&mut self, event: &SseEvent) -> EventAction {
        let chunk = serde_json::from_str::<Value>(&event.data).ok();
        if let Some(chunk) = &chunk {
            append_output(&mut self.output_text, chunk);
            if finishes(chunk) {
                self.finish_reason_seen = true;
            }
        }
        if !self.finish_reason_seen {
            // Early metadata may carry the prompt count alone: not the request's usage, but
            // what a stream cut before its finish still owes for its input.
            if let Some(metadata) = chunk.as_ref().and_then(|chunk| chunk.get("usageMetadata")).filter(|metadata| reports_usage(metadata)) {
                self.input_reported = usage(metadata).map(|reported| Usage { output_tokens: 0, reasoning_tokens: 0, ..reported });
            }
            return EventAction::Forward;
        }
        // From the finishing chunk on, metadata is final (and cumulative: the last one wins).
        if let Some(metadata) = chunk.as_ref().and_then(|chunk| chunk.get("usageMetadata")).filter(|metadata| reports_usage(metadata)) {
            self.usage = usage(metadata);
        }
        EventAction::MaybeTerminal
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::protocol::Protocol;
    use crate::sse::SseSplitter;
    use serde_json::json;

    /// A `generateContent` response as Google's API reference shows one, with implicit caching
    /// and thinking (a Gemini 2.5 model): 1007 prompt tokens of which 800 cached, 9 tool-use
    /// prompt tokens, 42 visible and 311 thinking tokens.
    const GENERATE_CONTENT_RESPONSE: &str = include_str!("../../../../tests/fixtures/gemini/generate_content.json");
    /// An `alt=sse` stream as Google sends it (CRLF event ends): early chunks carry only the
    /// prompt count, the last carries the finish reason and the final counts.
    const STREAM: &str = include_str!("../../../../tests/fixtures/gemini/stream_generate_content.sse");

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn facts(model: &str, stream: bool) -> UrlFacts {
        UrlFacts { model: Some(model.to_string()), stream }
    }

    #[test]
    fn a_recorded_response_gives_the_exact_usage() {
        let response: Value = serde_json::from_str(GENERATE_CONTENT_RESPONSE).unwrap();
        let usage = Protocol::GeminiGenerate.response_usage(&response).unwrap();
        assert_eq!(usage, Usage { input_tokens: 1007 - 800 + 9, cached_input_tokens: 800, cache_write_tokens: 0, output_tokens: 42 + 311, reasoning_tokens: 311 });
        assert_eq!(usage.prompt_tokens() + usage.output_tokens, response["usageMetadata"]["totalTokenCount"].as_u64().unwrap());
        let text = Protocol::GeminiGenerate.response_output_text(&response);
        assert!(text.starts_with("A ledger is"), "{text}");
    }

    #[test]
    fn a_recorded_stream_gives_the_last_usage_and_keeps_its_last_event_back() {
        let mut splitter = SseSplitter::new(1 << 20);
        let events = splitter.push(STREAM.as_bytes()).unwrap();
        assert_eq!(splitter.pending_bytes(), 0);
        assert_eq!(events.len(), 4);
        let mut inspector = Protocol::GeminiGenerate.stream_inspector(true);
        let actions: Vec<EventAction> = events.iter().map(|event| inspector.inspect(event)).collect();
        assert_eq!(actions, [EventAction::Forward, EventAction::Forward, EventAction::Forward, EventAction::MaybeTerminal]);
        assert!(inspector.completed_at_end_of_stream());
        assert_eq!(inspector.usage(), Some(Usage { input_tokens: 12, cached_input_tokens: 0, cache_write_tokens: 0, output_tokens: 27 + 96, reasoning_tokens: 96 }));
        assert_eq!(inspector.output_text(), "Paris is the capital of France. It lies on the Seine.");
    }

    #[test]
    fn a_stream_cut_before_its_finish_has_no_usage_and_is_not_complete() {
        let mut splitter = SseSplitter::new(1 << 20);
        let events = splitter.push(STREAM.as_bytes()).unwrap();
        let mut inspector = Protocol::GeminiGenerate.stream_inspector(true);
        for event in &events[..3] {
            assert_eq!(inspector.inspect(event), EventAction::Forward);
        }
        // The early chunks' prompt-only metadata is not the request's usage, but its input
        // count is kept for the charge of the cut stream.
        assert_eq!(inspector.usage(), None);
        assert_eq!(inspector.input_usage(), Some(Usage { input_tokens: 12, ..Usage::default() }));
        assert!(!inspector.completed_at_end_of_stream());
        assert_eq!(inspector.output_text(), "Paris is the capital of France. It lies");
    }

    #[test]
    fn chunks_after_the_finish_are_kept_back_too_and_the_last_metadata_wins() {
        let event = |data: Value| SseEvent { raw: bytes::Bytes::new(), name: None, data: data.to_string() };
        let mut inspector = Protocol::GeminiGenerate.stream_inspector(true);
        let first = json!({"candidates": [{"content": {"parts": [{"text": "a"}]}, "index": 0, "finishReason": "STOP"},
            {"content": {"parts": [{"text": "b"}]}, "index": 1}], "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}});
        let second = json!({"candidates": [{"content": {"parts": [{"text": "c"}]}, "index": 1, "finishReason": "MAX_TOKENS"}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "thoughtsTokenCount": 1}});
        let metadata_only = json!({"usageMetadata": {"trafficType": "ON_DEMAND"}});
        assert_eq!(inspector.inspect(&event(first)), EventAction::MaybeTerminal);
        assert_eq!(inspector.inspect(&event(second)), EventAction::MaybeTerminal);
        assert_eq!(inspector.inspect(&event(metadata_only)), EventAction::MaybeTerminal);
        assert_eq!(inspector.usage(), Some(Usage { input_tokens: 5, output_tokens: 4, reasoning_tokens: 1, ..Usage::default() }));
        assert_eq!(inspector.output_text(), "abc");
    }

    #[test]
    fn garbage_metadata_is_no_usage() {
        for metadata in [
            json!({"promptTokenCount": -1, "candidatesTokenCount": 2}),
            json!({"promptTokenCount": "5", "candidatesTokenCount": 2}),
            json!({"promptTokenCount": 5, "candidatesTokenCount": "2"}),
            json!({"promptTokenCount": 5, "thoughtsTokenCount": -3}),
            json!({"promptTokenCount": 5, "cachedContentTokenCount": 1.5}),
            json!({"candidatesTokenCount": 2}),
            json!(null),
        ] {
            assert_eq!(Protocol::GeminiGenerate.response_usage(&json!({"usageMetadata": metadata})), None, "{metadata}");
        }
        // Zero counts are omitted by proto JSON; cached tokens beyond the prompt are capped.
        let capped = Protocol::GeminiGenerate.response_usage(&json!({"usageMetadata": {"promptTokenCount": 4, "cachedContentTokenCount": 9}}));
        assert_eq!(capped, Some(Usage { cached_input_tokens: 4, ..Usage::default() }));
    }

    #[test]
    fn the_url_names_the_model_and_the_method() {
        assert_eq!(url_facts("gemini-2.5-flash:generateContent", None).unwrap(), facts("gemini-2.5-flash", false));
        assert_eq!(url_facts("gemini-2.5-flash:streamGenerateContent", Some("sse")).unwrap(), facts("gemini-2.5-flash", true));
        assert_eq!(url_facts("tuned:v2:generateContent", None).unwrap(), facts("tuned:v2", false));
        let not_sse = url_facts("m:streamGenerateContent", None).unwrap_err();
        assert!(matches!(not_sse, ProtocolError::InvalidRequest(_)), "{not_sse:?}");
        assert!(not_sse.to_string().contains("alt=sse"), "{not_sse}");
        assert!(url_facts("m:streamGenerateContent", Some("json")).is_err());
        assert!(matches!(url_facts("m:countTokens", None), Err(ProtocolError::NotFound(_))));
        assert!(matches!(url_facts("gemini-2.5-flash", None), Err(ProtocolError::NotFound(_))));
        assert!(matches!(url_facts(":generateContent", None), Err(ProtocolError::InvalidRequest(_))));
    }

    #[test]
    fn the_hold_counts_every_prompt_part_and_multiplies_the_cap_by_the_candidates() {
        let encoding = tokens::encoding_for_model("gemini-2.5-flash");
        let count = |text: &str| tokens::count_text(encoding, text);
        let tools = json!([{"functionDeclarations": [{"name": "lookup", "description": "Looks a word up"}]}]);
        let call = json!({"functionCall": {"name": "lookup", "args": {"word": "ledger"}}});
        let request = body(json!({
            "contents": [
                {"role": "user", "parts": [{"text": "What is a ledger?"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
                {"role": "model", "parts": [call]},
            ],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "tools": tools,
            "generationConfig": {"maxOutputTokens": 100, "candidateCount": 3, "temperature": 0.2},
            "safetySettings": [],
        }));
        let parsed = Protocol::GeminiGenerate.parse_at(&request, &facts("gemini-2.5-flash", true)).unwrap();
        assert_eq!(parsed.model, "gemini-2.5-flash");
        assert!(parsed.stream);
        assert_eq!(parsed.output_tokens_max, Some(100));
        assert_eq!(parsed.choices, 3);
        let expected = count("What is a ledger?") + MediaBounds::GEMINI.image_tokens_max + count(&call.to_string()) + count("Be brief.") + count(&tools.to_string());
        assert_eq!(parsed.prompt_tokens, expected);
        // Proto names work as well as JSON names; a bare string system instruction is counted.
        let snake = body(json!({"contents": [{"parts": [{"text": "hi"}]}], "system_instruction": "Be brief.",
            "generation_config": {"max_output_tokens": "7", "candidate_count": 2}}));
        let parsed = Protocol::GeminiGenerate.parse_at(&snake, &facts("m", false)).unwrap();
        assert_eq!((parsed.output_tokens_max, parsed.choices, parsed.prompt_tokens), (Some(7), 2, count("hi") + count("Be brief.")));
    }

    #[test]
    fn a_thinking_budget_is_read_by_either_name_and_dynamic_is_none() {
        let budget = |config: Value| {
            let body = json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": config});
            parse(body.as_object().unwrap(), &facts("m", false)).map(|parsed| parsed.thinking_budget)
        };
        assert_eq!(budget(json!({"thinkingConfig": {"thinkingBudget": 1024}})).unwrap(), Some(1024));
        assert_eq!(budget(json!({"thinking_config": {"thinking_budget": "0"}})).unwrap(), Some(0));
        assert_eq!(budget(json!({"thinkingConfig": {"thinkingBudget": -1}})).unwrap(), None, "dynamic");
        assert_eq!(budget(json!({"thinkingConfig": {"thinkingLevel": "high"}})).unwrap(), None);
        assert_eq!(budget(json!({"maxOutputTokens": 5})).unwrap(), None);
        for bad in [json!({"thinkingConfig": {"thinkingBudget": -2}}), json!({"thinkingConfig": {"thinkingBudget": 1.5}}), json!({"thinkingConfig": 3})] {
            assert!(budget(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_rejects_what_billing_cannot_price() {
        let url = facts("m", false);
        let cases = [
            (json!({}), "contents is required"),
            (json!({"contents": []}), "contents must not be empty"),
            (json!({"contents": "hi"}), "contents must be an array"),
            (json!({"contents": ["hi"]}), "every content must be an object, got \"hi\""),
            (json!({"contents": [{"parts": "hi"}]}), "parts must be an array"),
            (json!({"contents": [{"parts": ["hi"]}]}), "every part must be an object, got \"hi\""),
            (json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": -1}}), "generationConfig.maxOutputTokens must be a non-negative integer"),
            (json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 0}}), "generationConfig.candidateCount must be between 1 and 128"),
            (json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 129}}), "generationConfig.candidateCount must be between 1 and 128"),
            (json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": 5}), "generationConfig must be an object"),
            (json!({"contents": [{"parts": [{"text": "x"}]}], "systemInstruction": 5}), "systemInstruction must be a Content object"),
        ];
        for (request, message) in cases {
            let error = Protocol::GeminiGenerate.parse_at(&body(request.clone()), &url).unwrap_err();
            assert_eq!(error.to_string(), message, "{request}");
        }
        let no_model = Protocol::GeminiGenerate.parse(&body(json!({"contents": [{"parts": [{"text": "x"}]}]}))).unwrap_err();
        assert!(no_model.to_string().contains("named in the URL"), "{no_model}");
    }

    #[test]
    fn the_body_goes_upstream_as_sent_but_for_a_model_field() {
        let mut request = body(json!({"model": "models/gemini-2.5-pro", "contents": [{"parts": [{"text": "x"}]}], "cachedContent": "cachedContents/a", "futureField": {"x": 1}}));
        let prepared = Protocol::GeminiGenerate.prepare_upstream_body(&mut request, "gemini-2.5-flash", true);
        assert!(prepared.client_wants_usage && prepared.rewritten);
        assert_eq!(Value::Object(request), json!({"contents": [{"parts": [{"text": "x"}]}], "cachedContent": "cachedContents/a", "futureField": {"x": 1}}));
        assert_eq!(Protocol::GeminiGenerate.upstream_path("gemini-2.5-flash", false), "/models/gemini-2.5-flash:generateContent");
        assert_eq!(Protocol::GeminiGenerate.upstream_path("gemini-2.5-flash", true), "/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    }
}
