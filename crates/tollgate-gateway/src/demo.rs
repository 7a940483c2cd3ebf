//! `serve --demo`: a mock upstream in-process, routes for `demo-gpt` (OpenAI protocol),
//! `demo-claude` (Anthropic protocol) and `demo-embedding` (OpenAI embeddings) to it, prices, a demo account with credit and a demo key.
//! Idempotent: running the demo again on the same database adds nothing twice.

use tollgate_core::{Money, Price};
use tollgate_store::model::{AccountKind, NewAccount, NewApiKey, NewPrice};

use crate::config::{GatewayConfig, ModelRoute, ProviderConfig, ProviderKind};
use crate::error::ApiError;
use crate::keys::{generate_key, key_from_secret};
use crate::state::AppState;

pub const DEMO_ACCOUNT_ID: &str = "demo";
pub const DEMO_TIER: &str = "standard";
pub const DEMO_PROVIDER: &str = "mock";
/// The demo account's starting credit, in currency units.
pub const DEMO_CREDIT_NANOS: i64 = 10 * Money::NANOS_PER_UNIT;

/// Adds the mock provider and the demo routes to a configuration.
pub fn configure(config: &mut GatewayConfig, mock_base_url: &str) {
    config.providers.retain(|provider| provider.name != DEMO_PROVIDER);
    config.providers.push(ProviderConfig {
        name: DEMO_PROVIDER.into(),
        kind: ProviderKind::Mock,
        base_url: mock_base_url.to_string(),
        api_key_env: None,
        output_cap_field: None,
        client_file_references: Default::default(),
        client_urls: Default::default(),
    });
    for model in ["demo-gpt", "demo-claude", "demo-embedding"] {
        config.models.retain(|route| route.model != model);
        config.models.push(ModelRoute { model: model.into(), provider: DEMO_PROVIDER.into(), upstream_model: None, ..ModelRoute::default() });
    }
}

/// Demo prices: per million tokens, input 2.50 and output 10.00 (cached input 1.25, cache write
/// 3.125: Anthropic's 1.25 × input).
fn demo_price() -> Price {
    Price {
        input_per_mtok: Money::from_nanos(2_500_000_000),
        output_per_mtok: Money::from_nanos(10_000_000_000),
        cached_input_per_mtok: Some(Money::from_nanos(1_250_000_000)),
        cache_write_per_mtok: Some(Money::from_nanos(3_125_000_000)),
        per_request: Money::ZERO,
    }
}

/// Creates what is missing of the demo data and returns the demo key's secret (a new key each
/// run unless `fixed_key` is given).
///
/// # Errors
/// A store failure.
pub async fn seed(state: &AppState, fixed_key: Option<String>) -> Result<String, ApiError> {
    let ledger = &state.ledger;
    if ledger.account(DEMO_ACCOUNT_ID).await?.is_none() {
        ledger
            .create_account(NewAccount {
                id: DEMO_ACCOUNT_ID.into(),
                kind: AccountKind::User,
                name: "Demo user".into(),
                customer_type: DEMO_TIER.into(),
                credit_limit: Money::ZERO,
                daily_request_quota: None,
                monthly_request_quota: None,
                low_balance_threshold: None,
            })
            .await?;
    }
    let prices = state.prices.all();
    let missing: Vec<NewPrice> = ["demo-gpt", "demo-claude", "demo-embedding"]
        .into_iter()
        .filter(|model| !prices.iter().any(|row| row.provider == DEMO_PROVIDER && row.model == *model && row.customer_type == DEMO_TIER))
        .map(|model| NewPrice { provider: DEMO_PROVIDER.into(), model: model.into(), customer_type: DEMO_TIER.into(), price: demo_price() })
        .collect();
    if !missing.is_empty() {
        ledger.put_prices(missing).await?;
        state.reload_prices().await?;
    }
    let topup = ledger.create_topup(DEMO_ACCOUNT_ID, Money::from_nanos(DEMO_CREDIT_NANOS), "demo-initial-credit").await?;
    ledger.confirm_topup(&topup.id).await?;
    crate::charge::apply_pending_funds(state, DEMO_ACCOUNT_ID).await?;
    let key = match fixed_key {
        Some(secret) => key_from_secret(secret),
        None => generate_key(),
    };
    if ledger.key_by_hash(&key.hash).await?.is_none() {
        ledger
            .create_key(NewApiKey {
                id: format!("key_{}", uuid::Uuid::now_v7().simple()),
                account_id: DEMO_ACCOUNT_ID.into(),
                name: "demo".into(),
                key_hash: key.hash.clone(),
                prefix: key.display_prefix.clone(),
                budget_daily: None,
                budget_monthly: None,
                budget_total: None,
                rpm: None,
                tpm: None,
                allowed_models: None,
                session_lock: None,
                expires_at: None,
            })
            .await?;
    }
    state.contexts.invalidate_all();
    Ok(key.secret)
}
