//! Token counting with the tiktoken encodings (shipped inside tiktoken-rs, so it works offline).
//! Used for hold estimates and as the fallback when an upstream reports no usage.
//!
//! Each encoding is loaded once, lazily, on first use (roughly a hundred milliseconds), and
//! shared by every thread. If an encoding cannot be loaded, counting does not fail: it falls back
//! to an upper bound of one token per two bytes (rounded up), silently, so holds and fallback
//! charges err towards asking the payer for more, never towards a free request.
//! [`tokenizer_ready`] tells a readiness check whether the real encodings are in use.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::media::{self, MediaBounds, MediaReference, PromptEstimate};

/// The BPE encodings Tollgate counts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-4 / GPT-3.5 era encoding; also the approximation for every non-OpenAI model.
    Cl100k,
    /// GPT-4o and later OpenAI models.
    O200k,
}

/// OpenAI's chat format: tokens framing every message.
const TOKENS_PER_MESSAGE: u64 = 3;
/// OpenAI's chat format: one more for a message with a `name`.
const TOKENS_PER_NAME: u64 = 1;
/// OpenAI's chat format: tokens priming the assistant's reply.
const TOKENS_PRIMING_REPLY: u64 = 3;
/// Model-name prefixes counted with o200k.
const O200K_PREFIXES: [&str; 7] = ["gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
/// Content-part types that are images, held at the protocol's per-image ceiling.
const IMAGE_PART_TYPES: [&str; 3] = ["image_url", "image", "input_image"];

static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();

/// The loaded encoding, or `None` if it could not be loaded (remembered: not retried).
fn bpe(encoding: Encoding) -> Option<&'static CoreBPE> {
    match encoding {
        Encoding::Cl100k => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()).as_ref(),
        Encoding::O200k => O200K.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref(),
    }
}

/// True when both encodings are loaded, so counts are exact rather than the byte-based upper
/// bound. Loads them if not yet loaded, so calling it at startup also warms the tokenizer.
pub fn tokenizer_ready() -> bool {
    bpe(Encoding::Cl100k).is_some() && bpe(Encoding::O200k).is_some()
}

/// o200k for gpt-4o*, gpt-4.1*, gpt-5*, o1*, o3*, o4*, chatgpt-4o*; cl100k for everything else
/// (including unknown models and non-OpenAI models, as an approximation).
///
/// A routing prefix ("openai/gpt-4o") and a fine-tune prefix ("ft:gpt-4o-mini:org::id") are
/// ignored, and case does not matter, so aliases count like the model they name.
pub fn encoding_for_model(model: &str) -> Encoding {
    let model = model_family_name(model);
    if O200K_PREFIXES.iter().any(|prefix| model.starts_with(prefix)) { Encoding::O200k } else { Encoding::Cl100k }
}

/// A model's name as its family prefixes are matched: without a routing prefix
/// ("openai/gpt-4o") or a fine-tune prefix ("ft:gpt-4o-mini:org::id"), lower case.
pub fn model_family_name(model: &str) -> String {
    let model = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
    model.strip_prefix("ft:").map(str::to_string).unwrap_or(model)
}

/// The fallback when an encoding cannot be loaded: one token per two bytes, rounded up, which is
/// above what either encoding produces for ordinary text.
fn upper_bound_from_bytes(text: &str) -> u64 {
    u64::try_from(text.len()).unwrap_or(u64::MAX).div_ceil(2)
}

/// Tokens of a text, as the encoding splits it (special-token text is counted as plain text).
/// If the encoding could not be loaded, the byte-based upper bound described in the module docs.
pub fn count_text(encoding: Encoding, text: &str) -> u64 {
    match bpe(encoding) {
        Some(bpe) => u64::try_from(bpe.encode_ordinary(text).len()).unwrap_or(u64::MAX),
        None => upper_bound_from_bytes(text),
    }
}

/// Adds a message's `content` to the estimate: a string, or an array of parts.
fn estimate_content(encoding: Encoding, content: &Value, bounds: &MediaBounds, estimate: &mut PromptEstimate) {
    match content {
        Value::String(text) => estimate.add_text(count_text(encoding, text)),
        Value::Array(parts) => {
            for part in parts {
                estimate_part(encoding, part, bounds, estimate);
            }
        }
        _ => {}
    }
}

/// One content part of the OpenAI or Anthropic protocol (their part types do not overlap):
/// text as text, wherever it is nested; media at the protocol's ceilings; any other part as
/// its JSON text, so that nothing the upstream bills is free.
fn estimate_part(encoding: Encoding, part: &Value, bounds: &MediaBounds, estimate: &mut PromptEstimate) {
    let text = |text: &str| count_text(encoding, text);
    if let Value::String(part_text) = part {
        estimate.add_text(text(part_text));
        return;
    }
    MediaReference::of_part(part, &mut estimate.references);
    let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        _ if IMAGE_PART_TYPES.contains(&kind) => {
            let low_detail = part.pointer("/image_url/detail").or_else(|| part.get("detail")).and_then(Value::as_str) == Some("low");
            estimate.add_media(if low_detail { bounds.low_detail_image_tokens_max } else { bounds.image_tokens_max });
        }
        // OpenAI: base64 audio in `data`, its format (wav, mp3) in `format`.
        "input_audio" => match part.pointer("/input_audio/data").and_then(Value::as_str) {
            Some(data) => estimate.add_media(bounds.inline_tokens_max("audio/", data.len())),
            None => estimate.add_unsized(),
        },
        // OpenAI: a file inline (`file_data`, a data URL or bare base64) or by `file_id`.
        "file" => {
            let file = part.get("file").unwrap_or(&Value::Null);
            match file.get("file_data").and_then(Value::as_str) {
                Some(data) => {
                    let (mime_type, payload) = media::data_url(data).unwrap_or(("application/pdf", data));
                    estimate.add_media(bounds.inline_tokens_max(mime_type, payload.len()));
                }
                None => estimate.add_unsized(),
            }
            if let Some(filename) = file.get("filename").and_then(Value::as_str) {
                estimate.add_text(text(filename));
            }
        }
        "document" => estimate_document(encoding, part, bounds, estimate),
        "tool_result" => {
            estimate_content(encoding, part.get("content").unwrap_or(&Value::Null), bounds, estimate);
            if let Some(id) = part.get("tool_use_id").and_then(Value::as_str) {
                estimate.add_text(text(id));
            }
        }
        "tool_use" => {
            let name = part.get("name").and_then(Value::as_str).unwrap_or_default();
            let input = part.get("input").map(Value::to_string).unwrap_or_default();
            estimate.add_text(text(name).saturating_add(text(&input)));
        }
        "thinking" => estimate.add_text(part.get("thinking").and_then(Value::as_str).map_or(0, text)),
        _ => match part.get("text").and_then(Value::as_str) {
            Some(part_text) => estimate.add_text(text(part_text)),
            None if part.is_object() => estimate.add_text(text(&part.to_string())),
            None => {}
        },
    }
}

/// An Anthropic `document` block: its source is text, content blocks, base64 bytes (a PDF),
/// or a URL or file id whose size the gateway cannot see.
fn estimate_document(encoding: Encoding, part: &Value, bounds: &MediaBounds, estimate: &mut PromptEstimate) {
    let source = part.get("source").unwrap_or(&Value::Null);
    let data = source.get("data").and_then(Value::as_str);
    match (source.get("type").and_then(Value::as_str), data) {
        (Some("text"), Some(text)) => estimate.add_text(count_text(encoding, text)),
        (Some("content"), _) => estimate_content(encoding, source.get("content").unwrap_or(&Value::Null), bounds, estimate),
        (Some("base64"), Some(data)) => {
            let mime_type = source.get("media_type").and_then(Value::as_str).unwrap_or("application/pdf");
            estimate.add_media(bounds.inline_tokens_max(mime_type, data.len()));
        }
        _ => estimate.add_unsized(),
    }
    for field in ["title", "context"] {
        if let Some(text) = part.get(field).and_then(Value::as_str) {
            estimate.add_text(count_text(encoding, text));
        }
    }
}

/// Prompt tokens of a chat request by OpenAI's documented formula: 3 tokens per message, +1 if
/// the message has "name", the tokens of every string field value of the message (role, content,
/// name, and any other string field such as `tool_call_id`), plus 3 tokens priming the reply —
/// with media held at gpt-4o's ceilings ([`estimate_chat_prompt`] says what it does with parts).
pub fn count_chat_prompt(encoding: Encoding, messages: &[Value]) -> u64 {
    estimate_chat_prompt(encoding, messages, &MediaBounds::openai("gpt-4o")).tokens_max()
}

/// The prompt of a chat request (OpenAI or Anthropic messages) estimated from above (I7): text
/// counted by OpenAI's formula (see [`count_chat_prompt`]), with text nested in content parts
/// (tool results, tool calls' inputs, text documents) counted as text, the tool calls of
/// earlier turns (`tool_calls`, `function_call`) as their JSON, and media parts at `bounds`.
/// Saturating, so no input can make it wrap.
pub fn estimate_chat_prompt(encoding: Encoding, messages: &[Value], bounds: &MediaBounds) -> PromptEstimate {
    let mut estimate = PromptEstimate { text_tokens: TOKENS_PRIMING_REPLY, ..PromptEstimate::default() };
    for message in messages {
        estimate_message(encoding, message, bounds, &mut estimate);
    }
    estimate
}

fn estimate_message(encoding: Encoding, message: &Value, bounds: &MediaBounds, estimate: &mut PromptEstimate) {
    estimate.add_text(TOKENS_PER_MESSAGE);
    let Some(fields) = message.as_object() else {
        return;
    };
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("content", content) => estimate_content(encoding, content, bounds, estimate),
            // The calls the model made in earlier turns come back as prompt.
            ("tool_calls" | "function_call", calls) if !calls.is_null() => estimate.add_text(count_text(encoding, &calls.to_string())),
            (_, Value::String(text)) => estimate.add_text(count_text(encoding, text)),
            _ => {}
        }
        if key == "name" {
            estimate.add_text(TOKENS_PER_NAME);
        }
    }
}

/// OpenAI's framing of function definitions, per encoding, as its cookbook measured them
/// against the API ("Counting tokens for chat completions with tool calls").
struct ToolFraming {
    function_start: i64,
    properties_start: i64,
    property: i64,
    enum_start: i64,
    enum_item: i64,
    functions_end: i64,
}

fn tool_framing(encoding: Encoding) -> ToolFraming {
    let function_start = match encoding {
        Encoding::O200k => 7,
        Encoding::Cl100k => 10,
    };
    ToolFraming { function_start, properties_start: 3, property: 3, enum_start: -3, enum_item: 3, functions_end: 12 }
}

/// Prompt tokens an OpenAI `tools` array adds, by the formula OpenAI's cookbook checked against
/// the API: per function, framing + "name:description" (a final period dropped) + per property
/// "name:type:description" and its enum values. A tool this formula cannot read (not a
/// function, no parameters object) is counted as its JSON text instead, so it is never free.
pub fn count_openai_tools(encoding: Encoding, tools: &Value) -> u64 {
    let Some(tools) = tools.as_array() else {
        return count_text(encoding, &tools.to_string());
    };
    if tools.is_empty() {
        return 0;
    }
    let framing = tool_framing(encoding);
    let text = |text: &str| i64::try_from(count_text(encoding, text)).unwrap_or(i64::MAX);
    let trimmed = |text: &str| text.strip_suffix('.').unwrap_or(text).to_string();
    let mut tokens: i64 = 0;
    for tool in tools {
        let function = tool.get("function").filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"));
        let Some(function) = function.filter(|function| function.get("name").is_some_and(Value::is_string)) else {
            tokens = tokens.saturating_add(text(&tool.to_string()));
            continue;
        };
        let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
        let description = function.get("description").and_then(Value::as_str).unwrap_or_default();
        tokens = tokens.saturating_add(framing.function_start).saturating_add(text(&format!("{name}:{}", trimmed(description))));
        let properties = function.pointer("/parameters/properties").and_then(Value::as_object);
        if let Some(properties) = properties.filter(|properties| !properties.is_empty()) {
            tokens = tokens.saturating_add(framing.properties_start);
            for (key, property) in properties {
                tokens = tokens.saturating_add(framing.property);
                let kind = property.get("type").and_then(Value::as_str).unwrap_or_default();
                let description = property.get("description").and_then(Value::as_str).unwrap_or_default();
                if let Some(values) = property.get("enum").and_then(Value::as_array) {
                    tokens = tokens.saturating_add(framing.enum_start);
                    for value in values {
                        let value = value.as_str().map_or_else(|| value.to_string(), str::to_string);
                        tokens = tokens.saturating_add(framing.enum_item).saturating_add(text(&value));
                    }
                }
                tokens = tokens.saturating_add(text(&format!("{key}:{kind}:{}", trimmed(description))));
            }
        }
    }
    u64::try_from(tokens.saturating_add(framing.functions_end)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    const BOTH: [Encoding; 2] = [Encoding::Cl100k, Encoding::O200k];

    /// The example of OpenAI's cookbook "How to count tokens with tiktoken", whose counts it
    /// checked against the API's `usage.prompt_tokens`: 129 (cl100k models), 124 (o200k models).
    fn cookbook_messages() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."}),
            json!({"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."}),
            json!({"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."}),
            json!({"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."}),
            json!({"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."}),
            json!({"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}),
        ]
    }

    #[test]
    fn prompts_match_the_counts_the_openai_api_reported() {
        assert_eq!(count_chat_prompt(encoding_for_model("gpt-4"), &cookbook_messages()), 129);
        assert_eq!(count_chat_prompt(encoding_for_model("gpt-4o"), &cookbook_messages()), 124);
        // The cookbook's tool example: 105 prompt tokens for gpt-4, 101 for gpt-4o, per the API.
        let tools = json!([{"type": "function", "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {"type": "object", "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
            }, "required": ["location"]}
        }}]);
        let messages = [
            json!({"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."}),
            json!({"role": "user", "content": "What's the weather like in San Francisco?"}),
        ];
        for (model, expected) in [("gpt-4", 105), ("gpt-4o", 101)] {
            let encoding = encoding_for_model(model);
            assert_eq!(count_chat_prompt(encoding, &messages) + count_openai_tools(encoding, &tools), expected, "{model}");
        }
        assert_eq!(count_openai_tools(Encoding::O200k, &json!([])), 0);
        let odd = json!([{"type": "web_search"}]);
        assert_eq!(count_openai_tools(Encoding::O200k, &odd), count_text(Encoding::O200k, &odd[0].to_string()) + 12);
    }

    /// Counts from OpenAI's Python `tiktoken` run on its own BPE files (regenerated and checked
    /// by scripts/tiktoken-fixtures), for texts and prompts the test suite sends.
    #[test]
    fn counts_match_the_pinned_python_tiktoken_run() {
        let fixture: Value = serde_json::from_str(include_str!("../../../tests/fixtures/tiktoken.json")).unwrap();
        let encoding = |name: &Value| match name.as_str() {
            Some("cl100k_base") => Encoding::Cl100k,
            Some("o200k_base") => Encoding::O200k,
            other => panic!("encoding {other:?}"),
        };
        let texts = fixture["texts"].as_array().unwrap();
        assert!(texts.len() >= 20);
        for case in texts {
            let text = case["text"].as_str().unwrap();
            assert_eq!(count_text(encoding(&case["encoding"]), text), case["tokens"].as_u64().unwrap(), "{case}");
        }
        let prompts = fixture["prompts"].as_array().unwrap();
        for case in prompts {
            let messages = case["messages"].as_array().unwrap();
            assert_eq!(count_chat_prompt(encoding(&case["encoding"]), messages), case["tokens"].as_u64().unwrap(), "{case}");
        }
    }

    #[test]
    fn texts_match_published_tiktoken_counts() {
        // Token ids published in tiktoken's own examples and tutorials.
        assert_eq!(count_text(Encoding::Cl100k, "tiktoken is great!"), 6);
        assert_eq!(count_text(Encoding::Cl100k, "China is great!"), 4);
        assert_eq!(count_text(Encoding::O200k, "Hi my name is Tevin and I love jamaican oxtail."), 15);
    }

    #[test]
    fn known_counts() {
        assert!(tokenizer_ready());
        assert_eq!(count_text(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200k, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100k, ""), 0);
        assert_eq!(count_text(Encoding::O200k, ""), 0);
        assert_eq!(count_text(Encoding::Cl100k, "hello"), 1);
        // Special-token text is ordinary text here: more than the one special token.
        assert!(count_text(Encoding::Cl100k, "<|endoftext|>") > 1);
    }

    #[test]
    fn the_encodings_differ_where_they_should() {
        // cl100k and o200k split some text differently; the choice must reach the tokenizer.
        let text = "Schönheit liegt im Auge des Betrachters, 美しさは見る人の目の中にある.";
        assert_ne!(count_text(Encoding::Cl100k, text), count_text(Encoding::O200k, text));
    }

    #[test]
    fn each_hello_chunk_is_one_token() {
        for encoding in BOTH {
            for repetitions in 1..50 {
                assert_eq!(count_text(encoding, &" hello".repeat(repetitions)), u64::try_from(repetitions).unwrap(), "{encoding:?} × {repetitions}");
            }
        }
    }

    #[test]
    fn byte_fallback_is_an_upper_bound() {
        assert_eq!(upper_bound_from_bytes(""), 0);
        assert_eq!(upper_bound_from_bytes("a"), 1);
        assert_eq!(upper_bound_from_bytes("ab"), 1);
        assert_eq!(upper_bound_from_bytes("abc"), 2);
        assert_eq!(upper_bound_from_bytes("é"), 1);
        for text in ["hello world", " hello hello hello", "The quick brown fox jumps over the lazy dog.", "naïve café 日本語"] {
            for encoding in BOTH {
                assert!(count_text(encoding, text) <= upper_bound_from_bytes(text), "{text}");
            }
        }
    }

    #[test]
    fn chat_prompt_follows_the_documented_formula() {
        for encoding in BOTH {
            // 3 priming + 3 per message + "user" (1) + "hello world" (2).
            assert_eq!(count_chat_prompt(encoding, &[json!({"role": "user", "content": "hello world"})]), 9);
            // + "name" flag (1) + "bob" (1) + text part (2) + image part (gpt-4o's ceiling).
            let named = json!({"role": "user", "name": "bob", "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ]});
            assert_eq!(count_chat_prompt(encoding, &[named]), 3 + 3 + 1 + 1 + 1 + 2 + 1_445);
            assert_eq!(count_chat_prompt(encoding, &[]), 3);
            // Two messages: each framed.
            let two = [json!({"role": "system", "content": "hello"}), json!({"role": "user", "content": "hello world"})];
            assert_eq!(count_chat_prompt(encoding, &two), 3 + (3 + 1 + 1) + (3 + 1 + 2));
            // Null content counts nothing; earlier tool calls count as their JSON; other
            // non-string fields are skipped.
            let tool_calls = json!([{"id": "x"}]);
            let tool_call = json!({"role": "assistant", "content": null, "tool_calls": tool_calls, "refusal": null});
            assert_eq!(count_chat_prompt(encoding, &[tool_call]), 3 + 3 + 1 + count_text(encoding, &tool_calls.to_string()));
            // Any other string field counts, as in OpenAI's reference implementation.
            let tool_result = json!({"role": "tool", "tool_call_id": "hello", "content": "hello world"});
            assert_eq!(count_chat_prompt(encoding, &[tool_result]), 3 + 3 + 1 + 1 + 2);
            // Not an object: only the framing.
            assert_eq!(count_chat_prompt(encoding, &[json!("hello world")]), 3 + 3);
        }
    }

    #[test]
    fn content_parts_are_counted_by_kind() {
        let encoding = Encoding::Cl100k;
        for kind in IMAGE_PART_TYPES {
            let message = json!({"role": "user", "content": [{"type": kind, "text": "ignored caption words here"}]});
            assert_eq!(count_chat_prompt(encoding, &[message]), 3 + 3 + 1 + 1_445, "{kind}");
        }
        // A text part (2), an unknown part without text (its JSON), a bare string part (1).
        let unknown = json!({"type": "unknown"});
        let message = json!({"role": "user", "content": [{"type": "input_text", "text": "hello world"}, unknown, "hello"]});
        assert_eq!(count_chat_prompt(encoding, &[message]), 3 + 3 + 1 + 2 + count_text(encoding, &unknown.to_string()) + 1);
        let message = json!({"role": "user", "content": 42});
        assert_eq!(count_chat_prompt(encoding, &[message]), 3 + 3 + 1);
    }

    /// Issue 19 item 2: what the tokenizer cannot read was free (tool results, tool inputs,
    /// documents, audio, files) or flat (an image at 85 whatever the model); text nested in
    /// structured parts is text, media is held at the protocol's ceiling.
    #[test]
    fn nested_text_is_text_and_media_is_held_at_its_ceiling() {
        let encoding = Encoding::Cl100k;
        let text = |text: &str| count_text(encoding, text);
        let estimate = |content: Value, bounds: &MediaBounds| estimate_chat_prompt(encoding, &[json!({"role": "user", "content": content})], bounds);
        let framing = 3 + 3 + text("user");
        let long = "the quick brown fox jumps over the lazy dog ".repeat(50);
        let anthropic = MediaBounds::ANTHROPIC;
        let url = |field, url: &str| MediaReference::Url { field, url: url.to_string() };

        let tool_result = json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": long},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        ]}, {"type": "tool_result", "tool_use_id": "toolu_2", "content": long}]);
        let counted = estimate(tool_result, &anthropic);
        assert_eq!(counted, PromptEstimate { text_tokens: framing + 2 * text(&long) + text("toolu_1") + text("toolu_2"), media_tokens_max: 1_600, unsized_parts: 0, references: Vec::new() });

        let input = json!({"query": long});
        let tool_use = estimate(json!([{"type": "tool_use", "id": "toolu_1", "name": "search", "input": input}]), &anthropic);
        assert_eq!(tool_use.text_tokens, framing + text("search") + text(&input.to_string()));

        let documents = json!([
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": long}, "title": "Notes"},
            {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": long}]}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "A".repeat(4 * 1_024)}},
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        ]);
        let counted = estimate(documents, &anthropic);
        assert_eq!(counted, PromptEstimate { text_tokens: framing + 2 * text(&long) + text("Notes"), media_tokens_max: 3 * 1_024, unsized_parts: 1, references: vec![url("source.url", "https://example.com/a.pdf")] });

        // OpenAI: audio bounded by its bytes, a file inline by its bytes or unsized by id, an
        // image at the model's ceiling (low detail: the base), earlier tool calls as their JSON.
        let gpt_4o = MediaBounds::openai("gpt-4o");
        let parts = json!([
            {"type": "input_audio", "input_audio": {"data": "A".repeat(10_000), "format": "mp3"}},
            {"type": "file", "file": {"file_data": format!("data:application/pdf;base64,{}", "A".repeat(4 * 512)), "filename": "a.pdf"}},
            {"type": "file", "file": {"file_id": "file-abc"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        ]);
        let counted = estimate(parts, &gpt_4o);
        let references = vec![
            MediaReference::File { field: "file.file_id", id: "file-abc".into() },
            url("image_url.url", "https://example.com/a.png"),
            url("image_url.url", "https://example.com/a.png"),
        ];
        assert_eq!(counted, PromptEstimate { text_tokens: framing + text("a.pdf"), media_tokens_max: 320 + 2 * 1_024 + 1_445 + 85, unsized_parts: 1, references });
        assert_eq!(counted.tokens_max(), counted.text_tokens + counted.media_tokens_max);
        let mini = estimate(json!([{"type": "image_url", "image_url": {"url": "x"}}]), &MediaBounds::openai("gpt-4o-mini"));
        assert_eq!(mini.media_tokens_max, 48_169);
    }

    #[test]
    fn models_pick_their_encoding() {
        let o200k = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini", "o1", "o1-preview", "o3-mini", "o4-mini", "chatgpt-4o-latest", "openai/gpt-5", "GPT-4o", "ft:gpt-4o-mini:org::abc"];
        for model in o200k {
            assert_eq!(encoding_for_model(model), Encoding::O200k, "{model}");
        }
        let cl100k = ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "text-embedding-3-small", "claude-sonnet-4", "llama-3", "", "omni", "gpt-40"];
        for model in cl100k {
            assert_eq!(encoding_for_model(model), Encoding::Cl100k, "{model}");
        }
    }

    #[test]
    fn loading_is_shared_across_threads() {
        let counts: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| count_text(Encoding::O200k, &" hello".repeat(10)))).collect();
            handles.into_iter().map(|handle| handle.join().unwrap()).collect()
        });
        assert_eq!(counts, vec![10; 8]);
    }
}
