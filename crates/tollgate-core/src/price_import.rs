//! Price lists published by others, read exactly: OpenRouter's model list (`GET /api/v1/models`)
//! and LiteLLM's model price map (`model_prices_and_context_window.json`).
//!
//! Both give prices in currency units **per token**: OpenRouter as JSON strings
//! (`"0.0000025"`), LiteLLM as JSON numbers, often in exponent form (`2.5e-06`). A [`Price`] is
//! in nano-units per **million** tokens, so a per-token value `v` becomes `v × 10¹⁵` nano-units.
//! That product is computed on the decimal digits as written, never through a float: the JSON
//! number is read as text ([`serde_json::value::RawValue`]), since a parse into `f64` would
//! already have rounded it. A value that is not a whole number of nano-units per million tokens
//! (or per request), or is negative, or does not fit, is refused with a message naming the entry
//! and the field — a price is never rounded into something the list did not say.
//!
//! Parsing gives one [`Entry`] per model of the list: priced, skipped (nothing Tollgate can bill
//! by the token, with the reason) or rejected (a value that cannot be a price). Which entries
//! are imported, and under which names, is the caller's choice; [`PriceList::find`] matches an
//! upstream model name against the list's ids.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::money::Money;
use crate::price::Price;

/// Largest price list read, in bytes. LiteLLM's full map is about 1.6 MB and OpenRouter's model
/// list about 1 MB; this leaves room to grow while bounding the memory an import takes.
pub const PRICE_LIST_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Longest decimal text accepted for one value. Real lists use at most about 25 characters; the
/// cap bounds the work per value.
const AMOUNT_TEXT_CHARS_MAX: usize = 64;

/// Powers of ten between a per-token price in currency units and a per-million-token price in
/// nano-units: 10⁶ tokens × 10⁹ nano-units.
const PER_TOKEN_TO_NANOS_PER_MTOK_POWER: i64 = 15;

/// Powers of ten between currency units and nano-units, for per-request fees.
const UNITS_TO_NANOS_POWER: i64 = 9;

/// Decimal digits of `i64::MAX` (9223372036854775807).
const I64_DIGITS_MAX: usize = 19;

/// The two published formats read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceListFormat {
    /// `{"data": [{"id": "openai/gpt-4o", "pricing": {"prompt": "0.0000025", …}}, …]}`.
    OpenRouter,
    /// `{"gpt-4o": {"input_cost_per_token": 2.5e-06, "mode": "chat", …}, "sample_spec": {…}}`.
    LiteLlm,
}

impl PriceListFormat {
    /// The format a list's text has: OpenRouter's lists are an object with a `data` array;
    /// anything else is read as LiteLLM's map (whose parse then says what is wrong).
    pub fn detect(text: &str) -> PriceListFormat {
        #[derive(Deserialize)]
        struct Probe<'a> {
            #[serde(borrow)]
            data: Option<&'a RawValue>,
        }
        match serde_json::from_str::<Probe<'_>>(text) {
            Ok(Probe { data: Some(data) }) if data.get().starts_with('[') => PriceListFormat::OpenRouter,
            _ => PriceListFormat::LiteLlm,
        }
    }
}

impl std::fmt::Display for PriceListFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            PriceListFormat::OpenRouter => "openrouter",
            PriceListFormat::LiteLlm => "litellm",
        })
    }
}

/// Why a value of a price list is not an exact price.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not a plain decimal number (digits, at most one '.', an optional exponent).
    #[error("is not a decimal number (expected digits, an optional '.' and an optional exponent such as e-06)")]
    NotANumber,
    /// Below zero: charging it would credit the customer.
    #[error("is negative; a price must be zero or more")]
    Negative,
    /// Finer than Tollgate stores: prices are whole nano-units (10⁻⁹ of the currency) per
    /// million tokens, and per request.
    #[error("is more precise than one nano-unit (10⁻⁹ of the currency) per million tokens or per request, so it cannot be stored exactly")]
    TooPrecise,
    /// Beyond what an i64 of nano-units holds.
    #[error("is too large to store (at most 9223372036.854775807 per million tokens or per request)")]
    TooLarge,
}

/// A value of an entry that cannot be a price: the entry is not imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{model}: {field} = {text} {reason}")]
pub struct RejectedValue {
    /// The entry's id in the list.
    pub model: String,
    /// The field as the list names it (`prompt`, `input_cost_per_token`, …).
    pub field: &'static str,
    /// The value as written.
    pub text: String,
    pub reason: AmountError,
}

/// Why a whole list cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceListError {
    /// Over [`PRICE_LIST_BYTES_MAX`].
    #[error("the price list is {bytes} bytes, more than the {PRICE_LIST_BYTES_MAX} read at most")]
    TooLarge {
        /// The list's size.
        bytes: usize,
    },
    /// Not JSON of the expected shape; the message is serde_json's, with line and column.
    #[error("the file is not {expected}: {detail}")]
    Shape {
        /// What was expected, for the message.
        expected: &'static str,
        /// serde_json's description, with the position.
        detail: String,
    },
}

/// Why an entry of a list has no price to import. Expected, not an error: lists price much
/// that a gateway of chat, message and embedding requests does not bill (images, audio, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// LiteLLM's `sample_spec`, which documents the format.
    SampleSpec,
    /// A LiteLLM mode Tollgate does not bill by the token (`image_generation`, `rerank`, …).
    UnsupportedMode(String),
    /// A field the entry needs is absent or null.
    MissingPrice(&'static str),
    /// The entry is not an object of the expected shape.
    Unreadable(String),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::SampleSpec => formatter.write_str("LiteLLM's format description, not a model"),
            SkipReason::UnsupportedMode(mode) => write!(formatter, "mode {mode:?} is not billed per token (Tollgate bills chat, completion and embedding models)"),
            SkipReason::MissingPrice(field) => write!(formatter, "no {field} price"),
            SkipReason::Unreadable(detail) => write!(formatter, "unreadable entry: {detail}"),
        }
    }
}

/// What became of one entry of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryOutcome {
    Priced(Price),
    Skipped(SkipReason),
    Rejected(RejectedValue),
}

/// One model of a price list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The model's id in the list (`openai/gpt-4o`, `gpt-4o`, `azure/gpt-4o`, …).
    pub id: String,
    pub outcome: EntryOutcome,
}

/// A price list read whole, entries in the list's order (LiteLLM's: sorted by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceList {
    pub format: PriceListFormat,
    pub entries: Vec<Entry>,
}

/// The entry a model name found in a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// One entry (or several with the same price, the first of them).
    Found(&'a Entry),
    /// Several entries with different outcomes; their ids, so the operator can choose.
    Ambiguous(Vec<&'a str>),
    NotFound,
}

impl PriceList {
    /// Reads a list of the given format.
    ///
    /// # Errors
    /// `TooLarge` over [`PRICE_LIST_BYTES_MAX`]; `Shape` when the text is not JSON of the
    /// format's shape. A bad entry does not fail the list: it is skipped or rejected.
    pub fn parse(text: &str, format: PriceListFormat) -> Result<PriceList, PriceListError> {
        if text.len() > PRICE_LIST_BYTES_MAX {
            return Err(PriceListError::TooLarge { bytes: text.len() });
        }
        let entries = match format {
            PriceListFormat::OpenRouter => parse_openrouter(text)?,
            PriceListFormat::LiteLlm => parse_litellm(text)?,
        };
        Ok(PriceList { format, entries })
    }

    /// The entry for an upstream model name. An id equal to the name wins; otherwise ids that
    /// equal it once a `vendor/` prefix is dropped from one side — OpenRouter's `openai/gpt-4o`
    /// for a route to `gpt-4o`, LiteLLM's `gpt-4o` for a route to `openai/gpt-4o`. Several such
    /// entries are one match if they agree, else ambiguous: a price is never picked at random.
    /// Linear in the list's length (bounded by [`PRICE_LIST_BYTES_MAX`]), once per route.
    pub fn find(&self, upstream_model: &str) -> Lookup<'_> {
        if let Some(entry) = self.entries.iter().find(|entry| entry.id == upstream_model) {
            return Lookup::Found(entry);
        }
        let unprefixed_name = without_vendor(upstream_model);
        let candidates: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|entry| without_vendor(&entry.id) == Some(upstream_model) || Some(entry.id.as_str()) == unprefixed_name)
            .collect();
        match candidates.as_slice() {
            [] => Lookup::NotFound,
            [first, rest @ ..] if rest.iter().all(|entry| entry.outcome == first.outcome) => Lookup::Found(first),
            _ => Lookup::Ambiguous(candidates.iter().map(|entry| entry.id.as_str()).collect()),
        }
    }
}

/// The name after its first `vendor/` segment, if it has one.
fn without_vendor(name: &str) -> Option<&str> {
    name.split_once('/').map(|(_, rest)| rest).filter(|rest| !rest.is_empty())
}

#[derive(Deserialize)]
struct OpenRouterList {
    data: Vec<OpenRouterModel>,
}

#[derive(Deserialize)]
struct OpenRouterModel {
    id: String,
    #[serde(default)]
    pricing: Option<OpenRouterPricing>,
}

/// The pricing fields Tollgate bills; the rest (`image`, `web_search`, `internal_reasoning`,
/// `discount`, …) are ignored: reasoning is billed as output, the others are not requests
/// Tollgate forwards.
#[derive(Deserialize)]
struct OpenRouterPricing {
    prompt: Option<Box<RawValue>>,
    completion: Option<Box<RawValue>>,
    request: Option<Box<RawValue>>,
    input_cache_read: Option<Box<RawValue>>,
    input_cache_write: Option<Box<RawValue>>,
}

fn parse_openrouter(text: &str) -> Result<Vec<Entry>, PriceListError> {
    let list: OpenRouterList = serde_json::from_str(text)
        .map_err(|error| PriceListError::Shape { expected: "an OpenRouter model list ({\"data\": [{\"id\", \"pricing\"}, …]})", detail: error.to_string() })?;
    Ok(list
        .data
        .into_iter()
        .map(|model| {
            let outcome = match &model.pricing {
                None => EntryOutcome::Skipped(SkipReason::MissingPrice("pricing")),
                Some(pricing) => outcome(openrouter_price(&model.id, pricing)),
            };
            Entry { id: model.id, outcome }
        })
        .collect())
}

/// What an entry's prices come to: a price, a reason to skip it, or a value that cannot be one.
type EntryPrice = Result<Result<Price, SkipReason>, RejectedValue>;

fn openrouter_price(model: &str, pricing: &OpenRouterPricing) -> EntryPrice {
    let token = PER_TOKEN_TO_NANOS_PER_MTOK_POWER;
    let Some(input) = read_value(model, "prompt", pricing.prompt.as_deref(), token)? else {
        return Ok(Err(SkipReason::MissingPrice("prompt")));
    };
    let Some(output) = read_value(model, "completion", pricing.completion.as_deref(), token)? else {
        return Ok(Err(SkipReason::MissingPrice("completion")));
    };
    Ok(Ok(Price {
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: read_value(model, "input_cache_read", pricing.input_cache_read.as_deref(), token)?,
        cache_write_per_mtok: read_value(model, "input_cache_write", pricing.input_cache_write.as_deref(), token)?,
        per_request: read_value(model, "request", pricing.request.as_deref(), UNITS_TO_NANOS_POWER)?.unwrap_or(Money::ZERO),
    }))
}

/// The LiteLLM fields Tollgate bills. Tiered fields (`…_above_200k_tokens`), batch prices and
/// `output_cost_per_reasoning_token` are ignored: Tollgate bills reasoning as output and has
/// one price per token kind.
#[derive(Deserialize)]
struct LiteLlmEntry {
    input_cost_per_token: Option<Box<RawValue>>,
    output_cost_per_token: Option<Box<RawValue>>,
    cache_read_input_token_cost: Option<Box<RawValue>>,
    cache_creation_input_token_cost: Option<Box<RawValue>>,
    mode: Option<String>,
}

/// LiteLLM's key documenting the format.
const LITELLM_SAMPLE_SPEC: &str = "sample_spec";

fn parse_litellm(text: &str) -> Result<Vec<Entry>, PriceListError> {
    let map: std::collections::BTreeMap<String, Box<RawValue>> = serde_json::from_str(text)
        .map_err(|error| PriceListError::Shape { expected: "a LiteLLM model price map ({\"gpt-4o\": {\"input_cost_per_token\": …}, …})", detail: error.to_string() })?;
    Ok(map
        .into_iter()
        .map(|(id, raw)| {
            let outcome = if id == LITELLM_SAMPLE_SPEC {
                EntryOutcome::Skipped(SkipReason::SampleSpec)
            } else {
                match serde_json::from_str::<LiteLlmEntry>(raw.get()) {
                    Ok(entry) => outcome(litellm_price(&id, &entry)),
                    Err(error) => EntryOutcome::Skipped(SkipReason::Unreadable(error.to_string())),
                }
            };
            Entry { id, outcome }
        })
        .collect())
}

/// Modes billed like chat: input and output tokens. A missing mode is read as chat, LiteLLM's
/// default.
const LITELLM_TOKEN_MODES: [&str; 3] = ["chat", "completion", "responses"];
/// Embeddings: input tokens only; an absent output price is zero.
const LITELLM_EMBEDDING_MODE: &str = "embedding";

fn litellm_price(model: &str, entry: &LiteLlmEntry) -> EntryPrice {
    let mode = entry.mode.as_deref().unwrap_or("chat");
    let embedding = mode == LITELLM_EMBEDDING_MODE;
    if !embedding && !LITELLM_TOKEN_MODES.contains(&mode) {
        return Ok(Err(SkipReason::UnsupportedMode(mode.to_string())));
    }
    let token = PER_TOKEN_TO_NANOS_PER_MTOK_POWER;
    let Some(input) = read_value(model, "input_cost_per_token", entry.input_cost_per_token.as_deref(), token)? else {
        return Ok(Err(SkipReason::MissingPrice("input_cost_per_token")));
    };
    let output = match read_value(model, "output_cost_per_token", entry.output_cost_per_token.as_deref(), token)? {
        Some(output) => output,
        None if embedding => Money::ZERO,
        None => return Ok(Err(SkipReason::MissingPrice("output_cost_per_token"))),
    };
    Ok(Ok(Price {
        input_per_mtok: input,
        output_per_mtok: output,
        cached_input_per_mtok: read_value(model, "cache_read_input_token_cost", entry.cache_read_input_token_cost.as_deref(), token)?,
        cache_write_per_mtok: read_value(model, "cache_creation_input_token_cost", entry.cache_creation_input_token_cost.as_deref(), token)?,
        per_request: Money::ZERO,
    }))
}

fn outcome(price: EntryPrice) -> EntryOutcome {
    match price {
        Ok(Ok(price)) => EntryOutcome::Priced(price),
        Ok(Err(reason)) => EntryOutcome::Skipped(reason),
        Err(rejected) => EntryOutcome::Rejected(rejected),
    }
}

/// One field's value scaled by `10^power` into nano-units: `None` when absent or null.
fn read_value(model: &str, field: &'static str, raw: Option<&RawValue>, power: i64) -> Result<Option<Money>, RejectedValue> {
    let Some(raw) = raw else { return Ok(None) };
    let json = raw.get();
    let reject = |text: &str, reason| RejectedValue { model: model.to_string(), field, text: text.to_string(), reason };
    let text = match json.as_bytes().first() {
        Some(b'n') if json == "null" => return Ok(None),
        // A JSON string (OpenRouter's form): its content, unescaped.
        Some(b'"') => serde_json::from_str::<String>(json).map_err(|_| reject(json, AmountError::NotANumber))?,
        Some(b'-' | b'0'..=b'9') => json.to_string(),
        _ => return Err(reject(json, AmountError::NotANumber)),
    };
    scaled_nanos(&text, power).map(|nanos| Some(Money::from_nanos(nanos))).map_err(|reason| reject(&text, reason))
}

/// Converts a per-token price in currency units, written as decimal text (`"0.0000025"`,
/// `2.5e-06`, `1E-5`), to nano-units per million tokens, exactly.
///
/// # Errors
/// `NotANumber`, `Negative` (for a non-zero value below zero), `TooPrecise` when the result is
/// not a whole number of nano-units, `TooLarge` beyond `i64`.
pub fn per_token_to_per_mtok(text: &str) -> Result<Money, AmountError> {
    scaled_nanos(text, PER_TOKEN_TO_NANOS_PER_MTOK_POWER).map(Money::from_nanos)
}

/// Converts a per-request fee in currency units, written as decimal text, to nano-units,
/// exactly (exponents accepted, unlike [`Money::parse_non_negative`]).
///
/// # Errors
/// As [`per_token_to_per_mtok`].
pub fn per_request_to_nanos(text: &str) -> Result<Money, AmountError> {
    scaled_nanos(text, UNITS_TO_NANOS_POWER).map(Money::from_nanos)
}

/// `text × 10^power` as an exact integer. The number is split into its significant digits and
/// a power of ten (`2.5e-06` → digits `25`, power −7), trailing zeros move into the power, and
/// the result is those digits followed by `power` zeros — which must not be negative (else the
/// value has a fraction of a nano-unit) and must fit an `i64`. Integer work only.
fn scaled_nanos(text: &str, power: i64) -> Result<i64, AmountError> {
    let number = DecimalText::parse(text)?;
    let significant = number.digits.trim_start_matches('0');
    let without_trailing_zeros = significant.trim_end_matches('0');
    if without_trailing_zeros.is_empty() {
        return Ok(0);
    }
    if number.negative {
        return Err(AmountError::Negative);
    }
    let trailing_zeros = significant.len() - without_trailing_zeros.len();
    // Every term is bounded (text ≤ 64 characters, exponent clamped), so this cannot overflow.
    let zeros_after = number.exponent - number.fraction_digits + power + trailing_zeros as i64;
    if zeros_after < 0 {
        return Err(AmountError::TooPrecise);
    }
    let total_digits = without_trailing_zeros.len() as i64 + zeros_after;
    if total_digits > I64_DIGITS_MAX as i64 {
        return Err(AmountError::TooLarge);
    }
    let mut value: i128 = 0;
    for digit in without_trailing_zeros.bytes() {
        value = value * 10 + i128::from(digit - b'0');
    }
    for _ in 0..zeros_after {
        value *= 10;
    }
    debug_assert!(value > 0, "a non-zero significand scales to a positive value");
    i64::try_from(value).map_err(|_| AmountError::TooLarge)
}

/// A decimal number's parts as written: `-12.50e-3` → negative, digits `1250`, 2 fraction
/// digits, exponent −3.
struct DecimalText<'a> {
    negative: bool,
    /// Integer and fraction digits together, the point removed.
    digits: std::borrow::Cow<'a, str>,
    fraction_digits: i64,
    /// Clamped to ±[`EXPONENT_MAGNITUDE_MAX`]: beyond it every non-zero value is out of range.
    exponent: i64,
}

/// Larger exponents make any non-zero value too large or too precise, whatever its digits.
const EXPONENT_MAGNITUDE_MAX: i64 = 1_000;

impl<'a> DecimalText<'a> {
    /// JSON's number grammar, as text: `-?digits(.digits)?([eE][+-]?digits)?`. Leading zeros
    /// are accepted (a string value is not bound by JSON's rule).
    fn parse(text: &'a str) -> Result<DecimalText<'a>, AmountError> {
        if text.is_empty() || text.len() > AMOUNT_TEXT_CHARS_MAX || !text.is_ascii() {
            return Err(AmountError::NotANumber);
        }
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent_text) = match unsigned.find(['e', 'E']) {
            Some(index) => (&unsigned[..index], Some(&unsigned[index + 1..])),
            None => (unsigned, None),
        };
        let (whole, fraction) = match mantissa.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (mantissa, ""),
        };
        let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
        if !all_digits(whole) || (mantissa.contains('.') && !all_digits(fraction)) {
            return Err(AmountError::NotANumber);
        }
        let exponent = match exponent_text {
            None => 0,
            Some(exponent_text) => {
                let (sign, digits) = match exponent_text.as_bytes().first() {
                    Some(b'-') => (-1, &exponent_text[1..]),
                    Some(b'+') => (1, &exponent_text[1..]),
                    _ => (1, exponent_text),
                };
                if !all_digits(digits) {
                    return Err(AmountError::NotANumber);
                }
                let magnitude = digits.bytes().fold(0_i64, |magnitude, digit| (magnitude * 10 + i64::from(digit - b'0')).min(EXPONENT_MAGNITUDE_MAX));
                sign * magnitude
            }
        };
        let digits = if fraction.is_empty() { std::borrow::Cow::Borrowed(whole) } else { std::borrow::Cow::Owned(format!("{whole}{fraction}")) };
        Ok(DecimalText { negative, digits, fraction_digits: fraction.len() as i64, exponent })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;

    fn nanos(value: i64) -> Money {
        Money::from_nanos(value)
    }

    #[test]
    fn per_token_prices_become_exact_per_million_prices() {
        let cases = [
            ("0.0000025", 2_500_000_000),
            ("2.5e-06", 2_500_000_000),
            ("2.5E-6", 2_500_000_000),
            ("2.5e-6", 2_500_000_000),
            ("25e-7", 2_500_000_000),
            ("0.00000000025e4", 2_500_000_000),
            ("1e-05", 10_000_000_000),
            ("0.00001", 10_000_000_000),
            ("1.25e-06", 1_250_000_000),
            ("5.46875e-07", 546_875_000),
            ("3.3e-07", 330_000_000),
            ("1.9e-08", 19_000_000),
            ("2e-08", 20_000_000),
            ("0.0000000375", 37_500_000),
            ("1e-15", 1),
            ("0.000000000000001", 1),
            ("1.000000000000000e-15", 1),
            ("0", 0),
            ("0.0", 0),
            ("-0", 0),
            ("0e-30", 0),
            ("0.000000000000000000000000000000", 0),
            ("0.000000000000000000000000000001e30", 1_000_000_000_000_000),
            ("000.0000025", 2_500_000_000),
            ("1", 1_000_000_000_000_000),
            ("1e+0", 1_000_000_000_000_000),
            ("9.223372036854775807e3", i64::MAX),
        ];
        for (text, expected) in cases {
            assert_eq!(per_token_to_per_mtok(text), Ok(nanos(expected)), "{text}");
        }
    }

    #[test]
    fn per_request_fees_become_exact_nanos() {
        assert_eq!(per_request_to_nanos("0"), Ok(Money::ZERO));
        assert_eq!(per_request_to_nanos("0.005"), Ok(nanos(5_000_000)));
        assert_eq!(per_request_to_nanos("5e-3"), Ok(nanos(5_000_000)));
        assert_eq!(per_request_to_nanos("0.000000001"), Ok(nanos(1)));
        assert_eq!(per_request_to_nanos("0.0000000001"), Err(AmountError::TooPrecise));
        assert_eq!(per_request_to_nanos("9223372036.854775807"), Ok(nanos(i64::MAX)));
        assert_eq!(per_request_to_nanos("9223372036.854775808"), Err(AmountError::TooLarge));
    }

    #[test]
    fn what_is_not_an_exact_price_is_refused() {
        let cases = [
            ("-1", AmountError::Negative),
            ("-0.0000025", AmountError::Negative),
            ("-2.5e-06", AmountError::Negative),
            ("1e-16", AmountError::TooPrecise),
            ("0.0000000000000001", AmountError::TooPrecise),
            ("1.4999999999999999e-07", AmountError::TooPrecise),
            ("3.0000000000000004e-06", AmountError::TooPrecise),
            ("1e-99999999999999999999", AmountError::TooPrecise),
            ("9.223372036854775808e3", AmountError::TooLarge),
            ("1e4", AmountError::TooLarge),
            ("1e99999999999999999999", AmountError::TooLarge),
            ("", AmountError::NotANumber),
            ("abc", AmountError::NotANumber),
            ("NaN", AmountError::NotANumber),
            ("inf", AmountError::NotANumber),
            ("1.", AmountError::NotANumber),
            (".5", AmountError::NotANumber),
            ("1.2.3", AmountError::NotANumber),
            ("1e", AmountError::NotANumber),
            ("1e-", AmountError::NotANumber),
            ("1e5.5", AmountError::NotANumber),
            ("+1", AmountError::NotANumber),
            ("--1", AmountError::NotANumber),
            (" 1", AmountError::NotANumber),
            ("1 ", AmountError::NotANumber),
            ("1,5", AmountError::NotANumber),
            ("0x10", AmountError::NotANumber),
            ("١", AmountError::NotANumber),
        ];
        for (text, error) in cases {
            assert_eq!(per_token_to_per_mtok(text), Err(error), "{text:?}");
        }
        let long = format!("0.{}", "0".repeat(100));
        assert_eq!(per_token_to_per_mtok(&long), Err(AmountError::NotANumber), "over the length cap");
    }

    const OPENROUTER: &str = r#"{"data": [
        {"id": "openai/gpt-4o", "name": "OpenAI: GPT-4o", "context_length": 128000,
         "pricing": {"prompt": "0.0000025", "completion": "0.00001", "request": "0", "image": "0.003613",
                     "web_search": "0", "internal_reasoning": "0", "input_cache_read": "0.00000125", "discount": 0}},
        {"id": "anthropic/claude-sonnet-4", "pricing": {"prompt": "0.000003", "completion": "0.000015",
                     "input_cache_read": "0.0000003", "input_cache_write": "0.00000375", "request": "0.001"}},
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        {"id": "vendor/precise", "pricing": {"prompt": "0.0000000000000001", "completion": "0"}},
        {"id": "vendor/no-completion", "pricing": {"prompt": "0.000001"}},
        {"id": "vendor/no-pricing"}
    ]}"#;

    #[test]
    fn openrouter_lists_are_read_exactly() {
        assert_eq!(PriceListFormat::detect(OPENROUTER), PriceListFormat::OpenRouter);
        let list = PriceList::parse(OPENROUTER, PriceListFormat::OpenRouter).unwrap();
        let outcomes: Vec<(&str, &EntryOutcome)> = list.entries.iter().map(|entry| (entry.id.as_str(), &entry.outcome)).collect();
        assert_eq!(outcomes.len(), 6);
        assert_eq!(
            outcomes[0],
            ("openai/gpt-4o", &EntryOutcome::Priced(Price { input_per_mtok: nanos(2_500_000_000), output_per_mtok: nanos(10_000_000_000), cached_input_per_mtok: Some(nanos(1_250_000_000)), cache_write_per_mtok: None, per_request: Money::ZERO }))
        );
        assert_eq!(
            outcomes[1],
            ("anthropic/claude-sonnet-4", &EntryOutcome::Priced(Price { input_per_mtok: nanos(3_000_000_000), output_per_mtok: nanos(15_000_000_000), cached_input_per_mtok: Some(nanos(300_000_000)), cache_write_per_mtok: Some(nanos(3_750_000_000)), per_request: nanos(1_000_000) }))
        );
        let rejected = RejectedValue { model: "openrouter/auto".into(), field: "prompt", text: "-1".into(), reason: AmountError::Negative };
        assert_eq!(outcomes[2], ("openrouter/auto", &EntryOutcome::Rejected(rejected.clone())));
        assert_eq!(rejected.to_string(), "openrouter/auto: prompt = -1 is negative; a price must be zero or more");
        let EntryOutcome::Rejected(precise) = outcomes[3].1 else { panic!("{:?}", outcomes[3]) };
        assert_eq!((precise.field, precise.reason.clone()), ("prompt", AmountError::TooPrecise));
        assert!(precise.to_string().starts_with("vendor/precise: prompt = 0.0000000000000001 is more precise than one nano-unit"), "{precise}");
        assert_eq!(outcomes[4].1, &EntryOutcome::Skipped(SkipReason::MissingPrice("completion")));
        assert_eq!(outcomes[5].1, &EntryOutcome::Skipped(SkipReason::MissingPrice("pricing")));
    }

    const LITELLM: &str = r#"{
        "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "litellm_provider": "one of https://docs.litellm.ai/docs/providers", "mode": "one of: chat, embedding, completion, image_generation"},
        "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai", "mode": "chat", "max_tokens": 16384},
        "claude-sonnet-4-20250514": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05, "cache_creation_input_token_cost": 3.75e-06, "cache_read_input_token_cost": 3e-07, "input_cost_per_token_above_200k_tokens": 6e-06, "litellm_provider": "anthropic", "mode": "chat"},
        "text-embedding-3-small": {"input_cost_per_token": 2e-08, "output_cost_per_token": 0.0, "litellm_provider": "openai", "mode": "embedding"},
        "embed-no-output": {"input_cost_per_token": 1e-07, "mode": "embedding"},
        "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation", "output_cost_per_image": 0.04},
        "whisper-1": {"input_cost_per_second": 0.0001, "mode": "audio_transcription"},
        "chat-no-output": {"input_cost_per_token": 1e-06, "mode": "chat"},
        "bad-string": {"input_cost_per_token": "cheap", "output_cost_per_token": 1e-06},
        "bad-type": {"input_cost_per_token": true, "output_cost_per_token": 1e-06},
        "not-an-object": 3
    }"#;

    #[test]
    fn litellm_maps_are_read_exactly() {
        assert_eq!(PriceListFormat::detect(LITELLM), PriceListFormat::LiteLlm);
        let list = PriceList::parse(LITELLM, PriceListFormat::LiteLlm).unwrap();
        let outcome = |id: &str| list.entries.iter().find(|entry| entry.id == id).map(|entry| entry.outcome.clone()).unwrap();
        assert_eq!(outcome("sample_spec"), EntryOutcome::Skipped(SkipReason::SampleSpec));
        assert_eq!(
            outcome("gpt-4o"),
            EntryOutcome::Priced(Price { input_per_mtok: nanos(2_500_000_000), output_per_mtok: nanos(10_000_000_000), cached_input_per_mtok: Some(nanos(1_250_000_000)), cache_write_per_mtok: None, per_request: Money::ZERO })
        );
        assert_eq!(
            outcome("claude-sonnet-4-20250514"),
            EntryOutcome::Priced(Price { input_per_mtok: nanos(3_000_000_000), output_per_mtok: nanos(15_000_000_000), cached_input_per_mtok: Some(nanos(300_000_000)), cache_write_per_mtok: Some(nanos(3_750_000_000)), per_request: Money::ZERO })
        );
        assert_eq!(
            outcome("text-embedding-3-small"),
            EntryOutcome::Priced(Price { input_per_mtok: nanos(20_000_000), output_per_mtok: Money::ZERO, cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO })
        );
        assert!(matches!(outcome("embed-no-output"), EntryOutcome::Priced(Price { output_per_mtok: Money::ZERO, .. })));
        assert_eq!(outcome("dall-e-3"), EntryOutcome::Skipped(SkipReason::UnsupportedMode("image_generation".into())));
        assert_eq!(outcome("whisper-1"), EntryOutcome::Skipped(SkipReason::UnsupportedMode("audio_transcription".into())));
        assert_eq!(outcome("chat-no-output"), EntryOutcome::Skipped(SkipReason::MissingPrice("output_cost_per_token")));
        assert_eq!(outcome("bad-string"), EntryOutcome::Rejected(RejectedValue { model: "bad-string".into(), field: "input_cost_per_token", text: "cheap".into(), reason: AmountError::NotANumber }));
        assert_eq!(outcome("bad-type"), EntryOutcome::Rejected(RejectedValue { model: "bad-type".into(), field: "input_cost_per_token", text: "true".into(), reason: AmountError::NotANumber }));
        assert!(matches!(outcome("not-an-object"), EntryOutcome::Skipped(SkipReason::Unreadable(_))));
    }

    #[test]
    fn lists_of_the_wrong_shape_are_refused_whole() {
        assert!(matches!(PriceList::parse("not json", PriceListFormat::LiteLlm), Err(PriceListError::Shape { .. })));
        assert!(matches!(PriceList::parse("[1, 2]", PriceListFormat::LiteLlm), Err(PriceListError::Shape { .. })));
        assert!(matches!(PriceList::parse(LITELLM, PriceListFormat::OpenRouter), Err(PriceListError::Shape { .. })));
        assert!(matches!(PriceList::parse(r#"{"data": [{"pricing": {}}]}"#, PriceListFormat::OpenRouter), Err(PriceListError::Shape { .. })));
        assert_eq!(PriceListFormat::detect(r#"{"data": {"input_cost_per_token": 1e-06}}"#), PriceListFormat::LiteLlm);
        assert_eq!(PriceListFormat::detect("garbage"), PriceListFormat::LiteLlm);
        let huge = " ".repeat(PRICE_LIST_BYTES_MAX + 1);
        assert_eq!(PriceList::parse(&huge, PriceListFormat::LiteLlm), Err(PriceListError::TooLarge { bytes: PRICE_LIST_BYTES_MAX + 1 }));
    }

    #[test]
    fn names_match_with_or_without_a_vendor_prefix() {
        let priced = |input: i64| EntryOutcome::Priced(Price { input_per_mtok: nanos(input), output_per_mtok: nanos(1), cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO });
        let entry = |id: &str, input: i64| Entry { id: id.into(), outcome: priced(input) };
        let list = PriceList {
            format: PriceListFormat::LiteLlm,
            entries: vec![entry("gpt-4o", 1), entry("azure/gpt-4o", 2), entry("openai/gpt-4o-mini", 3), entry("openrouter/openai/o3", 4), entry("a/twin", 5), entry("b/twin", 5), entry("a/split", 6), entry("b/split", 7)],
        };
        let found = |name: &str| match list.find(name) {
            Lookup::Found(entry) => Some(entry.id.clone()),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(found("gpt-4o"), Some("gpt-4o".into()), "an exact id wins over a prefixed one");
        assert_eq!(found("azure/gpt-4o"), Some("azure/gpt-4o".into()));
        assert_eq!(found("openai/gpt-4o"), Some("gpt-4o".into()), "the route's vendor prefix dropped");
        assert_eq!(found("gpt-4o-mini"), Some("openai/gpt-4o-mini".into()), "the list's vendor prefix dropped");
        assert_eq!(found("openai/o3"), Some("openrouter/openai/o3".into()));
        assert_eq!(found("twin"), Some("a/twin".into()), "entries that agree are one match");
        assert_eq!(list.find("split"), Lookup::Ambiguous(vec!["a/split", "b/split"]));
        assert_eq!(list.find("o3"), Lookup::NotFound, "only one vendor segment is dropped");
        assert_eq!(list.find("claude"), Lookup::NotFound);
        assert_eq!(list.find("x/"), Lookup::NotFound);
    }

    proptest! {
        #[test]
        fn conversion_agrees_with_independent_arithmetic(units in 0u64..=9_223_372, fraction in 0u64..1_000_000_000_000_000, exponent_shift in -3i32..=3) {
            // Per-token value = units.fraction(15 digits); nano-units per Mtok = that × 10¹⁵.
            let expected = i128::from(units) * 1_000_000_000_000_000 + i128::from(fraction);
            let plain = format!("{units}.{fraction:015}");
            prop_assert_eq!(per_token_to_per_mtok(&plain).map(|money| i128::from(money.nanos())), if expected <= i128::from(i64::MAX) { Ok(expected) } else { Err(AmountError::TooLarge) });
            // The same value written with a shifted point and an exponent that undoes the shift.
            let digits = format!("{units}{fraction:015}");
            let point = (digits.len() as i32 - 15 + exponent_shift).clamp(1, digits.len() as i32 - 1) as usize;
            let written = format!("{}.{}e{}", &digits[..point], &digits[point..], digits.len() as i32 - 15 - point as i32);
            prop_assert_eq!(per_token_to_per_mtok(&written), per_token_to_per_mtok(&plain), "{}", written);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "[-+0-9.eE ]{0,40}") {
            let _ = per_token_to_per_mtok(&text);
            let _ = per_request_to_nanos(&text);
        }
    }
}
