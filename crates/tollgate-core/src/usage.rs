//! What a request used, normalised across providers.

use serde::{Deserialize, Serialize};

/// Token counts of one request. The three input kinds are disjoint, so each prompt token is
/// priced exactly once; reasoning is a part of output, reported for information and priced as
/// output.
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
    /// The reasoning part of `output_tokens`: informational, not priced separately.
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Usage {
    /// All prompt tokens, whatever the cache did with them; saturating, for display and limits
    /// (pricing uses the separate counts).
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.cached_input_tokens).saturating_add(self.cache_write_tokens)
    }

    /// Prompt plus output tokens, saturating; reasoning is already inside output.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens().saturating_add(self.output_tokens)
    }
}

/// Where a usage came from, best first. Every usage row records it, so a charge made from a
/// count or an estimate can be told apart from one the upstream reported.
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
    /// The stored and serialised name ("upstream", "tokenizer", "estimate").
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Tokenizer => "tokenizer",
            UsageSource::Estimate => "estimate",
        }
    }

    /// The inverse of [`UsageSource::as_str`], exact and case-sensitive; `None` for anything else.
    pub fn parse(text: &str) -> Option<UsageSource> {
        match text {
            "upstream" => Some(UsageSource::Upstream),
            "tokenizer" => Some(UsageSource::Tokenizer),
            "estimate" => Some(UsageSource::Estimate),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn sums_saturate() {
        let usage = Usage { input_tokens: 10, cached_input_tokens: 20, cache_write_tokens: 30, output_tokens: 40, reasoning_tokens: 15 };
        assert_eq!(usage.prompt_tokens(), 60);
        assert_eq!(usage.total_tokens(), 100);
        let huge = Usage { input_tokens: u64::MAX, cached_input_tokens: 1, cache_write_tokens: 1, output_tokens: 1, reasoning_tokens: 0 };
        assert_eq!(huge.prompt_tokens(), u64::MAX);
        assert_eq!(huge.total_tokens(), u64::MAX);
        assert_eq!(Usage::default().total_tokens(), 0);
    }

    #[test]
    fn serde_defaults_missing_counts_to_zero() {
        let usage: Usage = serde_json::from_str(r#"{"output_tokens": 7}"#).unwrap();
        assert_eq!(usage, Usage { output_tokens: 7, ..Usage::default() });
        assert_eq!(serde_json::from_str::<Usage>("{}").unwrap(), Usage::default());
        let full = Usage { input_tokens: 1, cached_input_tokens: 2, cache_write_tokens: 3, output_tokens: 4, reasoning_tokens: 2 };
        assert_eq!(serde_json::from_str::<Usage>(&serde_json::to_string(&full).unwrap()).unwrap(), full);
        assert!(serde_json::from_str::<Usage>(r#"{"input_tokens": -1}"#).is_err());
    }

    #[test]
    fn source_names_round_trip() {
        for source in [UsageSource::Upstream, UsageSource::Tokenizer, UsageSource::Estimate] {
            assert_eq!(UsageSource::parse(source.as_str()), Some(source));
            assert_eq!(serde_json::to_string(&source).unwrap(), format!("\"{}\"", source.as_str()));
            assert_eq!(serde_json::from_str::<UsageSource>(&format!("\"{}\"", source.as_str())).unwrap(), source);
        }
        assert_eq!(UsageSource::Tokenizer.as_str(), "tokenizer");
        assert_eq!(UsageSource::parse("Upstream"), None);
        assert_eq!(UsageSource::parse(""), None);
        assert_eq!(UsageSource::parse("upstream "), None);
    }
}
