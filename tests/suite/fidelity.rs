//! Pass-through fidelity: what a client sends reaches the upstream untouched (tools, JSON mode,
//! vision parts, `n`, `stop`, fields no version of Tollgate knows yet, the protocol headers), and
//! what the upstream answers reaches the client (tool calls, rate-limit headers) — billed exactly
//! from every token kind the upstream reports.

use serde_json::{Value, json};

use crate::common::*;

/// The last request the mock upstream received: path, headers, body.
async fn upstream_saw(gateway: &TestGateway) -> Value {
    let base = gateway.mock_url.trim_end_matches("/v1");
    gateway.http.get(format!("{base}/mock/requests/last")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_requests_reach_the_upstream_untouched_and_tool_calls_come_back() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let body = json!({
        "model": "demo-gpt",
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
            ]}
        ],
        "tools": [{"type": "function", "function": {"name": "describe", "description": "Describe an image.",
            "parameters": {"type": "object", "properties": {"what": {"type": "string", "description": "The thing"}}, "required": ["what"]}}}],
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
        "n": 2,
        "stop": ["\n\n", "END"],
        "temperature": 0.25,
        "seed": 7,
        "logit_bias": {"1234": -100},
        "user": "end-user-42",
        "metadata": {"trace": "abc"},
        "a_field_from_the_future": {"nested": [1, "two", null, {"deep": true}]},
        "max_completion_tokens": 40,
        "mock": {"output_tokens": 8, "cached_tokens": 5, "thoughts_tokens": 6}
    });
    let response = gateway
        .http
        .post(format!("{}/v1/chat/completions", gateway.url))
        .bearer_auth(&key)
        .header("OpenAI-Organization", "org-fidelity")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "9999", "the upstream's rate-limit headers reach the client");
    let completion: Value = response.json().await.unwrap();

    let seen = upstream_saw(&gateway).await;
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["body"], body, "the upstream received the body as the client sent it");
    assert_eq!(seen["headers"]["openai-organization"], "org-fidelity");
    assert!(seen["headers"].get("x-tollgate-cost").is_none());

    let choices = completion["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for choice in choices {
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["tool_calls"][0]["function"]["name"], "describe");
    }
    // Cached prompt tokens at the cached price, reasoning inside the output count.
    let usage = &completion["usage"];
    let (prompt, output) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 5);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 6);
    assert_eq!(output, 2 * 8 + 6);
    let expected = Money::from_nanos(i64::try_from((prompt - 5) * 2_500 + 5 * 1_250 + output * 10_000).unwrap());
    assert_eq!(cost, expected);
    let statement = gateway.assert_ledger_sound(&account).await;
    let row = statement["rows"].as_array().unwrap().iter().find(|row| row["kind"] == "usage").unwrap().clone();
    assert_eq!((row["cached_input_tokens"].as_u64(), row["reasoning_tokens"].as_u64(), row["usage_source"].as_str()), (Some(5), Some(6), Some("upstream")), "{row}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_requests_reach_the_upstream_untouched_and_cache_tokens_are_priced_apart() {
    let gateway = TestGateway::start().await;
    // A cache-write price of its own (1.25 × input), as Anthropic charges.
    let price = json!([{"provider": "mock", "model": "demo-claude", "customer_type": TIER, "input_per_mtok": INPUT_PER_MTOK,
        "output_per_mtok": OUTPUT_PER_MTOK, "cached_input_per_mtok": "0.25", "cache_write_per_mtok": "3.125"}]);
    gateway.admin_ok(reqwest::Method::PUT, "/internal/prices", Some(price)).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let body = json!({
        "model": "demo-claude",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "You are a weather bot. ".repeat(20), "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        "tools": [{"name": "get_weather", "description": "Current weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "disabled"},
        "a_field_from_the_future": [true],
        "mock": {"output_tokens": 9, "cached_tokens": 100, "cache_write_tokens": 20}
    });
    let response = gateway
        .messages_request(&key)
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    assert_eq!(response.headers()["anthropic-ratelimit-requests-remaining"], "3999");
    let message: Value = response.json().await.unwrap();

    let seen = upstream_saw(&gateway).await;
    assert_eq!(seen["path"], "/v1/messages");
    assert_eq!(seen["body"], body);
    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(seen["headers"]["anthropic-beta"], "prompt-caching-2024-07-31");
    assert!(seen["headers"].get("x-api-key").is_none(), "the client's key never reaches the upstream");

    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["content"][0]["name"], "get_weather");
    let usage = &message["usage"];
    let (input, read, write, output) = (
        usage["input_tokens"].as_u64().unwrap(),
        usage["cache_read_input_tokens"].as_u64().unwrap(),
        usage["cache_creation_input_tokens"].as_u64().unwrap(),
        usage["output_tokens"].as_u64().unwrap(),
    );
    assert_eq!((read, write, output), (100, 20, 9));
    let expected = Money::from_nanos(i64::try_from(input * 2_500 + read * 250 + write * 3_125 + output * 10_000).unwrap());
    assert_eq!(cost, expected);
    let statement = gateway.assert_ledger_sound(&account).await;
    let row = statement["rows"].as_array().unwrap().iter().find(|row| row["kind"] == "usage").unwrap().clone();
    assert_eq!((row["cached_input_tokens"].as_u64(), row["cache_write_tokens"].as_u64()), (Some(100), Some(20)), "{row}");
    gateway.stop().await;
}
