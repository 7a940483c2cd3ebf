//! Money as exact integer nano-units (1 unit = 10⁻⁹ of the currency), with strict decimal
//! parsing and formatting and checked arithmetic. No floating point anywhere: every amount a
//! customer pays or an operator sets is a decimal string that maps to exactly one integer.

use std::fmt;
use std::str::FromStr;

/// An amount of money in nano-units (10⁻⁹ of the currency unit).
///
/// Signed because balances may go below zero by a bounded settle overrun, and adjustments and
/// refunds are signed movements. Only checked arithmetic is offered, so an amount never wraps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Fractional digits a decimal amount may carry: one per nano-unit decade.
const FRACTION_DIGITS_MAX: usize = 9;

/// Significant whole-unit digits that can fit: i64::MAX is 9223372036.854775807 units.
const WHOLE_DIGITS_MAX: usize = 10;

/// Why a decimal string is not an amount. Each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Nothing to parse.
    #[error("amount is empty; write it as a decimal string such as \"12.5\"")]
    Empty,
    /// A character that is not a digit, the one decimal point, or a leading sign where allowed.
    /// `position` counts characters from 1.
    #[error(
        "amount contains {character:?} at position {position}; use only digits and at most one '.', e.g. \"12.5\" (no spaces, exponents or separators)"
    )]
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Where it is, counting characters from 1.
        position: usize,
    },
    /// No digits at all, or a decimal point without a digit on one of its sides (".5", "1.").
    #[error("amount needs digits on both sides of the decimal point, e.g. \"0.5\" rather than \".5\" or \"5.\"")]
    MissingDigits,
    /// More precision than a nano-unit, even if the extra digits are zeros.
    #[error("amount has more than 9 fractional digits")]
    TooManyFractionDigits,
    /// Beyond what an i64 of nano-units holds; never wrapped or clamped.
    #[error("amount is out of range; amounts must lie between -9223372036.854775808 and 9223372036.854775807")]
    Overflow,
    /// A sign where only a plain non-negative amount is accepted.
    #[error("amount must not carry a sign ('-' or '+'); write a plain non-negative decimal such as \"12.5\"")]
    SignNotAllowed,
}

impl Money {
    /// No money: the default, and what an empty usage costs before any flat fee.
    pub const ZERO: Money = Money(0);
    /// Nano-units in one currency unit: amounts carry at most nine fractional digits.
    pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

    /// An amount from its exact nano-unit count, as stored in the ledger.
    pub const fn from_nanos(nanos: i64) -> Money {
        Money(nanos)
    }

    /// The largest amount every store holds exactly: ±(2^53 − 1) nano-units, about 9,007,199.25
    /// currency units. Redis's scripts compare money as doubles, exact only this far, and refuse
    /// beyond it (`MONEY_MAX` in `tollgate.lua`), while SQL and Rust go on to i64. So this is the
    /// one range for whatever reaches the hot store (fund amounts and the balances they make,
    /// credit limits, key budgets), checked before the ledger commits: past it, a committed top-up
    /// would fail to apply for good, and a balance or limit would make every authorize fail.
    pub const HOT_STORE_MAX: Money = Money((1 << 53) - 1);

    /// Whether the amount lies within ±[`Money::HOT_STORE_MAX`].
    pub const fn in_hot_store_range(self) -> bool {
        -Money::HOT_STORE_MAX.0 <= self.0 && self.0 <= Money::HOT_STORE_MAX.0
    }

    /// The exact nano-unit count, for storage and integer arithmetic elsewhere.
    pub const fn nanos(self) -> i64 {
        self.0
    }

    /// The sum, or `None` rather than a wrapped amount.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    /// The difference, or `None` rather than a wrapped amount.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    /// The negation, or `None` for the one amount (i64::MIN nano) with no positive counterpart.
    pub fn checked_neg(self) -> Option<Money> {
        self.0.checked_neg().map(Money)
    }

    /// Below zero, e.g. a balance after a settle overrun.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Exactly zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Above zero.
    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Strict parse of a decimal string, sign allowed ("-1.5", "+2" ok), for signed movements
    /// such as adjustments.
    ///
    /// Accepted: an optional leading `-` or `+`, then digits, then optionally `.` and one to nine
    /// digits. Leading zeros are fine and "-0" is zero. Nothing else: no whitespace, exponents,
    /// separators, or a point without digits on both sides.
    ///
    /// # Errors
    /// `Empty`, `InvalidCharacter`, `MissingDigits`, `TooManyFractionDigits` (even for trailing
    /// zeros), or `Overflow` for a value outside the i64 nano-unit range.
    pub fn parse_signed(text: &str) -> Result<Money, MoneyError> {
        parse(text, SignRule::Allowed)
    }

    /// Strict parse with no sign character at all (neither '-' nor '+'), so the value is >= 0;
    /// for amounts that cannot meaningfully be negative, such as prices and top-ups.
    ///
    /// # Errors
    /// As [`Money::parse_signed`], plus `SignNotAllowed` for a leading `-` or `+`.
    pub fn parse_non_negative(text: &str) -> Result<Money, MoneyError> {
        parse(text, SignRule::Forbidden)
    }
}

/// Whether a leading sign is accepted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SignRule {
    Allowed,
    Forbidden,
}

/// One pass over the text, bounded work per character whatever its length: digits beyond what
/// could fit are counted, not accumulated, so a huge input is rejected without overflow or
/// quadratic cost. Errors are reported in a fixed order: empty, sign, invalid character,
/// missing digits, too many fractional digits, out of range.
fn parse(text: &str, sign_rule: SignRule) -> Result<Money, MoneyError> {
    let mut characters = text.chars().enumerate().peekable();
    let Some(&(_, first)) = characters.peek() else {
        return Err(MoneyError::Empty);
    };
    let mut negative = false;
    if first == '-' || first == '+' {
        if sign_rule == SignRule::Forbidden {
            return Err(MoneyError::SignNotAllowed);
        }
        negative = first == '-';
        characters.next();
    }

    let mut whole: i128 = 0;
    let mut whole_digits: usize = 0;
    let mut whole_significant_digits: usize = 0;
    let mut fraction: i128 = 0;
    let mut fraction_digits: usize = 0;
    let mut seen_point = false;
    for (index, character) in characters {
        if let Some(digit) = character.to_digit(10) {
            let digit = i128::from(digit);
            if seen_point {
                fraction_digits = fraction_digits.saturating_add(1);
                if fraction_digits <= FRACTION_DIGITS_MAX {
                    fraction = fraction * 10 + digit;
                }
            } else {
                whole_digits = whole_digits.saturating_add(1);
                if whole_significant_digits > 0 || digit != 0 {
                    whole_significant_digits = whole_significant_digits.saturating_add(1);
                    if whole_significant_digits <= WHOLE_DIGITS_MAX {
                        whole = whole * 10 + digit;
                    }
                }
            }
        } else if character == '.' && !seen_point {
            seen_point = true;
        } else {
            return Err(MoneyError::InvalidCharacter { character, position: index.saturating_add(1) });
        }
    }

    if whole_digits == 0 || (seen_point && fraction_digits == 0) {
        return Err(MoneyError::MissingDigits);
    }
    if fraction_digits > FRACTION_DIGITS_MAX {
        return Err(MoneyError::TooManyFractionDigits);
    }
    if whole_significant_digits > WHOLE_DIGITS_MAX {
        return Err(MoneyError::Overflow);
    }
    for _ in fraction_digits..FRACTION_DIGITS_MAX {
        fraction *= 10;
    }
    // At most 10 whole digits and 9 fractional ones: far inside i128, so this cannot overflow,
    // and the one range check below is exact at both ends (i64::MIN included).
    let magnitude = whole * i128::from(Money::NANOS_PER_UNIT) + fraction;
    let nanos = if negative { -magnitude } else { magnitude };
    i64::try_from(nanos).map(Money).map_err(|_| MoneyError::Overflow)
}

impl fmt::Display for Money {
    /// Canonical form, the one `parse_signed` reads back exactly: no exponent, no trailing
    /// fractional zeros, no point for whole amounts ("0", "12", "12.5", "-0.000000001").
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // unsigned_abs keeps i64::MIN exact.
        let magnitude = self.0.unsigned_abs();
        let nanos_per_unit = Money::NANOS_PER_UNIT.unsigned_abs();
        let whole = magnitude / nanos_per_unit;
        let mut fraction = magnitude % nanos_per_unit;
        if self.0 < 0 {
            formatter.write_str("-")?;
        }
        if fraction == 0 {
            return write!(formatter, "{whole}");
        }
        let mut width = FRACTION_DIGITS_MAX;
        while fraction.is_multiple_of(10) {
            fraction /= 10;
            width -= 1;
        }
        write!(formatter, "{whole}.{fraction:0width$}")
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    /// Same as [`Money::parse_signed`].
    fn from_str(text: &str) -> Result<Money, MoneyError> {
        Money::parse_signed(text)
    }
}

impl serde::Serialize for Money {
    /// As the canonical decimal string, so JSON clients never round it through a float.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    /// Only from a string, via [`Money::parse_signed`]. A JSON number is rejected: it may already
    /// have been rounded through a float by the sender, and the error says to send a string.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = Money;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(
                    "an amount as a decimal string such as \"12.5\" (amounts are decimal strings, not JSON numbers, so they stay exact)",
                )
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Money, E> {
                Money::parse_signed(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

/// In the API, an exact decimal string of currency units with up to 9 fractional digits.
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(r"^-?[0-9]+(\.[0-9]{1,9})?$"))
            .description(Some("An exact amount of currency units as a decimal string, up to 9 fractional digits (never a JSON number)."))
            .examples(["12.345678901"])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    fn invalid(character: char, position: usize) -> MoneyError {
        MoneyError::InvalidCharacter { character, position }
    }

    #[test]
    fn parses_exact_values() {
        let cases = [
            ("0", 0),
            ("-0", 0),
            ("+0", 0),
            ("-0.0", 0),
            ("0.000000000", 0),
            ("+2", 2_000_000_000),
            ("1", 1_000_000_000),
            ("1.5", 1_500_000_000),
            ("-1.5", -1_500_000_000),
            ("007.5", 7_500_000_000),
            ("00000000000000000000000.1", 100_000_000),
            ("0.1", 100_000_000),
            ("0.000000001", 1),
            ("-0.000000001", -1),
            ("1.000000000", 1_000_000_000),
            ("12.345678901", 12_345_678_901),
            ("9223372036", 9_223_372_036_000_000_000),
            ("9223372036.854775807", i64::MAX),
            ("+9223372036.854775807", i64::MAX),
            ("-9223372036.854775807", -i64::MAX),
            ("-9223372036.854775808", i64::MIN),
        ];
        for (text, nanos) in cases {
            assert_eq!(Money::parse_signed(text), Ok(Money::from_nanos(nanos)), "{text}");
            assert_eq!(text.parse::<Money>(), Ok(Money::from_nanos(nanos)), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_an_exact_amount() {
        let cases = [
            ("", MoneyError::Empty),
            (".", MoneyError::MissingDigits),
            ("1.", MoneyError::MissingDigits),
            (".5", MoneyError::MissingDigits),
            ("-.5", MoneyError::MissingDigits),
            ("-", MoneyError::MissingDigits),
            ("+", MoneyError::MissingDigits),
            ("-.", MoneyError::MissingDigits),
            ("1.0000000000", MoneyError::TooManyFractionDigits),
            ("0.0000000001", MoneyError::TooManyFractionDigits),
            ("-0.0000000000", MoneyError::TooManyFractionDigits),
            ("9223372036.854775808", MoneyError::Overflow),
            ("-9223372036.854775809", MoneyError::Overflow),
            ("9223372037", MoneyError::Overflow),
            ("10000000000", MoneyError::Overflow),
            ("100000000000000000000000", MoneyError::Overflow),
            ("1e3", invalid('e', 2)),
            ("1E3", invalid('E', 2)),
            ("1.5e-3", invalid('e', 4)),
            (" 1", invalid(' ', 1)),
            ("1 ", invalid(' ', 2)),
            ("1 000", invalid(' ', 2)),
            ("1\t", invalid('\t', 2)),
            ("\n1", invalid('\n', 1)),
            ("- 1", invalid(' ', 2)),
            ("--1", invalid('-', 2)),
            ("+-1", invalid('-', 2)),
            ("-+1", invalid('+', 2)),
            ("1-", invalid('-', 2)),
            ("1.2.3", invalid('.', 4)),
            ("1..2", invalid('.', 3)),
            ("0x10", invalid('x', 2)),
            ("1,5", invalid(',', 2)),
            ("1_000", invalid('_', 2)),
            ("١", invalid('١', 1)),
            ("€1", invalid('€', 1)),
            ("NaN", invalid('N', 1)),
            ("inf", invalid('i', 1)),
            ("-inf", invalid('i', 2)),
        ];
        for (text, error) in cases {
            assert_eq!(Money::parse_signed(text), Err(error), "{text:?}");
        }
    }

    #[test]
    fn non_negative_parse_refuses_any_sign() {
        assert_eq!(Money::parse_non_negative("-1"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("+1"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("-0"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("+"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("1-"), Err(invalid('-', 2)));
        assert_eq!(Money::parse_non_negative(""), Err(MoneyError::Empty));
        assert_eq!(Money::parse_non_negative(".5"), Err(MoneyError::MissingDigits));
        assert_eq!(Money::parse_non_negative("1.25"), Ok(Money::from_nanos(1_250_000_000)));
        assert_eq!(Money::parse_non_negative("0"), Ok(Money::ZERO));
        assert_eq!(Money::parse_non_negative("9223372036.854775807"), Ok(Money::from_nanos(i64::MAX)));
        assert_eq!(Money::parse_non_negative("9223372036.854775808"), Err(MoneyError::Overflow));
    }

    #[test]
    fn huge_inputs_are_rejected_quickly_without_panicking() {
        let started = std::time::Instant::now();
        let nines = "9".repeat(1_000_000);
        assert_eq!(Money::parse_signed(&nines), Err(MoneyError::Overflow));
        assert_eq!(Money::parse_signed(&format!("-{nines}")), Err(MoneyError::Overflow));
        let zeros_then_one = format!("{}1", "0".repeat(1_000_000));
        assert_eq!(Money::parse_signed(&zeros_then_one), Ok(Money::from_nanos(1_000_000_000)));
        let long_fraction = format!("1.{}", "0".repeat(1_000_000));
        assert_eq!(Money::parse_signed(&long_fraction), Err(MoneyError::TooManyFractionDigits));
        let garbage_at_end = format!("{nines}x");
        assert_eq!(Money::parse_signed(&garbage_at_end), Err(invalid('x', 1_000_001)));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn error_messages_say_what_to_do() {
        assert_eq!(MoneyError::TooManyFractionDigits.to_string(), "amount has more than 9 fractional digits");
        let message = Money::parse_signed("1e3").unwrap_err().to_string();
        assert!(message.contains("'e'") && message.contains("position 2"), "{message}");
        assert!(MoneyError::SignNotAllowed.to_string().contains("must not carry a sign"));
        assert!(MoneyError::Overflow.to_string().contains("9223372036.854775807"));
    }

    #[test]
    fn formats_canonically() {
        let cases = [
            (0, "0"),
            (1, "0.000000001"),
            (10, "0.00000001"),
            (12_000_000_000, "12"),
            (12_500_000_000, "12.5"),
            (12_050_000_000, "12.05"),
            (-1, "-0.000000001"),
            (-1_500_000_000, "-1.5"),
            (-2_000_000_000, "-2"),
            (100_000_000, "0.1"),
            (123_456_789, "0.123456789"),
            (1_000_000_001, "1.000000001"),
            (i64::MIN, "-9223372036.854775808"),
            (i64::MIN + 1, "-9223372036.854775807"),
            (i64::MAX, "9223372036.854775807"),
        ];
        for (nanos, text) in cases {
            assert_eq!(Money::from_nanos(nanos).to_string(), text, "{nanos}");
        }
    }

    #[test]
    fn predicates_and_constants() {
        assert_eq!(Money::ZERO, Money::default());
        assert_eq!(Money::ZERO.nanos(), 0);
        assert_eq!(Money::NANOS_PER_UNIT, 1_000_000_000);
        assert!(Money::ZERO.is_zero() && !Money::ZERO.is_negative() && !Money::ZERO.is_positive());
        assert!(Money::from_nanos(-1).is_negative() && !Money::from_nanos(-1).is_zero());
        assert!(Money::from_nanos(1).is_positive() && !Money::from_nanos(1).is_negative());
        assert!(Money::from_nanos(-1) < Money::ZERO && Money::ZERO < Money::from_nanos(1));
    }

    #[test]
    fn checked_arithmetic_never_wraps() {
        assert_eq!(Money::from_nanos(i64::MAX).checked_add(Money::from_nanos(1)), None);
        assert_eq!(Money::from_nanos(i64::MIN).checked_add(Money::from_nanos(-1)), None);
        assert_eq!(Money::from_nanos(i64::MIN).checked_sub(Money::from_nanos(1)), None);
        assert_eq!(Money::from_nanos(i64::MAX).checked_sub(Money::from_nanos(-1)), None);
        assert_eq!(Money::from_nanos(i64::MIN).checked_neg(), None);
        assert_eq!(Money::from_nanos(i64::MAX).checked_neg(), Some(Money::from_nanos(-i64::MAX)));
        assert_eq!(Money::from_nanos(5).checked_sub(Money::from_nanos(7)), Some(Money::from_nanos(-2)));
        assert_eq!(Money::from_nanos(5).checked_add(Money::from_nanos(7)), Some(Money::from_nanos(12)));
    }

    /// The hot store's range is ±(2^53 − 1), the last integers a double holds exactly with
    /// their neighbours (tollgate.lua refuses |x| ≥ 2^53).
    #[test]
    fn the_hot_store_range_ends_where_doubles_stop_being_exact() {
        let max = Money::HOT_STORE_MAX.nanos();
        assert_eq!(max, 9_007_199_254_740_991);
        assert_eq!(max as f64 + 1.0, (max + 1) as f64, "exact up to here");
        assert_eq!((max + 1) as f64 + 1.0, (max + 1) as f64, "2^53 + 1 is not");
        for inside in [0, 1, -1, max, -max] {
            assert!(Money::from_nanos(inside).in_hot_store_range(), "{inside}");
        }
        for outside in [max + 1, -max - 1, i64::MAX, i64::MIN] {
            assert!(!Money::from_nanos(outside).in_hot_store_range(), "{outside}");
        }
    }

    #[test]
    fn serde_uses_strings_only() {
        let money: Money = serde_json::from_str("\"1.25\"").unwrap();
        assert_eq!(money, Money::from_nanos(1_250_000_000));
        assert_eq!(serde_json::to_string(&money).unwrap(), "\"1.25\"");
        assert_eq!(serde_json::to_string(&Money::from_nanos(i64::MIN)).unwrap(), "\"-9223372036.854775808\"");
        assert_eq!(serde_json::from_str::<Money>("\"-0.000000001\"").unwrap(), Money::from_nanos(-1));
        for number in ["1.25", "1", "-3", "1e3", "18446744073709551615"] {
            let error = serde_json::from_str::<Money>(number).unwrap_err().to_string();
            assert!(error.contains("amounts are decimal strings"), "{number}: {error}");
        }
        for other in ["null", "true", "[]", "{}"] {
            assert!(serde_json::from_str::<Money>(other).is_err(), "{other}");
        }
        let error = serde_json::from_str::<Money>("\"1.0000000001\"").unwrap_err().to_string();
        assert!(error.contains("more than 9 fractional digits"), "{error}");
        assert!(serde_json::from_str::<Money>("\" 1\"").is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(nanos in any::<i64>()) {
            let money = Money::from_nanos(nanos);
            let text = money.to_string();
            prop_assert_eq!(Money::parse_signed(&text), Ok(money));
            prop_assert_eq!(serde_json::from_str::<Money>(&serde_json::to_string(&money).unwrap()).unwrap(), money);
            // Canonical: no trailing fractional zero, no exponent, at most 9 fractional digits.
            if let Some((_, fraction)) = text.split_once('.') {
                prop_assert!(!fraction.ends_with('0') && !fraction.is_empty() && fraction.len() <= 9);
            }
            prop_assert!(text.bytes().all(|byte| byte.is_ascii_digit() || byte == b'.' || byte == b'-'));
            if nanos >= 0 {
                prop_assert_eq!(Money::parse_non_negative(&text), Ok(money));
            }
        }

        #[test]
        fn parse_agrees_with_independent_arithmetic(
            leading_zeros in 0usize..4,
            whole in 0u64..=9_999_999_999,
            fraction in proptest::option::of("[0-9]{1,9}"),
            sign in prop_oneof![Just(""), Just("-"), Just("+")],
        ) {
            let text = format!(
                "{sign}{}{whole}{}",
                "0".repeat(leading_zeros),
                fraction.as_ref().map(|digits| format!(".{digits}")).unwrap_or_default(),
            );
            let fraction_nanos: i128 = match &fraction {
                Some(digits) => {
                    let padded = format!("{digits:0<9}");
                    padded.parse::<i128>().unwrap()
                }
                None => 0,
            };
            let magnitude = i128::from(whole) * 1_000_000_000 + fraction_nanos;
            let expected = if sign == "-" { -magnitude } else { magnitude };
            let parsed = Money::parse_signed(&text);
            if (i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(&expected) {
                prop_assert_eq!(parsed.map(|money| i128::from(money.nanos())), Ok(expected), "{}", text);
            } else {
                prop_assert_eq!(parsed, Err(MoneyError::Overflow), "{}", text);
            }
        }

        #[test]
        fn arbitrary_text_never_panics_and_accepted_text_round_trips(text in "[-+0-9. e]{0,30}") {
            if let Ok(money) = Money::parse_signed(&text) {
                prop_assert_eq!(Money::parse_signed(&money.to_string()), Ok(money));
            }
        }

        #[test]
        fn checked_arithmetic_matches_wide_arithmetic(left in any::<i64>(), right in any::<i64>()) {
            let (left_money, right_money) = (Money::from_nanos(left), Money::from_nanos(right));
            let sum = i128::from(left) + i128::from(right);
            prop_assert_eq!(left_money.checked_add(right_money).map(|money| i128::from(money.nanos())), i64::try_from(sum).ok().map(i128::from));
            let difference = i128::from(left) - i128::from(right);
            prop_assert_eq!(left_money.checked_sub(right_money).map(|money| i128::from(money.nanos())), i64::try_from(difference).ok().map(i128::from));
        }
    }
}
