//! The client-facing protocols: what Tollgate reads from a request (model, stream flag, output
//! cap, prompt size), what it changes before forwarding (the upstream model name, asking for
//! stream usage), and how it measures usage from responses and streams. Everything else in a
//! body passes through untouched.

use serde_json::{Map, Value};
use tollgate_core::{MediaBounds, MediaReference, PromptEstimate, Usage};
use tollgate_core::tokens::{self, Encoding};

use crate::error::ProtocolError;
use crate::sse::SseEvent;

pub mod gemini;

/// Anthropic server tool types (`web_search_20250305`, …) billed per use, by prefix.
const ANTHROPIC_SERVER_TOOLS: [&str; 3] = ["web_search", "web_fetch", "code_execution"];
/// Gemini tools billed per grounded prompt, by their JSON and proto names.
const GEMINI_BILLED_TOOLS: [&str; 6] = ["googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval", "enterpriseWebSearch", "enterprise_web_search"];

/// Upper bound on `n` (choices per request), so a hold cannot be multiplied without limit.
const CHOICES_MAX: u64 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI `/v1/chat/completions`.
    OpenAiChat,
    /// Anthropic `/v1/messages`.
    AnthropicMessages,
    /// OpenAI `/v1/embeddings`: billed by input tokens, never streamed.
    OpenAiEmbeddings,
    /// Google Gemini `/v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`
    /// (see [`gemini`]): the model and streaming are in the URL.
    GeminiGenerate,
}

/// What a request's URL says, for protocols that put request facts there rather than in the
/// body (Gemini names the model and the method in the path).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlFacts {
    /// The model named in the path.
    pub model: Option<String>,
    /// The method asks for a stream.
    pub stream: bool,
}

/// What [`Protocol::prepare_upstream_body`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamBody {
    /// The client asked for stream usage itself (else the gateway's usage chunk is stripped).
    pub client_wants_usage: bool,
    /// The body was changed; when not, the client's bytes are forwarded unchanged.
    pub rewritten: bool,
}

/// What the charge path needs to know about a request body.
#[derive(Clone, Debug)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    /// The request's own cap on output tokens per choice, if it set one (at least 1).
    pub output_tokens_max: Option<u64>,
    /// Choices requested (`n`), which multiplies the output.
    pub choices: u64,
    /// The prompt estimated from above (I7): text counted with the model's tokenizer, media
    /// at the protocol's ceilings; what the hold is sized with and the tokenizer fallback
    /// charges, before the gateway adds its default for each unsized part.
    pub prompt_tokens: u64,
    /// The part of `prompt_tokens` the tokenizer read: what an upstream's report is checked
    /// against (a report below the media ceilings is no under-report).
    pub prompt_text_tokens: u64,
    /// Media parts whose size the request does not show (a file by id or URL).
    pub unsized_media_parts: u64,
    /// URLs and files the request names for the upstream to fetch or open (the pass-through
    /// policy's input).
    pub media_references: Vec<MediaReference>,
    /// For a protocol whose thinking is outside the output cap (Gemini): the tokens per choice
    /// the request lets the model think (`thinkingConfig.thinkingBudget` of 0 or more); `None`
    /// when it leaves that to the model (no budget, or -1 for dynamic).
    pub thinking_budget: Option<u64>,
    pub encoding: Encoding,
}

impl ParsedRequest {
    fn new(model: String, stream: bool, output_tokens_max: Option<u64>, choices: u64, prompt: PromptEstimate, encoding: Encoding) -> ParsedRequest {
        ParsedRequest {
            model,
            stream,
            output_tokens_max,
            choices,
            prompt_tokens: prompt.tokens_max(),
            prompt_text_tokens: prompt.text_tokens,
            unsized_media_parts: prompt.unsized_parts,
            media_references: prompt.references,
            thinking_budget: None,
            encoding,
        }
    }
}

/// What to do with one event of an upstream stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventAction {
    Forward,
    /// Not for this client (the usage chunk it did not ask for).
    Strip,
    /// The stream's last event: held back until the charge is settled.
    Terminal,
    /// Possibly the last event, in a protocol whose stream simply ends (Gemini): kept back until
    /// another event shows it was not, or the upstream closes the stream — then, if
    /// [`StreamInspector::completed_at_end_of_stream`], it is the terminal event.
    MaybeTerminal,
}

fn invalid(message: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidRequest(message.into())
}

/// Which field of an OpenAI-protocol body carries the output cap the gateway adds when a client
/// sets none (I7: the cap that sized the hold is the one the upstream gets). OpenAI's own API
/// reads `max_completion_tokens` (its reasoning models refuse `max_tokens`); most compatible
/// servers read `max_tokens`, and some read only it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenAiCapField {
    #[default]
    MaxTokens,
    MaxCompletionTokens,
}

impl OpenAiCapField {
    pub fn as_str(self) -> &'static str {
        match self {
            OpenAiCapField::MaxTokens => "max_tokens",
            OpenAiCapField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// An output cap the client set: a positive integer. A cap of 0 is refused: some servers read 0
/// as "unset" (vLLM: `max_completion_tokens or max_tokens`) and generate without bound while the
/// hold was sized for none.
fn optional_cap(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProtocolError> {
    match optional_u64(body, field)? {
        Some(0) => Err(invalid(format!("{field} must be at least 1"))),
        cap => Ok(cap),
    }
}

fn optional_u64(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProtocolError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{field} must be a non-negative integer"))),
    }
}

impl Protocol {
    /// Whether reported reasoning (Gemini's `thoughtsTokenCount`) comes on top of the output cap
    /// rather than inside it, as the Gemini API reports it; for OpenAI and Anthropic the cap
    /// bounds every generated token. The hold then covers the thinking budget too
    /// ([`ParsedRequest::thinking_budget`]).
    pub fn reasoning_outside_output_cap(self) -> bool {
        self == Protocol::GeminiGenerate
    }

    /// A feature of the request that the provider bills beyond token prices — per use, or at a
    /// premium — which the price table has no field for, if the request asks for one (issue 19
    /// item 3: passed through, the operator would pay it and the customer not). Named as the
    /// client wrote it, for the error. `anthropic_beta` is the `anthropic-beta` header.
    pub fn unpriced_feature(self, body: &Map<String, Value>, anthropic_beta: Option<&str>) -> Option<String> {
        match self {
            Protocol::OpenAiChat => {
                // OpenAI prices priority and flex tiers apart; "auto" and "default" are the standard price.
                let tier = body.get("service_tier").and_then(Value::as_str);
                if let Some(tier) = tier.filter(|tier| !matches!(*tier, "auto" | "default")) {
                    return Some(format!("service_tier \"{tier}\""));
                }
                body.get("web_search_options").filter(|options| !options.is_null()).map(|_| "web_search_options".to_string())
            }
            Protocol::AnthropicMessages => {
                // Server tools are billed per use (web search, web fetch, code execution hours).
                let server_tool = body.get("tools").and_then(Value::as_array).into_iter().flatten().find_map(|tool| {
                    let kind = tool.get("type").and_then(Value::as_str)?;
                    ANTHROPIC_SERVER_TOOLS.iter().any(|prefix| kind.starts_with(prefix)).then(|| format!("server tool {kind}"))
                });
                if server_tool.is_some() {
                    return server_tool;
                }
                // Long-context betas bill the whole request at a premium past 200k input tokens.
                anthropic_beta?.split(',').map(str::trim).find(|beta| beta.starts_with("context-")).map(|beta| format!("anthropic-beta {beta}"))
            }
            Protocol::GeminiGenerate => {
                body.get("tools").and_then(Value::as_array).into_iter().flatten().find_map(|tool| {
                    let fields = tool.as_object()?;
                    GEMINI_BILLED_TOOLS.iter().find(|name| fields.contains_key(**name)).map(|name| format!("tool {name}"))
                })
            }
            Protocol::OpenAiEmbeddings => None,
        }
    }

    /// The path (and query) under the provider's base URL.
    pub fn upstream_path(self, upstream_model: &str, stream: bool) -> String {
        match self {
            Protocol::OpenAiChat => "/chat/completions".into(),
            Protocol::AnthropicMessages => "/messages".into(),
            Protocol::OpenAiEmbeddings => "/embeddings".into(),
            Protocol::GeminiGenerate if stream => format!("/models/{upstream_model}:streamGenerateContent?alt=sse"),
            Protocol::GeminiGenerate => format!("/models/{upstream_model}:generateContent"),
        }
    }

    /// [`Protocol::parse`], with what the URL says (Gemini names the model and streaming there).
    ///
    /// # Errors
    /// `InvalidRequest` naming the field that is missing or malformed.
    pub fn parse_at(self, body: &Map<String, Value>, url: &UrlFacts) -> Result<ParsedRequest, ProtocolError> {
        match self {
            Protocol::GeminiGenerate => gemini::parse(body, url),
            Protocol::OpenAiChat | Protocol::AnthropicMessages | Protocol::OpenAiEmbeddings => self.parse(body),
        }
    }

    /// The model the request names, read without counting anything: the gateway checks the
    /// route, the key's models and the price with it before it spends CPU on the tokenizer.
    ///
    /// # Errors
    /// `InvalidRequest` as [`Protocol::parse_at`] words it.
    pub fn requested_model(self, body: &Map<String, Value>, url: &UrlFacts) -> Result<String, ProtocolError> {
        if self == Protocol::GeminiGenerate {
            return gemini::requested_model(url);
        }
        match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => Ok(model.clone()),
            Some(_) => Err(invalid("model must be a non-empty string")),
            None => Err(invalid("model is required")),
        }
    }

    /// Reads and validates what billing needs; the body is otherwise not interpreted.
    ///
    /// # Errors
    /// `InvalidRequest` naming the field that is missing or malformed.
    pub fn parse(self, body: &Map<String, Value>) -> Result<ParsedRequest, ProtocolError> {
        if self == Protocol::GeminiGenerate {
            return gemini::parse(body, &UrlFacts::default());
        }
        let model = self.requested_model(body, &UrlFacts::default())?;
        if self == Protocol::OpenAiEmbeddings {
            return parse_embeddings(model, body);
        }
        let messages = match body.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => messages,
            Some(Value::Array(_)) => return Err(invalid("messages must not be empty")),
            Some(_) => return Err(invalid("messages must be an array")),
            None => return Err(invalid("messages is required")),
        };
        if let Some(bad) = messages.iter().find(|message| !message.is_object()) {
            return Err(invalid(format!("every message must be an object, got {bad}")));
        }
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err(invalid("stream must be a boolean")),
        };
        let encoding = tokens::encoding_for_model(&model);
        let bounds = if self == Protocol::AnthropicMessages { MediaBounds::ANTHROPIC } else { MediaBounds::openai(&model) };
        let mut prompt = tokens::estimate_chat_prompt(encoding, messages, &bounds);
        let (output_tokens_max, choices) = match self {
            Protocol::OpenAiChat => {
                // Servers differ in which one wins when both are set: the hold could only cover
                // the larger, so they must agree.
                let cap = match (optional_cap(body, "max_completion_tokens")?, optional_cap(body, "max_tokens")?) {
                    (Some(completion), Some(tokens)) if completion != tokens => {
                        return Err(invalid("max_completion_tokens and max_tokens differ; send one of them"));
                    }
                    (completion, tokens) => completion.or(tokens),
                };
                let choices = optional_u64(body, "n")?.unwrap_or(1);
                if choices == 0 || choices > CHOICES_MAX {
                    return Err(invalid(format!("n must be between 1 and {CHOICES_MAX}")));
                }
                (cap, choices)
            }
            // Parsed by their own functions above; never reached.
            Protocol::OpenAiEmbeddings | Protocol::GeminiGenerate => (Some(0), 1),
            Protocol::AnthropicMessages => {
                let cap = optional_cap(body, "max_tokens")?.ok_or_else(|| invalid("max_tokens is required"))?;
                match body.get("system") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(system)) => prompt.add_text(tokens::count_text(encoding, system)),
                    Some(Value::Array(parts)) => {
                        for part in parts {
                            if let Some(text) = part.get("text").and_then(Value::as_str) {
                                prompt.add_text(tokens::count_text(encoding, text));
                            }
                        }
                    }
                    Some(_) => return Err(invalid("system must be a string or an array of blocks")),
                }
                (Some(cap), 1)
            }
        };
        // Tool definitions are part of the prompt the provider bills.
        if let Some(tools) = body.get("tools").filter(|tools| !tools.is_null()) {
            prompt.add_text(match self {
                Protocol::OpenAiChat => tokens::count_openai_tools(encoding, tools),
                _ => tokens::count_text(encoding, &tools.to_string()),
            });
        }
        Ok(ParsedRequest::new(model, stream, output_tokens_max, choices, prompt, encoding))
    }

    /// Rewrites the body for the upstream: its model name, and (OpenAI streams) a request for
    /// the usage chunk. Says whether the client itself asked for stream usage, and whether the
    /// body changed at all (if not, the bytes the client sent go upstream as they are).
    pub fn prepare_upstream_body(self, body: &mut Map<String, Value>, upstream_model: &str, stream: bool) -> UpstreamBody {
        if self == Protocol::GeminiGenerate {
            // The URL names the model; a `model` in the body could steer the upstream to another
            // model than the one priced, so it is dropped. Gemini streams always carry usage.
            let rewritten = body.remove("model").is_some();
            return UpstreamBody { client_wants_usage: true, rewritten };
        }
        let mut rewritten = false;
        if body.get("model").and_then(Value::as_str) != Some(upstream_model) {
            body.insert("model".into(), Value::String(upstream_model.to_string()));
            rewritten = true;
        }
        match self {
            Protocol::OpenAiChat if stream => {
                let options = body.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
                if !options.is_object() {
                    *options = Value::Object(Map::new());
                }
                let client_wants_usage = options.get("include_usage").and_then(Value::as_bool) == Some(true);
                if let Some(options) = options.as_object_mut() {
                    options.insert("include_usage".into(), Value::Bool(true));
                }
                UpstreamBody { client_wants_usage, rewritten: rewritten || !client_wants_usage }
            }
            // Anthropic streams always carry usage; nothing to ask for or strip.
            _ => UpstreamBody { client_wants_usage: true, rewritten },
        }
    }

    /// Adds the output cap the hold was sized with to a body whose client set none (I7), in the
    /// field the upstream reads: per choice, as every protocol counts it. Returns whether the
    /// body changed. Anthropic requires a cap, and embeddings generate nothing: no change.
    pub fn insert_output_cap(self, body: &mut Map<String, Value>, cap: u64, openai_field: OpenAiCapField) -> bool {
        debug_assert!(cap > 0, "a cap of 0 is refused at parse");
        match self {
            Protocol::OpenAiChat => {
                body.insert(openai_field.as_str().into(), Value::from(cap));
                true
            }
            Protocol::GeminiGenerate => gemini::insert_output_cap(body, cap),
            Protocol::AnthropicMessages | Protocol::OpenAiEmbeddings => false,
        }
    }

    /// The upstream's own usage from a complete response, if present and sane.
    pub fn response_usage(self, response: &Value) -> Option<Usage> {
        let field = if self == Protocol::GeminiGenerate { "usageMetadata" } else { "usage" };
        let usage = response.get(field)?;
        match self {
            Protocol::GeminiGenerate => gemini::usage(usage),
            Protocol::OpenAiChat => openai_usage(usage),
            Protocol::AnthropicMessages => anthropic_usage(usage, None),
            Protocol::OpenAiEmbeddings => {
                let input_tokens = usage.get("prompt_tokens")?.as_u64()?;
                Some(Usage { input_tokens, ..Usage::default() })
            }
        }
    }

    /// The generated text of a complete response, for the tokenizer fallback.
    pub fn response_output_text(self, response: &Value) -> String {
        let mut text = String::new();
        match self {
            Protocol::OpenAiChat => {
                for choice in response.get("choices").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(message) = choice.get("message") {
                        append_openai_output(&mut text, message);
                    }
                }
            }
            Protocol::AnthropicMessages => {
                for block in response.get("content").and_then(Value::as_array).into_iter().flatten() {
                    append_anthropic_block(&mut text, block);
                }
            }
            // Embeddings generate no text; the fallback is the counted input alone.
            Protocol::OpenAiEmbeddings => {}
            Protocol::GeminiGenerate => gemini::append_output(&mut text, response),
        }
        text
    }

    pub fn stream_inspector(self, client_wants_usage: bool) -> StreamInspector {
        StreamInspector {
            protocol: self,
            client_wants_usage,
            usage: None,
            anthropic_start: None,
            input_reported: None,
            output_text: String::new(),
            finish_reason_seen: false,
        }
    }
}

/// Inputs per embeddings request at most.
const EMBEDDING_INPUTS_MAX: usize = 2_048;

/// An embeddings body: `input` is a string, an array of strings, or token arrays; the hold is
/// its input tokens, nothing is generated.
fn parse_embeddings(model: String, body: &Map<String, Value>) -> Result<ParsedRequest, ProtocolError> {
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(invalid("embeddings cannot be streamed"));
    }
    let encoding = tokens::encoding_for_model(&model);
    let count_one = |input: &Value| -> Result<u64, ProtocolError> {
        match input {
            Value::String(text) => Ok(tokens::count_text(encoding, text)),
            // Pre-tokenized input: its length is its token count.
            Value::Array(token_ids) if token_ids.iter().all(Value::is_u64) => Ok(token_ids.len() as u64),
            _ => Err(invalid("input must be a string, an array of strings, or arrays of token ids")),
        }
    };
    let prompt_tokens = match body.get("input") {
        None | Some(Value::Null) => return Err(invalid("input is required")),
        Some(Value::Array(inputs)) if inputs.is_empty() => return Err(invalid("input must not be empty")),
        Some(Value::Array(inputs)) if inputs.len() > EMBEDDING_INPUTS_MAX => {
            return Err(invalid(format!("input has more than {EMBEDDING_INPUTS_MAX} items")));
        }
        Some(Value::Array(inputs)) if inputs.iter().all(Value::is_u64) => inputs.len() as u64,
        Some(Value::Array(inputs)) => inputs.iter().map(count_one).sum::<Result<u64, ProtocolError>>()?,
        Some(single) => count_one(single)?,
    };
    let prompt = PromptEstimate { text_tokens: prompt_tokens, ..PromptEstimate::default() };
    Ok(ParsedRequest::new(model, false, Some(0), 1, prompt, encoding))
}

fn openai_usage(usage: &Value) -> Option<Usage> {
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage.get("completion_tokens")?.as_u64()?;
    let cached = usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0);
    let reasoning = usage.pointer("/completion_tokens_details/reasoning_tokens").and_then(Value::as_u64).unwrap_or(0);
    if cached > prompt || reasoning > completion {
        tracing::warn!(prompt, cached, completion, reasoning, "inconsistent upstream usage; details capped");
    }
    let cached = cached.min(prompt);
    Some(Usage {
        input_tokens: prompt - cached,
        cached_input_tokens: cached,
        cache_write_tokens: 0,
        output_tokens: completion,
        reasoning_tokens: reasoning.min(completion),
    })
}

/// Anthropic reports uncached input, cache reads and cache writes separately. In streams the
/// output count arrives later, in `message_delta`.
fn anthropic_usage(usage: &Value, output_override: Option<u64>) -> Option<Usage> {
    let input = usage.get("input_tokens")?.as_u64()?;
    let output = match output_override {
        Some(output) => output,
        None => usage.get("output_tokens")?.as_u64()?,
    };
    Some(Usage {
        input_tokens: input,
        cached_input_tokens: usage.get("cache_read_input_tokens").and_then(Value::as_u64).unwrap_or(0),
        cache_write_tokens: usage.get("cache_creation_input_tokens").and_then(Value::as_u64).unwrap_or(0),
        output_tokens: output,
        reasoning_tokens: 0,
    })
}

fn append_openai_output(text: &mut String, message: &Value) {
    // `reasoning_content` (DeepSeek, vLLM) and `reasoning` (OpenRouter) carry visible reasoning.
    for field in ["content", "reasoning_content", "reasoning", "refusal"] {
        if let Some(content) = message.get(field).and_then(Value::as_str) {
            text.push_str(content);
        }
    }
    for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        for pointer in ["/function/name", "/function/arguments"] {
            if let Some(part) = call.pointer(pointer).and_then(Value::as_str) {
                text.push_str(part);
            }
        }
    }
}

fn append_anthropic_block(text: &mut String, block: &Value) {
    for field in ["text", "thinking", "partial_json"] {
        if let Some(part) = block.get(field).and_then(Value::as_str) {
            text.push_str(part);
        }
    }
    if let Some(input) = block.get("input").filter(|input| !input.is_null()) {
        text.push_str(&input.to_string());
    }
}

/// Watches a stream go by: collects usage and generated text, decides each event's fate.
pub struct StreamInspector {
    protocol: Protocol,
    client_wants_usage: bool,
    usage: Option<Usage>,
    /// Anthropic: the usage of `message_start`, completed by `message_delta`.
    anthropic_start: Option<Value>,
    /// The input counts the upstream reported before its full report (Anthropic's
    /// `message_start`, Gemini's latest `usageMetadata`), output left at 0: a stream cut before
    /// the full report is still charged the input the provider counted.
    input_reported: Option<Usage>,
    output_text: String,
    /// Gemini: a candidate carried a `finishReason`, so the stream is complete if it ends now.
    finish_reason_seen: bool,
}

impl StreamInspector {
    pub fn inspect(&mut self, event: &SseEvent) -> EventAction {
        match self.protocol {
            Protocol::OpenAiChat | Protocol::OpenAiEmbeddings => self.inspect_openai(event),
            Protocol::AnthropicMessages => self.inspect_anthropic(event),
            Protocol::GeminiGenerate => self.inspect_gemini(event),
        }
    }

    /// Whether the upstream closing the stream now completes it: true for a protocol without a
    /// terminal event once its last chunk came (Gemini: a `finishReason`); false otherwise (an
    /// end before the terminal event is a cut).
    pub fn completed_at_end_of_stream(&self) -> bool {
        self.finish_reason_seen
    }

    fn inspect_openai(&mut self, event: &SseEvent) -> EventAction {
        if event.data.trim() == "[DONE]" {
            return EventAction::Terminal;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            return EventAction::Forward;
        };
        for choice in chunk.get("choices").and_then(Value::as_array).into_iter().flatten() {
            if let Some(delta) = choice.get("delta") {
                append_openai_output(&mut self.output_text, delta);
            }
        }
        let usage = chunk.get("usage").filter(|usage| !usage.is_null());
        if let Some(usage) = usage {
            self.usage = openai_usage(usage);
            let usage_only = chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
            if usage_only && !self.client_wants_usage {
                return EventAction::Strip;
            }
        }
        EventAction::Forward
    }

    fn inspect_anthropic(&mut self, event: &SseEvent) -> EventAction {
        let Ok(payload) = serde_json::from_str::<Value>(&event.data) else {
            return EventAction::Forward;
        };
        let kind = event.name.as_deref().or_else(|| payload.get("type").and_then(Value::as_str));
        match kind {
            Some("message_start") => {
                self.anthropic_start = payload.pointer("/message/usage").cloned();
                self.input_reported = self.anthropic_start.as_ref().and_then(|usage| anthropic_usage(usage, Some(0)));
            }
            Some("content_block_start") => {
                if let Some(block) = payload.get("content_block") {
                    append_anthropic_block(&mut self.output_text, block);
                }
            }
            Some("content_block_delta") => {
                if let Some(delta) = payload.get("delta") {
                    append_anthropic_block(&mut self.output_text, delta);
                }
            }
            Some("message_delta") => {
                let output = payload.pointer("/usage/output_tokens").and_then(Value::as_u64);
                if let (Some(start), Some(output)) = (&self.anthropic_start, output) {
                    // message_delta may also restate input counts; prefer them when present.
                    let mut merged = start.clone();
                    if let (Some(merged), Some(delta_usage)) = (merged.as_object_mut(), payload.get("usage").and_then(Value::as_object)) {
                        for (field, value) in delta_usage {
                            if !value.is_null() {
                                merged.insert(field.clone(), value.clone());
                            }
                        }
                    }
                    self.usage = anthropic_usage(&merged, Some(output));
                }
            }
            Some("message_stop") => return EventAction::Terminal,
            _ => {}
        }
        EventAction::Forward
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The upstream's usage, once its stream reported it in full.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The input counts (uncached, cache reads, cache writes) the upstream reported so far,
    /// with no output: what a stream cut before its full report still owes for its prompt.
    pub fn input_usage(&self) -> Option<Usage> {
        self.input_reported
    }

    /// Everything generated so far, for the tokenizer fallback.
    pub fn output_text(&self) -> &str {
        &self.output_text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn event(name: Option<&str>, data: &str) -> SseEvent {
        SseEvent { raw: Bytes::from(data.to_string()), name: name.map(str::to_string), data: data.to_string() }
    }

    #[test]
    fn openai_usage_splits_cached_tokens_out_of_the_prompt() {
        let response = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 30}, "completion_tokens_details": {"reasoning_tokens": 5}}});
        let usage = Protocol::OpenAiChat.response_usage(&response).unwrap();
        assert_eq!(usage, Usage { input_tokens: 70, cached_input_tokens: 30, cache_write_tokens: 0, output_tokens: 20, reasoning_tokens: 5 });
    }

    #[test]
    fn garbage_usage_is_no_usage() {
        for usage in [json!({"prompt_tokens": -1, "completion_tokens": 2}), json!({"prompt_tokens": "5", "completion_tokens": 2}), json!(null), json!({"completion_tokens": 2})] {
            assert_eq!(Protocol::OpenAiChat.response_usage(&json!({"usage": usage})), None);
        }
    }

    #[test]
    fn include_usage_is_injected_and_the_usage_chunk_stripped_when_not_asked() {
        let mut body = json!({"model": "a", "stream": true}).as_object().unwrap().clone();
        let prepared = Protocol::OpenAiChat.prepare_upstream_body(&mut body, "b", true);
        assert_eq!(prepared, UpstreamBody { client_wants_usage: false, rewritten: true });
        let wants = prepared.client_wants_usage;
        assert_eq!(body["stream_options"]["include_usage"], json!(true));
        assert_eq!(body["model"], json!("b"));
        let mut inspector = Protocol::OpenAiChat.stream_inspector(wants);
        assert_eq!(inspector.inspect(&event(None, r#"{"choices":[{"delta":{"content":" hi"}}],"usage":null}"#)), EventAction::Forward);
        assert_eq!(inspector.inspect(&event(None, r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#)), EventAction::Strip);
        assert_eq!(inspector.inspect(&event(None, "[DONE]")), EventAction::Terminal);
        assert_eq!(inspector.output_text(), " hi");
        assert_eq!(inspector.usage().unwrap().output_tokens, 1);
    }

    /// I7, issue 19 item 1: a cap of 0 (which vLLM reads as unset) and two caps that disagree
    /// are refused, since the hold could cover neither; a request without a cap gets the hold's
    /// in the field its upstream reads.
    #[test]
    fn the_output_cap_is_positive_single_and_sent_upstream() {
        let messages = json!([{"role": "user", "content": "x"}]);
        let parse = |extra: Value| {
            let mut body = json!({"model": "m", "messages": messages});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            Protocol::OpenAiChat.parse(body.as_object().unwrap()).map(|parsed| parsed.output_tokens_max).map_err(|error| error.to_string())
        };
        assert_eq!(parse(json!({"max_completion_tokens": 0, "max_tokens": 50})), Err("max_completion_tokens must be at least 1".into()));
        assert_eq!(parse(json!({"max_tokens": 0})), Err("max_tokens must be at least 1".into()));
        assert_eq!(parse(json!({"max_completion_tokens": 10, "max_tokens": 50})), Err("max_completion_tokens and max_tokens differ; send one of them".into()));
        assert_eq!(parse(json!({"max_completion_tokens": 10, "max_tokens": 10})), Ok(Some(10)));
        assert_eq!(parse(json!({"max_tokens": null})), Ok(None));
        let mut body = json!({"model": "m", "messages": messages}).as_object().unwrap().clone();
        assert!(Protocol::OpenAiChat.insert_output_cap(&mut body, 4096, OpenAiCapField::MaxCompletionTokens));
        assert_eq!(body["max_completion_tokens"], json!(4096));
        assert_eq!(Protocol::OpenAiChat.parse(&body).unwrap().output_tokens_max, Some(4096), "what goes upstream reads back as the hold's cap");
        let mut gemini = json!({"contents": [{"parts": [{"text": "x"}]}], "generation_config": {"temperature": 0.1}}).as_object().unwrap().clone();
        assert!(Protocol::GeminiGenerate.insert_output_cap(&mut gemini, 77, OpenAiCapField::MaxTokens));
        assert_eq!(gemini["generation_config"], json!({"temperature": 0.1, "maxOutputTokens": 77}));
        let facts = UrlFacts { model: Some("g".into()), stream: false };
        assert_eq!(Protocol::GeminiGenerate.parse_at(&gemini, &facts).unwrap().output_tokens_max, Some(77));
        let zero = json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 0}});
        assert!(Protocol::GeminiGenerate.parse_at(zero.as_object().unwrap(), &facts).is_err());
    }

    /// Issue 19 item 3: what a provider bills beyond token prices is refused by name, never
    /// passed through for the operator to pay.
    #[test]
    fn features_billed_beyond_tokens_are_named() {
        let openai = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            Protocol::OpenAiChat.unpriced_feature(body.as_object().unwrap(), None)
        };
        assert_eq!(openai(json!({"service_tier": "priority"})), Some("service_tier \"priority\"".into()));
        assert_eq!(openai(json!({"service_tier": "flex"})), Some("service_tier \"flex\"".into()));
        assert_eq!(openai(json!({"service_tier": "default"})), None);
        assert_eq!(openai(json!({"service_tier": "auto", "web_search_options": {}})), Some("web_search_options".into()));
        assert_eq!(openai(json!({})), None);
        let anthropic = json!({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "f", "input_schema": {}}, {"type": "web_search_20250305", "name": "web_search"}]});
        assert_eq!(Protocol::AnthropicMessages.unpriced_feature(anthropic.as_object().unwrap(), None), Some("server tool web_search_20250305".into()));
        let plain = json!({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "f", "input_schema": {}}]});
        assert_eq!(Protocol::AnthropicMessages.unpriced_feature(plain.as_object().unwrap(), Some("prompt-caching-2024-07-31")), None);
        assert_eq!(Protocol::AnthropicMessages.unpriced_feature(plain.as_object().unwrap(), Some("x, context-1m-2025-08-07")), Some("anthropic-beta context-1m-2025-08-07".into()));
        let grounded = json!({"contents": [], "tools": [{"functionDeclarations": []}, {"google_search": {}}]});
        assert_eq!(Protocol::GeminiGenerate.unpriced_feature(grounded.as_object().unwrap(), None), Some("tool google_search".into()));
    }

    #[test]
    fn anthropic_stream_usage_combines_start_and_delta() {
        let mut inspector = Protocol::AnthropicMessages.stream_inspector(true);
        inspector.inspect(&event(Some("message_start"), r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":4,"cache_creation_input_tokens":2,"output_tokens":1}}}"#));
        inspector.inspect(&event(Some("content_block_delta"), r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":" hello"}}"#));
        assert_eq!(inspector.usage(), None);
        inspector.inspect(&event(Some("message_delta"), r#"{"type":"message_delta","usage":{"output_tokens":7}}"#));
        assert_eq!(inspector.inspect(&event(Some("message_stop"), r#"{"type":"message_stop"}"#)), EventAction::Terminal);
        assert_eq!(inspector.usage(), Some(Usage { input_tokens: 10, cached_input_tokens: 4, cache_write_tokens: 2, output_tokens: 7, reasoning_tokens: 0 }));
        assert_eq!(inspector.output_text(), " hello");
    }

    /// Issue 19 item 2: a stream cut before `message_delta` keeps the input counts
    /// `message_start` carried (cache reads and writes too), with no output of its own.
    #[test]
    fn anthropic_input_counts_are_kept_from_message_start() {
        let mut inspector = Protocol::AnthropicMessages.stream_inspector(true);
        assert_eq!(inspector.input_usage(), None);
        inspector.inspect(&event(Some("message_start"), r#"{"type":"message_start","message":{"usage":{"input_tokens":5000,"cache_read_input_tokens":300,"cache_creation_input_tokens":200,"output_tokens":1}}}"#));
        inspector.inspect(&event(Some("content_block_delta"), r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":" hello"}}"#));
        assert_eq!(inspector.usage(), None, "no full report yet");
        assert_eq!(inspector.input_usage(), Some(Usage { input_tokens: 5000, cached_input_tokens: 300, cache_write_tokens: 200, ..Usage::default() }));
    }

    /// The hold counts what the tokenizer cannot see from above, per protocol; what an upstream
    /// report is checked against stays the text alone.
    #[test]
    fn media_parts_are_held_from_above_per_protocol() {
        let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}});
        let anthropic = json!({"model": "claude-sonnet-4", "max_tokens": 5, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]});
        let parsed = Protocol::AnthropicMessages.parse(anthropic.as_object().unwrap()).unwrap();
        assert_eq!(parsed.prompt_tokens, parsed.prompt_text_tokens + 1_600);
        let openai = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "file", "file": {"file_id": "file-1"}}]}]});
        let parsed = Protocol::OpenAiChat.parse(openai.as_object().unwrap()).unwrap();
        assert_eq!((parsed.prompt_tokens - parsed.prompt_text_tokens, parsed.unsized_media_parts), (48_169, 1));
    }

    #[test]
    fn parse_rejects_what_billing_cannot_price() {
        let cases = [
            (json!({"messages": [{"role": "user", "content": "x"}]}), "model is required"),
            (json!({"model": "m"}), "messages is required"),
            (json!({"model": "m", "messages": []}), "messages must not be empty"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}), "max_tokens must be a non-negative integer"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream must be a boolean"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}), "n must be between 1 and 128"),
        ];
        for (body, message) in cases {
            let error = Protocol::OpenAiChat.parse(body.as_object().unwrap()).unwrap_err();
            assert_eq!(error.to_string(), message);
        }
        let missing_max = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let zero_cap = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0});
        assert_eq!(Protocol::AnthropicMessages.parse(zero_cap.as_object().unwrap()).unwrap_err().to_string(), "max_tokens must be at least 1");
        assert_eq!(Protocol::AnthropicMessages.parse(missing_max.as_object().unwrap()).unwrap_err().to_string(), "max_tokens is required");
    }
}
