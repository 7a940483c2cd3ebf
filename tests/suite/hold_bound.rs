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

/// A counter of the gateway's `/metrics`, 0 while it has never moved.
async fn metric(gateway: &TestGateway, name: &str) -> u64 {
    let text = gateway.http.get(format!("{}/metrics", gateway.url)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

/// Sends an Anthropic request whose upstream answers after a pause, and reads the amount held
/// for it while it is in flight: the hold itself, as the hot store placed it.
async fn hold_and_response(gateway: &TestGateway, key: &str, body: Value) -> (Money, reqwest::Response) {
    let request = gateway.messages_request(key).json(&body).send();
    let watch = async {
        loop {
            let held = money(&gateway.balance(key).await["held"]);
            if held.is_positive() {
                return held;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    // Answered before the hold was seen: fail, rather than watch for ever a hold that is gone.
    tokio::pin!(request);
    let held = tokio::select! {
        held = watch => held,
        response = &mut request => panic!("answered ({:?}) before its hold was seen", response.map(|response| response.status())),
    };
    (held, request.await.unwrap())
}

/// Issue 19 item 2: an Anthropic stream cut after `message_start` (before `message_delta`) is
/// charged the input counts `message_start` carried — uncached, cache reads, cache writes —
/// plus the tokenizer's count of the output relayed, not the gateway's count of the prompt
/// text. Before, the provider's 5,000 input tokens were thrown away and the 10 of the text
/// charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_cut_after_message_start_is_charged_the_input_it_reported() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let reported = json!({"input_tokens": 5_000, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 200, "output_tokens": 1});
    let body = json!({"model": "demo-claude", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "cut me"}],
        "mock": {"output_tokens": 50, "fail_after_chunks": 3, "usage_override": reported}});
    let before = gateway.balance_of(&key).await;
    let text = gateway.messages_request(&key).json(&body).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("message_start") && !text.contains("message_stop"), "cut before its end: {text}");
    assert_eq!(text.matches("text_delta").count(), 3);
    // Input 2.5, cache reads 1.25, cache writes at the input price (unset), output 10 per million.
    let expected = Money::from_nanos(5_000 * 2_500 + 300 * 1_250 + 200 * 2_500 + 3 * 10_000);
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), expected);
    let statement = gateway.assert_ledger_sound(&account).await;
    let row = statement["rows"].as_array().unwrap().iter().find(|row| row["kind"] == "usage").unwrap().clone();
    let counts = ["input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens"].map(|field| row[field].as_u64().unwrap());
    assert_eq!(counts, [5_000, 300, 200, 3], "{row}");
    assert_eq!((row["status"].as_str(), row["usage_source"].as_str()), (Some("upstream_interrupted"), Some("tokenizer")));
    gateway.stop().await;
}

/// Issue 19 item 2: a request with an image holds at least what the provider then charges for
/// it (an image counted at 1,500 tokens, under Anthropic's ceiling of about 1,600; before, the
/// hold counted it at 85). A document sent by URL shows no size: it is held at
/// `limits.unsized_media_part_tokens`, and a provider counting more is charged in full and the
/// excess counted on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_non_text_part_holds_what_it_is_charged_or_counts_the_excess() {
    let gateway = TestGateway::start_with(|config| config.limits.unsized_media_part_tokens = 10_000).await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}});
    let body = json!({"model": "demo-claude", "max_tokens": 16, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
        "mock": {"output_tokens": 16, "latency_ms": 300, "usage_override": {"input_tokens": 1_500, "output_tokens": 16}}});
    let (held, response) = hold_and_response(&gateway, &key, body).await;
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    assert_eq!(cost, Money::from_nanos(1_500 * 2_500 + 16 * 10_000));
    assert!(cost <= held, "the charge {cost} stays inside its hold {held}");

    let (exceeded, exceeded_nanos) = (metric(&gateway, "tollgate_hold_exceeded_total").await, metric(&gateway, "tollgate_hold_exceeded_nanos_total").await);
    let document = json!({"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}});
    let body = json!({"model": "demo-claude", "max_tokens": 16, "messages": [{"role": "user", "content": [document, {"type": "text", "text": "Summarise."}]}],
        "mock": {"output_tokens": 16, "latency_ms": 300, "usage_override": {"input_tokens": 40_000, "output_tokens": 16}}});
    let (held, response) = hold_and_response(&gateway, &key, body).await;
    assert_eq!(response.status(), 200);
    assert!(held >= Money::from_nanos(10_000 * 2_500), "the unsized document is held at the configured default: {held}");
    let cost = header_money(&response, "x-tollgate-cost");
    assert_eq!(cost, Money::from_nanos(40_000 * 2_500 + 16 * 10_000), "charged what the provider counted");
    let excess = u64::try_from(cost.checked_sub(held).unwrap().nanos()).unwrap();
    assert!(metric(&gateway, "tollgate_hold_exceeded_total").await > exceeded);
    assert!(metric(&gateway, "tollgate_hold_exceeded_nanos_total").await >= exceeded_nanos + excess, "the excess {excess} is counted");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}
