//! Recorded-shape responses and streams of each provider (hand-written after the public API
//! references, in tests/fixtures/providers/) → the usage extracted is exact, field by field.
//! Streams are fed in awkward pieces, as a network would cut them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;
use tollgate_core::Usage;
use tollgate_protocol::{EventAction, Protocol, SseSplitter};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/providers").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn response_usage(protocol: Protocol, name: &str) -> Option<Usage> {
    let json: Value = serde_json::from_str(&fixture(name)).unwrap();
    protocol.response_usage(&json)
}

/// What a stream's inspector saw: its usage, its text, the actions taken per event.
struct Inspected {
    usage: Option<Usage>,
    output_text: String,
    actions: Vec<EventAction>,
}

fn inspect_stream(protocol: Protocol, name: &str, piece_bytes: usize, client_wants_usage: bool) -> Inspected {
    let bytes = fixture(name).into_bytes();
    let mut splitter = SseSplitter::new(1 << 20);
    let mut inspector = protocol.stream_inspector(client_wants_usage);
    let mut actions = Vec::new();
    for piece in bytes.chunks(piece_bytes) {
        for event in splitter.push(piece).unwrap() {
            actions.push(inspector.inspect(&event));
        }
    }
    assert_eq!(splitter.pending_bytes(), 0, "{name}: every event ended");
    Inspected { usage: inspector.usage(), output_text: inspector.output_text().to_string(), actions }
}

#[test]
fn openai_response_usage_splits_cached_input_and_keeps_reasoning_inside_output() {
    assert_eq!(
        response_usage(Protocol::OpenAiChat, "openai_chat_completion.json"),
        Some(Usage { input_tokens: 93, cached_input_tokens: 1024, cache_write_tokens: 0, output_tokens: 46, reasoning_tokens: 32 })
    );
}

#[test]
fn openai_stream_usage_comes_from_the_final_chunk_which_is_stripped_unless_asked() {
    for piece_bytes in [1, 7, 64, 4096] {
        let seen = inspect_stream(Protocol::OpenAiChat, "openai_chat_stream.sse", piece_bytes, false);
        assert_eq!(seen.usage, Some(Usage { input_tokens: 86, cached_input_tokens: 1920, cache_write_tokens: 0, output_tokens: 2, reasoning_tokens: 0 }));
        assert_eq!(seen.output_text, "Hello there");
        assert_eq!(
            seen.actions,
            [EventAction::Forward, EventAction::Forward, EventAction::Forward, EventAction::Forward, EventAction::Strip, EventAction::Terminal]
        );
    }
    let asked = inspect_stream(Protocol::OpenAiChat, "openai_chat_stream.sse", 64, true);
    assert_eq!(asked.actions[4], EventAction::Forward, "a client that asked for usage sees it");
}

#[test]
fn anthropic_response_usage_prices_cache_reads_and_writes_apart() {
    assert_eq!(
        response_usage(Protocol::AnthropicMessages, "anthropic_message.json"),
        Some(Usage { input_tokens: 472, cached_input_tokens: 12033, cache_write_tokens: 1850, output_tokens: 89, reasoning_tokens: 0 })
    );
}

#[test]
fn anthropic_stream_usage_is_message_start_completed_by_message_delta() {
    for piece_bytes in [1, 13, 4096] {
        let seen = inspect_stream(Protocol::AnthropicMessages, "anthropic_stream.sse", piece_bytes, true);
        assert_eq!(seen.usage, Some(Usage { input_tokens: 25, cached_input_tokens: 2048, cache_write_tokens: 0, output_tokens: 47, reasoning_tokens: 0 }));
        assert_eq!(seen.output_text, "Hello!{}{\"location\": \"San Francisco, CA\"}");
        assert_eq!(seen.actions.last(), Some(&EventAction::Terminal));
        assert!(!seen.actions.contains(&EventAction::Strip), "nothing of Anthropic's is hidden");
    }
}

#[test]
fn openrouter_usage_reads_like_openai_and_its_cost_field_is_not_trusted() {
    // OpenRouter adds `cost` (its own price, a float): Tollgate charges by its own prices.
    assert_eq!(
        response_usage(Protocol::OpenAiChat, "openrouter_chat_completion.json"),
        Some(Usage { input_tokens: 66, cached_input_tokens: 128, cache_write_tokens: 0, output_tokens: 12, reasoning_tokens: 0 })
    );
}

#[test]
fn openrouter_stream_comments_pass_and_reasoning_counts_as_output() {
    let seen = inspect_stream(Protocol::OpenAiChat, "openrouter_stream.sse", 5, false);
    assert_eq!(seen.usage, Some(Usage { input_tokens: 13, cached_input_tokens: 0, cache_write_tokens: 0, output_tokens: 152, reasoning_tokens: 148 }));
    assert_eq!(seen.output_text, "Let me think.Paris.");
    // The two keep-alive comments are forwarded as they came (SDKs skip them).
    assert_eq!(&seen.actions[..2], [EventAction::Forward, EventAction::Forward]);
    assert_eq!(seen.actions.last(), Some(&EventAction::Terminal));
}
