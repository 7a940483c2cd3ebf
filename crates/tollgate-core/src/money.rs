//! Money as exact integer nano-units (1 unit = 10⁻⁹ of the currency), with strict decimal
//! parsing and formatting and checked arithmetic. No floating point anywhere.

use std::fmt;
use std::str::FromStr;

/// An amount of money in nano-units. Signed: balances may go below zero by a bounded overrun,
/// and adjustments and refunds are signed movements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

/// Fractional digits a decimal amount may carry: one per nano-unit decade.
const FRACTION_DIGITS_MAX: usize = 9;

/// Why a decimal string is not an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is empty")]
    Empty,
    #[error("amount {text:?} is not a decimal number (digits, at most one '.', e.g. \"12.5\")")]
    InvalidFormat { text: String },
    #[error("amount has more than 9 fractional digits")]
    TooManyFractionDigits,
    #[error("amount is out of range")]
    Overflow,
    #[error("amount must not carry a sign")]
    SignNotAllowed,
}

impl Money {
    pub const ZERO: Money = Money(0);
    pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

    pub const fn from_nanos(nanos: i64) -> Money {
        Money(nanos)
    }

    pub const fn nanos(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        self.0.checked_sub(other.0).map(Money)
    }

    pub fn checked_neg(self) -> Option<Money> {
        self.0.checked_neg().map(Money)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Strict parse of a decimal string; a leading `-` or `+` is allowed.
    ///
    /// # Errors
    /// Empty input, anything but digits and one point with digits on both sides, more than nine
    /// fractional digits, or a value outside the i64 nano-unit range.
    pub fn parse_signed(text: &str) -> Result<Money, MoneyError> {
        let (negative, digits) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        parse_magnitude(text, digits, negative)
    }

    /// Strict parse of a decimal string without any sign character.
    ///
    /// # Errors
    /// As `parse_signed`, plus `SignNotAllowed` for a leading `-` or `+`.
    pub fn parse_non_negative(text: &str) -> Result<Money, MoneyError> {
        if text.starts_with(['-', '+']) {
            return Err(MoneyError::SignNotAllowed);
        }
        parse_magnitude(text, text, false)
    }
}

/// Parses `digits` ("123" or "123.456") into nano-units, negated when asked. Accumulates in
/// i128 so the check against the i64 range happens once, exactly (i64::MIN included).
fn parse_magnitude(text: &str, digits: &str, negative: bool) -> Result<Money, MoneyError> {
    if text.is_empty() {
        return Err(MoneyError::Empty);
    }
    let invalid = || MoneyError::InvalidFormat { text: text.chars().take(64).collect() };
    let (whole, fraction) = match digits.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (digits, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|fraction| !all_digits(fraction)) {
        return Err(invalid());
    }
    let fraction = fraction.unwrap_or("");
    if fraction.len() > FRACTION_DIGITS_MAX {
        return Err(MoneyError::TooManyFractionDigits);
    }
    // i64::MAX has 19 digits; more significant whole digits cannot fit (leading zeros can).
    let whole = whole.trim_start_matches('0');
    if whole.len() > 19 {
        return Err(MoneyError::Overflow);
    }
    let mut nanos: i128 = 0;
    for byte in whole.bytes().chain(fraction.bytes()) {
        nanos = nanos * 10 + i128::from(byte - b'0');
    }
    for _ in fraction.len()..FRACTION_DIGITS_MAX {
        nanos *= 10;
    }
    if negative {
        nanos = -nanos;
    }
    i64::try_from(nanos).map(Money).map_err(|_| MoneyError::Overflow)
}

impl fmt::Display for Money {
    /// Canonical form: no exponent, no trailing fractional zeros, no point for whole amounts.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let magnitude = self.0.unsigned_abs();
        let nanos_per_unit = Money::NANOS_PER_UNIT.unsigned_abs();
        let whole = magnitude / nanos_per_unit;
        let fraction = magnitude % nanos_per_unit;
        if self.0 < 0 {
            formatter.write_str("-")?;
        }
        if fraction == 0 {
            return write!(formatter, "{whole}");
        }
        let fraction = format!("{fraction:09}");
        write!(formatter, "{whole}.{}", fraction.trim_end_matches('0'))
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(text: &str) -> Result<Money, MoneyError> {
        Money::parse_signed(text)
    }
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Money;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("an amount as a decimal string, e.g. \"12.5\" (amounts are strings, not JSON numbers)")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Money, E> {
                Money::parse_signed(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_values() {
        let cases = [
            ("0", 0),
            ("-0", 0),
            ("+2", 2_000_000_000),
            ("1", 1_000_000_000),
            ("1.5", 1_500_000_000),
            ("007.5", 7_500_000_000),
            ("0.000000001", 1),
            ("-0.000000001", -1),
            ("12.345678901", 12_345_678_901),
            ("9223372036.854775807", i64::MAX),
            ("-9223372036.854775808", i64::MIN),
        ];
        for (text, nanos) in cases {
            assert_eq!(Money::parse_signed(text), Ok(Money::from_nanos(nanos)), "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_an_exact_amount() {
        let cases = [
            ("", MoneyError::Empty),
            ("1.0000000000", MoneyError::TooManyFractionDigits),
            ("0.0000000001", MoneyError::TooManyFractionDigits),
            ("9223372036.854775808", MoneyError::Overflow),
            ("-9223372036.854775809", MoneyError::Overflow),
            ("100000000000000000000000", MoneyError::Overflow),
        ];
        for (text, error) in cases {
            assert_eq!(Money::parse_signed(text), Err(error), "{text}");
        }
        for text in [".", "1.", ".5", "1e3", " 1", "1 ", "--1", "+-1", "1.2.3", "0x10", "١", "1,5", "-", "+", "NaN", "inf"] {
            assert!(matches!(Money::parse_signed(text), Err(MoneyError::InvalidFormat { .. })), "{text:?}");
        }
        assert_eq!(Money::parse_non_negative("-1"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("+1"), Err(MoneyError::SignNotAllowed));
        assert_eq!(Money::parse_non_negative("1.25"), Ok(Money::from_nanos(1_250_000_000)));
        let long = "9".repeat(100_000);
        assert_eq!(Money::parse_signed(&long), Err(MoneyError::Overflow));
        let zeros = format!("{}1", "0".repeat(100_000));
        assert_eq!(Money::parse_signed(&zeros), Ok(Money::from_nanos(1_000_000_000)));
    }

    #[test]
    fn formats_canonically() {
        let cases = [
            (0, "0"),
            (12_000_000_000, "12"),
            (12_500_000_000, "12.5"),
            (-1, "-0.000000001"),
            (100_000_000, "0.1"),
            (i64::MIN, "-9223372036.854775808"),
            (i64::MAX, "9223372036.854775807"),
        ];
        for (nanos, text) in cases {
            assert_eq!(Money::from_nanos(nanos).to_string(), text);
        }
    }

    #[test]
    fn checked_arithmetic_never_wraps() {
        assert_eq!(Money::from_nanos(i64::MAX).checked_add(Money::from_nanos(1)), None);
        assert_eq!(Money::from_nanos(i64::MIN).checked_sub(Money::from_nanos(1)), None);
        assert_eq!(Money::from_nanos(i64::MIN).checked_neg(), None);
        assert_eq!(Money::from_nanos(5).checked_sub(Money::from_nanos(7)), Some(Money::from_nanos(-2)));
    }

    #[test]
    fn serde_uses_strings_only() {
        let money: Money = serde_json::from_str("\"1.25\"").unwrap();
        assert_eq!(money, Money::from_nanos(1_250_000_000));
        assert_eq!(serde_json::to_string(&money).unwrap(), "\"1.25\"");
        let error = serde_json::from_str::<Money>("1.25").unwrap_err().to_string();
        assert!(error.contains("decimal string"), "{error}");
        assert!(serde_json::from_str::<Money>("\"1.0000000001\"").is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(nanos in any::<i64>()) {
            let money = Money::from_nanos(nanos);
            prop_assert_eq!(Money::parse_signed(&money.to_string()), Ok(money));
        }

        #[test]
        fn parse_agrees_with_independent_arithmetic(whole in 0u64..9_223_372_035, fraction in 0u32..1_000_000_000, digits in 1usize..=9, negative in any::<bool>()) {
            let fraction_text = format!("{fraction:09}")[..digits].to_string();
            let text = format!("{}{whole}.{fraction_text}", if negative { "-" } else { "" });
            let scaled: i128 = i128::from(whole) * 1_000_000_000 + fraction_text.parse::<i128>().unwrap() * 10i128.pow(9 - digits as u32);
            let expected = if negative { -scaled } else { scaled };
            prop_assert_eq!(Money::parse_signed(&text).unwrap().nanos() as i128, expected);
        }
    }
}
