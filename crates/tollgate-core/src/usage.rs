//! What a request used, normalised across providers.

use serde::{Deserialize, Serialize};

/// Token counts of one request. The three input kinds are disjoint, so each prompt token is
/// priced exactly once; reasoning is a part of output, reported for information and priced as
/// output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's own report.
    Upstream,
    /// A tokenizer count of what was sent and received.
    Tokenizer,
    /// Neither was possible; the hold estimate was charged.
    Estimate,
    /// The upstream's report failed a sanity check ([`check_reported`]) and was corrected:
    /// capped at what the request allowed, or raised to what was measured.
    Adjusted,
}

impl UsageSource {
    /// Every source, for the metric's series registered at zero.
    pub const ALL: [UsageSource; 4] = [UsageSource::Upstream, UsageSource::Tokenizer, UsageSource::Estimate, UsageSource::Adjusted];

    /// The stored and serialised name ("upstream", "tokenizer", "estimate").
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Tokenizer => "tokenizer",
            UsageSource::Estimate => "estimate",
            UsageSource::Adjusted => "adjusted",
        }
    }

    /// The inverse of [`UsageSource::as_str`], exact and case-sensitive; `None` for anything else.
    pub fn parse(text: &str) -> Option<UsageSource> {
        match text {
            "upstream" => Some(UsageSource::Upstream),
            "tokenizer" => Some(UsageSource::Tokenizer),
            "estimate" => Some(UsageSource::Estimate),
            "adjusted" => Some(UsageSource::Adjusted),
            _ => None,
        }
    }
}

/// More tokens of one kind than any model takes or gives in one request: a count beyond it is
/// a broken or hostile report, not usage.
pub const TOKENS_PER_REQUEST_MAX: u64 = 10_000_000;

/// A measured count above `reported * UNDER_REPORT_FACTOR + slack` means the upstream reported
/// less than it visibly sent. Generous, because the tokenizer is only an approximation for
/// non-OpenAI models.
const UNDER_REPORT_FACTOR: u64 = 2;
const OUTPUT_UNDER_REPORT_SLACK: u64 = 16;
/// Prompts get more slack: tool schemas and non-text parts are counted approximately.
const INPUT_UNDER_REPORT_FACTOR: u64 = 3;
const INPUT_UNDER_REPORT_SLACK: u64 = 256;

/// What was wrong with an upstream's usage report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageAnomaly {
    /// A count beyond [`TOKENS_PER_REQUEST_MAX`]; capped there.
    Absurd,
    /// More output than the request's own cap allows; capped at the cap.
    OverCap,
    /// Far less output than was measured in the response; raised to the measured count.
    OutputUnderReported,
    /// Far less prompt than was counted in the request; raised to the counted prompt.
    InputUnderReported,
}

impl UsageAnomaly {
    /// Every kind, for the metric's series registered at zero.
    pub const ALL: [UsageAnomaly; 4] = [UsageAnomaly::Absurd, UsageAnomaly::OverCap, UsageAnomaly::OutputUnderReported, UsageAnomaly::InputUnderReported];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageAnomaly::Absurd => "absurd",
            UsageAnomaly::OverCap => "over_cap",
            UsageAnomaly::OutputUnderReported => "output_under_reported",
            UsageAnomaly::InputUnderReported => "input_under_reported",
        }
    }
}

/// An upstream report after [`check_reported`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedUsage {
    pub usage: Usage,
    /// Empty when the report was taken as it came.
    pub anomalies: Vec<UsageAnomaly>,
}

impl CheckedUsage {
    /// `Upstream` when the report was taken as is, `Adjusted` when corrected.
    pub fn source(&self) -> UsageSource {
        if self.anomalies.is_empty() { UsageSource::Upstream } else { UsageSource::Adjusted }
    }
}

/// Checks an upstream's report against what Tollgate measured itself: `measured` is the
/// tokenizer's count of the prompt sent and the output received, `output_cap` the request's own
/// cap on output tokens (all choices), when its protocol makes the cap include reasoning. A
/// report is never trusted into a crash (absurd counts are capped) nor into a silent
/// undercharge (a report far below what visibly went through is raised to the measurement).
pub fn check_reported(reported: Usage, measured: Usage, output_cap: Option<u64>) -> CheckedUsage {
    let mut usage = reported;
    let mut anomalies = Vec::new();
    for count in [
        &mut usage.input_tokens,
        &mut usage.cached_input_tokens,
        &mut usage.cache_write_tokens,
        &mut usage.output_tokens,
        &mut usage.reasoning_tokens,
    ] {
        if *count > TOKENS_PER_REQUEST_MAX {
            *count = TOKENS_PER_REQUEST_MAX;
            if !anomalies.contains(&UsageAnomaly::Absurd) {
                anomalies.push(UsageAnomaly::Absurd);
            }
        }
    }
    if let Some(cap) = output_cap
        && usage.output_tokens > cap {
            usage.output_tokens = cap;
            anomalies.push(UsageAnomaly::OverCap);
        }
    let measured_output = measured.output_tokens.min(output_cap.unwrap_or(u64::MAX));
    if measured_output > usage.output_tokens.saturating_mul(UNDER_REPORT_FACTOR).saturating_add(OUTPUT_UNDER_REPORT_SLACK) {
        usage.output_tokens = measured_output.min(TOKENS_PER_REQUEST_MAX);
        anomalies.push(UsageAnomaly::OutputUnderReported);
    }
    usage.reasoning_tokens = usage.reasoning_tokens.min(usage.output_tokens);
    let measured_prompt = measured.prompt_tokens();
    if measured_prompt > usage.prompt_tokens().saturating_mul(INPUT_UNDER_REPORT_FACTOR).saturating_add(INPUT_UNDER_REPORT_SLACK) {
        // What the report misses is charged as uncached input, the price an operator set for it.
        let missing = measured_prompt.saturating_sub(usage.prompt_tokens());
        usage.input_tokens = usage.input_tokens.saturating_add(missing).min(TOKENS_PER_REQUEST_MAX);
        anomalies.push(UsageAnomaly::InputUnderReported);
    }
    CheckedUsage { usage, anomalies }
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
        for source in [UsageSource::Upstream, UsageSource::Tokenizer, UsageSource::Estimate, UsageSource::Adjusted] {
            assert_eq!(UsageSource::parse(source.as_str()), Some(source));
            assert_eq!(serde_json::to_string(&source).unwrap(), format!("\"{}\"", source.as_str()));
            assert_eq!(serde_json::from_str::<UsageSource>(&format!("\"{}\"", source.as_str())).unwrap(), source);
        }
        assert_eq!(UsageSource::Tokenizer.as_str(), "tokenizer");
        assert_eq!(UsageSource::parse("Upstream"), None);
        assert_eq!(UsageSource::parse(""), None);
        assert_eq!(UsageSource::parse("upstream "), None);
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage { input_tokens: input, output_tokens: output, ..Usage::default() }
    }

    #[test]
    fn a_plausible_report_is_taken_as_it_came() {
        let reported = Usage { input_tokens: 90, cached_input_tokens: 10, cache_write_tokens: 0, output_tokens: 50, reasoning_tokens: 30 };
        // Hidden reasoning makes the report larger than the visible text: that is fine.
        let checked = check_reported(reported, usage(80, 12), Some(64));
        assert_eq!(checked, CheckedUsage { usage: reported, anomalies: Vec::new() });
        assert_eq!(checked.source(), UsageSource::Upstream);
        // Tokenizers disagree a little across vendors: no anomaly.
        assert!(check_reported(usage(100, 100), usage(120, 150), None).anomalies.is_empty());
    }

    #[test]
    fn absurd_counts_are_capped_not_trusted() {
        let reported = Usage { input_tokens: u64::MAX, cached_input_tokens: 0, cache_write_tokens: 0, output_tokens: 5, reasoning_tokens: u64::MAX };
        let checked = check_reported(reported, usage(10, 5), None);
        assert_eq!(checked.usage, Usage { input_tokens: TOKENS_PER_REQUEST_MAX, output_tokens: 5, reasoning_tokens: 5, ..Usage::default() });
        assert_eq!(checked.anomalies, vec![UsageAnomaly::Absurd]);
        assert_eq!(checked.source(), UsageSource::Adjusted);
    }

    #[test]
    fn output_beyond_the_request_cap_is_capped() {
        let checked = check_reported(Usage { output_tokens: 5_000, reasoning_tokens: 4_000, ..usage(10, 0) }, usage(10, 20), Some(100));
        assert_eq!((checked.usage.output_tokens, checked.usage.reasoning_tokens), (100, 100));
        assert_eq!(checked.anomalies, vec![UsageAnomaly::OverCap]);
    }

    #[test]
    fn a_report_below_what_went_through_is_raised_to_the_measurement() {
        let checked = check_reported(usage(10, 0), usage(10, 400), None);
        assert_eq!(checked.usage.output_tokens, 400);
        assert_eq!(checked.anomalies, vec![UsageAnomaly::OutputUnderReported]);
        // Raised no further than the request's cap.
        assert_eq!(check_reported(usage(10, 0), usage(10, 400), Some(64)).usage.output_tokens, 64);
        let checked = check_reported(usage(0, 5), usage(2_000, 5), None);
        assert_eq!(checked.usage.input_tokens, 2_000);
        assert_eq!(checked.anomalies, vec![UsageAnomaly::InputUnderReported]);
    }

    proptest::proptest! {
        /// Whatever the report, the result is bounded, never below a fair share of what was
        /// measured, and reasoning stays inside output.
        #[test]
        fn checked_usage_is_bounded_and_not_undercharged(
            input in 0u64..20_000_000, cached in 0u64..20_000_000, output in 0u64..20_000_000,
            reasoning in 0u64..20_000_000, measured_in in 0u64..2_000_000, measured_out in 0u64..2_000_000,
            cap in proptest::option::of(0u64..1_000_000),
        ) {
            let reported = Usage { input_tokens: input, cached_input_tokens: cached, cache_write_tokens: 0, output_tokens: output, reasoning_tokens: reasoning };
            let checked = check_reported(reported, usage(measured_in, measured_out), cap);
            let result = checked.usage;
            for count in [result.input_tokens, result.cached_input_tokens, result.cache_write_tokens, result.output_tokens, result.reasoning_tokens] {
                proptest::prop_assert!(count <= TOKENS_PER_REQUEST_MAX);
            }
            proptest::prop_assert!(result.reasoning_tokens <= result.output_tokens);
            if let Some(cap) = cap { proptest::prop_assert!(result.output_tokens <= cap); }
            let fair_output = measured_out.min(cap.unwrap_or(u64::MAX));
            proptest::prop_assert!(result.output_tokens * UNDER_REPORT_FACTOR + OUTPUT_UNDER_REPORT_SLACK >= fair_output);
            proptest::prop_assert!(result.prompt_tokens() * INPUT_UNDER_REPORT_FACTOR + INPUT_UNDER_REPORT_SLACK >= measured_in);
            // Reasoning is informational: kept inside output without calling it an anomaly.
            let normalized = Usage { reasoning_tokens: reported.reasoning_tokens.min(reported.output_tokens), ..reported };
            if checked.anomalies.is_empty() { proptest::prop_assert_eq!(result, normalized); }
        }
    }
}
