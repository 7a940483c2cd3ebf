//! The hold: what to reserve before forwarding a request.

use crate::cost::{CostError, cost};
use crate::money::Money;
use crate::price::Price;
use crate::usage::Usage;

/// The amount to hold before forwarding: counted prompt tokens as uncached input plus the
/// request's maximum output tokens, priced by `cost` (the same function settle uses), flat fee
/// included.
///
/// It covers any usage with at most `prompt_tokens` prompt tokens and at most
/// `max_output_tokens` output tokens whenever the cache prices do not exceed the input price
/// (the usual case). A real charge above it — a provider counting the prompt higher than the
/// local tokenizer, or a cache-write price above the input price — is the bounded settle overrun.
///
/// # Errors
/// As [`cost`]: a negative price component, or a hold beyond the representable range.
pub fn hold_estimate(price: &Price, prompt_tokens: u64, max_output_tokens: u64) -> Result<Money, CostError> {
    let usage = Usage { input_tokens: prompt_tokens, output_tokens: max_output_tokens, ..Usage::default() };
    cost(price, &usage).map(|breakdown| breakdown.total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::price::PriceError;
    use proptest::prelude::*;

    fn example_price() -> Price {
        Price {
            input_per_mtok: Money::from_nanos(3_000_000_000),
            output_per_mtok: Money::from_nanos(15_000_000_000),
            cached_input_per_mtok: Some(Money::from_nanos(300_000_000)),
            cache_write_per_mtok: None,
            per_request: Money::from_nanos(10),
        }
    }

    #[test]
    fn the_hold_is_the_cost_of_the_worst_case() {
        let price = example_price();
        let hold = hold_estimate(&price, 120, 400).unwrap();
        assert_eq!(hold, Money::from_nanos(120 * 3_000 + 400 * 15_000 + 10));
        assert_eq!(hold_estimate(&price, 0, 0).unwrap(), Money::from_nanos(10));
        for output in [0, 1, 399, 400] {
            for cached in [0, 60, 120] {
                let usage = Usage { input_tokens: 120 - cached, cached_input_tokens: cached, output_tokens: output, ..Usage::default() };
                assert!(cost(&price, &usage).unwrap().total <= hold);
            }
        }
    }

    #[test]
    fn errors_pass_through() {
        let mut price = example_price();
        assert_eq!(hold_estimate(&price, u64::MAX, u64::MAX), Err(CostError::Overflow));
        price.per_request = Money::from_nanos(-1);
        assert_eq!(hold_estimate(&price, 1, 1), Err(CostError::InvalidPrice(PriceError::Negative { component: "per_request" })));
    }

    proptest! {
        #[test]
        fn the_hold_covers_usage_within_its_bounds(
            input_rate in 0i64..100_000_000_000,
            output_rate in 0i64..100_000_000_000,
            cached_share in 0u64..=100,
            write_share in 0u64..=100,
            fee in 0i64..1_000_000_000,
            prompt in 0u64..10_000_000,
            max_output in 0u64..10_000_000,
            cached_tokens in 0u64..10_000_000,
            write_tokens in 0u64..10_000_000,
            output in 0u64..10_000_000,
        ) {
            // Cache prices at or below the input price.
            let price = Price {
                input_per_mtok: Money::from_nanos(input_rate),
                output_per_mtok: Money::from_nanos(output_rate),
                cached_input_per_mtok: Some(Money::from_nanos(input_rate / 100 * i64::try_from(cached_share).unwrap())),
                cache_write_per_mtok: Some(Money::from_nanos(input_rate / 100 * i64::try_from(write_share).unwrap())),
                per_request: Money::from_nanos(fee),
            };
            let hold = hold_estimate(&price, prompt, max_output).unwrap();
            let cached = cached_tokens.min(prompt);
            let written = write_tokens.min(prompt - cached);
            let usage = Usage {
                input_tokens: prompt - cached - written,
                cached_input_tokens: cached,
                cache_write_tokens: written,
                output_tokens: output.min(max_output),
                reasoning_tokens: 0,
            };
            prop_assert!(cost(&price, &usage).unwrap().total <= hold);
            let worst = Usage { input_tokens: prompt, output_tokens: max_output, ..Usage::default() };
            prop_assert_eq!(cost(&price, &worst).unwrap().total, hold);
        }
    }
}
