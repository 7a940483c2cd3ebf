//! Token counting with the tiktoken encodings (shipped inside tiktoken-rs, so it works offline).
//! Used for hold estimates and as the fallback when an upstream reports no usage.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The BPE encodings Tollgate counts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Cl100k,
    O200k,
}

/// Flat token charge for an image part, as OpenAI counts a low-detail image.
const IMAGE_PART_TOKENS: u64 = 85;
/// OpenAI's chat format: tokens around every message, and priming the reply.
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const TOKENS_PRIMING_REPLY: u64 = 3;

static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();

fn bpe(encoding: Encoding) -> Option<&'static CoreBPE> {
    match encoding {
        Encoding::Cl100k => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()).as_ref(),
        Encoding::O200k => O200K.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref(),
    }
}

/// True once both encodings are loaded (loading them is the first call's cost, ~100 ms).
pub fn tokenizer_ready() -> bool {
    bpe(Encoding::Cl100k).is_some() && bpe(Encoding::O200k).is_some()
}

/// o200k for the GPT-4o, GPT-4.1, GPT-5 and o-series families; cl100k for everything else,
/// including non-OpenAI models, as an approximation.
pub fn encoding_for_model(model: &str) -> Encoding {
    let model = model.rsplit('/').next().unwrap_or(model);
    const O200K_PREFIXES: [&str; 7] = ["gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
    if O200K_PREFIXES.iter().any(|prefix| model.starts_with(prefix)) { Encoding::O200k } else { Encoding::Cl100k }
}

/// Tokens of a text. If the encoding could not be loaded, an upper bound (bytes / 2, rounded
/// up) so holds and fallback charges err on the side of the payer being asked for more, never
/// on the side of a free request.
pub fn count_text(encoding: Encoding, text: &str) -> u64 {
    match bpe(encoding) {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => (text.len() as u64).div_ceil(2),
    }
}

fn count_content(encoding: Encoding, content: &Value) -> u64 {
    match content {
        Value::String(text) => count_text(encoding, text),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("image_url" | "image" | "input_image") => IMAGE_PART_TOKENS,
                _ => part.get("text").and_then(Value::as_str).map_or(0, |text| count_text(encoding, text)),
            })
            .sum(),
        _ => 0,
    }
}

/// Prompt tokens of a chat request by OpenAI's documented formula: 3 per message, 1 more for a
/// `name`, the tokens of role, content and name, and 3 priming the reply.
pub fn count_chat_prompt(encoding: Encoding, messages: &[Value]) -> u64 {
    let mut tokens = TOKENS_PRIMING_REPLY;
    for message in messages {
        tokens += TOKENS_PER_MESSAGE;
        if let Some(role) = message.get("role").and_then(Value::as_str) {
            tokens += count_text(encoding, role);
        }
        if let Some(content) = message.get("content") {
            tokens += count_content(encoding, content);
        }
        if let Some(name) = message.get("name").and_then(Value::as_str) {
            tokens += TOKENS_PER_NAME + count_text(encoding, name);
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_counts() {
        assert!(tokenizer_ready());
        assert_eq!(count_text(Encoding::Cl100k, "hello world"), 2);
        assert_eq!(count_text(Encoding::O200k, "hello world"), 2);
        assert_eq!(count_text(Encoding::Cl100k, ""), 0);
    }

    #[test]
    fn each_hello_chunk_is_one_token() {
        for encoding in [Encoding::Cl100k, Encoding::O200k] {
            for repetitions in 1..50 {
                assert_eq!(count_text(encoding, &" hello".repeat(repetitions)), repetitions as u64);
            }
        }
    }

    #[test]
    fn chat_prompt_follows_the_documented_formula() {
        let messages = [json!({"role": "user", "content": "hello world"})];
        // 3 priming + 3 per message + "user" (1) + "hello world" (2).
        assert_eq!(count_chat_prompt(Encoding::Cl100k, &messages), 9);
        let named = [json!({"role": "user", "name": "bob", "content": [{"type": "text", "text": "hello world"}, {"type": "image_url", "image_url": {"url": "x"}}]})];
        assert_eq!(count_chat_prompt(Encoding::Cl100k, &named), 9 + 1 + 1 + 85);
    }

    #[test]
    fn models_pick_their_encoding() {
        assert_eq!(encoding_for_model("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(encoding_for_model("openai/gpt-5"), Encoding::O200k);
        assert_eq!(encoding_for_model("gpt-4"), Encoding::Cl100k);
        assert_eq!(encoding_for_model("claude-sonnet-4"), Encoding::Cl100k);
    }
}
