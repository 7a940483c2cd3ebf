//! Usage extraction from what an upstream sends: complete responses and streams, of every
//! protocol, and (optionally) the request parse that sizes the hold.
//!
//! Input: one options byte (bit 0: the client asked for stream usage; bit 1: also parse the
//! rest as a request body, which runs the tokenizer), then bytes read twice: as a JSON response
//! and as a server-sent event stream. Properties, beyond never panicking:
//! - a response's usage restates the upstream's own counts (OpenAI: cached + uncached input is
//!   the prompt; Anthropic: the counts as sent; Gemini: cached capped at the prompt, output is
//!   candidates plus thoughts), and reasoning never exceeds output;
//! - a stream inspector's text only grows, its usage has reasoning within output, and its
//!   actions follow the protocol: `Terminal` only on `[DONE]` (OpenAI) or `message_stop`
//!   (Anthropic), `Strip` only for a client that did not ask for usage, and Gemini's
//!   `MaybeTerminal` from its first finishing chunk to the end;
//! - a parsed request asks for 1 to 128 choices.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_core::Usage;
use tollgate_protocol::{EventAction, Protocol, SseEvent, SseSplitter};

const PROTOCOLS: [Protocol; 4] = [Protocol::OpenAiChat, Protocol::AnthropicMessages, Protocol::OpenAiEmbeddings, Protocol::GeminiGenerate];

/// The gateway's bound on choices per request.
const CHOICES_MAX: u64 = 128;

fuzz_target!(|input: &[u8]| {
    let Some((&options, rest)) = input.split_first() else { return };
    let client_wants_usage = options & 1 == 1;
    let parse_requests = options & 2 == 2;

    if let Ok(response) = serde_json::from_slice::<Value>(rest) {
        for protocol in PROTOCOLS {
            check_response_usage(protocol, &response);
            let _ = protocol.response_output_text(&response);
        }
        if parse_requests && let Value::Object(body) = &response {
            for protocol in PROTOCOLS {
                if let Ok(parsed) = protocol.parse(body) {
                    assert!((1..=CHOICES_MAX).contains(&parsed.choices), "{protocol:?}: {} choices", parsed.choices);
                    assert!(!parsed.model.is_empty() || protocol == Protocol::GeminiGenerate);
                }
            }
        }
    }

    let mut splitter = SseSplitter::new(usize::MAX);
    let events = splitter.push(rest).unwrap_or_default();
    for protocol in PROTOCOLS {
        check_stream(protocol, client_wants_usage, &events);
    }
});

fn count(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

fn check_usage_is_sane(protocol: Protocol, usage: &Usage) {
    assert!(usage.reasoning_tokens <= usage.output_tokens, "{protocol:?}: reasoning beyond output: {usage:?}");
    // Saturating sums: these must not overflow whatever the counts.
    let _ = (usage.prompt_tokens(), usage.total_tokens());
}

/// The usage of a complete response against the counts it was read from.
fn check_response_usage(protocol: Protocol, response: &Value) {
    let Some(usage) = protocol.response_usage(response) else { return };
    check_usage_is_sane(protocol, &usage);
    match protocol {
        Protocol::OpenAiChat => {
            assert_eq!(Some(usage.input_tokens + usage.cached_input_tokens), count(response, "/usage/prompt_tokens"), "{usage:?}");
            assert_eq!(Some(usage.output_tokens), count(response, "/usage/completion_tokens"));
            assert_eq!(usage.cache_write_tokens, 0);
        }
        Protocol::AnthropicMessages => {
            assert_eq!(Some(usage.input_tokens), count(response, "/usage/input_tokens"));
            assert_eq!(Some(usage.output_tokens), count(response, "/usage/output_tokens"));
            assert_eq!(usage.cached_input_tokens, count(response, "/usage/cache_read_input_tokens").unwrap_or(0));
            assert_eq!(usage.cache_write_tokens, count(response, "/usage/cache_creation_input_tokens").unwrap_or(0));
            assert_eq!(usage.reasoning_tokens, 0);
        }
        Protocol::OpenAiEmbeddings => {
            assert_eq!(usage, Usage { input_tokens: usage.input_tokens, ..Usage::default() });
            assert_eq!(Some(usage.input_tokens), count(response, "/usage/prompt_tokens"));
        }
        Protocol::GeminiGenerate => {
            let prompt = count(response, "/usageMetadata/promptTokenCount");
            assert!(prompt.is_some(), "usage without a prompt count: {usage:?}");
            let prompt = prompt.unwrap_or(0);
            let field = |name: &str| count(response, &format!("/usageMetadata/{name}")).unwrap_or(0);
            assert!(usage.cached_input_tokens <= prompt, "{usage:?}");
            assert_eq!(usage.cached_input_tokens, field("cachedContentTokenCount").min(prompt));
            assert_eq!(usage.input_tokens, (prompt - usage.cached_input_tokens).saturating_add(field("toolUsePromptTokenCount")));
            assert_eq!(usage.output_tokens, field("candidatesTokenCount").saturating_add(field("thoughtsTokenCount")));
            assert_eq!(usage.reasoning_tokens, field("thoughtsTokenCount"));
        }
    }
}

/// One inspector over the whole stream, checking each action and what it collected.
fn check_stream(protocol: Protocol, client_wants_usage: bool, events: &[SseEvent]) {
    let mut inspector = protocol.stream_inspector(client_wants_usage);
    let mut output_text = String::new();
    let mut finished = false;
    for event in events {
        let action = inspector.inspect(event);
        match protocol {
            Protocol::OpenAiChat | Protocol::OpenAiEmbeddings => {
                assert_eq!(action == EventAction::Terminal, event.data.trim() == "[DONE]", "{event:?}");
                assert!(action != EventAction::Strip || !client_wants_usage, "a usage chunk the client asked for was stripped");
                assert_ne!(action, EventAction::MaybeTerminal);
            }
            Protocol::AnthropicMessages => {
                if action == EventAction::Terminal {
                    let payload: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                    let kind = event.name.as_deref().or_else(|| payload.get("type").and_then(Value::as_str));
                    assert_eq!(kind, Some("message_stop"), "{event:?}");
                }
                assert!(matches!(action, EventAction::Forward | EventAction::Terminal), "{action:?}");
            }
            Protocol::GeminiGenerate => {
                assert!(matches!(action, EventAction::Forward | EventAction::MaybeTerminal), "{action:?}");
                // Once a chunk finished the response, every later one may be the last.
                assert!(!finished || action == EventAction::MaybeTerminal, "a finished stream went back to forwarding");
                finished = action == EventAction::MaybeTerminal;
                assert_eq!(inspector.completed_at_end_of_stream(), finished);
            }
        }
        assert!(inspector.output_text().starts_with(&output_text), "{protocol:?}: generated text was rewritten");
        output_text = inspector.output_text().to_string();
        if let Some(usage) = inspector.usage() {
            check_usage_is_sane(protocol, &usage);
        }
    }
    if protocol == Protocol::GeminiGenerate && !finished {
        assert_eq!(inspector.usage(), None, "usage from a stream that never finished");
    }
    assert!(protocol == Protocol::GeminiGenerate || !inspector.completed_at_end_of_stream());
}
