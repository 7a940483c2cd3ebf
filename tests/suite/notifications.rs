//! Two gateways on one PostgreSQL ledger: what an operator changes through one reaches the
//! other through LISTEN/NOTIFY, at once.

use serde_json::json;

use crate::common::*;

/// Polls until the condition holds: a notification is a network hop, not instantaneous, and a
/// loaded machine may take more than a second over one. The bound stays far below what could
/// make the condition hold without the notification (the second gateway's billing contexts
/// live 300 s; its price table and hot balance change only when told).
async fn reaches_the_second_gateway<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(&format!("{what} reaching the second gateway"), condition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_gateway_apply_on_the_other() {
    let database_url = fresh_postgres_database().await;
    let first = TestGateway::start_on(TempDir::new(), database_url.clone(), |_| {}).await;
    let second = TestGateway::start_on(TempDir::new(), database_url, |_| {}).await;
    let account = first.account("0", json!({})).await;
    let created = first.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/keys"), Some(json!({"name": "k"}))).await;
    let key = created["key"].as_str().unwrap().to_string();
    assert_eq!(second.balance_of(&key).await, Money::ZERO, "the second gateway has loaded the account");

    // A top-up confirmed on the first gateway is spendable on the second.
    first.top_up(&account, "1", "notify-credit").await;
    reaches_the_second_gateway("the top-up", || async { second.balance_of(&key).await == Money::from_nanos(Money::NANOS_PER_UNIT) }).await;
    let spent = second.chat(&key, chat_body("spend on the second"), None).await;
    assert_eq!(spent.status(), 200);
    let cost = header_money(&spent, "x-tollgate-cost");

    // A price change on the first applies to the second's next request.
    first
        .admin_ok(reqwest::Method::PUT, "/internal/prices", Some(json!([{"provider": "mock", "model": "demo-gpt", "customer_type": TIER, "input_per_mtok": "5", "output_per_mtok": "20"}])))
        .await;
    let doubled = Money::from_nanos(cost.nanos() * 2);
    reaches_the_second_gateway("the price change", || async { header_money(&second.chat(&key, chat_body("spend on the second"), None).await, "x-tollgate-cost") == doubled }).await;

    // A plan switch, then a key revocation, on the first: refused on the second.
    first.admin_ok(reqwest::Method::PATCH, &format!("/internal/accounts/{account}"), Some(json!({"customer_type": "unpriced-tier"}))).await;
    reaches_the_second_gateway("the plan switch", || async { second.chat(&key, chat_body("x"), None).await.status() == 400 }).await;
    let key_id = created["id"].as_str().unwrap();
    first.admin_ok(reqwest::Method::DELETE, &format!("/internal/keys/{key_id}"), None).await;
    reaches_the_second_gateway("the revocation", || async { second.chat(&key, chat_body("x"), None).await.status() == 401 }).await;
    first.stop().await;
    second.stop().await;
}

/// Notifications are not durable: a gateway whose LISTEN connection dropped catches up from the
/// ledger when it reconnects, so a top-up made meanwhile still reaches its hot balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_lost_its_listen_connection_catches_up() {
    let database_url = fresh_postgres_database().await;
    let first = TestGateway::start_on(TempDir::new(), database_url.clone(), |_| {}).await;
    let second = TestGateway::start_on(TempDir::new(), database_url.clone(), |_| {}).await;
    let account = first.account("0", json!({})).await;
    let key = first.key(&account, json!({})).await;
    assert_eq!(second.balance_of(&key).await, Money::ZERO);
    // Cut every LISTEN connection of this database, then top up at once, while they reconnect.
    let admin = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&database_url).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'")
        .fetch_all(&admin)
        .await
        .unwrap();
    assert!(cut.len() >= 2, "both gateways were listening ({} connections cut)", cut.len());
    first.top_up(&account, "2", "during-outage").await;
    reaches_the_second_gateway("the top-up made while disconnected", || async { second.balance_of(&key).await == Money::from_nanos(2 * Money::NANOS_PER_UNIT) }).await;
    admin.close().await;
    first.stop().await;
    second.stop().await;
}
