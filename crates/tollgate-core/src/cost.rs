//! The one cost function: settle, the hold estimate and the quote endpoint all call it.

use serde::Serialize;

use crate::money::Money;
use crate::price::{Price, PriceError};
use crate::usage::Usage;

/// Prices are per this many tokens.
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// A cost and its parts. Each line item is that part alone rounded up, for display; `total` is
/// the exact sum of the parts rounded up once (plus the flat fee), so it may be below the sum of
/// the rounded line items by at most 3 nano-units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CostBreakdown {
    pub input: Money,
    pub cached_input: Money,
    pub cache_write: Money,
    pub output: Money,
    pub per_request: Money,
    pub total: Money,
}

/// A cost that cannot be computed; never charged as zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    #[error("cost exceeds the representable range")]
    Overflow,
    #[error("invalid price: {0}")]
    InvalidPrice(#[from] PriceError),
}

/// Tokens × price-per-million, exact, in nano-units × 10⁶ (not yet divided).
fn scaled(tokens: u64, per_mtok: Money) -> i128 {
    i128::from(tokens) * i128::from(per_mtok.nanos())
}

fn ceil_to_money(scaled: i128) -> Result<Money, CostError> {
    debug_assert!(scaled >= 0, "costs are computed from non-negative prices");
    let nanos = scaled / TOKENS_PER_PRICE_UNIT + i128::from(scaled % TOKENS_PER_PRICE_UNIT != 0);
    i64::try_from(nanos).map(Money::from_nanos).map_err(|_| CostError::Overflow)
}

/// Prices a usage: exact integer arithmetic, rounded up once, to the nano-unit.
///
/// # Errors
/// A negative price component, or a total beyond the i64 nano-unit range.
pub fn cost(price: &Price, usage: &Usage) -> Result<CostBreakdown, CostError> {
    price.validate()?;
    // u64 × i64 fits i128 with room; the sum of four such products does too.
    let input = scaled(usage.input_tokens, price.input_per_mtok);
    let cached_input = scaled(usage.cached_input_tokens, price.cached_input_rate());
    let cache_write = scaled(usage.cache_write_tokens, price.cache_write_rate());
    let output = scaled(usage.output_tokens, price.output_per_mtok);
    let sum = [cached_input, cache_write, output]
        .into_iter()
        .try_fold(input, i128::checked_add)
        .ok_or(CostError::Overflow)?;
    let tokens_total = ceil_to_money(sum)?;
    let total = tokens_total.checked_add(price.per_request).ok_or(CostError::Overflow)?;
    Ok(CostBreakdown {
        input: ceil_to_money(input)?,
        cached_input: ceil_to_money(cached_input)?,
        cache_write: ceil_to_money(cache_write)?,
        output: ceil_to_money(output)?,
        per_request: price.per_request,
        total,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn price(input: i64, output: i64, cached: Option<i64>, write: Option<i64>, per_request: i64) -> Price {
        Price {
            input_per_mtok: Money::from_nanos(input),
            output_per_mtok: Money::from_nanos(output),
            cached_input_per_mtok: cached.map(Money::from_nanos),
            cache_write_per_mtok: write.map(Money::from_nanos),
            per_request: Money::from_nanos(per_request),
        }
    }

    #[test]
    fn worked_example() {
        // 2.50 / 10.00 per million: 1000 input tokens = 0.0025, 500 output = 0.005.
        let usage = Usage { input_tokens: 1000, output_tokens: 500, ..Usage::default() };
        let breakdown = cost(&price(2_500_000_000, 10_000_000_000, None, None, 0), &usage).unwrap();
        assert_eq!(breakdown.total, Money::from_nanos(7_500_000));
        assert_eq!(breakdown.input, Money::from_nanos(2_500_000));
        assert_eq!(breakdown.output, Money::from_nanos(5_000_000));
    }

    #[test]
    fn rounds_up_once_at_the_end() {
        // 1 token at 0.000000333 per million is 0.000333 nano: charged 1 nano, not 0.
        let one = Usage { input_tokens: 1, ..Usage::default() };
        assert_eq!(cost(&price(333, 0, None, None, 0), &one).unwrap().total, Money::from_nanos(1));
        // Three parts of 1/3 nano each sum to 1 nano exactly: rounded once, 1 — not 3.
        let three = Usage { input_tokens: 1, cached_input_tokens: 1, cache_write_tokens: 1, ..Usage::default() };
        let breakdown = cost(&price(333_334, 0, Some(333_333), Some(333_333), 0), &three).unwrap();
        assert_eq!(breakdown.total, Money::from_nanos(1));
        assert_eq!(breakdown.input, Money::from_nanos(1));
        assert_eq!(breakdown.cached_input, Money::from_nanos(1));
    }

    #[test]
    fn unset_cache_prices_charge_as_input_and_fees_add() {
        let usage = Usage { cached_input_tokens: 1_000_000, cache_write_tokens: 1_000_000, ..Usage::default() };
        let breakdown = cost(&price(2_000, 0, None, None, 7), &usage).unwrap();
        assert_eq!(breakdown.total, Money::from_nanos(4_007));
        assert_eq!(cost(&price(2_000, 5, None, None, 7), &Usage::default()).unwrap().total, Money::from_nanos(7));
    }

    #[test]
    fn overflow_and_negative_prices_are_errors() {
        let huge = Usage { output_tokens: u64::MAX, ..Usage::default() };
        assert_eq!(cost(&price(0, i64::MAX, None, None, 0), &huge), Err(CostError::Overflow));
        let everything = Usage { input_tokens: u64::MAX, cached_input_tokens: u64::MAX, cache_write_tokens: u64::MAX, output_tokens: u64::MAX, reasoning_tokens: 0 };
        assert_eq!(cost(&price(i64::MAX, i64::MAX, None, None, 0), &everything), Err(CostError::Overflow));
        assert!(matches!(cost(&price(-1, 0, None, None, 0), &Usage::default()), Err(CostError::InvalidPrice(_))));
        let fee_overflow = Usage { output_tokens: 1_000_000, ..Usage::default() };
        assert_eq!(cost(&price(0, i64::MAX, None, None, 1), &fee_overflow), Err(CostError::Overflow));
    }

    proptest! {
        #[test]
        fn total_is_the_exact_rational_rounded_up(
            input in 0u64..10_000_000, cached in 0u64..10_000_000, write in 0u64..10_000_000, output in 0u64..10_000_000,
            input_price in 0i64..100_000_000_000, output_price in 0i64..100_000_000_000,
            cached_price in proptest::option::of(0i64..100_000_000_000), write_price in proptest::option::of(0i64..100_000_000_000),
            fee in 0i64..1_000_000_000,
        ) {
            let price = price(input_price, output_price, cached_price, write_price, fee);
            let usage = Usage { input_tokens: input, cached_input_tokens: cached, cache_write_tokens: write, output_tokens: output, reasoning_tokens: 0 };
            let breakdown = cost(&price, &usage).unwrap();
            let numerator = u128::from(input) * input_price as u128
                + u128::from(cached) * cached_price.unwrap_or(input_price) as u128
                + u128::from(write) * write_price.unwrap_or(input_price) as u128
                + u128::from(output) * output_price as u128;
            let expected = numerator.div_ceil(1_000_000) + fee as u128;
            prop_assert_eq!(breakdown.total.nanos() as u128, expected);
            let items = breakdown.input.nanos() + breakdown.cached_input.nanos() + breakdown.cache_write.nanos() + breakdown.output.nanos() + fee;
            prop_assert!(breakdown.total.nanos() <= items && items - breakdown.total.nanos() <= 3);
        }

        #[test]
        fn cost_is_monotonic_in_every_token_count(base in 0u64..1_000_000, extra in 1u64..1_000_000, which in 0usize..4) {
            let price = price(2_500_000_000, 10_000_000_000, Some(1_250_000_000), Some(3_000_000_000), 0);
            let mut usage = Usage { input_tokens: base, cached_input_tokens: base, cache_write_tokens: base, output_tokens: base, reasoning_tokens: 0 };
            let before = cost(&price, &usage).unwrap().total;
            match which {
                0 => usage.input_tokens += extra,
                1 => usage.cached_input_tokens += extra,
                2 => usage.cache_write_tokens += extra,
                _ => usage.output_tokens += extra,
            }
            prop_assert!(cost(&price, &usage).unwrap().total > before);
        }
    }
}
