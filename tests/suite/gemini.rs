//! Gemini clients (`/v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`)
//! through the gateway to Gemini upstreams — the mock, and the mock standing in for Google AI
//! Studio (kind `gemini`) and Vertex AI (kind `vertex`) — are charged exactly what
//! `usageMetadata` says, and errors come back in Google's shape.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::{ModelRoute, ProviderConfig};

use crate::common::*;

/// Nano-units per cached input token at the test prices (1.25 per million).
const CACHED_INPUT_NANOS: i64 = 1_250;

fn provider(name: &str, kind: &str, base_url: &str, api_key_env: &str) -> ProviderConfig {
    serde_json::from_value(json!({"name": name, "kind": kind, "base_url": base_url, "api_key_env": api_key_env})).unwrap()
}

/// Routes `demo-gemini` to the mock (kind `mock`), `google-flash` to the mock as Google AI
/// Studio and `vertex-flash` to it as Vertex AI (both as the upstream model `gemini-2.5-flash`);
/// `openai-gpt` to it as an OpenAI-protocol provider, which cannot serve a Gemini call.
fn gemini_routes(config: &mut GatewayConfig, api_key_env: &str) {
    let mock_root = config.providers[0].base_url.trim_end_matches("/v1").to_string();
    config.providers.push(provider("google", "gemini", &format!("{mock_root}/v1beta"), api_key_env));
    let vertex = format!("{mock_root}/v1/projects/tollgate-test/locations/us-central1/publishers/google");
    config.providers.push(provider("vertex", "vertex", &vertex, api_key_env));
    config.providers.push(provider("openai", "openai", &format!("{mock_root}/v1"), api_key_env));
    let route = |model: &str, provider: &str, upstream_model: Option<&str>| ModelRoute {
        model: model.into(),
        provider: provider.into(),
        upstream_model: upstream_model.map(str::to_string),
        ..ModelRoute::default()
    };
    config.models.push(route("demo-gemini", "mock", None));
    config.models.push(route("google-flash", "google", Some("gemini-2.5-flash")));
    config.models.push(route("vertex-flash", "vertex", Some("gemini-2.5-flash")));
    config.models.push(route("openai-gpt", "openai", None));
}

async fn start() -> (TestGateway, String) {
    let (variable, secret) = upstream_key_variable();
    let gateway = TestGateway::start_with(|config| gemini_routes(config, &variable)).await;
    gateway.set_prices(&[("demo-gemini", TIER)]).await;
    let prices: Vec<Value> = [("google", "google-flash"), ("vertex", "vertex-flash")]
        .iter()
        .map(|(provider, model)| json!({"provider": provider, "model": model, "customer_type": TIER,
            "input_per_mtok": INPUT_PER_MTOK, "output_per_mtok": OUTPUT_PER_MTOK, "cached_input_per_mtok": "1.25"}))
        .collect();
    gateway.admin_ok(reqwest::Method::PUT, "/internal/prices", Some(Value::Array(prices))).await;
    (gateway, secret)
}

/// The prompt tokens the mock reports for `gemini_body(text)`: its text parts, the system
/// instruction's included, as Python tiktoken counts them (a literal, not the gateway's count).
fn gemini_prompt_tokens(text: &str) -> u64 {
    tiktoken_text_tokens(text) + tiktoken_text_tokens("Answer briefly.")
}

fn gemini_body(text: &str) -> Value {
    json!({
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "systemInstruction": {"parts": [{"text": "Answer briefly."}]},
    })
}

/// A Gemini call authenticated the way the google-genai SDK does it (`x-goog-api-key`).
async fn gemini_call(gateway: &TestGateway, key: &str, model_method: &str, body: &Value) -> reqwest::Response {
    gateway
        .http
        .post(format!("{}/v1beta/models/{model_method}", gateway.url))
        .header("x-goog-api-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The account's usage rows once `count` of them are in the ledger (the worker may lag).
async fn usage_rows_at_least(gateway: &TestGateway, account_id: &str, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let statement = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account_id}/statement"), None).await;
        let rows: Vec<Value> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage").cloned().collect();
        if rows.len() >= count {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{count} usage rows never appeared for {account_id}");
}

/// The cost of a `usageMetadata` at the test prices, computed independently of the gateway.
fn metadata_cost(metadata: &Value) -> Money {
    let count = |name: &str| metadata.get(name).and_then(Value::as_u64).unwrap_or(0);
    let cached = count("cachedContentTokenCount");
    let input = count("promptTokenCount") - cached + count("toolUsePromptTokenCount");
    let output = count("candidatesTokenCount") + count("thoughtsTokenCount");
    let cached_cost = Money::from_nanos(i64::try_from(cached).unwrap() * CACHED_INPUT_NANOS);
    expected_cost(input, output).checked_add(cached_cost).unwrap()
}

/// The JSON of each `data:` event of an `alt=sse` body.
fn sse_chunks(body: &str) -> Vec<Value> {
    body.split("\r\n\r\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

fn google_error(body: &Value) -> (u64, &str, &str) {
    let error = &body["error"];
    (error["code"].as_u64().unwrap(), error["status"].as_str().unwrap(), error["details"][0]["metadata"]["code"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_content_is_charged_exactly_what_usage_metadata_says() {
    let (gateway, _) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let mut body = gemini_body("What is a ledger?");
    body["generationConfig"] = json!({"maxOutputTokens": 12, "temperature": 0});
    body["mock"] = json!({"thoughts_tokens": 30, "cached_tokens": 4});
    let response = gemini_call(&gateway, &key, "demo-gemini:generateContent", &body).await;
    assert_eq!(response.status(), 200);
    let cost = header_money(&response, "x-tollgate-cost");
    let balance_header = header_money(&response, "x-tollgate-balance");
    let reply: Value = response.json().await.unwrap();
    let metadata = &reply["usageMetadata"];
    assert_eq!(metadata["candidatesTokenCount"], 12);
    assert_eq!(metadata["thoughtsTokenCount"], 30);
    assert_eq!(metadata["cachedContentTokenCount"], 4);
    assert_eq!(cost, metadata_cost(metadata));
    let after = gateway.balance_of(&key).await;
    assert_eq!(before.checked_sub(after).unwrap(), cost, "X-Tollgate-Cost equals the balance change");
    assert_eq!(balance_header, after);
    let rows = usage_rows_at_least(&gateway, &account, 1).await;
    let prompt = gemini_prompt_tokens("What is a ledger?");
    assert_eq!(metadata["promptTokenCount"].as_u64(), Some(prompt), "usage passed on as the upstream sent it");
    assert_eq!((rows[0]["input_tokens"].as_u64(), rows[0]["cached_input_tokens"].as_u64()), (Some(prompt - 4), Some(4)));
    assert_eq!((rows[0]["output_tokens"].as_u64(), rows[0]["reasoning_tokens"].as_u64()), (Some(42), Some(30)));
    assert_eq!(rows[0]["usage_source"], "upstream");
    assert_eq!(rows[0]["model"], "demo-gemini");

    // A retry with the same request id is replayed, not charged again.
    let retry = |request_id: &'static str| {
        gateway.http.post(format!("{}/v1beta/models/demo-gemini:generateContent", gateway.url)).bearer_auth(&key).header("X-Request-ID", request_id).json(&body).send()
    };
    let first = retry("gemini-once").await.unwrap();
    assert_eq!(first.status(), 200);
    let first_body = first.text().await.unwrap();
    let replayed = retry("gemini-once").await.unwrap();
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.text().await.unwrap(), first_body);
    usage_rows_at_least(&gateway, &account, 2).await;
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_charged_from_its_final_usage_before_its_last_event_is_delivered() {
    let (gateway, _) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let before = gateway.balance_of(&key).await;
    let mut body = gemini_body("Stream please.");
    body["mock"] = json!({"output_tokens": 20, "thoughts_tokens": 7, "chunk_interval_ms": 2});
    // The key in the URL, as some Gemini clients send it.
    let response = gateway
        .http
        .post(format!("{}/v1beta/models/demo-gemini:streamGenerateContent?alt=sse&key={key}", gateway.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let chunks = sse_chunks(&response.text().await.unwrap());
    // Read once the stream is complete: the charge must already be there (I1).
    let after = gateway.balance_of(&key).await;
    assert_eq!(chunks.len(), 21, "20 content chunks and the finishing one");
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP", "the held-back last event was delivered");
    let content: String = chunks.iter().filter_map(|chunk| chunk["candidates"][0]["content"]["parts"][0]["text"].as_str()).collect();
    assert_eq!(content, " hello".repeat(20));
    let metadata = &last["usageMetadata"];
    assert_eq!((metadata["candidatesTokenCount"].as_u64(), metadata["thoughtsTokenCount"].as_u64()), (Some(20), Some(7)));
    assert_eq!(before.checked_sub(after).unwrap(), metadata_cost(metadata));
    let rows = usage_rows_at_least(&gateway, &account, 1).await;
    assert_eq!((rows[0]["status"].as_str(), rows[0]["usage_source"].as_str()), (Some("success"), Some("upstream")));
    assert_eq!(rows[0]["output_tokens"], 27);
    assert_eq!(gateway.balance(&key).await["held"], "0");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_upstream_is_charged_for_what_was_streamed() {
    let (gateway, _) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let prompt = gemini_prompt_tokens("Cut me short.");
    let before = gateway.balance_of(&key).await;
    let mut body = gemini_body("Cut me short.");
    body["mock"] = json!({"output_tokens": 50, "fail_after_chunks": 5});
    let response = gemini_call(&gateway, &key, "demo-gemini:streamGenerateContent?alt=sse", &body).await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8_lossy(&response.bytes().await.unwrap_or_default()).into_owned();
    assert_eq!(text.matches(" hello").count(), 5);
    assert!(!text.contains("finishReason"));
    let rows = usage_rows_at_least(&gateway, &account, 1).await;
    let cut = rows.iter().find(|row| row["status"] == "upstream_interrupted").unwrap_or_else(|| panic!("{rows:?}"));
    // The early chunks' prompt-only metadata is no usage report: their prompt count is kept,
    // the output is the tokenizer's count of what was relayed.
    assert_eq!(cut["usage_source"], "tokenizer");
    assert_eq!((cut["input_tokens"].as_u64(), cut["output_tokens"].as_u64()), (Some(prompt), Some(5)));
    let after = gateway.balance_of(&key).await;
    assert_eq!(before.checked_sub(after).unwrap(), expected_cost(prompt, 5));
    assert_eq!(gateway.balance(&key).await["held"], "0");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

/// Issue 19 item 2: a stream with an image, cut before its finishing chunk, is charged the
/// prompt count of the latest `usageMetadata` it carried (the mock counts the text alone), not
/// the gateway's estimate from above (the text plus the image's ceiling of 4,128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_keeps_the_prompt_count_its_chunks_reported() {
    let (gateway, _) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = gemini_body("What is in this picture?");
    body["contents"][0]["parts"].as_array_mut().unwrap().push(json!({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}));
    // The mock counts the text alone.
    let prompt = gemini_prompt_tokens("What is in this picture?");
    let before = gateway.balance_of(&key).await;
    body["mock"] = json!({"output_tokens": 50, "fail_after_chunks": 3});
    let response = gemini_call(&gateway, &key, "demo-gemini:streamGenerateContent?alt=sse", &body).await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8_lossy(&response.bytes().await.unwrap_or_default()).into_owned();
    assert!(!text.contains("finishReason"), "cut before the finish: {text}");
    let rows = usage_rows_at_least(&gateway, &account, 1).await;
    let cut = rows.iter().find(|row| row["status"] == "upstream_interrupted").unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!((cut["input_tokens"].as_u64(), cut["output_tokens"].as_u64()), (Some(prompt), Some(3)), "{cut}");
    assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), expected_cost(prompt, 3));
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_garbage_usage_metadata_is_billed_by_the_tokenizer() {
    let (gateway, _) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let prompt = gemini_prompt_tokens("Count me.");
    for mock in [json!({"omit_usage": true, "output_tokens": 6}), json!({"usage_override": {"promptTokenCount": -3, "candidatesTokenCount": "6"}, "output_tokens": 6})] {
        for model_method in ["demo-gemini:generateContent", "demo-gemini:streamGenerateContent?alt=sse"] {
            let before = gateway.balance_of(&key).await;
            let mut body = gemini_body("Count me.");
            body["mock"] = mock.clone();
            let response = gemini_call(&gateway, &key, model_method, &body).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            let after = gateway.balance_of(&key).await;
            assert_eq!(before.checked_sub(after).unwrap(), expected_cost(prompt, 6), "{model_method} {mock}");
        }
    }
    let rows = usage_rows_at_least(&gateway, &account, 4).await;
    let sources: Vec<&str> = rows.iter().map(|row| row["usage_source"].as_str().unwrap()).collect();
    assert_eq!(sources.iter().filter(|source| **source == "tokenizer").count(), 4, "{sources:?}");
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_ai_studio_and_vertex_ai_providers_get_their_own_credentials() {
    let (gateway, secret) = start().await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut body = gemini_body("Which provider?");
    // The mock refuses a call without the configured key, sent the provider's way
    // (AI Studio: x-goog-api-key; Vertex AI: Authorization: Bearer).
    body["mock"] = json!({"expect_api_key": secret, "output_tokens": 3});
    for model in ["google-flash", "vertex-flash"] {
        let before = gateway.balance_of(&key).await;
        let response = gemini_call(&gateway, &key, &format!("{model}:generateContent"), &body).await;
        assert_eq!(response.status(), 200, "{model}");
        let cost = header_money(&response, "x-tollgate-cost");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["modelVersion"], "gemini-2.5-flash", "the route's upstream model is in the upstream URL");
        assert_eq!(cost, metadata_cost(&reply["usageMetadata"]));
        assert_eq!(before.checked_sub(gateway.balance_of(&key).await).unwrap(), cost);

        let response = gemini_call(&gateway, &key, &format!("{model}:streamGenerateContent?alt=sse"), &body).await;
        assert_eq!(response.status(), 200, "{model} stream");
        let chunks = sse_chunks(&response.text().await.unwrap());
        assert_eq!(chunks.last().unwrap()["candidates"][0]["finishReason"], "STOP");
    }
    let rows = usage_rows_at_least(&gateway, &account, 4).await;
    let mut providers: Vec<&str> = rows.iter().map(|row| row["provider"].as_str().unwrap()).collect();
    providers.sort_unstable();
    assert_eq!(providers, ["google", "google", "vertex", "vertex"]);

    // An upstream refusing our credentials is a 502, in Google's shape, and not charged.
    let before = gateway.balance(&key).await;
    body["mock"] = json!({"expect_api_key": format!("not-{secret}")});
    let response = gemini_call(&gateway, &key, "vertex-flash:generateContent", &body).await;
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(google_error(&error), (502, "UNAVAILABLE", "upstream_error"));
    let after = gateway.balance(&key).await;
    assert_eq!((before["balance"].clone(), after["held"].clone()), (after["balance"].clone(), json!("0")));
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_back_in_google_error_shape_and_reach_no_upstream() {
    let (gateway, _) = start().await;
    let account = gateway.account("0.0002", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let upstream_before = gateway.upstream_requests().await;
    let body = gemini_body("Hello?");
    let post = |path: String, auth: Option<(&'static str, String)>| {
        let mut request = gateway.http.post(format!("{}{path}", gateway.url)).json(&body);
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        request.send()
    };
    let cases = [
        (post("/v1beta/models/demo-gemini:generateContent".into(), Some(("x-goog-api-key", "tg_wrong".into()))).await.unwrap(), 401, "UNAUTHENTICATED", "invalid_api_key"),
        (post("/v1beta/models/demo-gemini:generateContent".into(), None).await.unwrap(), 401, "UNAUTHENTICATED", "invalid_api_key"),
        (post("/v1beta/models/demo-gemini:generateContent?key=tg_wrong".into(), None).await.unwrap(), 401, "UNAUTHENTICATED", "invalid_api_key"),
        (post("/v1beta/models/no-such-model:generateContent".into(), Some(("x-goog-api-key", key.clone()))).await.unwrap(), 404, "NOT_FOUND", "model_not_found"),
        // A model routed to a provider that does not speak Gemini.
        (post("/v1beta/models/openai-gpt:generateContent".into(), Some(("x-goog-api-key", key.clone()))).await.unwrap(), 404, "NOT_FOUND", "model_not_found"),
        (post("/v1beta/models/demo-gemini:countTokens".into(), Some(("x-goog-api-key", key.clone()))).await.unwrap(), 404, "NOT_FOUND", "not_found"),
        (post("/v1beta/models/demo-gemini:streamGenerateContent".into(), Some(("x-goog-api-key", key.clone()))).await.unwrap(), 400, "INVALID_ARGUMENT", "invalid_request"),
    ];
    for (response, status, google_status, code) in cases {
        assert_eq!(response.status(), status);
        let error: Value = response.json().await.unwrap();
        assert_eq!(google_error(&error), (u64::from(status), google_status, code), "{error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
        if code == "invalid_request" {
            assert!(error["error"]["message"].as_str().unwrap().contains("alt=sse"), "{error}");
        }
    }
    // The hold is (maxOutputTokens + thinkingBudget) × candidateCount: eight candidates do not
    // fit in the balance.
    let mut many = body.clone();
    many["generationConfig"] = json!({"maxOutputTokens": 8, "candidateCount": 8, "thinkingConfig": {"thinkingBudget": 0}});
    let response = gateway.http.post(format!("{}/v1/models/demo-gemini:generateContent", gateway.url)).bearer_auth(&key).json(&many).send().await.unwrap();
    assert_eq!(response.status(), 402);
    let error: Value = response.json().await.unwrap();
    assert_eq!(google_error(&error), (402, "FAILED_PRECONDITION", "insufficient_balance"));
    assert_eq!(gateway.upstream_requests().await, upstream_before, "nothing refused reached the upstream");
    // One candidate fits, and is served under /v1 as well.
    many["generationConfig"] = json!({"maxOutputTokens": 8, "thinkingConfig": {"thinkingBudget": 0}});
    let response = gateway.http.post(format!("{}/v1/models/demo-gemini:generateContent", gateway.url)).bearer_auth(&key).json(&many).send().await.unwrap();
    assert_eq!(response.status(), 200);
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}

/// Gemini reports thinking on top of `maxOutputTokens` (I7): the hold covers the request's
/// thinking budget, or `limits.default_thinking_tokens` (32,768) where it sets none, and no
/// charge counts more output than the cap and the budget together, whatever the upstream says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_is_held_and_charged_within_its_budget() {
    let (gateway, _) = start().await;
    // 0.1 covers 50 output tokens and a budget of 100 (1,500 nano-units), not 32,768 of thinking
    // at 10 per million (0.33).
    let account = gateway.account("0.1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut unbudgeted = gemini_body("Think it over");
    unbudgeted["generationConfig"] = json!({"maxOutputTokens": 50});
    let refused = gemini_call(&gateway, &key, "demo-gemini:generateContent", &unbudgeted).await;
    assert_eq!(refused.status(), 402, "the default thinking budget is held");
    assert_eq!(gateway.upstream_requests().await, 0);

    let mut budgeted = gemini_body("Think it over");
    budgeted["generationConfig"] = json!({"maxOutputTokens": 50, "thinkingConfig": {"thinkingBudget": 100}});
    // An upstream that thinks past the budget it was sent.
    budgeted["mock"] = json!({"output_tokens": 20, "thoughts_tokens": 500});
    let response = gemini_call(&gateway, &key, "demo-gemini:generateContent", &budgeted).await;
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["usageMetadata"]["thoughtsTokenCount"], 500, "the upstream reported past the budget");
    let rows = usage_rows_at_least(&gateway, &account, 1).await;
    assert_eq!(rows[0]["output_tokens"].as_u64(), Some(150), "charged at most the cap and the budget: {}", rows[0]);
    assert_eq!(rows[0]["usage_source"], "adjusted");

    let mut malformed = gemini_body("x");
    malformed["generationConfig"] = json!({"thinkingConfig": {"thinkingBudget": -2}});
    let response = gemini_call(&gateway, &key, "demo-gemini:generateContent", &malformed).await;
    assert_eq!(response.status(), 400);
    gateway.assert_ledger_sound(&account).await;
    gateway.stop().await;
}
