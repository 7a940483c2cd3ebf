//! Reconciliation: drift injected by hand — in account_balance (SQLite or PostgreSQL) and in the
//! hot store (the Redis balance key, or the in-process store) — is reported with its exact
//! amount, repaired by `fix`, recorded in the ledger, and afterwards I2 and I4 hold.

use serde_json::{Value, json};

use crate::common::*;

async fn reconcile(gateway: &TestGateway, fix: bool) -> Value {
    gateway.admin_ok(reqwest::Method::POST, "/internal/reconcile", Some(json!({"fix": fix}))).await
}

/// The drifts a run reports for one account.
fn drifts_of(run: &Value, account_id: &str) -> Vec<Value> {
    run["report"]["drifts"].as_array().unwrap().iter().filter(|drift| drift["account_id"] == account_id).cloned().collect()
}

/// Moves the hot balance by `nanos` behind the gateway's back: HINCRBY on the Redis balance key,
/// or, in embedded mode, through the in-process store's own handle.
async fn edit_hot_balance(gateway: &TestGateway, account_id: &str, nanos: i64) {
    match &gateway.config.redis_url {
        Some(url) => {
            let keys = tollgate_store::redis_store::KeySpace::new(&gateway.config.redis_prefix, gateway.config.redis_shards).unwrap();
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let _: i64 = redis::cmd("HINCRBY").arg(keys.account_key(account_id)).arg("balance").arg(nanos).query_async(&mut connection).await.unwrap();
        }
        None => {
            let view = gateway.hot.hot_views(&[account_id.to_string()]).await.unwrap().remove(0).unwrap();
            let edited = view.balance.checked_add(Money::from_nanos(nanos)).unwrap();
            assert!(gateway.hot.repair_balance(&view, edited).await.unwrap());
        }
    }
}

/// An account with some history: a top-up and two charged requests, all in the ledger.
async fn account_with_history(gateway: &TestGateway) -> (String, String) {
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    for content in ["first", "second"] {
        assert_eq!(gateway.chat(&key, chat_body(content), None).await.status(), 200);
    }
    gateway.assert_ledger_sound(&account).await;
    (account, key)
}

/// After a repair: no drift left, I2 and I4 hold, the repair entry is in the statement.
async fn assert_repaired(gateway: &TestGateway, account: &str, key: &str, fixed: &Value) {
    let clean = reconcile(gateway, false).await;
    assert!(drifts_of(&clean, account).is_empty(), "drift left after the repair: {clean}");
    let statement = gateway.assert_ledger_sound(account).await;
    let balance = gateway.balance_of(key).await;
    let ledger = money(&gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}"), None).await["ledger_balance"]);
    assert_eq!(balance, ledger, "the client sees the ledger's balance");
    let note = format!("reconciliation run {}", fixed["id"]);
    let repairs: Vec<&Value> = statement["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["kind"] == "adjustment" && row["reason"].as_str().is_some_and(|reason| reason.contains(&note)))
        .collect();
    assert_eq!(repairs.len(), 1, "one repair entry for the run: {statement}");
    assert_eq!(money(&repairs[0]["amount"]), Money::ZERO);
    let listed = gateway.admin_ok(reqwest::Method::GET, "/internal/reconciliations?limit=10", None).await;
    let listed_run = listed["data"].as_array().unwrap().iter().find(|run| run["id"] == fixed["id"]).cloned().unwrap();
    assert_eq!(listed_run["fix"], true);
    assert!(listed_run["accounts_repaired"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_account_balance_is_reported_exactly_and_repaired() {
    let gateway = TestGateway::start().await;
    let (account, key) = account_with_history(&gateway).await;
    let before = reconcile(&gateway, false).await;
    assert!(drifts_of(&before, &account).is_empty(), "no drift before the edit: {before}");

    edit_ledger(&gateway, "UPDATE account_balance SET balance = balance + 1234567 WHERE account_id = ?", &account).await;
    let found = reconcile(&gateway, false).await;
    let drifts = drifts_of(&found, &account);
    assert_eq!(drifts.len(), 1, "{found}");
    assert_eq!(drifts[0]["kind"], "ledger_balance");
    assert_eq!(drifts[0]["amount"], "0.001234567");
    assert_eq!(money(&drifts[0]["found"]).checked_sub(money(&drifts[0]["expected"])).unwrap(), Money::from_nanos(1_234_567));
    assert_eq!(drifts[0]["repaired"], false);
    assert!(found["total_drift"].as_str().is_some(), "{found}");

    let fixed = reconcile(&gateway, true).await;
    let drifts = drifts_of(&fixed, &account);
    assert_eq!(drifts.len(), 1, "{fixed}");
    assert_eq!(drifts[0]["repaired"], true, "{fixed}");
    assert_repaired(&gateway, &account, &key, &fixed).await;

    // Charging goes on from the repaired balance, and stays sound.
    assert_eq!(gateway.chat(&key, chat_body("after"), None).await.status(), 200);
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_the_hot_store_is_reported_exactly_and_repaired() {
    let gateway = TestGateway::start().await;
    let (account, key) = account_with_history(&gateway).await;
    let ledger_balance = gateway.balance_of(&key).await;

    edit_hot_balance(&gateway, &account, -7_000_000_000).await;
    assert_eq!(gateway.balance_of(&key).await, ledger_balance.checked_sub(Money::from_nanos(7_000_000_000)).unwrap());
    let found = reconcile(&gateway, false).await;
    let drifts = drifts_of(&found, &account);
    assert_eq!(drifts.len(), 1, "{found}");
    assert_eq!(drifts[0]["kind"], "hot_balance");
    assert_eq!(drifts[0]["amount"], "-7");
    assert_eq!(money(&drifts[0]["expected"]), ledger_balance);

    let fixed = reconcile(&gateway, true).await;
    assert_eq!(drifts_of(&fixed, &account)[0]["repaired"], true, "{fixed}");
    assert_eq!(gateway.balance_of(&key).await, ledger_balance);
    assert_repaired(&gateway, &account, &key, &fixed).await;
    gateway.stop().await;
}

/// Charges still in flight to the ledger are not drift: with the worker stopped (services mode)
/// or the ledger behind, the hot balance runs ahead by exactly the unlogged charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_gateway_shows_no_false_drift() {
    let gateway = TestGateway::start().await;
    let (account, key) = account_with_history(&gateway).await;
    let load = {
        let (http, url, key) = (gateway.http.clone(), gateway.url.clone(), key.clone());
        tokio::spawn(async move {
            for index in 0..60 {
                let mut body = chat_body(&format!("busy {index}"));
                body["stream"] = json!(index % 2 == 0);
                let response = http.post(format!("{url}/v1/chat/completions")).bearer_auth(&key).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap();
            }
        })
    };
    let mut runs = 0;
    while !load.is_finished() {
        let run = reconcile(&gateway, false).await;
        assert!(drifts_of(&run, &account).is_empty(), "a charge in flight was taken for drift: {run}");
        runs += 1;
    }
    load.await.unwrap();
    assert!(runs > 0);
    gateway.assert_ledger_sound(&account).await;
    let run = reconcile(&gateway, false).await;
    assert!(drifts_of(&run, &account).is_empty(), "{run}");
    gateway.stop().await;
}
