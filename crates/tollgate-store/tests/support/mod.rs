//! What the ledger test binaries share: a fresh PostgreSQL database and a usage event.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use tollgate_core::{Money, Usage, UsageSource};
use tollgate_store::model::{RequestStatus, UsageEvent};

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
    }
}
