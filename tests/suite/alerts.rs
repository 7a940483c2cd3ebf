//! Alerts and after-commit notifications: the low-balance webhook fires once per crossing,
//! signed, through a receiver that fails twice before it accepts; a key budget's 80 % is
//! announced once; a top-up whose transaction rolls back sends no NOTIFY and no webhook.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const SECRET: &str = "whsec_test_0123456789abcdef";

/// A webhook receiver that answers 500 to the first two attempts of every event, then 200.
#[derive(Clone, Default)]
struct Receiver {
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    /// Events accepted (2xx), in order: (event id, headers' signature check, body).
    accepted: Arc<Mutex<Vec<(String, bool, Value)>>>,
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers.get("x-tollgate-event-id").and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
    let attempt = {
        let mut attempts = receiver.attempts.lock().unwrap();
        let count = attempts.entry(id.clone()).or_insert(0);
        *count += 1;
        *count
    };
    if attempt <= 2 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let signature = headers.get("x-tollgate-signature").and_then(|value| value.to_str().ok()).unwrap_or_default();
    let valid = signature_is_valid(signature, &body);
    receiver.accepted.lock().unwrap().push((id, valid, serde_json::from_slice(&body).unwrap()));
    StatusCode::NO_CONTENT
}

/// Checks `t=…,v1=…` as a receiver would: HMAC-SHA256 of "<t>.<body>" under the shared secret.
fn signature_is_valid(header: &str, body: &[u8]) -> bool {
    let fields: HashMap<&str, &str> = header.split(',').filter_map(|field| field.split_once('=')).collect();
    let (Some(timestamp), Some(given)) = (fields.get("t"), fields.get("v1")) else { return false };
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let Ok(given) = hex::decode(given) else { return false };
    mac.verify_slice(&given).is_ok()
}

async fn start_receiver(shutdown: CancellationToken) -> (String, Receiver) {
    let receiver = Receiver::default();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await.unwrap() });
    (url, receiver)
}

async fn gateway_with_webhooks(url: &str) -> TestGateway {
    let url = url.to_string();
    TestGateway::start_with(move |config| {
        config.alerts.webhook_url = Some(url);
        config.alerts.webhook_secret = Some(SECRET.into());
        config.alerts.deliver_interval_ms = 100;
        config.alerts.retry_base_ms = 50;
    })
    .await
}

/// Waits until the receiver accepted an event matching `wanted`.
async fn accepted_matching(receiver: &Receiver, wanted: impl Fn(&Value) -> bool) -> Vec<(String, bool, Value)> {
    for _ in 0..300 {
        let found: Vec<_> = receiver.accepted.lock().unwrap().iter().filter(|(_, _, body)| wanted(body)).cloned().collect();
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no such event was delivered; accepted: {:?}", receiver.accepted.lock().unwrap());
}

fn is_low_balance(body: &Value) -> bool {
    body["type"] == "balance.low"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_balance_fires_once_per_crossing_signed_through_a_failing_receiver() {
    let shutdown = CancellationToken::new();
    let (url, receiver) = start_receiver(shutdown.clone()).await;
    let gateway = gateway_with_webhooks(&url).await;
    // Each chat costs about 0.000185: the first one takes the balance below 9.9999.
    let account = gateway.account("10", json!({"low_balance_threshold": "9.9999"})).await;
    let key = gateway.key(&account, json!({"budget_total": "0.0004"})).await;

    for content in ["one", "two"] {
        // A small max_tokens keeps the hold inside the key's budget.
        let mut body = chat_body(content);
        body["max_tokens"] = json!(16);
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    gateway.assert_ledger_sound(&account).await;
    let first = accepted_matching(&receiver, is_low_balance).await;
    assert_eq!(first.len(), 1, "one crossing, one alert: {first:?}");
    let (id, signed, body) = &first[0];
    assert!(signed, "the signature verifies");
    assert_eq!(body["data"]["account_id"], account.as_str());
    assert_eq!(money(&body["data"]["threshold"]), money(&json!("9.9999")));
    assert!(money(&body["data"]["balance"]) < money(&json!("9.9999")));
    assert_eq!(receiver.attempts.lock().unwrap()[id], 3, "two failures, then delivered");

    // The key's spend passed 80 % of its budget on the second request: one alert.
    let budget = accepted_matching(&receiver, |body| body["type"] == "key.budget").await;
    assert_eq!(budget.len(), 1, "{budget:?}");
    assert_eq!(budget[0].2["data"]["percent"], 80);
    assert_eq!(budget[0].2["data"]["budget"], "total");

    // Back above the threshold (no alert on the way up), then below again by a refund: a second
    // crossing, a second alert.
    gateway.top_up(&account, "1", &format!("again-{account}")).await;
    gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/refunds"), Some(json!({"amount": "1.5", "reason": "test", "reference_id": format!("refund-{account}")}))).await;
    let second = loop {
        let found = accepted_matching(&receiver, is_low_balance).await;
        if found.len() >= 2 {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(second.len(), 2, "{second:?}");
    assert_ne!(second[0].0, second[1].0, "two crossings, two distinct events");
    assert!(second.iter().all(|(_, signed, _)| *signed));

    // The operator's view: the events, delivered, and every attempt logged.
    // (The deliverer records an attempt after the receiver answered it: wait for the record.)
    let mut events = Value::Null;
    for _ in 0..100 {
        events = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/alerts?account_id={account}"), None).await;
        if events["data"].as_array().unwrap().iter().all(|event| event["status"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let low: Vec<&Value> = events["data"].as_array().unwrap().iter().filter(|event| event["event_type"] == "balance.low").collect();
    assert_eq!(low.len(), 2, "{events}");
    assert!(low.iter().all(|event| event["status"] == "delivered" && event["attempts"] == 3), "{events}");
    let attempts = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/alerts/{}/deliveries", low[1]["id"]), None).await;
    let codes: Vec<u64> = attempts["data"].as_array().unwrap().iter().map(|attempt| attempt["status_code"].as_u64().unwrap()).collect();
    assert_eq!(codes, vec![204, 500, 500], "newest first: {attempts}");

    // Nothing more arrives for the same crossings.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.accepted.lock().unwrap().iter().filter(|(_, _, body)| is_low_balance(body)).count(), 2);
    gateway.stop().await;
    shutdown.cancel();
}

/// An SQL trigger makes the top-up's last statement fail, after its fund row, its NOTIFY and its
/// outbox event were written in the same transaction: all of them must vanish with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_top_up_sends_no_notify_and_no_webhook() {
    let shutdown = CancellationToken::new();
    let (url, receiver) = start_receiver(shutdown.clone()).await;
    let gateway = gateway_with_webhooks(&url).await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let postgres = gateway.database_url.starts_with("postgres");
    if postgres {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&gateway.database_url).await.unwrap();
        sqlx::raw_sql(
            "CREATE FUNCTION refuse_topup() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse_topup BEFORE UPDATE ON topup_records FOR EACH ROW WHEN (NEW.amount = 13370000000) EXECUTE FUNCTION refuse_topup();",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&gateway.database_url).await.unwrap();
        sqlx::raw_sql("CREATE TRIGGER refuse_topup BEFORE UPDATE ON topup_records WHEN NEW.amount = 13370000000 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let mut listener = if postgres {
        let mut listener = sqlx::postgres::PgListener::connect(&gateway.database_url).await.unwrap();
        listener.listen(tollgate_store::postgres::FUND_CHANNEL).await.unwrap();
        Some(listener)
    } else {
        None
    };
    let balance = gateway.balance_of(&key).await;

    let topup = gateway
        .admin_ok(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account, "amount": "13.37", "reference_id": format!("doomed-{account}")})))
        .await;
    let (status, _) = gateway.admin(reqwest::Method::POST, &format!("/internal/topups/{}/confirm", topup["id"].as_str().unwrap()), None).await;
    assert!(status >= 500, "the confirmation failed: {status}");
    if let Some(listener) = listener.as_mut() {
        let heard = tokio::time::timeout(Duration::from_millis(700), listener.recv()).await;
        assert!(heard.is_err(), "a NOTIFY escaped a rolled-back transaction: {heard:?}");
    }
    assert_eq!(gateway.balance_of(&key).await, balance);
    gateway.assert_ledger_sound(&account).await;

    // A good top-up afterwards is announced both ways (the control).
    gateway.top_up(&account, "2", &format!("fine-{account}")).await;
    if let Some(listener) = listener.as_mut() {
        let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.unwrap().unwrap();
        assert!(heard.payload().contains("\"amount\":\"2\""), "{}", heard.payload());
    }
    let posted = accepted_matching(&receiver, |body| body["type"] == "fund.posted" && body["data"]["amount"] == "2").await;
    assert_eq!(posted.len(), 1);
    let everything = receiver.accepted.lock().unwrap().clone();
    assert!(everything.iter().all(|(_, _, body)| body["data"]["amount"] != "13.37"), "the rolled-back top-up was announced: {everything:?}");
    let events = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/alerts?account_id={account}"), None).await;
    assert!(events["data"].as_array().unwrap().iter().all(|event| event["payload"]["amount"] != "13.37"), "{events}");
    gateway.stop().await;
    shutdown.cancel();
}
