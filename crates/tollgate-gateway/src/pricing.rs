//! Pricing completeness and price import, between the configuration's routes and the ledger's
//! price rows:
//!
//! - [`missing_prices`]: the routed models without a price for a tier in use — what
//!   `tollgate prices check` prints and what `serve` warns about or refuses to start with
//!   (`pricing_check`). A request for such a model is refused either way (I5); the check finds
//!   the gap before a customer does.
//! - [`plan_import`]: the price rows a published list ([`PriceList`]) gives the routes —
//!   `tollgate prices import`. Rows are named by the route's client-facing model, the name
//!   requests are priced by.
//!
//! A price without a cached-input or cache-write component is complete: those default to the
//! input price by design ([`tollgate_core::Price::cached_input_rate`]).

use std::collections::{BTreeMap, BTreeSet};

use tollgate_core::price_import::{EntryOutcome, Lookup, PriceList, RejectedValue};
use tollgate_store::model::{NewPrice, PriceRow};
use tollgate_store::{Ledger, StoreResult};

use crate::config::{GatewayConfig, ModelRoute};

/// The tier checked even when no account has it yet: the demo's and the documentation's tier,
/// and the one `tollgate prices import` writes unless told otherwise.
pub const DEFAULT_TIER: &str = "standard";

/// Longest model or customer-type name stored, as the operator API allows.
const NAME_CHARS_MAX: usize = 128;

/// A routed model that has no price for a tier in use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MissingPrice {
    /// The client-facing model name (the price row's model).
    pub model: String,
    pub provider: String,
    pub customer_type: String,
}

impl std::fmt::Display for MissingPrice {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{} for customer type {}", self.provider, self.model, self.customer_type)
    }
}

/// The tiers prices are needed for: every account's customer type, and [`DEFAULT_TIER`].
///
/// # Errors
/// The ledger cannot be read.
pub async fn tiers_in_use(ledger: &dyn Ledger) -> StoreResult<BTreeSet<String>> {
    let mut tiers: BTreeSet<String> = ledger.customer_types().await?.into_iter().collect();
    tiers.insert(DEFAULT_TIER.to_string());
    Ok(tiers)
}

/// Every (route, tier) without a price row, routes in configuration order, tiers sorted.
pub fn missing_prices(routes: &[ModelRoute], prices: &[PriceRow], tiers: &BTreeSet<String>) -> Vec<MissingPrice> {
    let priced: BTreeSet<(&str, &str, &str)> = prices.iter().map(|row| (row.provider.as_str(), row.model.as_str(), row.customer_type.as_str())).collect();
    routes
        .iter()
        .flat_map(|route| tiers.iter().map(move |tier| (route, tier)))
        .filter(|(route, tier)| !priced.contains(&(route.provider.as_str(), route.model.as_str(), tier.as_str())))
        .map(|(route, tier)| MissingPrice { model: route.model.clone(), provider: route.provider.clone(), customer_type: tier.clone() })
        .collect()
}

/// What `serve` says when `pricing_check = "refuse"` finds gaps: each of them, and the ways out.
pub fn refusal_message(missing: &[MissingPrice]) -> String {
    let list: Vec<String> = missing.iter().map(|gap| format!("  {gap}")).collect();
    format!(
        "pricing_check = \"refuse\": {} routed model price(s) missing:\n{}\nprice them (`tollgate prices import FILE`, or PUT /internal/prices on a running gateway), remove the routes, or set pricing_check = \"warn\"",
        missing.len(),
        list.join("\n")
    )
}

/// What to import from a list.
#[derive(Clone, Debug)]
pub struct ImportOptions<'a> {
    /// The tier the rows are written for.
    pub customer_type: &'a str,
    /// Only the routes of this provider; with `all`, also the provider every other entry is
    /// stored under.
    pub provider: Option<&'a str>,
    /// Every priced entry of the list, not only the routed models (each under its own id).
    pub all: bool,
}

/// One row to store, and the list entry it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPrice {
    /// The entry's id in the list.
    pub source_id: String,
    pub row: NewPrice,
}

/// A selected route the list does not price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpricedRoute {
    pub model: String,
    pub provider: String,
    /// The name looked up in the list.
    pub upstream_model: String,
    pub reason: String,
}

/// What an import would store, and what it leaves out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportPlan {
    /// Sorted by (provider, model); one row per (provider, model).
    pub rows: Vec<PlannedPrice>,
    /// Rows equal to the current price, left out so the history shows only changes.
    pub unchanged: Vec<PlannedPrice>,
    pub unpriced_routes: Vec<UnpricedRoute>,
    /// With `all`: entries of the list not imported (id, reason).
    pub skipped_entries: Vec<(String, String)>,
}

/// Why an import cannot be planned. Nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("--all needs --provider: the provider name the list's prices are stored under")]
    AllNeedsProvider,
    #[error("provider {provider:?} is not configured (configured: {configured})")]
    UnknownProvider { provider: String, configured: String },
    #[error("the configuration routes no model{for_provider} ([[models]]); add routes, or import every entry with --all --provider NAME")]
    NoRoutes {
        /// " of provider X" when filtered.
        for_provider: String,
    },
    #[error("customer type must be 1 to {NAME_CHARS_MAX} printable characters")]
    InvalidCustomerType,
    #[error("the list's price of {} routed model(s) is invalid, so nothing was stored:\n{}", .0.len(), .0.iter().map(|value| format!("  {value}")).collect::<Vec<_>>().join("\n"))]
    RejectedRoutes(Vec<RejectedValue>),
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= NAME_CHARS_MAX && !name.chars().any(char::is_control)
}

/// The rows a list gives: for each selected route (all, or those of `provider`), the entry its
/// upstream model name finds ([`PriceList::find`]), stored under the route's client-facing name;
/// with `all`, every other priced entry too, under `provider` and its own id (a routed name
/// wins). A routed model whose entry has an invalid value fails the whole import — better no
/// import than a half-priced route; with `all`, other invalid entries are listed and left out.
///
/// # Errors
/// See [`ImportError`].
pub fn plan_import(config: &GatewayConfig, list: &PriceList, options: &ImportOptions<'_>) -> Result<ImportPlan, ImportError> {
    if !is_valid_name(options.customer_type) {
        return Err(ImportError::InvalidCustomerType);
    }
    if let Some(provider) = options.provider
        && !config.providers.iter().any(|configured| configured.name == provider)
    {
        let configured: Vec<&str> = config.providers.iter().map(|configured| configured.name.as_str()).collect();
        return Err(ImportError::UnknownProvider { provider: provider.to_string(), configured: if configured.is_empty() { "none".into() } else { configured.join(", ") } });
    }
    let all_provider = match (options.all, options.provider) {
        (true, None) => return Err(ImportError::AllNeedsProvider),
        (true, Some(provider)) => Some(provider),
        (false, _) => None,
    };
    let routes: Vec<&ModelRoute> = config.models.iter().filter(|route| options.provider.is_none_or(|provider| route.provider == provider)).collect();
    if routes.is_empty() && !options.all {
        return Err(ImportError::NoRoutes { for_provider: options.provider.map(|provider| format!(" of provider {provider}")).unwrap_or_default() });
    }
    let mut plan = ImportPlan::default();
    let mut rows: BTreeMap<(String, String), PlannedPrice> = BTreeMap::new();
    let mut rejected = Vec::new();
    for route in routes {
        let upstream_model = route.upstream_model.as_deref().unwrap_or(&route.model);
        let unpriced = |reason: String| UnpricedRoute { model: route.model.clone(), provider: route.provider.clone(), upstream_model: upstream_model.to_string(), reason };
        match list.find(upstream_model) {
            Lookup::Found(entry) => match &entry.outcome {
                EntryOutcome::Priced(price) => {
                    let row = NewPrice { provider: route.provider.clone(), model: route.model.clone(), customer_type: options.customer_type.to_string(), price: price.clone() };
                    rows.insert((route.provider.clone(), route.model.clone()), PlannedPrice { source_id: entry.id.clone(), row });
                }
                EntryOutcome::Skipped(reason) => plan.unpriced_routes.push(unpriced(format!("{}: {reason}", entry.id))),
                EntryOutcome::Rejected(value) => rejected.push(value.clone()),
            },
            Lookup::Ambiguous(ids) => plan.unpriced_routes.push(unpriced(format!("several entries match with different prices ({}); set upstream_model to the exact id", ids.join(", ")))),
            Lookup::NotFound => plan.unpriced_routes.push(unpriced("not in the list".into())),
        }
    }
    if !rejected.is_empty() {
        return Err(ImportError::RejectedRoutes(rejected));
    }
    if let Some(provider) = all_provider {
        for entry in &list.entries {
            match &entry.outcome {
                EntryOutcome::Priced(_) if !is_valid_name(&entry.id) => {
                    plan.skipped_entries.push((entry.id.clone(), format!("model name is not 1 to {NAME_CHARS_MAX} printable characters")));
                }
                EntryOutcome::Priced(price) => {
                    let row = NewPrice { provider: provider.to_string(), model: entry.id.clone(), customer_type: options.customer_type.to_string(), price: price.clone() };
                    rows.entry((provider.to_string(), entry.id.clone())).or_insert(PlannedPrice { source_id: entry.id.clone(), row });
                }
                EntryOutcome::Skipped(reason) => plan.skipped_entries.push((entry.id.clone(), reason.to_string())),
                EntryOutcome::Rejected(value) => plan.skipped_entries.push((entry.id.clone(), format!("{} = {} {}", value.field, value.text, value.reason))),
            }
        }
    }
    plan.rows = rows.into_values().collect();
    Ok(plan)
}

impl ImportPlan {
    /// Moves the rows equal to the current price of their (provider, model, tier) to
    /// `unchanged`, so importing the same list twice adds no history.
    pub fn set_aside_unchanged(&mut self, current: &[PriceRow]) {
        let current: BTreeMap<(&str, &str, &str), &tollgate_core::Price> =
            current.iter().map(|row| ((row.provider.as_str(), row.model.as_str(), row.customer_type.as_str()), &row.price)).collect();
        let (unchanged, changed) = std::mem::take(&mut self.rows).into_iter().partition(|planned: &PlannedPrice| {
            let row = &planned.row;
            current.get(&(row.provider.as_str(), row.model.as_str(), row.customer_type.as_str())) == Some(&&row.price)
        });
        self.rows = changed;
        self.unchanged = unchanged;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::config::{ProviderConfig, ProviderKind};
    use tollgate_core::price_import::PriceListFormat;
    use tollgate_core::{Money, Price};

    fn price(input: i64) -> Price {
        Price { input_per_mtok: Money::from_nanos(input), output_per_mtok: Money::from_nanos(1), cached_input_per_mtok: None, cache_write_per_mtok: None, per_request: Money::ZERO }
    }

    fn route(model: &str, provider: &str, upstream_model: Option<&str>) -> ModelRoute {
        ModelRoute { model: model.into(), provider: provider.into(), upstream_model: upstream_model.map(Into::into), ..ModelRoute::default() }
    }

    fn row(provider: &str, model: &str, tier: &str) -> PriceRow {
        PriceRow { id: 1, provider: provider.into(), model: model.into(), customer_type: tier.into(), price: price(1), effective_from: time::OffsetDateTime::UNIX_EPOCH }
    }

    fn config() -> GatewayConfig {
        let mut config = GatewayConfig::default();
        for name in ["openai", "openrouter"] {
            config.providers.push(ProviderConfig { name: name.into(), kind: ProviderKind::Openai, base_url: "https://example.com/v1".into(), api_key_env: None, output_cap_field: None, client_file_references: Default::default(), client_urls: Default::default() });
        }
        config.models = vec![route("gpt-4o", "openai", None), route("fast", "openrouter", Some("openai/gpt-4o-mini")), route("missing", "openai", None)];
        config
    }

    const LIST: &str = r#"{
        "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "mode": "chat"},
        "gpt-4o-mini": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07, "mode": "chat"},
        "dall-e-3": {"mode": "image_generation", "output_cost_per_image": 0.04},
        "broken": {"input_cost_per_token": -1, "output_cost_per_token": 0}
    }"#;

    fn list() -> PriceList {
        PriceList::parse(LIST, PriceListFormat::LiteLlm).unwrap()
    }

    #[test]
    fn every_route_needs_a_price_for_every_tier_in_use() {
        let routes = [route("a", "p", None), route("b", "p", Some("upstream-b"))];
        let tiers: BTreeSet<String> = ["premium", "standard"].into_iter().map(String::from).collect();
        let prices = [row("p", "a", "standard"), row("p", "a", "premium"), row("p", "b", "standard"), row("other", "b", "premium"), row("p", "upstream-b", "premium")];
        let missing = missing_prices(&routes, &prices, &tiers);
        assert_eq!(missing, [MissingPrice { model: "b".into(), provider: "p".into(), customer_type: "premium".into() }]);
        assert_eq!(missing[0].to_string(), "p:b for customer type premium");
        assert!(refusal_message(&missing).contains("  p:b for customer type premium\n"));
        assert!(missing_prices(&routes, &prices[..3], &BTreeSet::new()).is_empty());
    }

    #[test]
    fn routed_models_are_imported_under_their_client_names() {
        let plan = plan_import(&config(), &list(), &ImportOptions { customer_type: "standard", provider: None, all: false }).unwrap();
        let rows: Vec<(&str, &str, &str, Money)> = plan.rows.iter().map(|planned| (planned.row.provider.as_str(), planned.row.model.as_str(), planned.source_id.as_str(), planned.row.price.input_per_mtok)).collect();
        assert_eq!(rows, [("openai", "gpt-4o", "gpt-4o", Money::from_nanos(2_500_000_000)), ("openrouter", "fast", "gpt-4o-mini", Money::from_nanos(150_000_000))]);
        assert_eq!(plan.unpriced_routes.iter().map(|route| (route.model.as_str(), route.reason.as_str())).collect::<Vec<_>>(), [("missing", "not in the list")]);
        assert!(plan.skipped_entries.is_empty());
        let only_openrouter = plan_import(&config(), &list(), &ImportOptions { customer_type: "premium", provider: Some("openrouter"), all: false }).unwrap();
        assert_eq!(only_openrouter.rows.len(), 1);
        assert_eq!(only_openrouter.rows[0].row.customer_type, "premium");
    }

    #[test]
    fn all_imports_every_priced_entry_and_lists_the_rest() {
        let plan = plan_import(&config(), &list(), &ImportOptions { customer_type: "standard", provider: Some("openai"), all: true }).unwrap();
        let models: Vec<&str> = plan.rows.iter().map(|planned| planned.row.model.as_str()).collect();
        assert_eq!(models, ["gpt-4o", "gpt-4o-mini"]);
        let skipped: Vec<&str> = plan.skipped_entries.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(skipped, ["broken", "dall-e-3"]);
        assert!(plan.skipped_entries[0].1.contains("input_cost_per_token = -1 is negative"), "{:?}", plan.skipped_entries);
    }

    #[test]
    fn an_invalid_routed_price_or_a_bad_option_stores_nothing() {
        let mut config = config();
        config.models.push(route("broken", "openai", None));
        let error = plan_import(&config, &list(), &ImportOptions { customer_type: "standard", provider: None, all: false }).unwrap_err();
        assert!(matches!(&error, ImportError::RejectedRoutes(values) if values.len() == 1));
        assert!(error.to_string().contains("broken: input_cost_per_token = -1 is negative"), "{error}");
        let options = |provider, all| ImportOptions { customer_type: "standard", provider, all };
        assert_eq!(plan_import(&config, &list(), &options(None, true)), Err(ImportError::AllNeedsProvider));
        assert!(matches!(plan_import(&config, &list(), &options(Some("opnai"), false)), Err(ImportError::UnknownProvider { .. })));
        assert_eq!(plan_import(&config, &list(), &ImportOptions { customer_type: "", provider: None, all: false }), Err(ImportError::InvalidCustomerType));
        config.models.clear();
        assert!(matches!(plan_import(&config, &list(), &options(None, false)), Err(ImportError::NoRoutes { .. })));
    }

    #[test]
    fn unchanged_prices_are_set_aside() {
        let mut plan = plan_import(&config(), &list(), &ImportOptions { customer_type: "standard", provider: None, all: false }).unwrap();
        let current = PriceRow { price: plan.rows[0].row.price.clone(), ..row("openai", "gpt-4o", "standard") };
        plan.set_aside_unchanged(&[current, row("openrouter", "fast", "standard")]);
        assert_eq!(plan.unchanged.iter().map(|planned| planned.row.model.as_str()).collect::<Vec<_>>(), ["gpt-4o"]);
        assert_eq!(plan.rows.iter().map(|planned| planned.row.model.as_str()).collect::<Vec<_>>(), ["fast"]);
    }
}
