//! The billing domain, pure: no I/O, no clocks, no floats.
//!
//! - [`money`]: `Money`, exact nano-units with strict decimal parsing and checked arithmetic.
//! - [`price`]: prices per million tokens of each kind.
//! - [`usage`]: token counts normalised across providers, and where they came from.
//! - [`cost`]: the one cost function (exact, rounded up once).
//! - [`estimate`]: the hold placed before forwarding.
//! - [`tokens`]: tiktoken counting for estimates and the fallback when usage is missing.

pub mod cost;
pub mod estimate;
pub mod money;
pub mod price;
pub mod tokens;
pub mod usage;

pub use cost::{CostBreakdown, CostError, cost};
pub use estimate::hold_estimate;
pub use money::{Money, MoneyError};
pub use price::{Price, PriceError};
pub use usage::{Usage, UsageSource};
