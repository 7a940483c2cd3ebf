//! The billing domain of Tollgate, pure: no I/O, no clocks, no floats near money.
//!
//! Module map:
//! - [`money`]: [`Money`], exact signed nano-units (10⁻⁹ of the currency) with strict decimal
//!   parsing, canonical formatting, string-only serde and checked arithmetic; [`MoneyError`].
//! - [`price`]: [`Price`], what a million tokens of each kind cost plus a flat fee;
//!   [`PriceError`].
//! - [`usage`]: [`Usage`], token counts normalised across providers, and [`UsageSource`], where
//!   they came from.
//! - [`cost`](mod@cost): [`cost()`], the one cost function (exact, rounded up once), used by
//!   settle, the hold and the quote endpoint; [`CostBreakdown`], [`CostError`].
//! - [`estimate`]: [`hold_estimate`], the amount reserved before forwarding a request.
//! - [`price_import`]: OpenRouter's and LiteLLM's published price lists read exactly (per-token
//!   decimal text to nano-units per million tokens, never through a float); [`PriceList`].
//! - [`media`]: what input the tokenizer cannot read (images, audio, video, documents) is held
//!   at, per protocol, each ceiling with its source; [`PromptEstimate`].
//! - [`tokens`]: tiktoken counting for hold estimates and for the fallback when an upstream
//!   reports no usage.
//!
//! Errors are one `thiserror` enum per module, re-exported here.

pub mod cost;
pub mod estimate;
pub mod media;
pub mod money;
pub mod price;
pub mod price_import;
pub mod tokens;
pub mod usage;

pub use cost::{CostBreakdown, CostError, cost};
pub use estimate::hold_estimate;
pub use media::{MediaBounds, MediaReference, PromptEstimate};
pub use money::{Money, MoneyError};
pub use price::{Price, PriceError};
pub use price_import::{PriceList, PriceListFormat};
pub use usage::{CheckedUsage, Usage, UsageAnomaly, UsageSource, check_reported};
