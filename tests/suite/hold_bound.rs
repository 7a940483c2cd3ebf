//! I7: a charge stays inside its hold. The cap that sized the hold is the one the upstream gets;
//! an upstream that ignores it is cut in a stream and charged at the cap, never past it.

use serde_json::{Value, json};

use crate::common::*;

/// The exact cost of the default hold: the prompt of `body` plus `default_max_output_tokens`.
async fn quote(gateway: &TestGateway, account: &str, prompt_tokens: u64, output_tokens: u64) -> Money {
    let quote = gateway
        .admin_ok(reqwest::Method::POST, "/internal/billing/quote", Some(json!({"model": "demo-gpt", "account_id": account,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": output_tokens}})))
        .await;
    money(&quote["total"])
}

/// Issue 19's reproduction: 0.05 of credit, six concurrent streams without `max_tokens` whose
/// upstream would answer 50,000 tokens. Before, the default cap sized the hold but was never
/// sent upstream nor enforced, one request got through and the balance ended at -0.45. Now
/// the upstream is sent the cap (4,096) and the balance never goes below zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_max_tokens_cannot_overspend() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("0.05", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let body = json!({"model": "demo-gpt", "stream": true, "messages": [{"role": "user", "content": "long"}], "mock": {"output_tokens": 50_000}});
    let requests = (0..6).map(|_| gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&body).send());
    let mut served = 0;
    for response in futures_util::future::join_all(requests).await {
        let response = response.unwrap();
        if response.status() == 200 {
            served += 1;
            let text = response.text().await.unwrap();
            assert!(text.contains("[DONE]") && text.contains(r#""finish_reason":"length""#), "the upstream stopped at a cap");
            let relayed = text.matches(r#""content""#).count();
            assert!(relayed <= 4_096 + 2, "the upstream was sent the hold's cap: {relayed} content chunks");
        } else {
            assert_eq!(response.status(), 402);
        }
    }
    assert_eq!(served, 1, "0.05 covers one hold of 4,096 output tokens at 10 per million");
    let balance = gateway.balance_of(&key).await;
    assert!(!balance.is_negative(), "the balance ends at {balance}");
    let statement = gateway.assert_ledger_sound(&account).await;
    let usage: Vec<&Value> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").collect();
    assert_eq!(usage[0]["output_tokens"], json!(4096), "the upstream stopped at the cap it was sent");
    gateway.stop().await;
}

/// An upstream that ignores the cap it was sent: a stream is cut once clearly past it, and
/// every response, streamed or not, is charged at most the hold — exactly the hold when the
/// output reached the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_the_cap_is_charged_at_the_cap() {
    let gateway = TestGateway::start_with(|config| config.limits.default_max_output_tokens = 500).await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let messages = json!([{"role": "user", "content": "long"}]);
    let prompt_tokens = tollgate_core::tokens::count_chat_prompt(tollgate_core::tokens::encoding_for_model("demo-gpt"), messages.as_array().unwrap());
    let hold = quote(&gateway, &account, prompt_tokens, 500).await;

    let streamed = json!({"model": "demo-gpt", "stream": true, "messages": messages, "mock": {"output_tokens": 20_000, "ignore_output_cap": true}});
    let before = gateway.balance_of(&key).await;
    let text = gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&streamed).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("[DONE]"), "cut before the upstream's end");
    let relayed = text.matches("\"content\"").count();
    assert!((500..=700).contains(&relayed), "cut a little past the cap: {relayed} content chunks");
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), hold, "charged the hold, not 20,000 tokens");

    for cap in [json!({}), json!({"max_tokens": 300})] {
        let mut body = json!({"model": "demo-gpt", "messages": messages, "mock": {"output_tokens": 2_000, "ignore_output_cap": true}});
        merge(&mut body, cap.clone());
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 200);
        let expected = quote(&gateway, &account, prompt_tokens, cap["max_tokens"].as_u64().unwrap_or(500)).await;
        assert_eq!(header_money(&response, "x-tollgate-cost"), expected, "{cap}: charged at the cap");
    }
    let statement = gateway.assert_ledger_sound(&account).await;
    let outputs: Vec<u64> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").map(|row| row["output_tokens"].as_u64().unwrap()).collect();
    assert_eq!(outputs, vec![500, 500, 300]);
    gateway.stop().await;
}
