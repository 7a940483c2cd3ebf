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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), seen)
}

/// An upstream that redirects (compromised, misconfigured, or a proxy in the way) gets no second
/// request sent where it points: reqwest's default policy follows up to ten hops and keeps
/// `x-api-key` / `x-goog-api-key` across hosts. The client gets 502, nothing is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_redirect_is_not_followed() {
    let (elsewhere, elsewhere_seen) = redirector("http://127.0.0.1:9".into()).await;
    let (upstream, upstream_seen) = redirector(elsewhere.clone()).await;
    let (variable, _) = upstream_key_variable();
    let gateway = TestGateway::start_with(|config| {
        let provider = json!({"name": "redirecting", "kind": "anthropic", "base_url": format!("{upstream}/v1"), "api_key_env": variable});
        config.providers.push(serde_json::from_value(provider).unwrap());
        config.models.push(serde_json::from_value(json!({"model": "redirected-claude", "provider": "redirecting"})).unwrap());
    })
    .await;
    let price = json!([{"provider": "redirecting", "model": "redirected-claude", "customer_type": TIER, "input_per_mtok": "2.5", "output_per_mtok": "10"}]);
    gateway.admin_ok(reqwest::Method::PUT, "/internal/prices", Some(price)).await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
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
