//! Streams pass through as they arrive and are charged for what was generated.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::*;

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_charge_is_exact_and_the_injected_usage_chunk_is_stripped() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;

    // Asked for usage: the client sees it, and pays exactly that.
    let before = gateway.balance_of(&key).await;
    let mut body = chat_body("stream please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = gateway.chat(&key, body.clone(), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-ratelimit-limit-requests"], "10000", "rate-limit headers pass on streams too");
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = tiktoken_prompt_tokens(&body["messages"]);
    let completion = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!((usage_chunk["usage"]["prompt_tokens"].as_u64(), completion), (Some(prompt), 16), "usage passed on as the upstream sent it");
    let content: String = events[..events.len() - 1]
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(content, " hello".repeat(16));
    let after = gateway.balance_of(&key).await;
    assert_eq!(before.checked_sub(after).unwrap(), expected_cost(prompt, completion));

    // Not asked: no usage chunk reaches the client, and it pays the same.
    body.as_object_mut().unwrap().remove("stream_options");
    let response = gateway.chat(&key, body, None).await;
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().all(|data| !data.contains("\"choices\":[]")), "usage chunk stripped: {events:?}");
    let final_balance = gateway.balance_of(&key).await;
    assert_eq!(after.checked_sub(final_balance).unwrap(), expected_cost(prompt, completion));
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_pays_for_what_was_generated() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = chat_body("a long answer");
    body["stream"] = json!(true);
    body["mock"] = json!({"output_tokens": 200, "chunk_interval_ms": 20});
    let response = gateway.chat(&key, body, Some("leaver-1")).await;
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let mut received = String::new();
    while received.matches("hello").count() < 5 {
        received.push_str(&String::from_utf8_lossy(&chunks.next().await.unwrap().unwrap()));
    }
    let read_tokens = received.matches("hello").count() as u64;
    let read_chunks = received.matches("data: ").count() as u64;
    drop(chunks);
    // The gateway notices within a chunk interval, then settles.
    let mut row = Value::Null;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let statement = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statement"), None).await;
        if let Some(found) = statement["rows"].as_array().unwrap().iter().find(|row| row["kind"] == "usage") {
            row = found.clone();
            break;
        }
    }
    assert_eq!(row["status"], "client_disconnected", "{row}");
    assert_eq!(row["usage_source"], "tokenizer");
    let output = row["output_tokens"].as_u64().unwrap();
    // The chunks the client read, plus those already on their way when it left (the gateway
    // notices at its next write, one chunk interval; the slack covers a slow test machine).
    assert!(output >= read_tokens, "charged {output} tokens, client read {read_tokens}");
    assert!(output <= read_chunks + 25, "charged {output} tokens for {read_chunks} chunks read");
    let balance = gateway.balance(&key).await;
    assert_eq!(balance["held"], "0", "no hold left behind");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_upstream_usage_is_billed_by_the_tokenizer_count() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = chat_body("Zähle bitte: один, два, три — 一二三, and a ledger's entries.");
    body["stream"] = json!(true);
    body["mock"] = json!({"omit_usage": true, "output_tokens": 23});
    let before = gateway.balance_of(&key).await;
    let response = gateway.chat(&key, body.clone(), None).await;
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().all(|data| !data.contains("\"usage\":{")), "the upstream sent no usage");
    let charged = before.checked_sub(gateway.balance_of(&key).await).unwrap();

    // What OpenAI's own tokenizer counts for the prompt (by its chat formula) and the output.
    let reference = expected_cost(tiktoken_prompt_tokens(&body["messages"]), tiktoken_text_tokens(&" hello".repeat(23)));
    assert_eq!(charged, reference);
    let statement = gateway.assert_ledger_sound(&account).await;
    let sources: Vec<&str> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").map(|row| row["usage_source"].as_str().unwrap()).collect();
    assert_eq!(sources, vec!["tokenizer"]);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_streams_are_charged_from_message_delta_usage() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let response = gateway
        .http
        .post(format!("{}/v1/messages", gateway.url))
        .bearer_auth(&key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "demo-claude", "max_tokens": 12, "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "terminal event delivered after settle");
    let start: Value = serde_json::from_str(&sse_data(&text)[0]).unwrap();
    let input = tiktoken_prompt_tokens(&json!([{"role": "user", "content": "Hi"}]));
    assert_eq!(start["message"]["usage"]["input_tokens"].as_u64(), Some(input));
    let after = gateway.balance_of(&key).await;
    assert_eq!(before.checked_sub(after).unwrap(), expected_cost(input, 12));
    gateway.stop().await;
}

/// Issue 19 item 4: a client that stops reading a stream cannot hold it past its limits. The
/// pump used to wait for such a client outside the deadline, so the stream ran on until the
/// hold expired under it (its funds, request slot and id then spent again). Now the stream is
/// cut at `stream_duration_ms_max` and charged, with the client still connected and silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_stream_deadline() {
    let gateway = TestGateway::start_with(|config| {
        config.limits.stream_duration_ms_max = 1_500;
        config.limits.upstream_timeout_ms = 1_500;
        config.limits.settle_timeout_ms = 1_500;
        config.limits.hold_ttl_ms = 20_000;
        config.limits.hold_sweep_interval_ms = 200;
    })
    .await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let body = json!({"model": "demo-gpt", "stream": true, "max_tokens": 400_000, "messages": [{"role": "user", "content": "x"}],
        "mock": {"output_tokens": 400_000, "chunk_interval_ms": 0}});
    // Headers only: the body is never read, so the gateway's channel and the sockets fill.
    let silent = gateway.http.post(format!("{}/v1/chat/completions", gateway.url)).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(silent.status(), 200);
    assert!(money(&gateway.balance(&key).await["held"]).is_positive());
    // Settled at the 1.5 s deadline; the hold's own expiry (20 s) must not be what ends it.
    let started = std::time::Instant::now();
    let balance = loop {
        let balance = gateway.balance(&key).await;
        if money(&balance["held"]).is_zero() || started.elapsed() > Duration::from_secs(12) {
            break balance;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(money(&balance["held"]), Money::ZERO, "settled at the deadline, long before the hold's 20 s: {balance}");
    assert!(money(&balance["balance"]) < Money::from_nanos(10_000_000_000), "and charged for what was generated");
    drop(silent);
    let statement = gateway.assert_ledger_sound(&account).await;
    let usage = statement["rows"].as_array().unwrap().iter().find(|row| row["kind"] == "usage").unwrap().clone();
    assert_eq!(usage["status"], "upstream_interrupted", "{usage}");
    gateway.stop().await;
}
