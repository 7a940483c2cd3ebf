//! The one cost function: settle, the hold estimate and the quote endpoint all call it, so a
//! quote, a hold and a charge for the same usage can never disagree.

use serde::Serialize;

use crate::money::Money;
use crate::price::{Price, PriceError};
use crate::usage::Usage;

/// Prices are per this many tokens.
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// A cost and its parts.
///
/// Each line item (`input`, `cached_input`, `cache_write`, `output`) is that part alone rounded
/// up to the nano-unit, for display. `total` is NOT the sum of the rounded line items: it is the
/// exact sum of the four unrounded parts, rounded up once, plus `per_request`. So `total` is at
/// most the sum of the line items and `per_request`, and below it by at most 3 nano-units (one
/// rounding instead of four).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CostBreakdown {
    /// Uncached input tokens at `input_per_mtok`, rounded up.
    pub input: Money,
    /// Cached input tokens at the cached-input rate, rounded up.
    pub cached_input: Money,
    /// Cache-write tokens at the cache-write rate, rounded up.
    pub cache_write: Money,
    /// Output tokens at `output_per_mtok`, rounded up.
    pub output: Money,
    /// The flat fee, as priced.
    pub per_request: Money,
    /// What is charged: the exact token cost rounded up once, plus `per_request`.
    pub total: Money,
}

/// A cost that cannot be computed. The caller must refuse the request or fail the settle:
/// never charge zero or a clamped amount instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    /// The cost does not fit in an i64 of nano-units.
    #[error("cost exceeds the representable range of amounts")]
    Overflow,
    /// The price has a negative component.
    #[error("invalid price: {0}")]
    InvalidPrice(#[from] PriceError),
}

/// Tokens × price-per-million, exact, in nano-units × 10⁶ (not yet divided). Cannot overflow:
/// (2⁶⁴ − 1)(2⁶³ − 1) < 2¹²⁷ − 1.
fn scaled(tokens: u64, per_mtok: Money) -> i128 {
    i128::from(tokens) * i128::from(per_mtok.nanos())
}

/// Divides a scaled amount by one million, rounding toward positive infinity.
fn ceil_to_money(scaled: i128) -> Result<Money, CostError> {
    let quotient = scaled.div_euclid(TOKENS_PER_PRICE_UNIT);
    let remainder = scaled.rem_euclid(TOKENS_PER_PRICE_UNIT);
    let nanos = quotient + i128::from(remainder != 0);
    i64::try_from(nanos).map(Money::from_nanos).map_err(|_| CostError::Overflow)
}

/// The one cost function: used by settle, the hold estimate and the quote endpoint.
///
/// `total = ceil((input × input_per_mtok + cached × cached_rate + cache_write × write_rate +
/// output × output_per_mtok) / 1_000_000) + per_request`, computed exactly in i128 with one
/// rounding, upward, at the end, so no request is ever charged less than its exact cost and a
/// non-zero cost is never rounded to zero. Reasoning tokens are part of `output_tokens` and are
/// not priced again.
///
/// # Errors
/// `InvalidPrice` for a negative price component; `Overflow` when the total (or any line item)
/// does not fit in an i64 of nano-units.
pub fn cost(price: &Price, usage: &Usage) -> Result<CostBreakdown, CostError> {
    price.validate()?;
    let input = scaled(usage.input_tokens, price.input_per_mtok);
    let cached_input = scaled(usage.cached_input_tokens, price.cached_input_rate());
    let cache_write = scaled(usage.cache_write_tokens, price.cache_write_rate());
    let output = scaled(usage.output_tokens, price.output_per_mtok);
    let exact_sum = [cached_input, cache_write, output]
        .into_iter()
        .try_fold(input, i128::checked_add)
        .ok_or(CostError::Overflow)?;
    let total = ceil_to_money(exact_sum)?.checked_add(price.per_request).ok_or(CostError::Overflow)?;
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
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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

    fn usage(input: u64, cached: u64, write: u64, output: u64) -> Usage {
        Usage { input_tokens: input, cached_input_tokens: cached, cache_write_tokens: write, output_tokens: output, reasoning_tokens: 0 }
    }

    /// The expected total, computed independently: unsigned, checked, ceiling by `div_ceil`.
    /// `None` when it cannot be represented.
    fn independent_total(price: &Price, usage: &Usage) -> Option<i64> {
        let rate = |money: Money| u128::try_from(money.nanos()).unwrap();
        let cached_rate = price.cached_input_per_mtok.map_or(rate(price.input_per_mtok), rate);
        let write_rate = price.cache_write_per_mtok.map_or(rate(price.input_per_mtok), rate);
        let numerator = u128::from(usage.input_tokens)
            .checked_mul(rate(price.input_per_mtok))?
            .checked_add(u128::from(usage.cached_input_tokens).checked_mul(cached_rate)?)?
            .checked_add(u128::from(usage.cache_write_tokens).checked_mul(write_rate)?)?
            .checked_add(u128::from(usage.output_tokens).checked_mul(rate(price.output_per_mtok))?)?;
        let total = numerator.div_ceil(1_000_000).checked_add(rate(price.per_request))?;
        i64::try_from(total).ok()
    }

    fn any_valid_price(rate_max: i64) -> impl Strategy<Value = Price> {
        (
            0..=rate_max,
            0..=rate_max,
            proptest::option::of(0..=rate_max),
            proptest::option::of(0..=rate_max),
            0..=rate_max,
        )
            .prop_map(|(input, output, cached, write, fee)| price(input, output, cached, write, fee))
    }

    fn any_usage(tokens_max: u64) -> impl Strategy<Value = Usage> {
        (0..=tokens_max, 0..=tokens_max, 0..=tokens_max, 0..=tokens_max, 0..=tokens_max)
            .prop_map(|(input, cached, write, output, reasoning)| Usage { reasoning_tokens: reasoning.min(output), ..usage(input, cached, write, output) })
    }

    #[test]
    fn worked_example() {
        // 2.50 / 10.00 per million: 1000 input tokens = 0.0025, 500 output = 0.005.
        let breakdown = cost(&price(2_500_000_000, 10_000_000_000, None, None, 0), &usage(1000, 0, 0, 500)).unwrap();
        assert_eq!(
            breakdown,
            CostBreakdown {
                input: Money::from_nanos(2_500_000),
                cached_input: Money::ZERO,
                cache_write: Money::ZERO,
                output: Money::from_nanos(5_000_000),
                per_request: Money::ZERO,
                total: Money::from_nanos(7_500_000),
            }
        );
        assert_eq!(breakdown.total.to_string(), "0.0075");
    }

    #[test]
    fn reasoning_is_not_priced_again() {
        let price = price(1_000_000_000, 4_000_000_000, None, None, 0);
        let plain = cost(&price, &usage(0, 0, 0, 1_000)).unwrap();
        let reasoning = cost(&price, &Usage { reasoning_tokens: 800, ..usage(0, 0, 0, 1_000) }).unwrap();
        assert_eq!(plain, reasoning);
        assert_eq!(plain.total, Money::from_nanos(4_000_000));
    }

    #[test]
    fn rounds_up_once_at_the_end() {
        // 1 token at 333 nano per million is 0.000333 nano: charged 1 nano, never 0.
        assert_eq!(cost(&price(333, 0, None, None, 0), &usage(1, 0, 0, 0)).unwrap().total, Money::from_nanos(1));
        // Three parts of about 1/3 nano sum to exactly 1 nano: rounded once, 1 — not 3.
        let breakdown = cost(&price(333_334, 0, Some(333_333), Some(333_333), 0), &usage(1, 1, 1, 0)).unwrap();
        assert_eq!(breakdown.total, Money::from_nanos(1));
        assert_eq!(breakdown.input, Money::from_nanos(1));
        assert_eq!(breakdown.cached_input, Money::from_nanos(1));
        assert_eq!(breakdown.cache_write, Money::from_nanos(1));
        // Four tiny parts: the line items sum to 4, the total is 1 — the documented gap of 3.
        let four = cost(&price(1, 1, Some(1), Some(1), 0), &usage(1, 1, 1, 1)).unwrap();
        assert_eq!(four.total, Money::from_nanos(1));
        assert_eq!([four.input, four.cached_input, four.cache_write, four.output], [Money::from_nanos(1); 4]);
        // Exactly divisible: no rounding at all.
        assert_eq!(cost(&price(1_000_000, 0, None, None, 0), &usage(7, 0, 0, 0)).unwrap().total, Money::from_nanos(7));
        // Just above: rounded up by one.
        assert_eq!(cost(&price(1_000_001, 0, None, None, 0), &usage(7, 0, 0, 0)).unwrap().total, Money::from_nanos(8));
    }

    #[test]
    fn unset_cache_prices_charge_as_input_and_fees_add() {
        let breakdown = cost(&price(2_000, 0, None, None, 7), &usage(0, 1_000_000, 1_000_000, 0)).unwrap();
        assert_eq!(breakdown.cached_input, Money::from_nanos(2_000));
        assert_eq!(breakdown.cache_write, Money::from_nanos(2_000));
        assert_eq!(breakdown.per_request, Money::from_nanos(7));
        assert_eq!(breakdown.total, Money::from_nanos(4_007));
        let explicit = cost(&price(2_000, 0, Some(500), Some(3_000), 0), &usage(0, 1_000_000, 1_000_000, 0)).unwrap();
        assert_eq!(explicit.cached_input, Money::from_nanos(500));
        assert_eq!(explicit.cache_write, Money::from_nanos(3_000));
        assert_eq!(explicit.total, Money::from_nanos(3_500));
        assert_eq!(cost(&price(2_000, 5, None, None, 7), &Usage::default()).unwrap().total, Money::from_nanos(7));
    }

    #[test]
    fn overflow_is_an_error_never_a_wrong_amount() {
        assert_eq!(cost(&price(0, i64::MAX, None, None, 0), &usage(0, 0, 0, u64::MAX)), Err(CostError::Overflow));
        let everything = usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(cost(&price(i64::MAX, i64::MAX, None, None, 0), &everything), Err(CostError::Overflow));
        // The token cost alone is exactly i64::MAX: fits; one nano of fee more does not.
        let at_limit = usage(0, 0, 0, 1_000_000);
        assert_eq!(cost(&price(0, i64::MAX, None, None, 0), &at_limit).unwrap().total, Money::from_nanos(i64::MAX));
        assert_eq!(cost(&price(0, i64::MAX, None, None, 1), &at_limit), Err(CostError::Overflow));
        // A token cost one nano past i64::MAX after rounding.
        assert_eq!(cost(&price(0, i64::MAX, None, None, 0), &usage(0, 0, 0, 1_000_001)), Err(CostError::Overflow));
        // Two line items that fit separately but not together.
        let half = i64::MAX / 2 + 1;
        assert_eq!(cost(&price(half, half, None, None, 0), &usage(1_000_000, 0, 0, 1_000_000)), Err(CostError::Overflow));
    }

    #[test]
    fn negative_prices_are_errors() {
        let negative = [
            price(-1, 0, None, None, 0),
            price(0, -1, None, None, 0),
            price(0, 0, Some(-1), None, 0),
            price(0, 0, None, Some(-1), 0),
            price(0, 0, None, None, -1),
        ];
        for price in negative {
            assert!(matches!(cost(&price, &Usage::default()), Err(CostError::InvalidPrice(PriceError::Negative { .. }))), "{price:?}");
            assert!(matches!(cost(&price, &usage(5, 5, 5, 5)), Err(CostError::InvalidPrice(_))), "{price:?}");
        }
    }

    proptest! {
        #[test]
        fn total_is_the_exact_rational_rounded_up(price in any_valid_price(100_000_000_000), usage in any_usage(100_000_000)) {
            let breakdown = cost(&price, &usage).unwrap();
            prop_assert_eq!(Some(breakdown.total.nanos()), independent_total(&price, &usage));
        }

        #[test]
        fn total_matches_or_overflows_across_the_whole_range(
            price in prop_oneof![any_valid_price(i64::MAX), any_valid_price(10_000_000_000_000)],
            usage in prop_oneof![any_usage(u64::MAX), any_usage(1_000_000_000_000)],
        ) {
            match independent_total(&price, &usage) {
                Some(expected) => prop_assert_eq!(cost(&price, &usage).map(|breakdown| breakdown.total.nanos()), Ok(expected)),
                None => prop_assert_eq!(cost(&price, &usage), Err(CostError::Overflow)),
            }
        }

        #[test]
        fn line_items_are_each_part_rounded_up_and_bound_the_total(price in any_valid_price(100_000_000_000), usage in any_usage(100_000_000)) {
            let breakdown = cost(&price, &usage).unwrap();
            let alone = |field: fn(&mut Usage) -> &mut u64| {
                let mut only = Usage::default();
                let mut copy = usage;
                *field(&mut only) = *field(&mut copy);
                independent_total(&Price { per_request: Money::ZERO, ..price.clone() }, &only).unwrap()
            };
            prop_assert_eq!(breakdown.input.nanos(), alone(|usage| &mut usage.input_tokens));
            prop_assert_eq!(breakdown.cached_input.nanos(), alone(|usage| &mut usage.cached_input_tokens));
            prop_assert_eq!(breakdown.cache_write.nanos(), alone(|usage| &mut usage.cache_write_tokens));
            prop_assert_eq!(breakdown.output.nanos(), alone(|usage| &mut usage.output_tokens));
            prop_assert_eq!(breakdown.per_request, price.per_request);
            for item in [breakdown.input, breakdown.cached_input, breakdown.cache_write, breakdown.output, breakdown.per_request] {
                prop_assert!(breakdown.total >= item);
            }
            let items_sum = breakdown.input.nanos() + breakdown.cached_input.nanos() + breakdown.cache_write.nanos() + breakdown.output.nanos() + breakdown.per_request.nanos();
            prop_assert!(breakdown.total.nanos() <= items_sum);
            prop_assert!(items_sum - breakdown.total.nanos() <= 3);
        }

        #[test]
        fn cost_is_monotonic_in_every_token_count(price in any_valid_price(100_000_000_000), usage in any_usage(100_000_000), extra in 1u64..100_000_000, which in 0usize..5) {
            let before = cost(&price, &usage).unwrap().total;
            let mut more = usage;
            let rate = match which {
                0 => { more.input_tokens += extra; price.input_per_mtok }
                1 => { more.cached_input_tokens += extra; price.cached_input_rate() }
                2 => { more.cache_write_tokens += extra; price.cache_write_rate() }
                3 => { more.output_tokens += extra; price.output_per_mtok }
                _ => { more.reasoning_tokens += extra; Money::ZERO }
            };
            let after = cost(&price, &more).unwrap().total;
            prop_assert!(after >= before);
            // At one nano per token or more, every extra token costs something.
            if rate.nanos() >= 1_000_000 {
                prop_assert!(after > before);
            }
            if which == 4 {
                prop_assert_eq!(after, before);
            }
        }

        #[test]
        fn zero_usage_costs_the_flat_fee(price in any_valid_price(i64::MAX)) {
            let breakdown = cost(&price, &Usage::default()).unwrap();
            prop_assert_eq!(breakdown.total, price.per_request);
            prop_assert_eq!([breakdown.input, breakdown.cached_input, breakdown.cache_write, breakdown.output], [Money::ZERO; 4]);
        }

        #[test]
        fn any_nonzero_cost_is_at_least_one_nano(rate in 1i64..1_000_000, tokens in 1u64..1_000) {
            let total = cost(&price(rate, 0, None, None, 0), &usage(tokens, 0, 0, 0)).unwrap().total;
            prop_assert!(total.is_positive());
        }
    }
}
