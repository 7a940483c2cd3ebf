//! Hardening (issue 21): what a stranger or a hostile upstream can make the gateway reveal or
//! do. An upstream's refusal reaches the client without the operator's account in it; a
//! redirect from an upstream is not followed, so no credential goes to the host it names.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::common::*;

/// A stranger's big body costs no tokenizing until everything cheap has passed: a 1 MB prompt
/// naming a model that is not routed, or one the key may not use, is refused after its JSON is
/// read and before it is counted; one that passes is counted — and any body over 16 KiB is
/// parsed and counted on the bounded blocking pool, never on the async workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bodies_are_tokenized_on_the_pool_and_only_after_the_cheap_checks() {
    let gateway = TestGateway::start_with(|config| config.limits.tokenizer_threads = 1).await;
    let account = gateway.account("0", json!({})).await;
    let key = gateway.key(&account, json!({"allowed_models": ["demo-gpt"]})).await;
    let big = "hello ".repeat(200_000);
    let pool_runs = || gateway.state.tokenizer.runs().1;
    let mut expected = pool_runs();
    for (model, status, code) in [("no-such-model", 404, "model_not_found"), ("demo-claude", 403, "model_not_allowed")] {
        let mut body = chat_body(&big);
        body["model"] = json!(model);
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), status);
        assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], code);
        expected += 1;
        assert_eq!(pool_runs(), expected, "{model}: the JSON read on the pool, nothing counted");
    }
    // Routed and allowed: counted (on the pool), then refused for the empty balance.
    let response = gateway.chat(&key, chat_body(&big), None).await;
    assert_eq!(response.status(), 402);
    expected += 2;
    assert_eq!(pool_runs(), expected, "the JSON read and the prompt counted on the pool");
    // A small body is read and counted inline.
    let (inline_before, _) = gateway.state.tokenizer.runs();
    let response = gateway.chat(&key, chat_body("hello"), None).await;
    assert_eq!(response.status(), 402);
    assert_eq!(gateway.state.tokenizer.runs(), (inline_before + 2, expected));
    gateway.stop().await;
}

/// OpenAI's 429 names the organization and its limits; a 401 says which key failed. The client
/// is told the status and the upstream's code; a refusal about its own request (400) keeps the
/// upstream's words, identifiers taken out. Nothing is charged for either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_tells_the_client_nothing_of_the_operators_account() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let refused = |status: u16, message: &str| {
        let mut body = chat_body("refuse me");
        body["mock"] = json!({"fail_status": status, "fail_message": message});
        body
    };
    let rate_limited = "Rate limit reached for gpt-4o in organization org-Secret123 on tokens per min (TPM): Limit 30000, Used 29990, Requested 500.";
    for stream in [false, true] {
        let mut body = refused(429, rate_limited);
        body["stream"] = json!(stream);
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 502);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "upstream_error");
        assert_eq!(error["error"]["message"], "upstream returned status 429: rate_limit_exceeded");
    }
    let response = gateway.chat(&key, refused(401, "Incorrect API key provided: sk-proj-abc***xyz. You can find your API key at https://platform.example/keys."), None).await;
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["message"], "upstream returned status 401: invalid_api_key");

    let response = gateway.chat(&key, refused(400, "This model's maximum context length is 8192 tokens (project proj_Secret9)."), None).await;
    assert_eq!(response.status(), 400, "a refusal of the request itself keeps its status");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["message"], "upstream returned status 400: This model's maximum context length is 8192 tokens (project [redacted]");
    assert_eq!(gateway.balance_of(&key).await, before, "nothing charged");
    assert_eq!(gateway.balance(&key).await["held"], "0");
    gateway.stop().await;
}

/// A server that answers every request with a redirect to `target`, counting them.
async fn redirector(target: String) -> (String, Arc<AtomicU64>) {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (target, counter) = (target.clone(), Arc::clone(&counter));
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, format!("{target}{}", uri.path()))])
        }
    });
    (serve_on_loopback(app).await, seen)
}

/// Serves `app` on a free loopback port; its base URL.
async fn serve_on_loopback(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

/// An upstream that redirects (compromised, misconfigured, or a proxy in the way) gets no second
/// request sent where it points: reqwest's default policy follows up to ten hops and keeps
/// `x-api-key` / `x-goog-api-key` across hosts. The client gets 502, nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_redirect_is_not_followed() {
    let (elsewhere, elsewhere_seen) = redirector("http://127.0.0.1:9".into()).await;
    let (upstream, upstream_seen) = redirector(elsewhere.clone()).await;
    let (variable, _) = upstream_key_variable();
    let provider = json!({"name": "redirecting", "kind": "anthropic", "base_url": format!("{upstream}/v1"), "api_key_env": variable});
    let (gateway, _, key) = gateway_with_model("redirected-claude", provider, |_| {}).await;
    let before = gateway.balance_of(&key).await;
    let response = gateway
        .messages_request(&key)
        .json(&json!({"model": "redirected-claude", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["message"], "upstream returned status 307: details withheld", "{error}");
    assert_eq!(upstream_seen.load(Ordering::SeqCst), 1);
    assert_eq!(elsewhere_seen.load(Ordering::SeqCst), 0, "the redirect was followed, the upstream key with it");
    assert_eq!(gateway.balance_of(&key).await, before);
    gateway.stop().await;
}

// Issue 21 item 6: upstream bodies without end. A non-streaming answer is read up to
// `limits.upstream_response_bytes_max` and refused past it (502, not charged); a stream's event
// up to the gateway's event limit. Either way the gateway stops reading, so an endless upstream
// costs it a bounded amount of memory.

/// Bytes a flooding upstream offers: far more than the gateway may read.
const FLOOD_BYTES: u64 = 100 * 1024 * 1024;

/// An upstream that answers every request 200 with `data: ` and then [`FLOOD_BYTES`] of `x`,
/// made as they are sent, never ending a line; counts the bytes its client has taken so far
/// (from 0 at each request).
async fn flooding_upstream() -> (String, Arc<AtomicU64>) {
    use futures_util::StreamExt;
    const PIECE_BYTES: usize = 64 * 1024;
    let taken = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&taken);
    let app = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        async move {
            counter.store(0, Ordering::SeqCst);
            let piece = axum::body::Bytes::from(vec![b'x'; PIECE_BYTES]);
            let pieces = std::iter::once(axum::body::Bytes::from_static(b"data: ")).chain(std::iter::repeat_n(piece, (FLOOD_BYTES as usize) / PIECE_BYTES));
            let body = futures_util::stream::iter(pieces).map(move |piece| {
                counter.fetch_add(piece.len() as u64, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(piece)
            });
            ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(body))
        }
    });
    (serve_on_loopback(app).await, taken)
}

/// A gateway with model `flooded-gpt` on a [`flooding_upstream`], reading at most 1 MiB of an
/// answer; an account and key.
async fn flooded_gateway() -> (TestGateway, String, String, Arc<AtomicU64>) {
    let (upstream, taken) = flooding_upstream().await;
    let provider = json!({"name": "flooding", "kind": "openai", "base_url": format!("{upstream}/v1")});
    let (gateway, account, key) = gateway_with_model("flooded-gpt", provider, |config| config.limits.upstream_response_bytes_max = 1024 * 1024).await;
    (gateway, account, key, taken)
}

/// A gateway with `model` routed to `provider` (its config as JSON) and priced, an account and
/// a key.
async fn gateway_with_model(model: &str, provider: Value, adjust: impl FnOnce(&mut tollgate_gateway::GatewayConfig)) -> (TestGateway, String, String) {
    let provider_name = provider["name"].as_str().unwrap().to_string();
    let gateway = TestGateway::start_with(|config| {
        adjust(config);
        config.providers.push(serde_json::from_value(provider).unwrap());
        config.models.push(serde_json::from_value(json!({"model": model, "provider": provider_name})).unwrap());
    })
    .await;
    let price = json!([{"provider": provider_name, "model": model, "customer_type": TIER, "input_per_mtok": "2.5", "output_per_mtok": "10"}]);
    gateway.admin_ok(reqwest::Method::PUT, "/internal/prices", Some(price)).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    (gateway, account, key)
}

/// Reads of the flood stop near the bound: the bound itself plus what socket buffers and the
/// HTTP client hold (a few MiB on loopback) — never the whole 100 MiB.
fn assert_flood_abandoned(taken: &AtomicU64) {
    let taken = taken.load(Ordering::SeqCst);
    assert!(taken < FLOOD_BYTES / 4, "the gateway read {taken} bytes of the upstream's {FLOOD_BYTES}");
}

/// The usage row of `request_id`, once the ledger has it.
async fn usage_row(gateway: &TestGateway, account: &str, request_id: &str) -> Value {
    let row = std::sync::Mutex::new(Value::Null);
    wait_until("the request's usage row", || async {
        let statement = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statement"), None).await;
        let found = statement["rows"].as_array().unwrap().iter().find(|row| row["request_id"] == request_id).cloned();
        found.map(|found| *row.lock().unwrap() = found).is_some()
    })
    .await;
    row.into_inner().unwrap()
}

/// A non-streaming answer past the bound: 502 `upstream_error` saying so, read no further, and
/// not charged — the contract's 502 — with its hold released: the usage row is `failed` at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_past_the_bound_is_refused_without_reading_it_all() {
    let (gateway, account, key, taken) = flooded_gateway().await;
    let before = gateway.balance_of(&key).await;
    let body = json!({"model": "flooded-gpt", "max_tokens": 50, "messages": [{"role": "user", "content": "flood me"}]});
    let response = gateway.chat(&key, body, Some("flooded-answer")).await;
    assert_eq!(response.status(), 502);
    assert_flood_abandoned(&taken);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    assert_eq!(error["error"]["message"], "upstream error: the response exceeded 1048576 bytes, the gateway's limit; nothing was charged");
    assert_eq!(gateway.balance_of(&key).await, before, "nothing charged");
    assert_eq!(gateway.balance(&key).await["held"], "0");
    let row = usage_row(&gateway, &account, "flooded-answer").await;
    assert_eq!((row["status"].as_str(), row["amount"].as_str()), (Some("failed"), Some("0")), "{row}");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

/// A stream whose upstream sends one line without end: cut at the event limit, before any
/// output reached the client, so voided; the rest is not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_line_is_cut_without_reading_it_all() {
    let (gateway, account, key, taken) = flooded_gateway().await;
    let before = gateway.balance_of(&key).await;
    let body = json!({"model": "flooded-gpt", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "flood me"}]});
    let response = gateway.chat(&key, body, Some("flooded-stream")).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap_or_default();
    assert_flood_abandoned(&taken);
    assert!(!text.contains("[DONE]") && text.len() < 1024, "nothing of the endless line is relayed: {} bytes", text.len());
    assert_eq!(gateway.balance_of(&key).await, before, "nothing charged");
    assert_eq!(gateway.balance(&key).await["held"], "0");
    let row = usage_row(&gateway, &account, "flooded-stream").await;
    assert_eq!(row["status"], "failed", "{row}");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}
