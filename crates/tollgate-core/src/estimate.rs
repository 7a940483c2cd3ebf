//! The hold: what to reserve before forwarding a request.

use crate::cost::{CostError, cost};
use crate::money::Money;
use crate::price::Price;
use crate::usage::Usage;

/// The amount to hold before forwarding: counted prompt tokens as uncached input plus the
/// request's maximum output tokens, priced by the same `cost` settle uses. A real charge above
/// it (a provider counting the prompt higher) is the bounded settle overrun.
///
/// # Errors
/// As `cost`.
pub fn hold_estimate(price: &Price, prompt_tokens: u64, max_output_tokens: u64) -> Result<Money, CostError> {
    let usage = Usage { input_tokens: prompt_tokens, output_tokens: max_output_tokens, ..Usage::default() };
    cost(price, &usage).map(|breakdown| breakdown.total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_hold_covers_any_usage_within_its_bounds() {
        let price = Price {
            input_per_mtok: Money::from_nanos(3_000_000_000),
            output_per_mtok: Money::from_nanos(15_000_000_000),
            cached_input_per_mtok: Some(Money::from_nanos(300_000_000)),
            cache_write_per_mtok: None,
            per_request: Money::from_nanos(10),
        };
        let hold = hold_estimate(&price, 120, 400).unwrap();
        assert_eq!(hold, Money::from_nanos(120 * 3_000 + 400 * 15_000 + 10));
        for output in [0, 1, 399, 400] {
            for cached in [0, 60, 120] {
                let usage = Usage { input_tokens: 120 - cached, cached_input_tokens: cached, output_tokens: output, ..Usage::default() };
                assert!(cost(&price, &usage).unwrap().total <= hold);
            }
        }
    }
}
