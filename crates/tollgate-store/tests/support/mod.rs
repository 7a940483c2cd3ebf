//! What the ledger test binaries share: a fresh PostgreSQL database and a usage event.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use tollgate_core::{Money, Usage, UsageSource};
use tollgate_store::Ledger;
use tollgate_store::model::{AccountKind, NewAccount, RequestStatus, UsageEvent};

/// The URL of a fresh database on the test server (`TOLLGATE_TEST_POSTGRES_URL`), named with
/// `prefix`.
pub async fn fresh_postgres_url(prefix: &str) -> String {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL").expect("TOLLGATE_TEST_POSTGRES_URL is not set: run scripts/test, which starts PostgreSQL");
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// A usage event of key `key` for the mock's demo model: 10 input and 5 output tokens.
pub fn event(account: &str, request: &str, cost: i64, status: RequestStatus) -> UsageEvent {
    UsageEvent {
        request_id: request.into(),
        account_id: account.into(),
        api_key_id: "key".into(),
        provider: "mock".into(),
        model: "demo-gpt".into(),
        customer_type: "standard".into(),
        price_id: None,
        usage: Usage { input_tokens: 10, output_tokens: 5, ..Usage::default() },
        usage_source: UsageSource::Upstream,
        cost: Money::from_nanos(cost),
        status,
        latency_ms: 3,
        created_at_ms: 1_769_903_970_000,
        hot_balance_after: Money::ZERO,
        stored_response: None,
        request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
    }
}

/// A user account of the standard tier, no credit, no quotas.
pub fn new_account(id: &str) -> NewAccount {
    NewAccount {
        id: id.into(),
        kind: AccountKind::User,
        name: "n".into(),
        customer_type: "standard".into(),
        credit_limit: Money::ZERO,
        daily_request_quota: None,
        monthly_request_quota: None,
        low_balance_threshold: None,
    }
}

/// [`new_account`] created, with a confirmed top-up of `nanos`.
pub async fn funded_account(ledger: &dyn Ledger, id: &str, nanos: i64) {
    ledger.create_account(new_account(id)).await.unwrap();
    let topup = ledger.create_topup(id, Money::from_nanos(nanos), &format!("deposit-{id}")).await.unwrap();
    ledger.confirm_topup(&topup.id).await.unwrap();
}
