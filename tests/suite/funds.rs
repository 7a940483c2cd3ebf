//! Fund changes apply once, and the audit chain stays whole.

use std::str::FromStr;

use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirming_twice_or_reusing_a_reference_adds_money_once() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("0", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let topup = gateway
        .admin_ok(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account, "amount": "5.5", "reference_id": "pay-1"})))
        .await;
    assert_eq!(topup["status"], "pending");
    assert_eq!(gateway.balance_of(&key).await, Money::ZERO, "a pending top-up adds nothing");
    let id = topup["id"].as_str().unwrap();
    for _ in 0..2 {
        gateway.admin_ok(reqwest::Method::POST, &format!("/internal/topups/{id}/confirm"), None).await;
    }
    // The same reference again returns the same top-up.
    let again = gateway
        .admin_ok(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account, "amount": "5.5", "reference_id": "pay-1"})))
        .await;
    assert_eq!(again["id"], topup["id"]);
    assert_eq!(gateway.balance_of(&key).await, Money::from_nanos(5_500_000_000));

    for _ in 0..2 {
        let (status, _) = gateway
            .admin(reqwest::Method::POST, &format!("/internal/accounts/{account}/refunds"), Some(json!({"amount": "1.25", "reason": "goodwill", "reference_id": "refund-1"})))
            .await;
        assert!(status == 200 || status == 201);
        let (status, _) = gateway
            .admin(reqwest::Method::POST, &format!("/internal/accounts/{account}/adjustments"), Some(json!({"amount": "-0.000000001", "reason": "rounding", "operator_id": "ops", "reference_id": "adj-1"})))
            .await;
        assert!(status == 200 || status == 201);
    }
    assert_eq!(gateway.balance_of(&key).await, Money::from_nanos(5_500_000_000 - 1_250_000_000 - 1));
    assert_eq!(gateway.chat(&key, chat_body("spend"), None).await.status(), 200);
    let statement = gateway.assert_ledger_sound(&account).await;
    let kinds: Vec<&str> = statement["rows"].as_array().unwrap().iter().map(|row| row["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["deposit", "refund", "adjustment", "usage"]);

    // The CSV statement carries the same rows, with a header.
    let csv = gateway
        .http
        .get(format!("{}/internal/accounts/{account}/statement?format=csv", gateway.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("ledger_seq,kind,amount,balance_before,balance_after,reference"));
    assert_eq!(lines.len(), 5);
    assert!(lines[1].starts_with("1,deposit,5.5,0,5.5,pay-1,"), "{}", lines[1]);
    assert!(lines[2].starts_with("2,refund,-1.25,5.5,4.25,refund-1,"), "{}", lines[2]);

    // The quote prices a usage with the same function settle used for the usage row.
    let usage_row = &statement["rows"][3];
    let quote = gateway
        .admin_ok(reqwest::Method::POST, "/internal/billing/quote", Some(json!({"model": "demo-gpt", "account_id": account,
            "usage": {"input_tokens": usage_row["input_tokens"], "output_tokens": usage_row["output_tokens"]}})))
        .await;
    assert_eq!(money(&quote["total"]), Money::ZERO.checked_sub(money(&usage_row["amount"])).unwrap());
    let summary = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/billing/summary?account_id={account}&group_by=model"), None).await;
    assert_eq!(summary["data"][0]["group"], "demo-gpt");
    assert_eq!(money(&summary["data"][0]["cost"]), money(&quote["total"]));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_are_strict_decimal_strings() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("0", json!({})).await;
    for amount in [json!(5), json!("1.0000000001"), json!("-5"), json!("+5"), json!("1e3"), json!(""), json!("99999999999999")] {
        let (status, body) = gateway
            .admin(reqwest::Method::POST, "/internal/topups", Some(json!({"account_id": account, "amount": amount, "reference_id": format!("bad-{amount}")})))
            .await;
        assert_eq!(status, 400, "amount {amount} → {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
    let (status, body): (u16, Value) = gateway.admin(reqwest::Method::GET, &format!("/internal/accounts/{account}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["balance"], "0");
    gateway.stop().await;
}

/// Funds out only from free funds: while a stream holds most of the balance, a refund of the
/// balance is refused (402 insufficient_balance, nothing recorded), a refund of what is free
/// goes through, and once the stream settles the balance is exactly what the ledger says — never
/// below zero. Before the rule a refund of 1 was accepted here and the balance ended negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_cannot_take_funds_held_for_a_request_in_flight() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    // A hold of about 0.9: 90,000 output tokens at 10 per million.
    let body = json!({"model": "demo-gpt", "stream": true, "max_tokens": 90_000, "messages": [{"role": "user", "content": "slow"}],
        "mock": {"output_tokens": 40, "chunk_interval_ms": 50}});
    let stream = gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let held = money(&gateway.balance(&key).await["held"]);
    assert!(held > Money::from_str("0.9").unwrap(), "the stream holds {held}");
    let refunds = format!("/internal/accounts/{account}/refunds");
    let refund = |amount: &str, reference: &str| {
        gateway.admin(reqwest::Method::POST, &refunds, Some(json!({"amount": amount, "reason": "test", "reference_id": reference})))
    };
    let (status, refused) = refund("1", &format!("all-{account}")).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (402, Some("insufficient_balance")), "{refused}");
    let (status, refused) = gateway
        .admin(reqwest::Method::POST, &format!("/internal/accounts/{account}/adjustments"), Some(json!({"amount": "-0.5", "reason": "test", "operator_id": "ops", "reference_id": format!("adj-{account}")})))
        .await;
    assert_eq!((status, refused["error"]["code"].as_str()), (402, Some("insufficient_balance")), "a negative adjustment too: {refused}");
    let free = Money::from_str("1").unwrap().checked_sub(held).unwrap();
    let (status, _) = refund(&free.to_string(), &format!("free-{account}")).await;
    assert_eq!(status, 201, "what is free can leave");
    let text = stream.text().await.unwrap();
    assert!(text.contains("[DONE]"), "the stream completed");
    assert!(!gateway.balance_of(&key).await.is_negative());
    let statement = gateway.assert_ledger_sound(&account).await;
    let kinds: Vec<&str> = statement["rows"].as_array().unwrap().iter().map(|row| row["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["deposit", "refund", "usage"], "the refused ones left nothing");
    // Retrying the refund that went through answers it as recorded, whatever is free now.
    let (status, again) = refund(&free.to_string(), &format!("free-{account}")).await;
    assert_eq!(status, 200, "{again}");
    gateway.stop().await;
}
