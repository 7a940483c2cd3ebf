//! Prices per million tokens. A price row belongs to one (provider, model, customer_type); the
//! ledger keeps their history.

use serde::{Deserialize, Serialize};

use crate::money::Money;

/// What one million tokens of each kind cost, plus a flat fee per request. Per million, because
/// that is how providers publish prices, so operators can copy them without conversion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Price {
    /// Per million uncached input tokens.
    pub input_per_mtok: Money,
    /// Per million output tokens (reasoning included).
    pub output_per_mtok: Money,
    /// Per million cached input tokens; `None` charges them at `input_per_mtok` (never a
    /// discount the operator did not set).
    #[serde(default)]
    pub cached_input_per_mtok: Option<Money>,
    /// Per million tokens written to the provider's cache; `None` charges them at
    /// `input_per_mtok`.
    #[serde(default)]
    pub cache_write_per_mtok: Option<Money>,
    /// A flat fee per request, on top of the token cost; zero unless set.
    #[serde(default)]
    pub per_request: Money,
}

/// A price that cannot be charged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// A component below zero: charging it would credit the customer for using the model.
    #[error("price component {component} must not be negative")]
    Negative {
        /// The field name, as in the price's JSON.
        component: &'static str,
    },
}

impl Price {
    /// The cached-input price in effect: the explicit one, or the input price.
    pub fn cached_input_rate(&self) -> Money {
        self.cached_input_per_mtok.unwrap_or(self.input_per_mtok)
    }

    /// The cache-write price in effect: the explicit one, or the input price.
    pub fn cache_write_rate(&self) -> Money {
        self.cache_write_per_mtok.unwrap_or(self.input_per_mtok)
    }

    /// Checks that every component is >= 0, so a cost is never a credit. `cost` calls it, and the
    /// store calls it before saving a price.
    ///
    /// # Errors
    /// `Negative` naming the first negative component, in field order.
    pub fn validate(&self) -> Result<(), PriceError> {
        let components = [
            ("input_per_mtok", Some(self.input_per_mtok)),
            ("output_per_mtok", Some(self.output_per_mtok)),
            ("cached_input_per_mtok", self.cached_input_per_mtok),
            ("cache_write_per_mtok", self.cache_write_per_mtok),
            ("per_request", Some(self.per_request)),
        ];
        match components.into_iter().find(|(_, value)| value.is_some_and(Money::is_negative)) {
            Some((component, _)) => Err(PriceError::Negative { component }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn nanos(value: i64) -> Money {
        Money::from_nanos(value)
    }

    fn valid() -> Price {
        Price {
            input_per_mtok: nanos(2_500_000_000),
            output_per_mtok: nanos(10_000_000_000),
            cached_input_per_mtok: Some(nanos(1_250_000_000)),
            cache_write_per_mtok: None,
            per_request: Money::ZERO,
        }
    }

    #[test]
    fn validate_accepts_zero_and_positive_and_names_the_negative_component() {
        assert_eq!(valid().validate(), Ok(()));
        let free = Price { input_per_mtok: Money::ZERO, output_per_mtok: Money::ZERO, cached_input_per_mtok: Some(Money::ZERO), cache_write_per_mtok: Some(Money::ZERO), per_request: Money::ZERO };
        assert_eq!(free.validate(), Ok(()));
        type Breaker = fn(&mut Price);
        let cases: [(Breaker, &str); 5] = [
            (|price| price.input_per_mtok = nanos(-1), "input_per_mtok"),
            (|price| price.output_per_mtok = nanos(-1), "output_per_mtok"),
            (|price| price.cached_input_per_mtok = Some(nanos(i64::MIN)), "cached_input_per_mtok"),
            (|price| price.cache_write_per_mtok = Some(nanos(-1)), "cache_write_per_mtok"),
            (|price| price.per_request = nanos(-1), "per_request"),
        ];
        for (break_it, component) in cases {
            let mut price = valid();
            break_it(&mut price);
            assert_eq!(price.validate(), Err(PriceError::Negative { component }));
        }
        assert_eq!(
            PriceError::Negative { component: "per_request" }.to_string(),
            "price component per_request must not be negative"
        );
    }

    #[test]
    fn unset_cache_prices_fall_back_to_input() {
        let price = valid();
        assert_eq!(price.cached_input_rate(), nanos(1_250_000_000));
        assert_eq!(price.cache_write_rate(), nanos(2_500_000_000));
    }

    #[test]
    fn serde_defaults_optional_components() {
        let price: Price = serde_json::from_str(r#"{"input_per_mtok": "2.5", "output_per_mtok": "10"}"#).unwrap();
        assert_eq!(
            price,
            Price { input_per_mtok: nanos(2_500_000_000), output_per_mtok: nanos(10_000_000_000), cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO }
        );
        let round_trip: Price = serde_json::from_str(&serde_json::to_string(&valid()).unwrap()).unwrap();
        assert_eq!(round_trip, valid());
        let json = serde_json::to_value(valid()).unwrap();
        assert_eq!(json["input_per_mtok"], "2.5");
        assert_eq!(json["per_request"], "0");
        assert!(serde_json::from_str::<Price>(r#"{"input_per_mtok": 2.5, "output_per_mtok": "10"}"#).is_err());
        assert!(serde_json::from_str::<Price>(r#"{"output_per_mtok": "10"}"#).is_err());
    }
}
