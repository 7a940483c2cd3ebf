//! Money and price text: `Money`'s strict decimal parse and canonical format, the price-list
//! amount conversions (per token to per million tokens, per request), and whole price lists.
//!
//! Input: any bytes, read as text (invalid UTF-8 replaced). Properties, beyond never panicking:
//! - `Money::parse_signed` and `parse_non_negative` accept exactly what a small reference parser
//!   of the documented grammar accepts (`[+-]?[0-9]+(\.[0-9]{1,9})?` within the i64 nano-unit
//!   range, no sign for the non-negative parse), with the same value;
//! - format then parse is the identity, and the format is canonical;
//! - a JSON string goes through serde exactly as through `parse_signed`;
//! - the price conversions never give a negative amount, agree with `Money` on plain decimals,
//!   treat an exponent as a shift, and differ from each other by exactly 10⁶;
//! - every price imported from a list is a valid (non-negative) price.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::price_import::{AmountError, per_request_to_nanos, per_token_to_per_mtok};
use tollgate_core::{Money, MoneyError, Price, PriceList, PriceListFormat};

/// The price conversions read at most this many characters.
const AMOUNT_TEXT_CHARS_MAX: usize = 64;

/// Tokens per million: the factor between a per-request and a per-million-tokens reading.
const TOKENS_PER_MILLION: i64 = 1_000_000;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    check_money(&text);
    check_price_amounts(&text);
    if text.starts_with('{') {
        check_price_list(&text);
    }
    // Any i64 formats to text that parses back to it.
    if let Some(head) = input.first_chunk::<8>() {
        let money = Money::from_nanos(i64::from_le_bytes(*head));
        check_canonical(money);
    }
});

fn check_money(text: &str) {
    let signed = Money::parse_signed(text);
    let non_negative = Money::parse_non_negative(text);
    assert_eq!(signed.as_ref().ok().map(|money| money.nanos()), reference_nanos(text, true), "parse_signed({text:?}) = {signed:?}");
    assert_eq!(non_negative.as_ref().ok().map(|money| money.nanos()), reference_nanos(text, false), "parse_non_negative({text:?}) = {non_negative:?}");
    assert_eq!(signed == Err(MoneyError::Empty), text.is_empty());
    assert_eq!(non_negative == Err(MoneyError::SignNotAllowed), text.starts_with(['-', '+']));
    if let Ok(money) = signed {
        check_canonical(money);
        assert_eq!(text.parse::<Money>(), Ok(money));
    }
    let through_serde = serde_json::to_string(text).ok().and_then(|json| serde_json::from_str::<Money>(&json).ok());
    assert_eq!(through_serde, signed.ok(), "serde and parse_signed disagree on {text:?}");
}

/// Format then parse is the identity, and the text is the one canonical spelling.
fn check_canonical(money: Money) {
    let text = money.to_string();
    assert_eq!(Money::parse_signed(&text), Ok(money), "{text}");
    let unsigned = text.strip_prefix('-').unwrap_or(&text);
    assert_eq!(text.starts_with('-'), money.is_negative(), "{text}");
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    assert!(whole == "0" || !whole.starts_with('0'), "leading zero in {text}");
    assert!(!fraction.ends_with('0') && fraction.len() <= 9, "fraction not canonical in {text}");
    assert_eq!(unsigned.contains('.'), !fraction.is_empty(), "a bare point in {text}");
}

/// The grammar `Money` documents, read independently: an optional sign (where allowed), one or
/// more ASCII digits, optionally a point and one to nine digits; the value must fit i64 nanos.
fn reference_nanos(text: &str, sign_allowed: bool) -> Option<i64> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) if sign_allowed => (true, rest),
        _ => match text.strip_prefix('+') {
            Some(rest) if sign_allowed => (false, rest),
            _ => (false, text),
        },
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|fraction| !digits(fraction) || fraction.len() > 9) {
        return None;
    }
    let significant = whole.trim_start_matches('0');
    // Eleven significant digits are beyond any i64 of nano-units.
    if significant.len() > 10 {
        return None;
    }
    let whole_value: i128 = if significant.is_empty() { 0 } else { significant.parse().ok()? };
    let fraction_value: i128 = format!("{:0<9}", fraction.unwrap_or("0")).parse().ok()?;
    let magnitude = whole_value * 1_000_000_000 + fraction_value;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

fn check_price_amounts(text: &str) {
    let per_token = per_token_to_per_mtok(text);
    let per_request = per_request_to_nanos(text);
    for amount in [&per_token, &per_request].into_iter().flatten() {
        assert!(!amount.is_negative(), "negative price {amount} from {text:?}");
    }
    // Reading per token is reading per request and multiplying by a million tokens.
    if let Ok(per_request) = per_request {
        let scaled = per_request.nanos().checked_mul(TOKENS_PER_MILLION);
        match scaled {
            Some(scaled) => assert_eq!(per_token, Ok(Money::from_nanos(scaled)), "{text:?}"),
            None => assert_eq!(per_token, Err(AmountError::TooLarge), "{text:?}"),
        }
    }
    if text.len() > AMOUNT_TEXT_CHARS_MAX - 2 || text.contains(['e', 'E']) {
        return;
    }
    // An exponent is a shift of the point.
    assert_eq!(per_token_to_per_mtok(&format!("{text}e0")), per_token, "{text:?}e0");
    assert_eq!(per_request_to_nanos(&format!("{text}e6")), per_token, "{text:?}e6");
    // On a plain decimal `Money` reads too, both give the same amount (a price is never
    // negative, and "-0" is zero).
    if !text.starts_with('+')
        && let Ok(money) = Money::parse_signed(text)
    {
        let expected = if money.is_negative() { Err(AmountError::Negative) } else { Ok(money) };
        assert_eq!(per_request, expected, "{text:?}");
    }
}

/// Every entry imported from a list is a price that can be charged.
fn check_price_list(text: &str) {
    let format = PriceListFormat::detect(text);
    let Ok(list) = PriceList::parse(text, format) else { return };
    for entry in &list.entries {
        if let tollgate_core::price_import::EntryOutcome::Priced(price) = &entry.outcome {
            assert_eq!(price.validate(), Ok(()), "{}: {price:?}", entry.id);
            let json = serde_json::to_string(price).unwrap_or_default();
            assert_eq!(serde_json::from_str::<Price>(&json).ok().as_ref(), Some(price), "{json}");
        }
    }
}
