//! A charge equals, to the unit, what the upstream's usage and the prices say. Token counts are
//! literals from Python tiktoken (tests/fixtures/tiktoken.json), not read back from a response
//! that passed through the gateway: a gateway that rewrote `usage` to match its charge fails.

use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_charge_is_exact_and_matches_the_balance_change() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let response = gateway.chat(&key, chat_body("What is a ledger?"), None).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let cost = header_money(&response, "x-tollgate-cost");
    let balance_header = header_money(&response, "x-tollgate-balance");
    let body: Value = response.json().await.unwrap();
    let prompt = tiktoken_prompt_tokens(&chat_body("What is a ledger?")["messages"]);
    assert_eq!(prompt, 12);
    assert_eq!((body["usage"]["prompt_tokens"].as_u64(), body["usage"]["completion_tokens"].as_u64()), (Some(prompt), Some(16)), "usage passed on as the upstream sent it");
    assert_eq!(cost, expected_cost(prompt, 16));
    let after = gateway.balance_of(&key).await;
    assert_eq!(before.checked_sub(after).unwrap(), cost, "X-Tollgate-Cost equals the balance change");
    assert_eq!(balance_header, after);
    let statement = gateway.assert_ledger_sound(&account).await;
    let usage_rows: Vec<&Value> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").collect();
    assert_eq!(usage_rows.len(), 1);
    assert_eq!(money(&usage_rows[0]["amount"]), Money::ZERO.checked_sub(cost).unwrap());
    assert_eq!(usage_rows[0]["usage_source"], "upstream");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_upstream_usage_is_billed_by_the_tokenizer_count() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = chat_body("Count me");
    body["mock"] = json!({"omit_usage": true, "output_tokens": 7});
    let response = gateway.chat(&key, body.clone(), None).await;
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    // What OpenAI's tokenizer counts for this prompt and for the mock's seven " hello"s.
    assert_eq!(tiktoken_text_tokens(&" hello".repeat(7)), 7);
    assert_eq!(cost, expected_cost(tiktoken_prompt_tokens(&body["messages"]), 7));
    let statement = gateway.assert_ledger_sound(&account).await;
    let sources: Vec<&str> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").map(|row| row["usage_source"].as_str().unwrap()).collect();
    assert_eq!(sources, vec!["tokenizer"]);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failure_is_not_charged() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance(&key).await;
    let mut body = chat_body("fail please");
    body["mock"] = json!({"fail_status": 500});
    let response = gateway.chat(&key, body, None).await;
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    let after = gateway.balance(&key).await;
    assert_eq!(before["balance"], after["balance"]);
    assert_eq!(after["held"], "0", "the hold was voided");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_are_charged_from_their_usage() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let response = gateway
        .messages_request(&key)
        .json(&json!({"model": "demo-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    let body: Value = response.json().await.unwrap();
    let input = tiktoken_prompt_tokens(&json!([{"role": "user", "content": "Hi"}]));
    assert_eq!((body["usage"]["input_tokens"].as_u64(), body["usage"]["output_tokens"].as_u64()), (Some(input), Some(10)));
    assert_eq!(cost, expected_cost(input, 10));
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), cost);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_charged_by_input_tokens() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let response = gateway
        .http
        .post(format!("{}/v1/embeddings", gateway.url))
        .bearer_auth(&key)
        .json(&json!({"model": "demo-embedding", "input": ["hello world", "a ledger records every movement"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let input = tiktoken_text_tokens("hello world") + tiktoken_text_tokens("a ledger records every movement");
    assert_eq!(body["usage"]["prompt_tokens"].as_u64(), Some(input));
    assert_eq!(cost, expected_cost(input, 0));
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), cost);
    let bad = gateway.http.post(format!("{}/v1/embeddings", gateway.url)).bearer_auth(&key).json(&json!({"model": "demo-embedding", "input": [{"x": 1}]})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

/// Upstream usage that cannot be true is corrected and flagged, never trusted into an undercharge
/// or an overflow: the row says `adjusted` and the anomaly is counted on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_upstream_usage_is_corrected_and_flagged() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let charge = |usage: Value, max_tokens: u64| {
        let mut body = chat_body("Measure me");
        body["max_tokens"] = json!(max_tokens);
        body["mock"] = json!({"output_tokens": 40, "usage_override": usage});
        body
    };
    // A sane report first.
    let prompt = tiktoken_prompt_tokens(&chat_body("Measure me")["messages"]);
    let response = gateway.chat(&key, charge(Value::Null, 64), None).await;
    assert_eq!(header_money(&response, "x-tollgate-cost"), expected_cost(prompt, 40));

    // Claims to have generated a billion tokens for a request capped at 64: capped at 64.
    let response = gateway.chat(&key, charge(json!({"prompt_tokens": prompt, "completion_tokens": 1_000_000_000u64, "total_tokens": 0}), 64), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header_money(&response, "x-tollgate-cost"), expected_cost(prompt, 64));

    // Claims 1 output token after sending 40: charged the 40 that went through.
    let response = gateway.chat(&key, charge(json!({"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": 0}), 64), None).await;
    assert_eq!(header_money(&response, "x-tollgate-cost"), expected_cost(prompt, 40));

    let statement = gateway.assert_ledger_sound(&account).await;
    let sources: Vec<&str> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").map(|row| row["usage_source"].as_str().unwrap()).collect();
    assert_eq!(sources, vec!["upstream", "adjusted", "adjusted"]);
    let metrics = gateway.http.get(format!("{}/metrics", gateway.url)).send().await.unwrap().text().await.unwrap();
    for kind in ["over_cap", "output_under_reported"] {
        assert!(metrics.lines().any(|line| line.starts_with("tollgate_usage_anomalies_total") && line.contains(kind)), "{kind} counted:\n{metrics}");
    }
    gateway.stop().await;
}
