//! What a request used, normalised across providers.

use serde::{Deserialize, Serialize};

/// Token counts of one request. The three input kinds are disjoint; reasoning is a part of
/// output, reported for information and priced as output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens neither read from nor written to the provider's cache.
    #[serde(default)]
    pub input_tokens: u64,
    /// Prompt tokens read from the provider's cache.
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// All generated tokens, reasoning included.
    #[serde(default)]
    pub output_tokens: u64,
    /// The reasoning part of `output_tokens`.
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.cached_input_tokens).saturating_add(self.cache_write_tokens)
    }

    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens().saturating_add(self.output_tokens)
    }
}

/// Where a usage came from, best first. Every usage row records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's own report.
    Upstream,
    /// A tokenizer count of what was sent and received.
    Tokenizer,
    /// Neither was possible; the hold estimate was charged.
    Estimate,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Tokenizer => "tokenizer",
            UsageSource::Estimate => "estimate",
        }
    }

    pub fn parse(text: &str) -> Option<UsageSource> {
        match text {
            "upstream" => Some(UsageSource::Upstream),
            "tokenizer" => Some(UsageSource::Tokenizer),
            "estimate" => Some(UsageSource::Estimate),
            _ => None,
        }
    }
}
