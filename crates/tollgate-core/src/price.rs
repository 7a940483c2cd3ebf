//! Prices per million tokens. A price row belongs to one (provider, model, customer_type); the
//! ledger keeps their history.

use serde::{Deserialize, Serialize};

use crate::money::Money;

/// What one million tokens of each kind cost, plus a flat fee per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// Per million uncached input tokens.
    pub input_per_mtok: Money,
    /// Per million output tokens (reasoning included).
    pub output_per_mtok: Money,
    /// Per million cached input tokens; `None` charges them at `input_per_mtok` (never less
    /// than the operator set, never a silent discount).
    #[serde(default)]
    pub cached_input_per_mtok: Option<Money>,
    /// Per million tokens written to the provider's cache; `None` charges them as input.
    #[serde(default)]
    pub cache_write_per_mtok: Option<Money>,
    #[serde(default)]
    pub per_request: Money,
}

/// A price that cannot be charged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("{0} must not be negative")]
    Negative(&'static str),
}

impl Price {
    /// The cached-input price in effect.
    pub fn cached_input_rate(&self) -> Money {
        self.cached_input_per_mtok.unwrap_or(self.input_per_mtok)
    }

    /// The cache-write price in effect.
    pub fn cache_write_rate(&self) -> Money {
        self.cache_write_per_mtok.unwrap_or(self.input_per_mtok)
    }

    /// # Errors
    /// `Negative` naming the first negative component.
    pub fn validate(&self) -> Result<(), PriceError> {
        let components = [
            ("input_per_mtok", Some(self.input_per_mtok)),
            ("output_per_mtok", Some(self.output_per_mtok)),
            ("cached_input_per_mtok", self.cached_input_per_mtok),
            ("cache_write_per_mtok", self.cache_write_per_mtok),
            ("per_request", Some(self.per_request)),
        ];
        match components.into_iter().find(|(_, value)| value.is_some_and(Money::is_negative)) {
            Some((name, _)) => Err(PriceError::Negative(name)),
            None => Ok(()),
        }
    }
}
