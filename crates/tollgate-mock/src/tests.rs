//! End-to-end tests over real HTTP on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use tollgate_core::tokens::{count_chat_prompt, count_text, encoding_for_model};
use crate::{MockConfig, serve};

struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    async fn start(config: MockConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    async fn default() -> Self {
        Self::start(MockConfig::default()).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn openai(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn anthropic(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

fn messages() -> Value {
    json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello a few times, please."}
    ])
}

fn prompt_tokens(model: &str, messages: &Value) -> u64 {
    count_chat_prompt(encoding_for_model(model), messages.as_array().unwrap())
}

fn tokens(model: &str, text: &str) -> u64 {
    count_text(encoding_for_model(model), text)
}

/// Parsed SSE event: (event name, data).
fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    assert!(
        text.ends_with("\n\n"),
        "SSE body must end with a blank line"
    );
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = None;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event");
                    data = Some(d.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data.expect("data line"))
        })
        .collect()
}

/// OpenAI stream: the JSON chunks (without `[DONE]`), asserting `[DONE]` ends it.
fn openai_chunks(text: &str) -> Vec<Value> {
    let events = parse_sse(text);
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last.1, "[DONE]");
    rest.iter()
        .map(|(name, data)| {
            assert!(name.is_none());
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

/// Reads a body until it ends or fails; returns (bytes received, failed?).
async fn read_until_cut(resp: reqwest::Response) -> (String, bool) {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut failed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => body.extend_from_slice(&b),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    (String::from_utf8(body).unwrap(), failed)
}

#[tokio::test]
async fn healthz_and_models() {
    let s = Server::default().await;
    let r = s.client.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");

    let v: Value = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"demo-gpt") && ids.contains(&"demo-claude"),
        "{ids:?}"
    );

    let v: Value = s
        .client
        .get(s.url("/v1/models"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(v["has_more"], false);

    let r = s.client.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("/nope"));
}

#[tokio::test]
async fn openai_non_stream_usage() {
    let s = Server::start(MockConfig {
        output_tokens: 7,
        ..MockConfig::default()
    })
    .await;
    let msgs = messages();
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": msgs}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "demo-gpt");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    let content = choices[0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, " hello".repeat(7));
    assert_eq!(tokens("demo-gpt", content), 7);
    assert_eq!(choices[0]["finish_reason"], "stop");

    let prompt = prompt_tokens("demo-gpt", &msgs);
    assert!(prompt > 0);
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["completion_tokens"], 7);
    assert_eq!(u["total_tokens"], prompt + 7);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);
}

#[tokio::test]
async fn openai_n_choices() {
    let s = Server::default().await;
    let v: Value = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "n": 3, "mock": {"output_tokens": 4}}))
        .await
        .json()
        .await
        .unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], " hello".repeat(4));
    }
    assert_eq!(v["usage"]["completion_tokens"], 12);

    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "n": 0}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn openai_max_tokens_cap() {
    let s = Server::start(MockConfig {
        output_tokens: 10,
        ..MockConfig::default()
    })
    .await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let v: Value = s
            .openai(&json!({"model": "demo-gpt", "messages": messages(), field: 3}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{field}");
        assert_eq!(v["choices"][0]["message"]["content"], " hello".repeat(3));
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }
    // Both present: the smaller wins.
    let v: Value = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "max_tokens": 5, "max_completion_tokens": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // Cap equal to N is not a truncation.
    let v: Value = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "max_tokens": 10}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 10);

    // Streaming honours the cap too.
    let text = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "max_tokens": 4, "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap();
    let chunks = openai_chunks(&text);
    assert_eq!(chunks.len(), 1 + 4 + 1);
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn openai_stream_without_usage() {
    let s = Server::start(MockConfig {
        output_tokens: 9,
        ..MockConfig::default()
    })
    .await;
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    assert!(!text.contains("usage"), "no usage without include_usage");
    let chunks = openai_chunks(&text);
    // role chunk + 9 content chunks + finish chunk
    assert_eq!(chunks.len(), 11);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-mock-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "demo-gpt");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let content: String = chunks[1..10]
        .iter()
        .map(|c| {
            assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tokens("demo-gpt", &content), 9);
    assert_eq!(chunks[10]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[10]["choices"][0]["finish_reason"], "stop");

    // include_usage: false behaves the same.
    let text2 = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "stream_options": {"include_usage": false}}),
        )
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(openai_chunks(&text2).len(), 11);
    assert!(!text2.contains("usage"));
}

#[tokio::test]
async fn openai_stream_with_usage() {
    let s = Server::default().await;
    let msgs = messages();
    let text = s
        .openai(
            &json!({"model": "demo-gpt", "messages": msgs, "stream": true,
                        "stream_options": {"include_usage": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    let chunks = openai_chunks(&text);
    // role + 16 content + finish + usage
    assert_eq!(chunks.len(), 1 + 16 + 1 + 1);
    let content: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(tokens("demo-gpt", &content), 16);
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["usage"], Value::Null);
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let prompt = prompt_tokens("demo-gpt", &msgs);
    assert_eq!(last["usage"]["prompt_tokens"], prompt);
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert_eq!(last["usage"]["total_tokens"], prompt + 16);
}

#[tokio::test]
async fn openai_stream_n_choices() {
    let s = Server::default().await;
    let text = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "stream": true, "n": 2,
                        "stream_options": {"include_usage": true}, "mock": {"output_tokens": 3}}),
        )
        .await
        .text()
        .await
        .unwrap();
    let chunks = openai_chunks(&text);
    assert_eq!(chunks.len(), 2 + 6 + 2 + 1);
    for idx in 0..2u64 {
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter(|ch| ch["index"] == idx)
            .filter_map(|ch| ch["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, " hello".repeat(3));
    }
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn overrides_from_headers_and_body() {
    let s = Server::default().await;
    let base = json!({"model": "demo-gpt", "messages": messages()});
    let send = |body: Value, header: Option<&'static str>| {
        let mut rb = s.client.post(s.url("/v1/chat/completions")).json(&body);
        if let Some(h) = header {
            rb = rb.header("x-mock-output-tokens", h);
        }
        rb.send()
    };
    let v: Value = send(base.clone(), Some("5"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // Body beats header.
    let mut with_mock = base.clone();
    with_mock["mock"] = json!({"output_tokens": 2});
    let v: Value = send(with_mock, Some("5"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // Bad header value.
    let r = send(base.clone(), Some("many")).await.unwrap();
    assert_eq!(r.status(), 400);
    // Zero tokens.
    let v: Value = send(base, Some("0")).await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "");
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

#[tokio::test]
async fn latency_header_and_body() {
    let s = Server::default().await;
    let t = Instant::now();
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-mock-latency-ms", "150")
        .json(&json!({"model": "demo-gpt", "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    let t = Instant::now();
    let r = s
        .anthropic(&json!({"model": "demo-claude", "messages": messages(), "stream": true,
                           "mock": {"latency_ms": 100, "chunk_interval_ms": 10, "output_tokens": 5}}))
        .await;
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "headers delayed by latency"
    );
    let _ = r.text().await.unwrap();
    // 3 head + 5 deltas + 3 tail = 11 frames, 10 gaps.
    assert!(t.elapsed() >= Duration::from_millis(100 + 100));
}

#[tokio::test]
async fn omit_usage_everywhere() {
    let s = Server::default().await;
    let v: Value = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "mock": {"omit_usage": true}}))
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none());
    assert_eq!(v["choices"][0]["message"]["content"], " hello".repeat(16));

    let text = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "stream_options": {"include_usage": true}, "mock": {"omit_usage": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"));
    assert_eq!(openai_chunks(&text).len(), 18);

    let v: Value = s
        .anthropic(
            &json!({"model": "demo-claude", "messages": messages(), "mock": {"omit_usage": true}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none());
    assert_eq!(v["type"], "message");

    let text = s
        .anthropic(
            &json!({"model": "demo-claude", "messages": messages(), "stream": true,
                           "mock": {"omit_usage": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"));
    let events = parse_sse(&text);
    assert_eq!(events.first().unwrap().0.as_deref(), Some("message_start"));
    assert_eq!(events.last().unwrap().0.as_deref(), Some("message_stop"));
}

#[tokio::test]
async fn usage_override_verbatim() {
    let s = Server::default().await;
    let garbage = json!({"prompt_tokens": -5, "completion_tokens": "lots", "extra": [1, 2]});
    let v: Value = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "mock": {"usage_override": garbage}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"], garbage);

    let text = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "stream_options": {"include_usage": true}, "mock": {"usage_override": garbage}}))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(openai_chunks(&text).last().unwrap()["usage"], garbage);

    let anth = json!({"input_tokens": 1e30, "output_tokens": null});
    let text = s
        .anthropic(
            &json!({"model": "demo-claude", "messages": messages(), "stream": true,
                           "mock": {"usage_override": anth}}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(start["message"]["usage"], anth);
    let delta = events
        .iter()
        .find(|e| e.0.as_deref() == Some("message_delta"))
        .unwrap();
    let delta: Value = serde_json::from_str(&delta.1).unwrap();
    assert_eq!(delta["usage"], anth);
}

#[tokio::test]
async fn fail_status_provider_shaped() {
    let s = Server::start(MockConfig {
        latency_ms: 2_000,
        ..MockConfig::default()
    })
    .await;
    let t = Instant::now();
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "mock": {"fail_status": 429}}))
        .await;
    assert!(
        t.elapsed() < Duration::from_millis(1_500),
        "failure is immediate"
    );
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true, "mock": {"fail_status": 500}}))
        .await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");

    let r = s
        .anthropic(
            &json!({"model": "demo-claude", "messages": messages(), "mock": {"fail_status": 529}}),
        )
        .await;
    assert_eq!(r.status(), 529);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(v["error"]["message"].is_string());

    let r = s
        .client
        .post(s.url("/v1/embeddings"))
        .header("x-mock-fail-status", "401")
        .json(&json!({"model": "demo-embedding", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Out-of-range status is itself a 400.
    let r = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "mock": {"fail_status": 1000}}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "mock": {"fail_status": 101}}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn openai_fail_after_chunks_cuts_stream() {
    let s = Server::default().await;
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "stream_options": {"include_usage": true}, "mock": {"fail_after_chunks": 3}}))
        .await;
    assert_eq!(r.status(), 200);
    let (body, failed) = read_until_cut(r).await;
    assert!(failed, "body must end with an error, got {body:?}");
    assert!(!body.contains("[DONE]"));
    assert!(!body.contains("finish_reason\":\"stop"));
    assert!(!body.contains("\"choices\":[]"));
    let content_chunks = body.matches("\"delta\":{\"content\":\" hello\"}").count();
    assert_eq!(content_chunks, 3, "{body}");

    // Non-streaming: the JSON body is truncated.
    let r = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "mock": {"fail_after_chunks": 0}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (body, failed) = read_until_cut(r).await;
    assert!(failed);
    assert!(serde_json::from_str::<Value>(&body).is_err());
}

#[tokio::test]
async fn anthropic_fail_after_chunks_cuts_stream() {
    let s = Server::default().await;
    let r = s
        .anthropic(
            &json!({"model": "demo-claude", "messages": messages(), "stream": true,
                           "mock": {"fail_after_chunks": 2}}),
        )
        .await;
    let (body, failed) = read_until_cut(r).await;
    assert!(failed, "body must end with an error, got {body:?}");
    assert_eq!(body.matches("event: content_block_delta").count(), 2);
    assert!(!body.contains("message_stop"));
    assert!(!body.contains("message_delta"));
}

#[tokio::test]
async fn malformed_sse_is_injected_verbatim_after_the_opening_frames() {
    let s = Server::default().await;
    let garbage = "data: {not json\n\nno field name here\n\n";
    let r = s
        .openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "mock": {"output_tokens": 2, "malformed_sse": garbage}}))
        .await;
    assert_eq!(r.status(), 200);
    let (body, failed) = read_until_cut(r).await;
    assert!(!failed);
    let role_end = body.find("\n\n").unwrap() + 2;
    assert!(body[role_end..].starts_with(garbage), "{body}");
    assert_eq!(body.matches("\"delta\":{\"content\":\" hello\"}").count(), 2);
    assert!(body.ends_with("data: [DONE]\n\n"));

    let r = s
        .anthropic(&json!({"model": "demo-claude", "max_tokens": 5, "messages": messages(), "stream": true,
                           "mock": {"malformed_sse": garbage}}))
        .await;
    let (body, _) = read_until_cut(r).await;
    let ping_end = body.find("event: ping").unwrap();
    assert!(body[ping_end..].contains(&format!("{{\"type\":\"ping\"}}\n\n{garbage}event: content_block_delta")), "{body}");
    assert!(body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    // Without the override, nothing is injected.
    let r = s.openai(&json!({"model": "demo-gpt", "messages": messages(), "stream": true})).await;
    assert_eq!(openai_chunks(&r.text().await.unwrap()).len(), 1 + 16 + 1);
}

#[tokio::test]
async fn anthropic_non_stream_usage() {
    let s = Server::start(MockConfig {
        output_tokens: 6,
        ..MockConfig::default()
    })
    .await;
    let msgs = json!([{"role": "user", "content": "Hello there, how are you today?"}]);
    let system = "You are terse and precise.";
    let r = s
        .anthropic(
            &json!({"model": "demo-claude", "max_tokens": 100, "system": system, "messages": msgs}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "demo-claude");
    assert_eq!(v["content"][0]["type"], "text");
    let text = v["content"][0]["text"].as_str().unwrap();
    assert_eq!(tokens("demo-claude", text), 6);
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    let expected_input = prompt_tokens("demo-claude", &msgs) + tokens("demo-claude", system);
    assert!(tokens("demo-claude", system) > 0);
    assert_eq!(v["usage"]["input_tokens"], expected_input);
    assert_eq!(v["usage"]["output_tokens"], 6);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 0);

    // System as text blocks counts the same; max_tokens caps output.
    let v: Value = s
        .anthropic(
            &json!({"model": "demo-claude", "max_tokens": 2, "messages": msgs,
                           "system": [{"type": "text", "text": system}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["input_tokens"], expected_input);
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["content"][0]["text"], " hello hello");

    // count_tokens agrees.
    let v: Value = s
        .client
        .post(s.url("/v1/messages/count_tokens"))
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "demo-claude", "system": system, "messages": msgs}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["input_tokens"], expected_input);
}

#[tokio::test]
async fn anthropic_requires_version_header() {
    let s = Server::default().await;
    let r = s
        .client
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "demo-claude", "max_tokens": 10, "messages": messages()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );
}

#[tokio::test]
async fn anthropic_stream_event_sequence() {
    let s = Server::default().await;
    let msgs = messages();
    let r = s
        .anthropic(
            &json!({"model": "demo-claude", "max_tokens": 5, "messages": msgs, "stream": true,
                           "mock": {"output_tokens": 8}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.0.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 5));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.1).unwrap())
        .collect();
    for (name, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *name, "event name matches data.type");
    }
    let start = &data[0]["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(start["model"], "demo-claude");
    assert_eq!(start["content"], json!([]));
    assert_eq!(
        start["usage"]["input_tokens"],
        prompt_tokens("demo-claude", &msgs)
    );
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        data[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let streamed: String = data[3..8]
        .iter()
        .map(|d| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(tokens("demo-claude", &streamed), 5);
    let delta = &data[9];
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    assert_eq!(delta["usage"]["output_tokens"], 5);

    let text = s
        .anthropic(
            &json!({"model": "demo-claude", "max_tokens": 100, "messages": msgs, "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    assert_eq!(events.len(), 3 + 16 + 3);
    let delta: Value = serde_json::from_str(&events[20].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 16);
}

#[tokio::test]
async fn malformed_bodies_are_400_and_never_crash() {
    let s = Server::default().await;
    let bodies: &[&str] = &[
        "",
        "{",
        "null",
        "[]",
        "42",
        "{\"model\": 1, \"messages\": []}",
        "{\"model\": \"m\"}",
        "{\"model\": \"m\", \"messages\": \"hi\"}",
        "{\"model\": \"m\", \"messages\": [], \"max_tokens\": -1}",
        "{\"model\": \"m\", \"messages\": [], \"max_tokens\": 1e99}",
        "{\"model\": \"m\", \"messages\": [], \"n\": -3}",
        "{\"model\": \"m\", \"messages\": [], \"stream\": \"yes\"}",
        "{\"model\": \"m\", \"messages\": [], \"mock\": {\"output_tokens\": \"x\"}}",
        "{\"model\": \"m\", \"messages\": [], \"mock\": {\"typo_field\": 1}}",
        "{\"model\": \"m\", \"messages\": [], \"mock\": {\"fail_status\": 70000}}",
        "{\"model\": \"m\", \"messages\": [], \"mock\": {\"output_tokens\": 18446744073709551615}}",
        "{\"model\": \"m\", \"messages\": [], \"system\": 5}",
    ];
    for body in bodies {
        for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
            let r = s
                .client
                .post(s.url(path))
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .body(*body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            // `system` is Anthropic-only and `n` OpenAI-only; elsewhere ignored.
            if (body.contains("system") && !anthropic) || (body.contains("\"n\"") && anthropic) {
                assert_eq!(status, 200, "{path} {body}");
                continue;
            }
            assert_eq!(status, 400, "{path} {body}");
            if anthropic {
                assert_eq!(v["type"], "error", "{body}");
                assert_eq!(v["error"]["type"], "invalid_request_error");
            } else {
                assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
            }
        }
    }
    // Still serving after all that.
    let r = s.client.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn huge_stream_is_lazy_and_cut() {
    // A practically unbounded stream is produced lazily; cut it after 1000 chunks.
    let s = Server::default().await;
    let r = s
        .openai(
            &json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                        "mock": {"output_tokens": u64::MAX, "fail_after_chunks": 1000}}),
        )
        .await;
    let (body, failed) = read_until_cut(r).await;
    assert!(failed);
    assert_eq!(body.matches("\" hello\"").count(), 1000);
}

#[tokio::test]
async fn embeddings_usage_and_vectors() {
    let s = Server::default().await;
    let inputs = ["hello world", " hello hello hello", "The quick brown fox"];
    let post = |input: Value| {
        s.client
            .post(s.url("/v1/embeddings"))
            .json(&json!({"model": "demo-embedding", "input": input}))
            .send()
    };
    let r = post(json!(inputs)).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "demo-embedding");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let e = d["embedding"].as_array().unwrap();
        assert_eq!(e.len(), 8);
        assert!(
            e.iter()
                .all(|x| x.as_f64().is_some_and(|f| (-1.0..1.0).contains(&f)))
        );
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    let expected: u64 = inputs.iter().map(|t| tokens("demo-embedding", t)).sum();
    assert_eq!(v["usage"]["prompt_tokens"], expected);
    assert_eq!(v["usage"]["total_tokens"], expected);

    // Single string; same vector as in the batch (deterministic).
    let v2: Value = post(json!(inputs[1])).await.unwrap().json().await.unwrap();
    assert_eq!(v2["data"].as_array().unwrap().len(), 1);
    assert_eq!(v2["data"][0]["embedding"], data[1]["embedding"]);
    assert_eq!(v2["usage"]["prompt_tokens"], 3);

    // base64 decodes to the same floats.
    let v3: Value = s
        .client
        .post(s.url("/v1/embeddings"))
        .json(&json!({"model": "demo-embedding", "input": inputs[1], "encoding_format": "base64"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let raw = b64_decode(v3["data"][0]["embedding"].as_str().unwrap());
    let floats: Vec<f64> = raw
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let plain: Vec<f64> = data[1]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(floats.len(), 8);
    for (a, b) in floats.iter().zip(&plain) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    // Bad inputs.
    for bad in [json!([]), json!(5), json!([1, "a"]), json!({"a": 1})] {
        let r = post(bad.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, &c| (acc << 6) | val(c));
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

/// Replaces `"id":"…"` values and `"created":N` with placeholders.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    loop {
        let next_id = rest.find("\"id\":\"");
        let next_created = rest.find("\"created\":");
        let (pos, is_id) = match (next_id, next_created) {
            (None, None) => break,
            (Some(a), Some(b)) if b < a => (b, false),
            (Some(a), _) => (a, true),
            (None, Some(b)) => (b, false),
        };
        if is_id {
            let start = pos + "\"id\":\"".len();
            out.push_str(&rest[..start]);
            let end = start + rest[start..].find('"').unwrap();
            out.push_str("ID");
            rest = &rest[end..];
        } else {
            let start = pos + "\"created\":".len();
            out.push_str(&rest[..start]);
            let end = start + rest[start..].find(|c: char| !c.is_ascii_digit()).unwrap();
            out.push('0');
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn responses_are_deterministic() {
    let s = Server::default().await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "demo-gpt", "messages": messages()}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "demo-gpt", "messages": messages(), "stream": true,
                                         "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/messages",
            json!({"model": "demo-claude", "max_tokens": 50, "messages": messages()}),
        ),
        (
            "/v1/messages",
            json!({"model": "demo-claude", "max_tokens": 50, "messages": messages(), "stream": true}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "demo-embedding", "input": ["a", "b"]}),
        ),
    ];
    for (path, body) in cases {
        let mut texts = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let text = s
                .client
                .post(s.url(path))
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            ids.push(
                text.find("\"id\":\"")
                    .map(|p| text[p..p + 40.min(text.len() - p)].to_owned()),
            );
            texts.push(normalize(&text));
        }
        assert_eq!(texts[0], texts[1], "{path}");
        if path != "/v1/embeddings" {
            assert_ne!(ids[0], ids[1], "ids are unique");
        }
    }
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let mut s = Server::default().await;
    assert_eq!(
        s.client
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.shutdown.take().unwrap().send(()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), s.handle.take().unwrap())
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(res.is_ok());
    assert!(
        reqwest::Client::new()
            .get(s.url("/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[test]
fn default_config() {
    let c = MockConfig::default();
    assert_eq!(
        (c.latency_ms, c.output_tokens, c.chunk_interval_ms),
        (0, 16, 0)
    );
}

// --- Gemini ------------------------------------------------------------------------------------

impl Server {
    async fn gemini(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.unwrap()
    }
}

fn gemini_body() -> Value {
    json!({
        "contents": [{"role": "user", "parts": [{"text": "Say hello a few times, please."}]}],
        "systemInstruction": {"parts": [{"text": "You are a helpful assistant."}]},
    })
}

/// The prompt count of [`gemini_body`]: its text parts.
fn gemini_prompt_tokens() -> u64 {
    tokens("demo-gemini", "Say hello a few times, please.") + tokens("demo-gemini", "You are a helpful assistant.")
}

/// An `alt=sse` body: its events' JSON, asserting Google's CRLF event ends and one data line each.
fn gemini_chunks(text: &str) -> Vec<Value> {
    assert!(text.ends_with("\r\n\r\n"), "events end with CRLF CRLF: {text:?}");
    text.split("\r\n\r\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("one data line: {event:?}"));
            assert!(!data.contains('\n'), "one line per event");
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn gemini_non_stream_usage() {
    let s = Server::default().await;
    let mut body = gemini_body();
    body["mock"] = json!({"output_tokens": 7});
    let r = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], " hello".repeat(7));
    assert_eq!(v["candidates"][0]["content"]["role"], "model");
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(v["modelVersion"], "demo-gemini");
    let prompt = gemini_prompt_tokens();
    let usage = &v["usageMetadata"];
    assert_eq!(usage["promptTokenCount"], prompt);
    assert_eq!(usage["candidatesTokenCount"], 7);
    assert_eq!(usage["totalTokenCount"], prompt + 7);
    // Zero counts are omitted, as proto JSON does.
    assert!(usage.get("cachedContentTokenCount").is_none() && usage.get("thoughtsTokenCount").is_none(), "{usage}");
    // The same under /v1.
    let r = s.gemini("/v1/models/demo-gemini:generateContent", &body).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn gemini_thoughts_cache_and_candidates() {
    let s = Server::default().await;
    let mut body = gemini_body();
    body["generationConfig"] = json!({"maxOutputTokens": 4, "candidateCount": 2, "temperature": 0.5});
    body["mock"] = json!({"thoughts_tokens": 11, "cached_tokens": 3});
    let v: Value = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await.json().await.unwrap();
    let candidates = v["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2);
    for (index, candidate) in candidates.iter().enumerate() {
        assert_eq!(candidate["index"], index);
        assert_eq!(candidate["finishReason"], "MAX_TOKENS");
        assert_eq!(candidate["content"]["parts"][0]["text"], " hello".repeat(4));
    }
    let prompt = gemini_prompt_tokens();
    let usage = &v["usageMetadata"];
    assert_eq!(usage["promptTokenCount"], prompt, "the prompt count includes the cached tokens");
    assert_eq!(usage["cachedContentTokenCount"], 3);
    assert_eq!(usage["candidatesTokenCount"], 8);
    assert_eq!(usage["thoughtsTokenCount"], 11);
    assert_eq!(usage["totalTokenCount"], prompt + 8 + 11);
    // Proto names are accepted too; cached tokens are capped at the prompt.
    let body = json!({"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"max_output_tokens": 2},
        "mock": {"cached_tokens": 1000}});
    let v: Value = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await.json().await.unwrap();
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 2);
    assert_eq!(v["usageMetadata"]["cachedContentTokenCount"], v["usageMetadata"]["promptTokenCount"]);
    let too_many = json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"candidateCount": 9}});
    assert_eq!(s.gemini("/v1beta/models/demo-gemini:generateContent", &too_many).await.status(), 400);
}

#[tokio::test]
async fn gemini_stream_has_early_prompt_counts_and_final_usage_on_the_finishing_chunk() {
    let s = Server::default().await;
    let mut body = gemini_body();
    body["generationConfig"] = json!({"candidateCount": 2});
    body["mock"] = json!({"output_tokens": 5, "thoughts_tokens": 2});
    let r = s.gemini("/v1beta/models/demo-gemini:streamGenerateContent?alt=sse", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let chunks = gemini_chunks(&r.text().await.unwrap());
    // 5 tokens × 2 candidates, then one finishing chunk per candidate; no terminal event.
    assert_eq!(chunks.len(), 12);
    let prompt = gemini_prompt_tokens();
    let mut texts = [String::new(), String::new()];
    for chunk in &chunks[..11] {
        assert_eq!(chunk["usageMetadata"], json!({"promptTokenCount": prompt, "totalTokenCount": prompt,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}));
    }
    for chunk in &chunks {
        let candidate = &chunk["candidates"][0];
        let index = candidate["index"].as_u64().unwrap() as usize;
        texts[index].push_str(candidate["content"]["parts"][0]["text"].as_str().unwrap());
    }
    assert_eq!(texts, [" hello".repeat(5), " hello".repeat(5)]);
    assert!(chunks[..10].iter().all(|chunk| chunk["candidates"][0].get("finishReason").is_none()));
    assert_eq!(chunks[10]["candidates"][0]["finishReason"], "STOP");
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], 10);
    assert_eq!(last["usageMetadata"]["thoughtsTokenCount"], 2);
    assert_eq!(last["usageMetadata"]["totalTokenCount"], prompt + 12);
}

#[tokio::test]
async fn gemini_streams_need_alt_sse_and_unknown_methods_are_404() {
    let s = Server::default().await;
    let r = s.gemini("/v1beta/models/demo-gemini:streamGenerateContent", &gemini_body()).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 400);
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert!(v["error"]["message"].as_str().unwrap().contains("alt=sse"));
    for path in ["/v1beta/models/demo-gemini:countTokens", "/v1beta/models/demo-gemini"] {
        let r = s.gemini(path, &gemini_body()).await;
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["status"], "NOT_FOUND");
    }
    let r = s.gemini("/v1beta/models/demo-gemini:generateContent", &json!({"contents": "hi"})).await;
    assert_eq!(r.status(), 400);
    let mut body = gemini_body();
    body["mock"] = json!({"fail_status": 503});
    let v: Value = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await.json().await.unwrap();
    assert_eq!((v["error"]["code"].clone(), v["error"]["status"].clone()), (json!(503), json!("UNAVAILABLE")));
}

#[tokio::test]
async fn gemini_omit_override_and_cut() {
    let s = Server::default().await;
    let mut body = gemini_body();
    body["mock"] = json!({"omit_usage": true, "output_tokens": 3});
    let v: Value = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await.json().await.unwrap();
    assert!(v.get("usageMetadata").is_none());
    let text = s.gemini("/v1beta/models/demo-gemini:streamGenerateContent?alt=sse", &body).await.text().await.unwrap();
    assert!(!text.contains("usageMetadata"));
    assert_eq!(gemini_chunks(&text).len(), 4);

    let garbage = json!({"promptTokenCount": -1, "candidatesTokenCount": "many"});
    body["mock"] = json!({"usage_override": garbage, "output_tokens": 3});
    let v: Value = s.gemini("/v1beta/models/demo-gemini:generateContent", &body).await.json().await.unwrap();
    assert_eq!(v["usageMetadata"], garbage);
    let text = s.gemini("/v1beta/models/demo-gemini:streamGenerateContent?alt=sse", &body).await.text().await.unwrap();
    assert_eq!(gemini_chunks(&text).last().unwrap()["usageMetadata"], garbage);

    body["mock"] = json!({"output_tokens": 10, "fail_after_chunks": 4});
    let r = s.gemini("/v1beta/models/demo-gemini:streamGenerateContent?alt=sse", &body).await;
    let (text, failed) = read_until_cut(r).await;
    assert!(failed, "the connection is cut");
    assert_eq!(text.matches("\r\n\r\n").count(), 4);
    assert!(!text.contains("finishReason"));
}

#[tokio::test]
async fn upstream_api_keys_are_checked_when_expected() {
    let s = Server::default().await;
    let mut body = gemini_body();
    body["mock"] = json!({"expect_api_key": "k1"});
    let ai_studio = |key_header: Option<(&'static str, &'static str)>, query: &str| {
        let mut request = s.client.post(s.url(&format!("/v1beta/models/demo-gemini:generateContent{query}"))).json(&body);
        if let Some((name, value)) = key_header {
            request = request.header(name, value);
        }
        request.send()
    };
    let r = ai_studio(None, "").await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    assert_eq!(ai_studio(Some(("x-goog-api-key", "k2")), "").await.unwrap().status(), 401);
    assert_eq!(ai_studio(Some(("x-goog-api-key", "k1")), "").await.unwrap().status(), 200);
    assert_eq!(ai_studio(None, "?key=k1").await.unwrap().status(), 200);

    let vertex = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent";
    let r = s.client.post(s.url(vertex)).bearer_auth("k1").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    let r = s.client.post(s.url(vertex)).header("x-goog-api-key", "k1").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401, "Vertex AI takes a bearer token");

    let chat = json!({"model": "demo-gpt", "messages": messages(), "mock": {"expect_api_key": "k1"}});
    assert_eq!(s.openai(&chat).await.status(), 401);
    let r = s.client.post(s.url("/v1/chat/completions")).bearer_auth("k1").json(&chat).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let claude = json!({"model": "demo-claude", "messages": messages(), "max_tokens": 5, "mock": {"expect_api_key": "k1"}});
    assert_eq!(s.anthropic(&claude).await.status(), 401);
    let r = s.client.post(s.url("/v1/messages")).header("anthropic-version", "2023-06-01").header("x-api-key", "k1").json(&claude).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
